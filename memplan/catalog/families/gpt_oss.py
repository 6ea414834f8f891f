"""GPT-OSS (modeling_gpt_oss.py): every layer is a mixture of experts, with attention sinks.

- attention: q/k/v/o with biases (attention_bias, default True), 64 heads of head_dim 64 and 8 kv heads by
  default, and ``sinks``, one learned logit per head that eager_attention_forward concatenates to the scores
  before the softmax; layers alternate sliding-window (128) and full attention (config.layer_types; the
  model builds both masks every forward). GptOssPreTrainedModel has no SDPA path (_supports_sdpa = False):
  transformers runs it eager (or a flash kernel that takes the sinks).
- GptOssMLP: GptOssTopKRouter (weight experts x hidden and a bias; top-k of the logits, softmax over those)
  and GptOssExperts, fused stacks stored transposed: gate_up_proj (E, hidden, 2 x intermediate) with
  gate_up_proj_bias (E, 2 x intermediate), down_proj (E, intermediate, hidden) with down_proj_bias (E, hidden);
  _apply_gate is a clamped SwiGLU (swiglu_limit 7, swiglu_alpha 1.702).
- GptOssRMSNorm multiplies by its weight in fp32; the rotary cos/sin are head_dim / 2 wide.

peft's target_modules reach only the attention projections (the router is not an nn.Linear, and
GptOssExperts' stacks get no MoE conversion in peft), so "all-linear" means q/k/v/o_proj here.

The released checkpoints store the expert stacks in MXFP4; fine-tuning loads them dequantized to bf16
(transformers' Mxfp4Config(dequantize=True)). memplan counts every weight in the plan's dtype, i.e. bf16
experts, which is what such a training run holds.
"""

from __future__ import annotations

from memplan.catalog.families.common import (
    TWO_NORMS,
    attention_dropout,
    attention_window,
    lin,
    rotary_attention,
    rotary_dims,
)
from memplan.catalog.spec import Arch, Cfg, ParamItem, Traits

ROUTER = "router"
EXPERT_STACKS = ("experts.gate_up_proj", "experts.down_proj")


def build(cfg: Cfg) -> Arch:
    d = rotary_dims(cfg, kv_default=8, head_dim_default=64)
    experts = cfg.opt_int("num_local_experts", 128)
    top_k = cfg.opt_int("num_experts_per_tok", 4)
    hidden, inter, heads = d["hidden"], d["inter"], d["heads"]
    bias = cfg.flag("attention_bias", True)
    linears = rotary_attention(hidden, heads, d["kv_heads"], d["head_dim"], bias, bias)
    linears += [
        lin("mlp.router", hidden, experts, True, kind="router"),
        lin("mlp.experts.gate_up_proj", hidden, 2 * inter, False, experts, kind="experts"),
        lin("mlp.experts.down_proj", inter, hidden, False, experts, kind="experts"),
    ]
    extra = [
        ParamItem("self_attn.sinks", heads, "heads (one sink logit per head)"),
        ParamItem("mlp.experts.gate_up_proj_bias", experts * 2 * inter, "experts x 2 x intermediate"),
        ParamItem("mlp.experts.down_proj_bias", experts * hidden, "experts x hidden"),
    ]
    traits = Traits(
        "GptOssDecoderLayer", norm="rms_fp32_weight", sdpa=False, attn_dropout=attention_dropout(cfg),
        mask_kinds=("full_attention", "sliding_attention"), role_names=(("router", ROUTER),),
        q_contiguous=True, attn_sinks=True, expert_bias=True,
        expert_glu_limit=float(cfg.opt("swiglu_limit", 7.0)), router_topk_first=True, rotary_half_cos=True,
        experts_transposed=True, lora_unreachable=(ROUTER, *EXPERT_STACKS), flash=False,
        **attention_window(cfg, default=128, sliding=lambda i: (i + 1) % 2 == 1),
    )
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=linears, layer_norms=list(TWO_NORMS), experts=experts, top_k=top_k, traits=traits,
                layer_extra=extra)
