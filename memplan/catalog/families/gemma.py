"""Gemma (modeling_gemma.py): head_dim defaults to 256, kv heads to 16, embeddings tied by default;
legacy ``hidden_act="gelu"`` is read as gelu_pytorch_tanh (configuration_gemma.py)."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    bias = cfg.flag("attention_bias", False)
    act = cfg.opt("hidden_act", "gelu_pytorch_tanh")
    return llama_like(cfg, kv_default=16, head_dim_default=256, qkv_bias=bias, o_bias=bias,
                      act="gelu_pytorch_tanh" if act == "gelu" else act, tie_default=True,
                      traits=Traits("GemmaDecoderLayer", norm="rms_gemma", attn_dropout=attention_dropout(cfg)))
