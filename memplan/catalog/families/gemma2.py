"""Gemma-2 (modeling_gemma2.py): like Gemma but four RMSNorms per layer (pre/post attention and
pre/post feed-forward), kv heads default 4, activation key ``hidden_activation``; soft-capped attention
(50) and final logits (30), hence no SDPA path (Gemma2PreTrainedModel._supports_sdpa = False); layers
alternate sliding (window 4096) and full attention, and the model builds both masks every forward."""

from __future__ import annotations

from memplan.catalog.families.common import TWO_NORMS, attention_dropout, attention_window, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    bias = cfg.flag("attention_bias", False)
    traits = Traits(
        "Gemma2DecoderLayer", norm="rms_gemma", sandwich_norms=True, sdpa=False,
        attn_softcap=cfg.opt("attn_logit_softcapping", 50.0), final_softcap=cfg.opt("final_logit_softcapping", 30.0),
        attn_dropout=attention_dropout(cfg), mask_kinds=("full_attention", "sliding_attention"),
        **attention_window(cfg, default=4096, sliding=lambda i: (i + 1) % 2 == 1),
    )
    return llama_like(cfg, kv_default=4, head_dim_default=256, qkv_bias=bias, o_bias=bias,
                      act=cfg.opt("hidden_activation", "gelu_pytorch_tanh"), tie_default=True,
                      norms=TWO_NORMS + ["pre_feedforward_layernorm", "post_feedforward_layernorm"], traits=traits)
