"""Mixtral (modeling_mixtral.py): Mistral attention plus MixtralSparseMoeBlock = router ``gate``
(weight num_experts x hidden, no bias) and MixtralExperts with fused parameters
gate_up_proj (E, 2*intermediate, hidden) and down_proj (E, hidden, intermediate)."""

from __future__ import annotations

from memplan.catalog.families.common import (
    TWO_NORMS,
    attention_dropout,
    attention_window,
    lin,
    rotary_attention,
    rotary_dims,
)
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    d = rotary_dims(cfg, kv_default=8)
    experts = cfg.opt_int("num_local_experts", 8)
    top_k = cfg.opt_int("num_experts_per_tok", 2)
    hidden, inter = d["hidden"], d["inter"]
    linears = rotary_attention(hidden, d["heads"], d["kv_heads"], d["head_dim"], False, False)
    linears += [
        lin("mlp.gate", hidden, experts, False, kind="router"),
        lin("mlp.experts.gate_up_proj", hidden, 2 * inter, False, experts, kind="experts"),
        lin("mlp.experts.down_proj", inter, hidden, False, experts, kind="experts"),
    ]
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=linears, layer_norms=list(TWO_NORMS), experts=experts, top_k=top_k, traits=Traits(
                    "MixtralDecoderLayer", attn_dropout=attention_dropout(cfg),
                    # peft's MoE conversion gives the fused gate_up_proj stack rank r * 2 (w1 and w3;
                    # utils/transformers_weight_conversion.py _convert_peft_config_moe: rank_pattern)
                    expert_rank_mult=(2, 1), **attention_window(cfg, default=None),
                    # peft _MOE_TARGET_MODULE_MAPPING["mixtral"]: the router and w1/w3/w2 (transformers 4 names)
                    peft_expert_targets=(("gate", "gate"), ("w1", "experts.gate_up_proj"),
                                         ("w3", "experts.gate_up_proj"), ("w2", "experts.down_proj"))))
