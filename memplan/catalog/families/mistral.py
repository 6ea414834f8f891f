"""Mistral (modeling_mistral.py): no biases; MistralConfig defaults num_key_value_heads to 8 and
sliding_window to 4096 (every layer slides)."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, attention_window, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    traits = Traits("MistralDecoderLayer", attn_dropout=attention_dropout(cfg), **attention_window(cfg, default=4096))
    return llama_like(cfg, kv_default=8, act=cfg.opt("hidden_act", "silu"), traits=traits)
