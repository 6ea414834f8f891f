"""SmolLM3 (modeling_smollm3.py): Llama's layer, but some layers skip the rotary (NoPE): config.no_rope_layers
holds 1 where a layer applies it, by default every layer but each no_rope_layer_interval-th (4). With
use_sliding_window and a window, the NoPE layers slide (unless config.layer_types lists the kinds).
attention_bias sets all four projections' biases, mlp_bias the MLP's; kv heads default 4; embeddings tied
by default."""

from __future__ import annotations

from memplan.catalog.families.common import attention_dropout, llama_like
from memplan.catalog.spec import Arch, Cfg, Traits
from memplan.errors import UserError


# attention_dropout: the config class's default (0.0). With dropout > 0 the CPU SDPA path runs its math kernel
# (it keeps the s x s probabilities); CUDA's fused SDPA kernels keep none (LayerReplay.attention_kernel).
def build(cfg: Cfg) -> Arch:
    layers = cfg.req("num_hidden_layers")
    rope = _rope_layers(cfg, layers)
    window = cfg.opt("sliding_window", None) if cfg.flag("use_sliding_window", False) else None
    given = cfg.c.get("layer_types")
    if isinstance(given, list) and len(given) == layers:
        kinds = tuple(str(k) for k in given)
    else:
        kinds = tuple("sliding_attention" if window and not r else "full_attention" for r in rope)
    traits = Traits("SmolLM3DecoderLayer", attn_dropout=attention_dropout(cfg), sliding_window=window,
                    layer_types=kinds, rope_layers=rope)
    bias = cfg.flag("attention_bias", False)
    return llama_like(cfg, kv_default=4, qkv_bias=bias, o_bias=bias, mlp_bias=cfg.flag("mlp_bias", False),
                      act=cfg.opt("hidden_act", "silu"), tie_default=True, traits=traits)


def _rope_layers(cfg: Cfg, layers: int) -> tuple[bool, ...]:
    """SmolLM3Config: no_rope_layers as given (1 = the layer applies the rotary), else every layer but each
    no_rope_layer_interval-th."""
    given = cfg.c.get("no_rope_layers")
    if given is None:
        interval = cfg.opt_int("no_rope_layer_interval", 4)
        return tuple((i + 1) % interval != 0 for i in range(layers))
    if not isinstance(given, list) or len(given) < layers:
        raise UserError(f"{cfg.name}: config key 'no_rope_layers' must list 0 or 1 for each of the "
                        f"{layers} layers, got {given!r}")
    return tuple(bool(v) for v in given[:layers])
