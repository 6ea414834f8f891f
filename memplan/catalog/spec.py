"""The ModelSpec the estimator reads, and how a HF ``config.json`` becomes one.

Every count here is derived from a config dict alone, with the same defaults the transformers config
classes apply when a key is absent, and it reproduces ``sum(p.numel() for p in model.parameters())`` of
the transformers model exactly (tied weights counted once).  The per-family formulas are in
:mod:`memplan.catalog.families`; this module holds the types they fill in and the dispatch by
``model_type``.

This module is on the fast estimate path: it must import neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memplan.catalog import families
from memplan.errors import UserError
from memplan.files import read_json


def _hash_once(self) -> int:
    """A frozen dataclass's hash of its compared fields, computed once: specs and their layer groups key the
    estimator's caches, which a plan search asks a hundred thousand times (hashing a group hashes every item)."""
    cached = self.__dict__.get("_hash")
    if cached is None:
        cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.compare))
        object.__setattr__(self, "_hash", cached)
    return cached


def _state_without_hash(self) -> dict:
    """Pickled without the cached hash: another process hashes strings with another seed."""
    return {k: v for k, v in self.__dict__.items() if k != "_hash"}


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
class Traits:
    """How a family's forward differs from LlamaDecoderLayer's, as the estimator's layer replay reads it.

    A family module fills these from the config (with its config class's defaults); the estimator never
    asks which family a model is.  The defaults describe modeling_llama.py.
    """

    decoder_layer: str  # the transformers decoder-layer class (FSDP's transformer_layer_cls_to_wrap)
    norm: str = "rms"  # "rms" (LlamaRMSNorm), "rms_gemma" (x * (1 + w) in fp32) or "layer" (LayerNorm)
    sandwich_norms: bool = False  # Gemma-2: post-attention and pre/post-feedforward norms around each block
    attn_softcap: float | None = None  # tanh soft-capping of the attention logits (eager only)
    final_softcap: float | None = None  # tanh soft-capping of the lm_head logits
    sdpa: bool = True  # the model has an SDPA path (_supports_sdpa); without it "sdpa" loads eager
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # each layer's "full_attention" / "sliding_attention"
    mask_kinds: tuple[str, ...] = ()  # the masks the model builds per forward (default: its layers' kinds)
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0  # on each block's output (GPT-2 resid_pdrop, OPT dropout, Phi3 resid_pdrop)
    embd_dropout: float = 0.0  # on the embeddings' output (GPT-2 embd_pdrop)
    role_names: tuple[tuple[str, str], ...] = ()  # replay role -> module name, where not the Llama names
    fused_qkv: bool = False
    fused_gate_up: bool = False
    q_contiguous: bool = False  # q reaches the attention contiguous as (b, heads, s, d) (Phi3's torch.cat)
    softmax_fp32: bool = True  # eager softmax(dtype=torch.float32) (GPT-2 keeps the input dtype)
    expert_rank_mult: tuple[int, int] = (1, 1)  # peft's rank multiplier for the gate_up / down expert stacks
    position_ids: str = ""  # learned positions' saved int64 ids: "" none, "shared" (1, s), "batch" (b, s)
    positions_added: bool = False  # layer 0 gets embeddings + positions, not the (hooked) embedding output
    # q/k RMSNorm (the model's norm kind) on the projections, before the rotary: "" none, "head" over each
    # head's head_dim (modeling_qwen3.py / modeling_qwen3_moe.py / modeling_gemma3.py: q_norm(head_dim)),
    # "full" over all heads at once (modeling_olmo2.py: q_norm(num_attention_heads * head_dim))
    qk_norm: str = ""
    pre_norms: bool = True  # input/pre-feedforward norms (OLMo-2 has none: its norms sit on each block's output)
    # per layer, whether it applies the rotary (SmolLM3's and Llama 4's no_rope_layers: 0 = NoPE); () all
    rope_layers: tuple[bool, ...] = ()
    rotary_tables: int = 1  # cos/sin pairs built per forward (Gemma3RotaryEmbedding: one per attention kind)
    # cos/sin are (b, s, head_dim), one row per sequence, not (1, s, head_dim): Qwen2_5_VLRotaryEmbedding.forward
    # (modeling_qwen2_5_vl.py) gets position ids expanded to (3, b, s) for the multimodal rotary (mrope)
    rotary_per_sequence: bool = False
    # nn.Dropout modules the forward calls (each a module DeepSpeed ZeRO-3 fetches, so each prefetches):
    # "embeddings" (after them), "attention" / "mlp" (a block's last), "after_attention" / "after_mlp" (the layer's,
    # after that block)
    dropout_modules: tuple[str, ...] = ()
    # Granite (modeling_granite.py GraniteModel.forward): layer 0 gets embed_tokens(ids) * embedding_multiplier,
    # a new tensor, not the (hooked) embedding output
    embedding_scaled: bool = False
    # Granite (GraniteForCausalLM.forward): logits = logits / logits_scaling, a new tensor before the loss
    logits_scaled: bool = False
    # GPT-OSS (modeling_gpt_oss.py), on top of the fields above (and norm "rms_fp32_weight": GptOssRMSNorm's
    # (weight * x).to(input_dtype), the weight product in fp32):
    attn_sinks: bool = False  # a learned per-head logit concatenated to the scores (eager_attention_forward: sinks)
    expert_bias: bool = False  # the fused expert stacks carry biases, gathered per row (grouped_mm_experts_forward)
    expert_glu_limit: float | None = None  # GptOssExperts._apply_gate: clamped gate/up, gate*sigmoid(alpha*gate)*(up+1)
    router_topk_first: bool = False  # top-k of the router logits, then softmax over those (GptOssTopKRouter)
    rotary_half_cos: bool = False  # cos/sin are (s, head_dim / 2): no cat(freqs, freqs) (GptOssRotaryEmbedding)
    experts_transposed: bool = False  # expert stacks stored (count, d_in, d_out) (use_experts_implementation)
    lora_unreachable: tuple[str, ...] = ()  # layer_linears names peft's target_modules cannot wrap
    # Llama 4's text model (modeling_llama4.py):
    qk_weightless_norm: bool = False  # rotary layers: Llama4TextWeightlessRMSNorm on q and k (use_qk_norm)
    attn_temperature: bool = False  # NoPE layers scale q by a per-position fp32 factor (attn_temperature_tuning)
    # rotary on complex numbers: freqs_cis (s, head_dim / 2) complex64, q/k type_as back (Llama 4;
    # DeepseekV2RotaryEmbedding returns one such freqs_cis shared by the layers instead of cos and sin)
    rotary_complex: bool = False
    attention_chunk_size: int | None = None  # "chunked_attention" layers attend within chunks of this size
    experts_every_token: bool = False  # Llama4TextMoe: every token through every expert (bmm), plus a shared expert
    # MoE routing (defaults: MixtralTopKRouter): the top-k weights renormalized to sum to 1
    # (Qwen2-MoE/Qwen3-MoE norm_topk_prob), kept in fp32 (Qwen2-MoE casts them to the logits' dtype), and an
    # always-on shared expert scaled by sigmoid(shared_expert_gate(x)) (Qwen2MoeSparseMoeBlock.forward)
    moe_norm_topk: bool = True
    moe_weights_fp32: bool = True
    shared_expert_gate: bool = False
    # peft's MoE conversion (peft utils/transformers_weight_conversion.py _convert_peft_config_moe, for the
    # model types in its _MODEL_TO_CONVERSION_PATTERN): (target name, what it adapts) pairs. A target named
    # like a transformers-4 router or expert projection adapts the router weight or the fused expert stack
    # instead, and "all-linear" (every nn.Linear) gets those names added. Without it "all-linear" reaches
    # no router or expert stack (they are parameters, not nn.Linear modules).
    peft_expert_targets: tuple[tuple[str, str], ...] = ()
    # Multi-head latent attention (DeepseekV3Attention, DeepseekV2Attention): (q_lora_rank (0: a plain
    # q_proj), kv_lora_rank, qk_nope_head_dim, v_head_dim); the rotary width is the spec's head_dim. () = none.
    mla: tuple[int, ...] = ()
    rope_interleave: bool = False  # DeepSeek-V3 rotates interleaved pairs (apply_rotary_pos_emb_interleave)
    # The router: "softmax" (Mixtral, Qwen-MoE: top-k of the softmax over router logits in the input dtype),
    # "sigmoid_group" (DeepseekV3TopkRouter: fp32 logits, sigmoid, group-limited top-k with the score bias,
    # weights gathered from the sigmoid), "softmax_fp32" (DeepseekV2TopkRouter: fp32 logits, softmax, top-k)
    moe_router: str = "softmax"
    moe_groups: tuple[int, int] = (1, 1)  # (n_group, topk_group) of group-limited routing
    calibrated: str = ""  # no family module: the cache key of its traced calibration (estimator/calibrated.py)
    # the model loads flash-attention 2 (PreTrainedModel._supports_flash_attn; Llama4ForCausalLM has none), as
    # memplan profile / train load it: GPT-OSS's sinks need a flash kernel downloaded from the Hub, which they never do
    flash: bool = True


@dataclass(frozen=True)
class LayerGroup:
    """Decoder layers built alike: their ``indices`` in the stack, the weight matrices (``linears``) and the
    count lines (``items``: the linears, then the norms, relative to one layer). ``ffn`` is the MLP's
    intermediate width (the routed experts' with ``experts`` > 0)."""

    indices: tuple[int, ...]
    linears: tuple[Linear, ...]
    items: tuple[ParamItem, ...]
    ffn: int
    experts: int = 0
    top_k: int = 0
    shared_ffn: int = 0  # an MoE layer's always-on shared expert MLP (0: none)

    __hash__ = _hash_once
    __getstate__ = _state_without_hash

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def params(self) -> int:
        """Parameters of one layer of the group."""
        return sum(i.params for i in self.items)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the estimator needs to know about a decoder-only model, derived from config.json.

    The decoder layers come as ``layer_groups``: one group when every layer is alike, more when some differ
    (DeepSeek's dense first layers, Qwen-MoE's ``mlp_only_layers``). Every layer is in exactly one group."""

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
    layer_norm_params: int
    # HF module path of the decoder-layer list ("model.layers"), for mapping items to modules.
    layer_prefix: str
    embedding_items: tuple[ParamItem, ...]
    layer_groups: tuple[LayerGroup, ...]
    final_items: tuple[ParamItem, ...]
    lm_head_items: tuple[ParamItem, ...]
    traits: Traits = field(compare=False)
    # A multimodal config (memplan.catalog.vision): the vision tower and projector, frozen weights under every
    # method; the fields above describe its language model. wrapper: the multimodal config's model_type.
    frozen_items: tuple[ParamItem, ...] = ()
    wrapper: str = ""

    __hash__ = _hash_once
    __getstate__ = _state_without_hash

    @property
    def params_frozen(self) -> int:
        """Parameters that are never trained (a multimodal model's vision tower and projector)."""
        return sum(i.params for i in self.frozen_items)

    @property
    def layer_linears(self) -> tuple[Linear, ...]:
        """Every kind of weight matrix in the decoder layers, each name once (the first group's first)."""
        seen: dict[str, Linear] = {}
        for group in self.layer_groups:
            for lin in group.linears:
                seen.setdefault(lin.path, lin)
        return tuple(seen.values())

    def group_of(self, index: int) -> LayerGroup:
        """The group of decoder layer ``index``."""
        return next(g for g in self.layer_groups if index in g.indices)

    @property
    def params_embedding(self) -> int:
        return sum(i.params for i in self.embedding_items)

    @property
    def params_layers(self) -> int:
        """Parameters of all decoder layers."""
        return sum(g.count * g.params for g in self.layer_groups)

    @property
    def params_final_norm(self) -> int:
        return sum(i.params for i in self.final_items)

    @property
    def params_lm_head(self) -> int:
        return sum(i.params for i in self.lm_head_items)

    @property
    def params_total(self) -> int:
        return self.params_embedding + self.params_layers + self.params_final_norm + self.params_lm_head

    @property
    def qk_norm_widths(self) -> tuple[int, ...]:
        """The q_norm / k_norm weights of one layer (none unless Traits.qk_norm)."""
        return qk_norm_widths(self.traits.qk_norm, self.num_heads, self.num_kv_heads, self.head_dim)

    def linear_names(self) -> list[str]:
        """Names valid as LoRA targets: every ``layer_linears`` name, then ``lm_head``.

        ``kind`` tells how peft reaches each: ``linear``/``conv1d``/``router`` by
        ``target_modules`` (peft wraps Mixtral's router ``gate`` too); ``experts`` through peft's MoE
        conversion, which "all-linear" applies too (a ParamWrapper per fused stack). Names in
        ``traits.lora_unreachable`` are left out (peft cannot wrap them through target_modules)."""
        names = list(dict.fromkeys(lin.name for lin in self.layer_linears
                                   if lin.name not in self.traits.lora_unreachable))
        return names + ["lm_head"]

    def lora_target_names(self, targets: list[str] | str) -> frozenset[str]:
        """The layer linears peft adapts for ``targets`` (names, or "all-linear": every layer linear but those
        in Traits.lora_unreachable), with what its MoE conversion (Traits.peft_expert_targets) adds: a target
        named like a transformers-4 expert projection adapts the fused expert stack of its new name as well,
        and the nn.Linear modules of that name keep theirs (a dense layer's MLP, the shared experts: peft >=
        0.22, utils/transformers_weight_conversion.py, "all_matching_modules_are_linear")."""
        renames = dict(self.traits.peft_expert_targets)
        if targets == "all-linear":
            targets = [lin.name for lin in self.layer_linears if lin.kind in ("linear", "conv1d")
                       and lin.name not in self.traits.lora_unreachable] + list(renames)
        linears = {lin.name for lin in self.layer_linears}
        return frozenset(name for name in targets if name not in renames or name in linears) | frozenset(
            renames[name] for name in targets if name in renames)

    def lora_expert_stacks(self, targets: list[str] | str = "all-linear") -> list[str]:
        """The fused expert stacks peft adapts for ``targets`` (names, a comma-separated string or
        "all-linear"); its adapters there take no dropout."""
        if isinstance(targets, str) and targets != "all-linear":
            targets = targets.split(",")
        adapted = self.lora_target_names(targets)
        return list(dict.fromkeys(lin.name for lin in self.layer_linears
                                  if lin.kind == "experts" and lin.name in adapted))

    def param_breakdown(self) -> list[tuple[str, str, int, str]]:
        """Rows (group, module path, params, formula); layer rows are per layer, under "layer" when every
        layer is alike, else under "layers i-j" (or "layers i,j,...") for each group of alike layers."""
        rows = [("embedding", i.path, i.params, i.formula) for i in self.embedding_items]
        for g in self.layer_groups:
            label = "layer" if len(self.layer_groups) == 1 else f"layers {_index_ranges(g.indices)}"
            rows += [(label, i.path, i.params, i.formula) for i in g.items]
        groups = (("final_norm", self.final_items), ("lm_head", self.lm_head_items), ("frozen", self.frozen_items))
        return rows + [(g, i.path, i.params, i.formula) for g, items in groups for i in items]


def _index_ranges(indices: tuple[int, ...]) -> str:
    """0,1,2,5 -> "0-2,5"."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


# --------------------------------------------------------------------------------------------
# What a family builder reads and returns
# --------------------------------------------------------------------------------------------


class Cfg:
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

    def int_list(self, key: str) -> list[int]:
        """A list of layer indices (``mlp_only_layers``, ``moe_layers``); absent or null is empty."""
        value = self.c.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise UserError(f"{self.name}: config key '{key}' must be a list of layer indices, got {value!r}")
        return list(value)

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


@dataclass
class Arch:
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
    traits: Traits
    experts: int = 0
    top_k: int = 0
    # Layers built differently (DeepSeek's dense first layers, Qwen-MoE's mlp_only_layers); the layers no
    # entry claims are built from ``linears``, ``layer_norms``, ``inter``, ``experts``, ``top_k``, ``shared_ffn``.
    other_layers: list[OtherLayers] = field(default_factory=list)
    shared_ffn: int = 0
    norm_widths: dict[str, int] = field(default_factory=dict)  # RMSNorms inside a layer narrower than hidden
    layer_extra: list[ParamItem] = field(default_factory=list)  # every layer's parameters besides linears and norms


@dataclass
class OtherLayers:
    """Decoder layers built differently from a family's main kind (see Arch.other_layers)."""

    indices: tuple[int, ...]
    linears: list[Linear]
    ffn: int
    experts: int = 0
    top_k: int = 0
    shared_ffn: int = 0
    layer_norms: list[str] | None = None  # None: the main kind's


def norm_item(path: str, params: int, hidden: int) -> ParamItem:
    """The count line of one norm module (RMSNorm: hidden; LayerNorm: weight + bias; or no affine)."""
    formula = "0 (no affine)" if params == 0 else ("hidden" if params == hidden else "2 x hidden (weight + bias)")
    return ParamItem(path, params, formula)


def qk_norm_widths(kind: str, heads: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """The weights of a layer's q_norm and k_norm (Traits.qk_norm): head_dim each, shared by the heads,
    or the projections' full widths."""
    if not kind:
        return ()
    return (head_dim, head_dim) if kind == "head" else (heads * head_dim, kv_heads * head_dim)


def _linear_item(lin: Linear) -> ParamItem:
    bias = " + d_out" if lin.bias else ""
    count = f"{lin.count} x " if lin.count > 1 else ""
    return ParamItem(lin.path, lin.params, f"{count}({lin.d_in} x {lin.d_out}{bias})")


# --------------------------------------------------------------------------------------------
# Building a ModelSpec
# --------------------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    """A config.json's object (one line naming the file when it is not one)."""
    config = read_json(path, "model config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: config.json must hold a JSON object, got {type(config).__name__}")
    return config


def spec_from_config(config: dict, name: str, source: Path | None = None) -> ModelSpec:
    """Build the ModelSpec for a HF config.json dict; ``name`` is used in error messages. A model_type
    without a family module is read from transformers' model (memplan.catalog.traced; ``source``: the
    config.json's path, for a model with its own code)."""
    if not isinstance(config, dict):
        raise UserError(f"{name}: config.json must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    supported = ", ".join(families.SUPPORTED_MODEL_TYPES)
    if not model_type:
        raise UserError(f"{name}: config.json has no 'model_type' (supported: {supported})")
    from memplan.catalog import vision  # imports this module: loaded here, once a config is read

    if model_type in vision.WRAPPERS:
        return _multimodal(config, name, model_type)
    build = families.builder(model_type)
    if build is None:
        from memplan.catalog import traced  # imports transformers when the model is not in the cache yet

        return traced.spec_from_config(Cfg(config, name, model_type), source)
    try:
        arch = build(Cfg(config, name, model_type))
    except (TypeError, ValueError, KeyError, IndexError) as err:
        # a value of the wrong type or shape where the family reads it (a string for a layer count, a list
        # that is too short): one line naming the model, as for a missing key
        raise UserError(f"{name}: config.json for model_type '{model_type}' has a value memplan cannot read "
                        f"({type(err).__name__}: {err})") from err
    return _freeze(arch, name, model_type, config)


def _multimodal(config: dict, name: str, model_type: str) -> ModelSpec:
    """A multimodal config: its language model's ModelSpec, at the module paths it has inside the multimodal
    model, with the vision tower and projector as frozen items (memplan.catalog.vision)."""
    from memplan.catalog import vision

    wrapper = vision.WRAPPERS[model_type]
    text = vision.text_config(config, name, wrapper)
    if families.builder(text["model_type"]) is None:
        raise UserError(f"{name}: unsupported model_type '{text['model_type']}' (the language model of this "
                        f"'{model_type}' config; supported: {', '.join(families.SUPPORTED_MODEL_TYPES)})")
    spec = spec_from_config(text, name)

    def moved(items: tuple[ParamItem, ...]) -> tuple[ParamItem, ...]:
        return tuple(replace(i, path=vision.relocate(i.path, wrapper)) for i in items)

    return replace(spec, embedding_items=moved(spec.embedding_items), final_items=moved(spec.final_items),
                   lm_head_items=moved(spec.lm_head_items), layer_prefix=vision.relocate(spec.layer_prefix, wrapper),
                   frozen_items=vision.vision_items(config, name, wrapper, spec.hidden_size), wrapper=model_type)


def _freeze(arch: Arch, name: str, model_type: str, config: dict) -> ModelSpec:
    """The ModelSpec of a family's Arch: per-layer items are its linears, its norms, then its q/k norms and
    ``layer_extra`` (see _groups)."""
    lm_head = [] if arch.tie else [ParamItem("lm_head", arch.lm_head_in * arch.vocab, "hidden x vocab (untied)")]
    groups = _groups(arch)
    return ModelSpec(
        name=name, model_type=model_type, config=config, vocab_size=arch.vocab, hidden_size=arch.hidden,
        num_layers=arch.layers, num_heads=arch.heads, num_kv_heads=arch.kv_heads, head_dim=arch.head_dim,
        intermediate_size=arch.inter, mlp_gated=arch.gated, hidden_act=str(arch.act), norm=arch.norm,
        norms_per_layer=len(arch.layer_norms), tie_word_embeddings=arch.tie,
        position_embeddings=arch.positions, num_experts=arch.experts, experts_per_token=arch.top_k,
        layer_norm_params=arch.norm_params, layer_prefix=arch.layer_prefix, embedding_items=tuple(arch.embedding),
        layer_groups=tuple(sorted(groups, key=lambda g: g.indices[0])), final_items=tuple(arch.final),
        lm_head_items=tuple(lm_head), traits=_complete(arch.traits, arch.layers),
    )


def _groups(arch: Arch) -> list[LayerGroup]:
    """The main kind of layer first (every index no OtherLayers claims), then the others."""
    claimed = {i for o in arch.other_layers for i in o.indices}
    main = tuple(i for i in range(arch.layers) if i not in claimed)
    kinds = [OtherLayers(main, arch.linears, arch.inter, arch.experts, arch.top_k, arch.shared_ffn)]
    kinds += arch.other_layers
    # in every group: the attention's q/k norms (Traits.qk_norm) and Arch.layer_extra (GPT-OSS's sinks and
    # expert biases; its layers are all of one kind)
    widths = qk_norm_widths(arch.traits.qk_norm, arch.heads, arch.kv_heads, arch.head_dim)
    shared = [ParamItem(f"self_attn.{n}", w, "head_dim" if arch.traits.qk_norm == "head" else "heads x head_dim")
              for n, w in zip(("q_norm", "k_norm"), widths)] + arch.layer_extra
    groups = []
    for kind in kinds:
        if not kind.indices:
            continue
        norms = arch.layer_norms if kind.layer_norms is None else kind.layer_norms
        items = [_linear_item(lin) for lin in kind.linears]
        items += [norm_item(n, arch.norm_params, arch.hidden) if n not in arch.norm_widths
                  else ParamItem(n, arch.norm_widths[n], f"{arch.norm_widths[n]} (RMSNorm width)") for n in norms]
        items += shared
        groups.append(LayerGroup(tuple(kind.indices), tuple(kind.linears), tuple(items), kind.ffn,
                                 kind.experts, kind.top_k, kind.shared_ffn))
    return groups


def _complete(traits: Traits, layers: int) -> Traits:
    """Traits with the per-layer attention kinds filled in: all full, or all sliding when a window is set."""
    kinds = traits.layer_types or (("sliding_attention" if traits.sliding_window else "full_attention"),) * layers
    return replace(traits, layer_types=tuple(kinds), mask_kinds=traits.mask_kinds or tuple(dict.fromkeys(kinds)))
