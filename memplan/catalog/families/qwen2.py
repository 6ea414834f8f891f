"""Qwen2 (modeling_qwen2.py): q/k/v carry a bias, o_proj does not; Qwen2Config defaults kv heads to 32."""

from __future__ import annotations

from memplan.catalog.families.common import llama_like
from memplan.catalog.spec import Arch, Cfg


def build(cfg: Cfg) -> Arch:
    return llama_like(cfg, kv_default=32, qkv_bias=True, act=cfg.opt("hidden_act", "silu"))
