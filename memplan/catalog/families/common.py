"""Pieces several families share: peft-style Linear naming, the rotary attention of LlamaAttention and its
copies, LlamaMLP, and the llama-like builder (rotary, RMSNorm, token embeddings only) other families extend."""

from __future__ import annotations

from collections.abc import Callable

from memplan.catalog.spec import Arch, Cfg, Linear, ParamItem, Traits, norm_item

TWO_NORMS = ["input_layernorm", "post_attention_layernorm"]


def lin(path: str, d_in: int, d_out: int, bias: bool, count: int = 1, kind: str = "linear") -> Linear:
    """A Linear named as peft matches it: the last path component, or for fused expert
    parameters the last two (``experts.gate_up_proj``, as in peft's ``target_parameters``)."""
    parts = path.split(".")
    name = ".".join(parts[-2:]) if kind == "experts" else parts[-1]
    return Linear(name, d_in, d_out, bias, count, path, kind)


def rotary_attention(hidden: int, heads: int, kv: int, hd: int, qkv_bias: bool, o_bias: bool) -> list[Linear]:
    """q/k/v/o projections of LlamaAttention and its copies (modeling_llama.py, _mistral, _qwen2,
    _gemma, _gemma2): q: hidden -> heads*head_dim, k/v: hidden -> kv_heads*head_dim, o: back."""
    return [
        lin("self_attn.q_proj", hidden, heads * hd, qkv_bias),
        lin("self_attn.k_proj", hidden, kv * hd, qkv_bias),
        lin("self_attn.v_proj", hidden, kv * hd, qkv_bias),
        lin("self_attn.o_proj", heads * hd, hidden, o_bias),
    ]


def gated_mlp(hidden: int, inter: int, bias: bool, prefix: str = "mlp") -> list[Linear]:
    """LlamaMLP: gate_proj, up_proj (hidden -> intermediate) and down_proj (back), under ``prefix``."""
    return [
        lin(f"{prefix}.gate_proj", hidden, inter, bias),
        lin(f"{prefix}.up_proj", hidden, inter, bias),
        lin(f"{prefix}.down_proj", inter, hidden, bias),
    ]


def rotary_dims(cfg: Cfg, *, kv_default: int | None, head_dim_default: int | None = None) -> dict:
    """Shared dimensions of the rotary, RMSNorm, token-embedding-only families, as Arch fields;
    ``kv_default`` None means num_key_value_heads defaults to num_attention_heads."""
    vocab = cfg.req("vocab_size")
    hidden = cfg.req("hidden_size")
    layers = cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    kv = cfg.opt_int("num_key_value_heads", kv_default if kv_default is not None else heads)
    hd = cfg.head_dim(hidden, heads, head_dim_default)
    inter = cfg.req("intermediate_size")
    return dict(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=hd, inter=inter,
        gated=True, norm="rms", norm_params=hidden, positions=0, layer_prefix="model.layers",
        embedding=[ParamItem("model.embed_tokens", vocab * hidden, "vocab x hidden")],
        final=[norm_item("model.norm", hidden, hidden)], lm_head_in=hidden,
    )


def attention_window(cfg: Cfg, *, default: int | None, sliding: Callable[[int], bool] = lambda i: True) -> dict:
    """``sliding_window`` and ``layer_types`` Traits fields as the config class fills them: the window
    (``default`` when the key is absent), and config.layer_types when it lists every layer, else
    ``sliding(i)`` for layer i (every layer slides when a window is set, unless the family says otherwise)."""
    window = cfg.opt("sliding_window", default) if "sliding_window" in cfg.c else default
    window = int(window) if window else None
    layers = cfg.req("num_hidden_layers")
    given = cfg.c.get("layer_types")
    if isinstance(given, list) and len(given) == layers:
        kinds = tuple(str(k) for k in given)
    elif window is None:
        kinds = ("full_attention",) * layers
    else:
        kinds = tuple("sliding_attention" if sliding(i) else "full_attention" for i in range(layers))
    return dict(sliding_window=window, layer_types=kinds)


def llama_like(
    cfg: Cfg, *, kv_default: int | None, head_dim_default: int | None = None, qkv_bias: bool = False,
    o_bias: bool = False, mlp_bias: bool = False, act: str, tie_default: bool = False,
    norms: list[str] = TWO_NORMS, traits: Traits,
) -> Arch:
    """A LlamaDecoderLayer stack: rotary attention, gated MLP, ``norms`` RMSNorms per layer; ``act`` is the
    activation as read from the config, the lm_head untied unless ``tie_word_embeddings`` (default
    ``tie_default``)."""
    d = rotary_dims(cfg, kv_default=kv_default, head_dim_default=head_dim_default)
    linears = rotary_attention(d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], qkv_bias, o_bias)
    linears += gated_mlp(d["hidden"], d["inter"], mlp_bias)
    return Arch(**d, act=act, tie=cfg.flag("tie_word_embeddings", tie_default), linears=linears,
                layer_norms=list(norms), traits=traits)


def attention_dropout(cfg: Cfg) -> float:
    """config.attention_dropout (0.0 in every Llama-style config class)."""
    return float(cfg.opt("attention_dropout", 0.0))
