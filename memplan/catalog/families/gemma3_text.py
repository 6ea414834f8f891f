"""Gemma-3's text model (modeling_gemma3.py, Gemma3ForCausalLM with a Gemma3TextConfig): Gemma-2's four
(1 + w) RMSNorms per layer, plus a (1 + w) RMSNorm over each head's head_dim on q and k before the rotary.
kv heads default 4, head_dim 256, activation key ``hidden_activation``, embeddings tied by default.
Layers slide (window 4096 by default) except every sliding_window_pattern-th (6: five local to one global),
unless config.layer_types lists them; the model builds both masks and one rotary table per attention kind
(local and global bases). Gemma3Attention passes no soft-capping to the attention function, so
attn_logit_softcapping never applies and SDPA is supported; final_logit_softcapping defaults to None."""

from __future__ import annotations

from memplan.catalog.families.common import TWO_NORMS, attention_dropout, attention_window, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits

# Gemma3TextConfig's defaults for keys the Hub config.json files of Gemma-3 4B/12B/27B leave out of their
# text_config (configuration_gemma3.py: vocab_size=262_208, num_attention_heads=8)
DEFAULTS = {"vocab_size": 262_208, "num_attention_heads": 8}


# attention_dropout: the config class's default (0.0). With dropout > 0 the CPU SDPA path runs its math kernel
# (it keeps the s x s probabilities); CUDA's fused SDPA kernels keep none (LayerReplay.attention_kernel).
def build(cfg: Cfg) -> Arch:
    cfg = Cfg({**cfg.c, **{k: v for k, v in DEFAULTS.items() if cfg.c.get(k) is None}}, cfg.name, cfg.model_type)
    pattern = int(cfg.opt("sliding_window_pattern", 6))
    window = attention_window(cfg, default=4096, sliding=lambda i: (i + 1) % pattern != 0)
    traits = Traits(
        "Gemma3DecoderLayer", norm="rms_gemma", sandwich_norms=True, qk_norm="head",
        final_softcap=cfg.opt("final_logit_softcapping", None), attn_dropout=attention_dropout(cfg),
        mask_kinds=("full_attention", "sliding_attention"), rotary_tables=len(set(window["layer_types"])),
        **window,
    )
    bias = cfg.flag("attention_bias", False)
    return llama_like(cfg, kv_default=4, head_dim_default=256, qkv_bias=bias, o_bias=bias,
                      act=cfg.opt("hidden_activation", "gelu_pytorch_tanh"), tie_default=True,
                      norms=TWO_NORMS + ["pre_feedforward_layernorm", "post_feedforward_layernorm"], traits=traits)
