"""Qwen2-MoE (modeling_qwen2_moe.py): Qwen2 attention (q/k/v bias with ``qkv_bias``, default true) and
Qwen2MoeSparseMoeBlock on layers whose index is not in ``mlp_only_layers`` and (index + 1) is a multiple of
``decoder_sparse_step``; the others get a dense Qwen2MoeMLP of ``intermediate_size``. The sparse block is the
router ``gate`` (num_experts x hidden), the fused experts gate_up_proj (E, 2 x moe_intermediate_size,
hidden) and down_proj (E, hidden, moe_intermediate_size), a shared expert MLP of
``shared_expert_intermediate_size`` and its ``shared_expert_gate`` (hidden -> 1, a sigmoid scale)."""

from __future__ import annotations

from memplan.catalog.families.common import (
    TWO_NORMS,
    attention_dropout,
    attention_window,
    gated_mlp,
    lin,
    rotary_attention,
    rotary_dims,
)
from memplan.catalog.spec import Arch, Cfg, Linear, OtherLayers, Traits

# peft's _MOE_TARGET_MODULE_MAPPING["qwen2_moe"], which peft applies to the model types transformers maps to
# that pattern (qwen2_moe itself from peft 0.22, qwen3_moe, deepseek_v2, deepseek_v3, ...): the router, and the
# expert projections' names -> the fused stacks
QWEN2_MOE_PEFT_TARGETS = (("gate", "gate"), ("gate_proj", "experts.gate_up_proj"),
                          ("up_proj", "experts.gate_up_proj"), ("down_proj", "experts.down_proj"))


def build(cfg: Cfg) -> Arch:
    d = rotary_dims(cfg, kv_default=16)
    hidden, layers = d["hidden"], d["layers"]
    experts, top_k = int(cfg.opt("num_experts", 60)), cfg.opt_int("num_experts_per_tok", 4)  # 0: every layer dense
    moe_inter, shared = cfg.opt_int("moe_intermediate_size", 1408), cfg.opt_int("shared_expert_intermediate_size", 5632)
    attention = rotary_attention(hidden, d["heads"], d["kv_heads"], d["head_dim"], cfg.flag("qkv_bias", True), False)
    dense = dense_layers(cfg, layers, experts)
    dense_inter, d["inter"] = d["inter"], moe_inter  # the main (sparse) layers' MLP width is the experts'

    traits = Traits("Qwen2MoeDecoderLayer", attn_dropout=attention_dropout(cfg), **moe_window(cfg),
                    expert_rank_mult=(2, 1),  # peft doubles the fused gate_up stack's rank (see mixtral.py)
                    moe_norm_topk=cfg.flag("norm_topk_prob", False),
                    # Qwen2MoeTopKRouter: router_top_value.to(router_logits.dtype)
                    moe_weights_fp32=False, shared_expert_gate=True, peft_expert_targets=QWEN2_MOE_PEFT_TARGETS)
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=attention + moe_block(hidden, experts, moe_inter, shared), layer_norms=list(TWO_NORMS),
                experts=experts, top_k=top_k, shared_ffn=shared, traits=traits,
                other_layers=[OtherLayers(dense, attention + gated_mlp(hidden, dense_inter, False), dense_inter)])


def moe_window(cfg: Cfg) -> dict:
    """Qwen2MoeConfig.__post_init__: with use_sliding_window, the even layers below max_window_layers (28)
    slide (window sliding_window, 4096); without it every layer is full."""
    if not cfg.flag("use_sliding_window", False):
        return dict(sliding_window=None, layer_types=("full_attention",) * cfg.req("num_hidden_layers"))
    below = int(cfg.opt("max_window_layers", 28))
    return attention_window(cfg, default=4096, sliding=lambda i: i % 2 == 0 and i < below)


def dense_layers(cfg: Cfg, layers: int, experts: int) -> tuple[int, ...]:
    """The dense layers' indices: in mlp_only_layers, or (index + 1) not a multiple of decoder_sparse_step
    (Qwen2MoeDecoderLayer.__init__); all of them without experts."""
    only = set(cfg.int_list("mlp_only_layers"))
    step = cfg.opt_int("decoder_sparse_step", 1)
    return tuple(i for i in range(layers) if i in only or experts == 0 or (i + 1) % step)


def moe_block(hidden: int, experts: int, inter: int, shared: int) -> list[Linear]:
    """Qwen2MoeSparseMoeBlock's weights in module order: gate, experts, shared_expert, shared_expert_gate."""
    return [
        lin("mlp.gate", hidden, experts, False, kind="router"),
        lin("mlp.experts.gate_up_proj", hidden, 2 * inter, False, experts, kind="experts"),
        lin("mlp.experts.down_proj", inter, hidden, False, experts, kind="experts"),
        *gated_mlp(hidden, shared, False, prefix="mlp.shared_expert"),
        lin("mlp.shared_expert_gate", hidden, 1, False),
    ]
