"""Qwen2 (modeling_qwen2.py): q/k/v carry a bias, o_proj does not; Qwen2Config defaults kv heads to 32,
and slides (window 4096) only with use_sliding_window, from layer max_window_layers (28) on."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, attention_window, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits


def build(cfg: Cfg) -> Arch:
    traits = Traits("Qwen2DecoderLayer", attn_dropout=attention_dropout(cfg), **qwen_window(cfg))
    return llama_like(cfg, kv_default=32, qkv_bias=True, act=cfg.opt("hidden_act", "silu"), traits=traits)


def qwen_window(cfg: Cfg, max_window_layers: int = 28) -> dict:
    """Qwen2Config: sliding_window only with use_sliding_window; layers from max_window_layers (the config
    class's default: ``max_window_layers``) on slide."""
    if not cfg.flag("use_sliding_window", False):
        return dict(sliding_window=None, layer_types=("full_attention",) * cfg.req("num_hidden_layers"))
    first = int(cfg.opt("max_window_layers", max_window_layers))
    return attention_window(cfg, default=4096, sliding=lambda i: i >= first)
