"""Model presets, the ModelSpec the estimator reads, and exact analytic parameter counts.

Every count here is derived from a HF ``config.json`` dict alone, with the same defaults the
transformers config classes apply when a key is absent, and it reproduces
``sum(p.numel() for p in model.parameters())`` of the transformers model exactly (tied weights
counted once).  The formulas mirror the module constructors in transformers'
``models/<type>/modeling_<type>.py`` (transformers 5.x naming; the 4.x modules have the same
shapes, only Mixtral's experts were separate ``w1/w2/w3`` Linears there).

This module is on the fast estimate path: it must import neither torch nor transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable


from memplan.errors import UserError
from memplan.files import read_json, read_text
from memplan.paths import data_dir, load_table

# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """One weight-matrix module kind inside a decoder layer.

    ``name`` is the attribute name peft matches on (``q_proj``, ``c_attn``, ``gate_up_proj``, ...);
    ``path`` is the module path inside the decoder layer (``self_attn.q_proj``).  ``kind`` is
    ``"linear"`` (nn.Linear), ``"conv1d"`` (GPT-2's transposed Conv1D: peft needs
    ``fan_in_fan_out=True``), ``"router"`` (an MoE router weight used via F.linear, not an
    nn.Linear) or ``"experts"`` (a fused 3-D expert parameter of shape (count, d_out, d_in);
    peft reaches it only through ``target_parameters``, with LoRA A/B of
    count*r x d_in and d_out x count*r, i.e. ``count * r * (d_in + d_out)``).
    """

    name: str
    d_in: int
    d_out: int
    bias: bool
    count: int = 1
    path: str = ""
    kind: str = "linear"

    @property
    def params(self) -> int:
        return self.count * (self.d_in * self.d_out + (self.d_out if self.bias else 0))


@dataclass(frozen=True)
class ParamItem:
    """One named line of the parameter count: ``path`` is the HF module path (relative to the
    model for embedding/final/lm_head items, relative to one decoder layer for layer items)."""

    path: str
    params: int
    formula: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything the estimator needs to know about a decoder-only model, derived from config.json."""

    name: str
    model_type: str
    config: dict = field(compare=False, repr=False)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mlp_gated: bool
    hidden_act: str
    norm: str
    norms_per_layer: int
    tie_word_embeddings: bool
    position_embeddings: int
    num_experts: int
    experts_per_token: int
    layer_linears: tuple[Linear, ...]
    layer_norm_params: int
    # HF module path of the decoder-layer list ("model.layers"), for mapping items to modules.
    layer_prefix: str
    embedding_items: tuple[ParamItem, ...]
    layer_items: tuple[ParamItem, ...]
    final_items: tuple[ParamItem, ...]
    lm_head_items: tuple[ParamItem, ...]

    @property
    def params_embedding(self) -> int:
        return sum(i.params for i in self.embedding_items)

    @property
    def params_per_layer(self) -> int:
        return sum(i.params for i in self.layer_items)

    @property
    def params_final_norm(self) -> int:
        return sum(i.params for i in self.final_items)

    @property
    def params_lm_head(self) -> int:
        return sum(i.params for i in self.lm_head_items)

    @property
    def params_total(self) -> int:
        return (
            self.params_embedding
            + self.num_layers * self.params_per_layer
            + self.params_final_norm
            + self.params_lm_head
        )

    def linear_names(self) -> list[str]:
        """Names valid as LoRA targets: every ``layer_linears`` name, then ``lm_head``.

        ``kind`` tells how peft reaches each: ``linear``/``conv1d``/``router`` by
        ``target_modules`` (peft wraps Mixtral's router ``gate`` too); ``experts`` through peft's MoE
        conversion, which "all-linear" applies too in peft 0.21 (a ParamWrapper per fused stack)."""
        names = list(dict.fromkeys(lin.name for lin in self.layer_linears))
        return names + ["lm_head"]

    def param_breakdown(self) -> list[tuple[str, str, int, str]]:
        """Rows (group, module path, params, formula); layer rows are per layer."""
        groups = (
            ("embedding", self.embedding_items),
            ("layer", self.layer_items),
            ("final_norm", self.final_items),
            ("lm_head", self.lm_head_items),
        )
        return [(g, i.path, i.params, i.formula) for g, items in groups for i in items]


# --------------------------------------------------------------------------------------------
# Reading config values
# --------------------------------------------------------------------------------------------


class _Cfg:
    """Typed access to a config dict; errors name the model and the key."""

    def __init__(self, config: dict, name: str, model_type: str):
        self.c = config
        self.name = name
        self.model_type = model_type

    def req(self, *keys: str) -> int:
        """A required positive int, under the first of ``keys`` present (HF attribute aliases)."""
        for key in keys:
            if self.c.get(key) is not None:
                return self._positive(key)
        raise UserError(
            f"{self.name}: config.json for model_type '{self.model_type}' is missing "
            f"required key '{keys[0]}'"
        )

    def opt(self, key: str, default: Any) -> Any:
        """An optional key; absent or null gives the transformers config-class default."""
        value = self.c.get(key)
        return default if value is None else value

    def opt_int(self, key: str, default: int) -> int:
        return self._positive(key) if self.c.get(key) is not None else default

    def flag(self, key: str, default: bool) -> bool:
        return bool(self.opt(key, default))

    def _positive(self, key: str) -> int:
        value = self.c[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{self.name}: config key '{key}' must be a positive integer, got {value!r}")
        return value

    def head_dim(self, hidden: int, heads: int, default: int | None = None) -> int:
        """``config.head_dim`` if given, else the class default, else hidden // heads."""
        if self.c.get("head_dim") is not None:
            return self._positive("head_dim")
        if default is not None:
            return default
        if hidden % heads:
            raise UserError(
                f"{self.name}: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                "and config.json gives no head_dim"
            )
        return hidden // heads


def _lin(path: str, d_in: int, d_out: int, bias: bool, count: int = 1, kind: str = "linear") -> Linear:
    """A Linear named as peft matches it: the last path component, or for fused expert
    parameters the last two (``experts.gate_up_proj``, as in peft's ``target_parameters``)."""
    parts = path.split(".")
    name = ".".join(parts[-2:]) if kind == "experts" else parts[-1]
    return Linear(name, d_in, d_out, bias, count, path, kind)


def _linear_item(lin: Linear) -> ParamItem:
    bias = " + d_out" if lin.bias else ""
    count = f"{lin.count} x " if lin.count > 1 else ""
    return ParamItem(lin.path, lin.params, f"{count}({lin.d_in} x {lin.d_out}{bias})")


def _norm_item(path: str, params: int, hidden: int) -> ParamItem:
    formula = "0 (no affine)" if params == 0 else ("hidden" if params == hidden else "2 x hidden (weight + bias)")
    return ParamItem(path, params, formula)


# --------------------------------------------------------------------------------------------
# Architecture families
# --------------------------------------------------------------------------------------------


@dataclass
class _Arch:
    """What a family builder returns before it is frozen into a ModelSpec."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    gated: bool
    act: str
    norm: str
    norm_params: int
    tie: bool
    positions: int
    layer_prefix: str
    linears: list[Linear]
    layer_norms: list[str]
    embedding: list[ParamItem]
    final: list[ParamItem]
    lm_head_in: int  # lm_head input width (hidden, or OPT's word_embed_proj_dim)
    experts: int = 0
    top_k: int = 0


def _rotary_attention(hidden: int, heads: int, kv: int, hd: int, qkv_bias: bool, o_bias: bool) -> list[Linear]:
    """q/k/v/o projections of LlamaAttention and its copies (modeling_llama.py, _mistral, _qwen2,
    _gemma, _gemma2): q: hidden -> heads*head_dim, k/v: hidden -> kv_heads*head_dim, o: back."""
    return [
        _lin("self_attn.q_proj", hidden, heads * hd, qkv_bias),
        _lin("self_attn.k_proj", hidden, kv * hd, qkv_bias),
        _lin("self_attn.v_proj", hidden, kv * hd, qkv_bias),
        _lin("self_attn.o_proj", heads * hd, hidden, o_bias),
    ]


def _gated_mlp(hidden: int, inter: int, bias: bool) -> list[Linear]:
    """LlamaMLP: gate_proj, up_proj (hidden -> intermediate) and down_proj (back)."""
    return [
        _lin("mlp.gate_proj", hidden, inter, bias),
        _lin("mlp.up_proj", hidden, inter, bias),
        _lin("mlp.down_proj", inter, hidden, bias),
    ]


def _rotary_arch(cfg: _Cfg, *, kv_default: int | None, head_dim_default: int | None = None) -> dict:
    """Shared dimensions of the rotary, RMSNorm, token-embedding-only families."""
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
        final=[_norm_item("model.norm", hidden, hidden)], lm_head_in=hidden,
    )


_TWO_NORMS = ["input_layernorm", "post_attention_layernorm"]


def _llama(cfg: _Cfg) -> _Arch:
    """modeling_llama.py: attention_bias on q/k/v/o, mlp_bias on the MLP, kv_heads default = heads."""
    d = _rotary_arch(cfg, kv_default=None)
    attn_bias, mlp_bias = cfg.flag("attention_bias", False), cfg.flag("mlp_bias", False)
    linears = _rotary_attention(d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], attn_bias, attn_bias)
    linears += _gated_mlp(d["hidden"], d["inter"], mlp_bias)
    return _Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                 linears=linears, layer_norms=_TWO_NORMS)


def _mistral(cfg: _Cfg) -> _Arch:
    """modeling_mistral.py: no biases; MistralConfig defaults num_key_value_heads to 8."""
    d = _rotary_arch(cfg, kv_default=8)
    linears = _rotary_attention(d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], False, False)
    linears += _gated_mlp(d["hidden"], d["inter"], False)
    return _Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                 linears=linears, layer_norms=_TWO_NORMS)


def _mixtral(cfg: _Cfg) -> _Arch:
    """modeling_mixtral.py: Mistral attention plus MixtralSparseMoeBlock = router ``gate``
    (weight num_experts x hidden, no bias) and MixtralExperts with fused parameters
    gate_up_proj (E, 2*intermediate, hidden) and down_proj (E, hidden, intermediate)."""
    d = _rotary_arch(cfg, kv_default=8)
    experts = cfg.opt_int("num_local_experts", 8)
    top_k = cfg.opt_int("num_experts_per_tok", 2)
    hidden, inter = d["hidden"], d["inter"]
    linears = _rotary_attention(hidden, d["heads"], d["kv_heads"], d["head_dim"], False, False)
    linears += [
        _lin("mlp.gate", hidden, experts, False, kind="router"),
        _lin("mlp.experts.gate_up_proj", hidden, 2 * inter, False, experts, kind="experts"),
        _lin("mlp.experts.down_proj", inter, hidden, False, experts, kind="experts"),
    ]
    return _Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                 linears=linears, layer_norms=_TWO_NORMS, experts=experts, top_k=top_k)


def _qwen2(cfg: _Cfg) -> _Arch:
    """modeling_qwen2.py: q/k/v carry a bias, o_proj does not; Qwen2Config defaults kv heads to 32."""
    d = _rotary_arch(cfg, kv_default=32)
    linears = _rotary_attention(d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], True, False)
    linears += _gated_mlp(d["hidden"], d["inter"], False)
    return _Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                 linears=linears, layer_norms=_TWO_NORMS)


def _gemma(cfg: _Cfg) -> _Arch:
    """modeling_gemma.py: head_dim defaults to 256, kv heads to 16, embeddings tied by default;
    legacy ``hidden_act="gelu"`` is read as gelu_pytorch_tanh (configuration_gemma.py)."""
    d = _rotary_arch(cfg, kv_default=16, head_dim_default=256)
    bias = cfg.flag("attention_bias", False)
    linears = _rotary_attention(d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], bias, bias)
    linears += _gated_mlp(d["hidden"], d["inter"], False)
    act = cfg.opt("hidden_act", "gelu_pytorch_tanh")
    return _Arch(**d, act="gelu_pytorch_tanh" if act == "gelu" else act,
                 tie=cfg.flag("tie_word_embeddings", True), linears=linears, layer_norms=_TWO_NORMS)


def _gemma2(cfg: _Cfg) -> _Arch:
    """modeling_gemma2.py: like Gemma but four RMSNorms per layer (pre/post attention and
    pre/post feed-forward), kv heads default 4, activation key ``hidden_activation``."""
    d = _rotary_arch(cfg, kv_default=4, head_dim_default=256)
    bias = cfg.flag("attention_bias", False)
    linears = _rotary_attention(d["hidden"], d["heads"], d["kv_heads"], d["head_dim"], bias, bias)
    linears += _gated_mlp(d["hidden"], d["inter"], False)
    norms = _TWO_NORMS + ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    return _Arch(**d, act=cfg.opt("hidden_activation", "gelu_pytorch_tanh"),
                 tie=cfg.flag("tie_word_embeddings", True), linears=linears, layer_norms=norms)


def _phi3(cfg: _Cfg) -> _Arch:
    """modeling_phi3.py: fused qkv_proj (hidden -> (heads + 2*kv_heads)*head_dim) and fused
    gate_up_proj (hidden -> 2*intermediate); no biases."""
    d = _rotary_arch(cfg, kv_default=None)
    hidden, hd, inter = d["hidden"], d["head_dim"], d["inter"]
    linears = [
        _lin("self_attn.o_proj", d["heads"] * hd, hidden, False),  # Phi3Attention builds o_proj first
        _lin("self_attn.qkv_proj", hidden, (d["heads"] + 2 * d["kv_heads"]) * hd, False),
        _lin("mlp.gate_up_proj", hidden, 2 * inter, False),
        _lin("mlp.down_proj", inter, hidden, False),
    ]
    return _Arch(**d, act=cfg.opt("hidden_act", "silu"), tie=cfg.flag("tie_word_embeddings", False),
                 linears=linears, layer_norms=_TWO_NORMS)


def _gpt2(cfg: _Cfg) -> _Arch:
    """modeling_gpt2.py: learned positions (wpe, n_positions rows), LayerNorm with bias,
    Conv1D c_attn (E -> 3E) / c_proj, MLP c_fc (E -> n_inner, default 4E) / c_proj, all biased;
    lm_head tied to wte by default."""
    vocab = cfg.req("vocab_size")
    hidden = cfg.req("n_embd", "hidden_size")
    layers = cfg.req("n_layer", "num_hidden_layers")
    heads = cfg.req("n_head", "num_attention_heads")
    positions = cfg.opt_int("n_positions", cfg.opt_int("max_position_embeddings", 1024))
    inner = cfg.opt_int("n_inner", 4 * hidden)
    if hidden % heads:
        raise UserError(f"{cfg.name}: n_embd {hidden} is not divisible by n_head {heads}")
    linears = [
        _lin("attn.c_attn", hidden, 3 * hidden, True, kind="conv1d"),
        _lin("attn.c_proj", hidden, hidden, True, kind="conv1d"),
        _lin("mlp.c_fc", hidden, inner, True, kind="conv1d"),
        _lin("mlp.c_proj", inner, hidden, True, kind="conv1d"),
    ]
    return _Arch(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
        inter=inner, gated=False, act=cfg.opt("activation_function", "gelu_new"), norm="layer",
        norm_params=2 * hidden, tie=cfg.flag("tie_word_embeddings", True), positions=positions,
        layer_prefix="transformer.h", linears=linears, layer_norms=["ln_1", "ln_2"],
        embedding=[
            ParamItem("transformer.wte", vocab * hidden, "vocab x hidden"),
            ParamItem("transformer.wpe", positions * hidden, "n_positions x hidden"),
        ],
        final=[_norm_item("transformer.ln_f", 2 * hidden, hidden)], lm_head_in=hidden,
    )


def _opt(cfg: _Cfg) -> _Arch:
    """modeling_opt.py: learned positions with a +2 offset (OPTLearnedPositionalEmbedding),
    k/v/q/out_proj and fc1/fc2 biased when enable_bias, LayerNorms (affine unless
    layer_norm_elementwise_affine is false), optional project_in/out when word_embed_proj_dim
    differs from hidden_size, final LayerNorm only when do_layer_norm_before."""
    vocab = cfg.req("vocab_size")
    hidden = cfg.req("hidden_size")
    layers = cfg.req("num_hidden_layers")
    heads = cfg.req("num_attention_heads")
    ffn = cfg.req("ffn_dim")
    word_dim = cfg.opt_int("word_embed_proj_dim", hidden)
    positions = cfg.opt_int("max_position_embeddings", 2048) + 2
    bias = cfg.flag("enable_bias", True)
    norm_params = 2 * hidden if cfg.flag("layer_norm_elementwise_affine", True) else 0
    if hidden % heads:
        raise UserError(f"{cfg.name}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    linears = [
        _lin("self_attn.k_proj", hidden, hidden, bias),
        _lin("self_attn.v_proj", hidden, hidden, bias),
        _lin("self_attn.q_proj", hidden, hidden, bias),
        _lin("self_attn.out_proj", hidden, hidden, bias),
        _lin("fc1", hidden, ffn, bias),
        _lin("fc2", ffn, hidden, bias),
    ]
    embedding = [
        ParamItem("model.decoder.embed_tokens", vocab * word_dim, "vocab x word_embed_proj_dim"),
        ParamItem("model.decoder.embed_positions", positions * hidden, "(max_position_embeddings + 2) x hidden"),
    ]
    if word_dim != hidden:
        embedding += [
            ParamItem("model.decoder.project_in", word_dim * hidden, "word_embed_proj_dim x hidden"),
            ParamItem("model.decoder.project_out", hidden * word_dim, "hidden x word_embed_proj_dim"),
        ]
    final_norm = cfg.flag("do_layer_norm_before", True) and not cfg.flag("_remove_final_layer_norm", False)
    final = [_norm_item("model.decoder.final_layer_norm", norm_params, hidden)] if final_norm else []
    return _Arch(
        vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
        inter=ffn, gated=False, act=cfg.opt("activation_function", "relu"), norm="layer",
        norm_params=norm_params, tie=cfg.flag("tie_word_embeddings", True), positions=positions,
        layer_prefix="model.decoder.layers", linears=linears,
        layer_norms=["self_attn_layer_norm", "final_layer_norm"], embedding=embedding, final=final,
        lm_head_in=word_dim,
    )


_FAMILIES: dict[str, Callable[[_Cfg], _Arch]] = {
    "llama": _llama,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "qwen2": _qwen2,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "opt": _opt,
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


# --------------------------------------------------------------------------------------------
# Building a ModelSpec
# --------------------------------------------------------------------------------------------


def spec_from_config(config: dict, name: str) -> ModelSpec:
    """Build the ModelSpec for a HF config.json dict; ``name`` is used in error messages."""
    if not isinstance(config, dict):
        raise UserError(f"{name}: config.json must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not model_type:
        raise UserError(f"{name}: config.json has no 'model_type' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    family = _FAMILIES.get(model_type)
    if family is None:
        raise UserError(
            f"{name}: unsupported model_type '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    arch = family(_Cfg(config, name, model_type))
    layer_items = [_linear_item(lin) for lin in arch.linears]
    layer_items += [_norm_item(n, arch.norm_params, arch.hidden) for n in arch.layer_norms]
    lm_head = [] if arch.tie else [ParamItem("lm_head", arch.lm_head_in * arch.vocab, "hidden x vocab (untied)")]
    return ModelSpec(
        name=name, model_type=model_type, config=config, vocab_size=arch.vocab, hidden_size=arch.hidden,
        num_layers=arch.layers, num_heads=arch.heads, num_kv_heads=arch.kv_heads, head_dim=arch.head_dim,
        intermediate_size=arch.inter, mlp_gated=arch.gated, hidden_act=str(arch.act), norm=arch.norm,
        norms_per_layer=len(arch.layer_norms), tie_word_embeddings=arch.tie,
        position_embeddings=arch.positions, num_experts=arch.experts, experts_per_token=arch.top_k,
        layer_linears=tuple(arch.linears), layer_norm_params=arch.norm_params, layer_prefix=arch.layer_prefix,
        embedding_items=tuple(arch.embedding), layer_items=tuple(layer_items), final_items=tuple(arch.final),
        lm_head_items=tuple(lm_head),
    )


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def models_dir() -> Path:
    return data_dir() / "models"


@lru_cache(maxsize=1)
def _presets() -> dict[str, dict]:
    """presets.yaml, read from its JSON twin (see memplan.paths); the tests check that every entry has
    its <id>/config.json, so a run does not stat all of them."""
    return load_table(models_dir() / "presets.json") or {}


@lru_cache(maxsize=1)
def _lookup() -> dict[str, str]:
    """Lower-case id, alias and hub id -> preset id."""
    table: dict[str, str] = {}
    for pid, entry in _presets().items():
        for key in [pid, entry.get("hub_id") or "", *(entry.get("aliases") or [])]:
            key = key.lower()
            if key and table.setdefault(key, pid) != pid:
                raise RuntimeError(f"presets.yaml: '{key}' names both {table[key]} and {pid}")
    return table


def preset_ids() -> list[str]:
    return list(_presets())


def preset_info(pid: str) -> dict:
    """The presets.yaml entry of a preset id."""
    return dict(_presets()[pid])


def _preset_spec(pid: str) -> ModelSpec:
    path = models_dir() / pid / "config.json"
    return spec_from_config(read_config(path), pid)


def list_presets() -> list[dict]:
    """One row per preset for ``memplan models``."""
    rows = []
    for pid, entry in _presets().items():
        rows.append({
            "id": pid,
            "family": entry.get("family", ""),
            "hub_id": entry.get("hub_id", ""),
            "params_total": _preset_spec(pid).params_total,
            "aliases": list(entry.get("aliases") or []),
            "source": entry.get("source", ""),
        })
    return rows


# --------------------------------------------------------------------------------------------
# Resolving a model reference
# --------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """A config.json's object (one line naming the file when it is not one)."""
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: config.json must hold a JSON object, got {type(config).__name__}")
    return config


def _local_config(path: Path) -> Path | None:
    """The config.json a local path names: the file itself, or a model directory's config.json."""
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    return None


def hf_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps its cache, in its own order of precedence."""
    dirs = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            dirs.append(Path(os.environ[var]).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _cached_config(repo_id: str) -> Path | None:
    """config.json of ``org/name`` in an offline HF cache: the snapshot refs/main points at,
    else the most recently written snapshot that has one."""
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        repo = cache / folder
        if not repo.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            candidate = repo / "snapshots" / read_text(ref, "HF cache reference").strip() / "config.json"
            if candidate.is_file():
                return candidate
        found = sorted(repo.glob("snapshots/*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found[0]
    return None


def _looks_like_path(ref: str) -> bool:
    """True for refs that can only be file paths (a hub id is exactly ``org/name``)."""
    return ref.endswith(".json") or ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref


def _unknown(ref: str) -> UserError:
    """Unknown-name error with the closest presets (difflib over ids, aliases and hub ids), each model once:
    its id, and the name that matched when that was an alias or hub id."""
    import difflib  # only for the error message

    names: dict[str, tuple[str, str]] = {}  # lower-case name -> (preset id, name as spelled)
    for pid, entry in _presets().items():
        for name in [pid, *(entry.get("aliases") or []), entry.get("hub_id") or ""]:
            if name:
                names.setdefault(name.lower(), (pid, name))
    closest: dict[str, str] = {}
    for key in difflib.get_close_matches(ref.lower(), list(names), n=len(names), cutoff=0.5):
        pid, name = names[key]
        closest.setdefault(pid, pid if name == pid else f"{pid} ({name})")
        if len(closest) == 5:
            break
    where = ""
    if ref.count("/") == 1:
        where = f" (not a preset, and not in the local HF cache: {', '.join(map(str, hf_cache_dirs()))})"
    hint = f" Closest presets: {', '.join(closest.values())}" if closest else ""
    return UserError(
        f"unknown model '{ref}'{where}.{hint} (run `memplan models` for all; or pass a config.json "
        "or a local model directory)"
    )


def preset_id(ref: str) -> str | None:
    """The preset a reference names (its id, an alias or its hub id, in any case), or None."""
    return _lookup().get(ref.strip().lower())


def config_file(ref: str) -> tuple[Path, str]:
    """The config.json behind ``ref`` and the model's name, tried in this order: a config.json file or a local
    model directory holding one; a preset id, alias or preset hub id (case-insensitive); a hub id ``org/name``
    found offline in the HF cache (the file is read directly, nothing is fetched)."""
    ref = ref.strip()
    if not ref:
        raise UserError("empty model name (run `memplan models` for the presets)")
    path = Path(ref).expanduser()
    local = _local_config(path)
    if local is not None:
        return local, str(path)
    preset = preset_id(ref)
    if preset is not None:
        return models_dir() / preset / "config.json", preset
    if path.is_dir():
        raise UserError(f"{path} is a directory without a config.json")
    if _looks_like_path(ref):
        raise UserError(f"no such file or directory: {ref}")
    if ref.count("/") == 1:
        cached = _cached_config(ref)
        if cached is not None:
            return cached, ref
    raise _unknown(ref)


def resolve_model(ref: str) -> ModelSpec:
    """The ModelSpec of the model ``ref`` names (`config_file`)."""
    path, name = config_file(ref)
    return spec_from_config(read_config(path), name)
