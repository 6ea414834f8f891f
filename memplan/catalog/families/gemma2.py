"""Gemma-2 (modeling_gemma2.py): like Gemma but four RMSNorms per layer (pre/post attention and
pre/post feed-forward), kv heads default 4, activation key ``hidden_activation``."""

from __future__ import annotations

from memplan.catalog.families.common import TWO_NORMS, llama_like
from memplan.catalog.spec import Arch, Cfg


def build(cfg: Cfg) -> Arch:
    bias = cfg.flag("attention_bias", False)
    return llama_like(cfg, kv_default=4, head_dim_default=256, qkv_bias=bias, o_bias=bias,
                      act=cfg.opt("hidden_activation", "gelu_pytorch_tanh"), tie_default=True,
                      norms=TWO_NORMS + ["pre_feedforward_layernorm", "post_feedforward_layernorm"])
