"""Qwen3-MoE (modeling_qwen3_moe.py): Qwen3 attention (no q/k/v bias unless attention_bias; an RMSNorm over the
head dim on q and on k, q_norm and k_norm, before the rotary embedding) and Qwen3MoeSparseMoeBlock: the
router ``gate`` and the fused experts (moe_intermediate_size), no shared expert; layers in mlp_only_layers
(or off the decoder_sparse_step) get a dense Qwen3MoeMLP of intermediate_size. Every layer slides
(window sliding_window) only with use_sliding_window."""

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
from memplan.catalog.families.qwen2_moe import QWEN2_MOE_PEFT_TARGETS, dense_layers
from memplan.catalog.spec import Arch, Cfg, OtherLayers, Traits


def build(cfg: Cfg) -> Arch:
    d = rotary_dims(cfg, kv_default=4)
    hidden, hd = d["hidden"], d["head_dim"]
    experts, top_k = int(cfg.opt("num_experts", 128)), cfg.opt_int("num_experts_per_tok", 8)
    moe_inter = cfg.opt_int("moe_intermediate_size", 768)
    bias = cfg.flag("attention_bias", False)
    attention = rotary_attention(hidden, d["heads"], d["kv_heads"], hd, bias, bias)
    dense = dense_layers(cfg, d["layers"], experts)
    dense_inter, d["inter"] = d["inter"], moe_inter  # the sparse layers' MLP width is the experts'
    window = attention_window(cfg, default=4096) if cfg.flag("use_sliding_window", False) else {}
    traits = Traits("Qwen3MoeDecoderLayer", attn_dropout=attention_dropout(cfg), expert_rank_mult=(2, 1),
                    moe_norm_topk=cfg.flag("norm_topk_prob", False),
                    moe_weights_fp32=False,  # Qwen3MoeTopKRouter: router_top_value.to(router_logits.dtype)
                    peft_expert_targets=QWEN2_MOE_PEFT_TARGETS, qk_norm="head", **window)
    moe = [
        lin("mlp.gate", hidden, experts, False, kind="router"),
        lin("mlp.experts.gate_up_proj", hidden, 2 * moe_inter, False, experts, kind="experts"),
        lin("mlp.experts.down_proj", moe_inter, hidden, False, experts, kind="experts"),
    ]
    # q_norm / k_norm (head_dim each) are counted from Traits.qk_norm
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=attention + moe, layer_norms=list(TWO_NORMS), experts=experts, top_k=top_k, traits=traits,
                other_layers=[OtherLayers(dense, attention + gated_mlp(hidden, dense_inter, False), dense_inter)])
