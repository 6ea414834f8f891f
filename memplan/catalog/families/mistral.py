"""Mistral (modeling_mistral.py): no biases; MistralConfig defaults num_key_value_heads to 8."""

from __future__ import annotations

from memplan.catalog.families.common import llama_like
from memplan.catalog.spec import Arch, Cfg


def build(cfg: Cfg) -> Arch:
    return llama_like(cfg, kv_default=8, act=cfg.opt("hidden_act", "silu"))
