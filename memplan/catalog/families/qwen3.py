"""Qwen3 (modeling_qwen3.py): Qwen2's layer without the q/k/v biases (attention_bias, off by default, sets
all four projections' biases) and with an RMSNorm over each head's head_dim on q and k before the rotary
(q_norm / k_norm); head_dim is its own key (default 128), kv heads default 32, embeddings untied by default.
The window follows Qwen2's rules (use_sliding_window, max_window_layers), and a model with any sliding layer
builds both masks."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, llama_like
from memplan.catalog.families.qwen2 import qwen_window
from memplan.catalog.spec import Arch, Cfg, Traits


# attention_dropout: the config class's default (0.0). With dropout > 0 the CPU SDPA path runs its math kernel
# (it keeps the s x s probabilities); CUDA's fused SDPA kernels keep none (LayerReplay.attention_kernel).
def build(cfg: Cfg) -> Arch:
    window = qwen_window(cfg)
    masks = ("full_attention", "sliding_attention") if "sliding_attention" in window["layer_types"] else ()
    traits = Traits("Qwen3DecoderLayer", attn_dropout=attention_dropout(cfg), qk_norm="head", mask_kinds=masks,
                    **window)
    bias = cfg.flag("attention_bias", False)
    return llama_like(cfg, kv_default=32, head_dim_default=128, qkv_bias=bias, o_bias=bias,
                      act=cfg.opt("hidden_act", "silu"), traits=traits)
