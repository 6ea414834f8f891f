"""Llama (modeling_llama.py): attention_bias on q/k/v/o, mlp_bias on the MLP, kv heads default = heads."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    attn_bias = cfg.flag("attention_bias", False)
    return llama_like(cfg, kv_default=None, qkv_bias=attn_bias, o_bias=attn_bias,
                      mlp_bias=cfg.flag("mlp_bias", False), act=cfg.opt("hidden_act", "silu"),
                      traits=Traits("LlamaDecoderLayer", attn_dropout=attention_dropout(cfg)))
