"""Llama 4's text model (model_type llama4_text, Llama4ForCausalLM in modeling_llama4.py).

- attention: q/k/v/o (attention_bias, default False), 40 heads of head_dim 128 and 8 kv heads by default.
  Layers with rotary (no_rope_layers[i] = 1; by default every layer but each no_rope_layer_interval-th)
  apply it on complex numbers (freqs_cis, complex64) and then, with use_qk_norm, a weightless RMS norm to
  q and k (Llama4TextWeightlessRMSNorm, no parameters); they attend in chunks (attention_chunk_size 8192,
  layer_types "chunked_attention"). The other layers (NoPE) attend over everything and, with
  attn_temperature_tuning, scale q by log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1.
- Llama4TextMoe: Llama4Router (an nn.Linear hidden -> experts without bias; sigmoid of the top-k logits),
  Llama4TextExperts with fused stacks stored transposed, gate_up_proj (E, hidden, 2 x intermediate) and
  down_proj (E, intermediate, hidden), which every token passes through (scaled by its router score, zero
  outside its top-k), and a shared expert, a LlamaMLP of intermediate_size.
- Llama4TextRMSNorm as LlamaRMSNorm; eager softmax in the scores' dtype.

Layers are MoE where config.moe_layers says (default: every interleave_moe_layer_step-th layer, from index
step - 1; Llama-4-Scout's text model: step 1, every layer; Maverick's: step 2, the odd layers). The others
(Llama4TextDecoderLayer.__init__) get a dense Llama4TextMLP of intermediate_size_mlp (default 16384) as
their feed_forward, a layer group of their own.
peft's target_modules reach the attention, the shared expert and the dense MLPs: "all-linear" also wraps the
router, whose forward returns a tuple that peft's LoRA layer cannot add to (peft 0.21, 0.22), and the expert stacks
are not modules, so neither is a LoRA target here.
"""

from __future__ import annotations

from memplan.catalog.families.common import TWO_NORMS, attention_dropout, gated_mlp, lin, rotary_attention, rotary_dims
from memplan.catalog.spec import Arch, Cfg, OtherLayers, Traits

ROUTER = "router"
EXPERT_STACKS = ("experts.gate_up_proj", "experts.down_proj")


def build(cfg: Cfg) -> Arch:
    d = rotary_dims(cfg, kv_default=8, head_dim_default=128)
    layers, hidden, inter = d["layers"], d["hidden"], d["inter"]
    experts = cfg.opt_int("num_local_experts", 16)
    step = cfg.opt_int("interleave_moe_layer_step", 1)
    given = cfg.opt("moe_layers", None)  # Llama4TextConfig.__post_init__: moe_layers when set, else the step
    moe = set(range(step - 1, layers, step) if given is None else given)
    dense = tuple(i for i in range(layers) if i not in moe)
    dense_inter = cfg.opt_int("intermediate_size_mlp", 16384)
    bias = cfg.flag("attention_bias", False)
    attention = rotary_attention(hidden, d["heads"], d["kv_heads"], d["head_dim"], bias, bias)
    linears = attention + [lin("feed_forward.router", hidden, experts, False)]
    linears += [lin(f"feed_forward.shared_expert.{x.path.split('.')[-1]}", x.d_in, x.d_out, False)
                for x in gated_mlp(hidden, inter, False)]
    linears += [
        lin("feed_forward.experts.gate_up_proj", hidden, 2 * inter, False, experts, kind="experts"),
        lin("feed_forward.experts.down_proj", inter, hidden, False, experts, kind="experts"),
    ]
    return Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                linears=linears, layer_norms=list(TWO_NORMS), experts=experts,
                top_k=cfg.opt_int("num_experts_per_tok", 1), traits=_traits(cfg, layers),
                other_layers=[OtherLayers(dense, attention + gated_mlp(hidden, dense_inter, False, "feed_forward"),
                                          dense_inter)])


def _traits(cfg: Cfg, layers: int) -> Traits:
    """Per-layer rotary / NoPE and attention kinds as Llama4TextConfig.__post_init__ fills them."""
    interval = cfg.opt_int("no_rope_layer_interval", 4)
    rope = cfg.opt("no_rope_layers", None) or [int((i + 1) % interval != 0) for i in range(layers)]
    chunk = cfg.opt("attention_chunk_size", 8192) if "attention_chunk_size" in cfg.c else 8192
    chunk = int(chunk) if chunk else None
    given = cfg.c.get("layer_types")
    if isinstance(given, list) and len(given) == layers:
        kinds = tuple(str(k) for k in given)
    else:
        kinds = tuple("chunked_attention" if r and chunk is not None else "full_attention" for r in rope)
    return Traits(
        "Llama4TextDecoderLayer", attn_dropout=attention_dropout(cfg), layer_types=kinds,
        role_names=(("router", ROUTER),), softmax_fp32=False, experts_transposed=True,
        lora_unreachable=(ROUTER, *EXPERT_STACKS), rope_layers=tuple(bool(r) for r in rope),
        qk_weightless_norm=cfg.flag("use_qk_norm", True), attn_temperature=cfg.flag("attn_temperature_tuning", True),
        rotary_complex=True, attention_chunk_size=chunk, experts_every_token=True, flash=False,
    )
