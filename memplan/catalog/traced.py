"""The ModelSpec of a decoder-only ``model_type`` that has no family module, read from transformers' own model.

transformers builds the model (``AutoModelForCausalLM.from_config``) on the meta device: no memory, no
weights. Its parameters give the counts the estimator needs, exactly as ``model.parameters()`` has them (tied
weights once): the embeddings (``nn.Embedding`` modules outside the decoder layers), the decoder layers (found
as :func:`memplan.runtime.model.decoder_layers` finds them), the final norm and anything else outside the
layers, and the untied ``lm_head``. Each decoder layer's ``nn.Linear`` (and transformers ``Conv1D``) modules
become its ``layer_linears`` (name, d_in, d_out, bias), so LoRA targets and their tensors are counted as for a
family module. Activations are not derived here: :mod:`memplan.estimator.calibrated` fits them to fake-tensor
traces of the model's decoder layers; ``Traits.calibrated`` (the cache key) sends the estimator there.

The result is cached (:mod:`memplan.catalog.cache`): the next run reads it without importing torch or
transformers. A config transformers cannot build as a causal LM (an unknown model_type, a model that is not
a causal LM, remote code without ``--trust-remote-code``) is one UserError.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from memplan.catalog import cache
from memplan.catalog.spec import Arch, Cfg, Linear, ModelSpec, ParamItem, Traits, _freeze, _linear_item
from memplan.errors import UserError

_REMOTE_CODE = {"trusted": False}


def trust_remote_code(trusted: bool = True) -> None:
    """Let a config whose model ships its own Python code (``auto_map``) be built (``--trust-remote-code``)."""
    _REMOTE_CODE["trusted"] = bool(trusted)


def spec_from_config(cfg: Cfg, source: Path | None = None) -> ModelSpec:
    """The ModelSpec of ``cfg``'s model, from the cache or else from the model built on the meta device.
    ``source``: the config.json the dict came from (a model with remote code is built from its directory)."""
    key = cache.model_key(cfg.c)
    entry = cache.load(key)
    if entry is not None:
        try:
            return _spec(entry, cfg, key)
        except (KeyError, TypeError, ValueError):
            pass  # an entry written by another memplan: read the model again
    from memplan.extras import require

    require("torch", f"{cfg.name}: model_type '{cfg.model_type}' has no family module in memplan, so reading it "
                     "(once, then cached) builds the model with transformers, which")
    t0 = time.perf_counter()
    entry = _describe(cfg, source)
    entry["build_seconds"] = round(time.perf_counter() - t0, 3)
    entry["classes"] = {}
    cache.save(key, entry)
    return _spec(entry, cfg, key)


def _spec(entry: dict, cfg: Cfg, key: str) -> ModelSpec:
    """The frozen ModelSpec of a cached entry (one layer group): exact per-layer items replace the norm lines
    _freeze makes."""
    a = entry["arch"]
    # an MoE's router and fused expert stacks are adapted by peft's MoE conversion under their own names, as
    # for Mixtral: "all-linear" reaches them too (Traits.peft_expert_targets)
    moe = tuple((lin["name"], lin["name"]) for lin in a["linears"] if lin["kind"] in ("router", "experts"))
    traits = Traits(**dict(a["traits"], layer_types=tuple(a["traits"]["layer_types"]), calibrated=key,
                           peft_expert_targets=moe))
    items = [ParamItem(**i) for i in a["layer_items"]]
    arch = Arch(
        vocab=a["vocab"], hidden=a["hidden"], layers=a["layers"], heads=a["heads"], kv_heads=a["kv_heads"],
        head_dim=a["head_dim"], inter=a["inter"], gated=a["gated"], act=a["act"], norm=traits.norm,
        norm_params=a["layer_other_params"], tie=a["tie"], positions=a["positions"], layer_prefix=a["prefix"],
        linears=[Linear(**lin) for lin in a["linears"]], layer_norms=[], traits=traits,
        embedding=[ParamItem(**i) for i in a["embedding"]], final=[ParamItem(**i) for i in a["final"]],
        lm_head_in=a["lm_head_in"], experts=a["experts"], top_k=a["top_k"],
    )
    spec = _freeze(arch, cfg.name, cfg.model_type, cfg.c)
    return replace(spec, layer_groups=(replace(spec.layer_groups[0], items=tuple(items)),),
                   norms_per_layer=a["layer_norms"])


# ---------------------------------------------------------------- the model on the meta device


def build_meta(config: dict, name: str, source: Path | None = None):
    """transformers' causal LM of ``config`` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = hf_config(config, name, source)
    try:
        with _quiet(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf, trust_remote_code=bool(config.get("auto_map")),
                                                    dtype=torch.bfloat16)
    except Exception as err:  # transformers reports an unusable config in many ways (ValueError, KeyError, ...)
        raise _cannot_build(name, config, err) from None


def _cannot_build(name: str, config: dict, err: Exception) -> UserError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". Should contain")[0]
    return unsupported(name, config.get("model_type"), f"transformers {cache.transformers_version()} "
                       f"cannot build it as a causal LM ({first[:300]})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings about a config (token ids outside a cut vocabulary, ...) are not the user's."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


def hf_config(config: dict, name: str, source: Path | None = None, keep: list[int] | None = None):
    """transformers' config object of a config.json dict (``keep``: only these decoder layers)."""
    from transformers import AutoConfig

    remote = bool(config.get("auto_map"))
    if remote and not _REMOTE_CODE["trusted"]:
        raise unsupported(name, config.get("model_type"), "the model ships its own Python code (auto_map in "
                          "config.json), which memplan runs only with --trust-remote-code")
    try:
        if remote:
            if source is None:
                raise unsupported(name, config.get("model_type"), "a model with its own code is read from its "
                                  "directory (config.json and its *.py files)")
            with _quiet():
                hf = AutoConfig.from_pretrained(str(source.parent), trust_remote_code=True, local_files_only=True)
        else:
            data = dict(config)
            with _quiet():
                hf = AutoConfig.for_model(data.pop("model_type"), **data)
    except UserError:
        raise
    except Exception as err:
        raise _cannot_build(name, config, err) from None
    if keep is not None:
        _truncate(hf, keep)
    return hf


def unsupported(name: str, model_type, reason: str) -> UserError:
    """The one-line error of a model memplan can neither count analytically nor read from transformers."""
    from memplan.catalog.families import SUPPORTED_MODEL_TYPES

    return UserError(f"{name}: unsupported model_type '{model_type}': {reason} (families memplan counts "
                     f"without transformers: {', '.join(SUPPORTED_MODEL_TYPES)})")


def _truncate(hf_config, keep: list[int]) -> None:
    """Keep only the decoder layers ``keep`` of a config: as many layers, with their ``layer_types`` entries
    (without ``layer_types``, ``keep`` must be the first layers)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    kinds = getattr(text, "layer_types", None)
    if isinstance(kinds, list) and len(kinds) == text.num_hidden_layers:
        text.layer_types = [kinds[i] for i in keep]
    elif keep != list(range(len(keep))):
        raise ValueError(f"layers {keep} are not the first layers, and the config has no layer_types")
    text.num_hidden_layers = len(keep)


def representatives(config: dict, kinds: list[int]) -> list[int]:
    """Layer 0 and the first layer of each kind after it; with a config-level ``layer_types`` they can be
    built alone (in that order), else the first layers up to the last of them."""
    firsts = sorted({kinds.index(k, 1) for k in set(kinds[1:])})
    if isinstance(config.get("layer_types"), list) and len(config["layer_types"]) == len(kinds):
        return [0, *firsts]
    return list(range(1 + max(firsts, default=0)))


def layer_list(model, name: str = "") -> tuple[str, list]:
    """The decoder layers of ``model`` (as memplan.runtime.model.decoder_layers finds them) and the module
    path of the list that holds them; a UserError unless they are one list, in order (decoder-only)."""
    from memplan.runtime.model import decoder_layers

    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    paths = [names.get(id(m), "") for m in layers]
    prefix = paths[0].rpartition(".")[0] if paths else ""
    if not layers or paths != [f"{prefix}.{i}" for i in range(len(layers))]:
        raise unsupported(name or type(model).__name__, model.config.model_type, f"{type(model).__name__} is not "
                          "a decoder-only model (its decoder layers are not one list)")
    return prefix, layers


def layer_signature(layer, layer_type: str = "") -> str:
    """What makes two decoder layers the same kind: their class, attention type (the config's
    ``layer_types`` entry) and parameter shapes."""
    shapes = ",".join(f"{n.replace('.base_layer', '')}:{tuple(p.shape)}" for n, p in layer.named_parameters()
                      if "lora_" not in n)  # the same under peft's LoRA wrappers
    return f"{type(layer).__name__}|{layer_type or getattr(layer, 'attention_type', '')}|{shapes}"


def layer_types(config, layers: int) -> list[str]:
    """The config's ``layer_types`` (one per layer), or empty strings."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = getattr(text, "layer_types", None)
    return list(kinds) if isinstance(kinds, list) and len(kinds) == layers else [""] * layers


def _describe(cfg: Cfg, source: Path | None) -> dict:
    """The cache entry of a model: its parameter groups, shapes and layer kinds."""
    model = build_meta(cfg.c, cfg.name, source)
    prefix, layers = layer_list(model, cfg.name)
    types = layer_types(model.config, len(layers))
    signatures = [layer_signature(m, t) for m, t in zip(layers, types, strict=True)]
    if len({s.split("|", 2)[2] for s in signatures}) > 1:
        raise unsupported(cfg.name, cfg.model_type, "its decoder layers differ in their parameters (the "
                          "estimate needs layers of one shape)")
    kinds = list(dict.fromkeys(signatures))
    return {"arch": _arch(model, cfg, prefix, layers), "kinds": kinds,
            "layer_kinds": [kinds.index(s) for s in signatures],
            "model_class": type(model).__name__, "transformers": cache.transformers_version()}


def _arch(model, cfg: Cfg, prefix: str, layers: list) -> dict:
    """Parameter groups of the meta model, with the config values the estimator's analytic terms read."""
    from torch import nn

    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tie = head is not None and head.weight is emb.weight
    head_ids = set() if head is None or tie else {id(p) for p in head.parameters()}
    groups: dict[str, list[dict]] = {"embedding": [], "final": [], "lm_head": []}
    positions = 0
    for path, p in model.named_parameters():  # each tensor once: a tied lm_head is the embedding
        if path.startswith(prefix + "."):
            continue
        module = model.get_submodule(path.rpartition(".")[0])
        group = "lm_head" if id(p) in head_ids else "embedding" if isinstance(module, nn.Embedding) else "final"
        if isinstance(module, nn.Embedding) and module is not emb and module.embedding_dim == emb.embedding_dim:
            positions = module.num_embeddings  # learned positions
        groups[group].append(asdict(ParamItem(path, p.numel(), " x ".join(map(str, p.shape)))))
    linears, others = _layer_parameters(layers[0])
    hidden = getattr(text, "hidden_size", None) or emb.embedding_dim
    heads = getattr(text, "num_attention_heads", None) or 1
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None)
    traits = dict(
        decoder_layer=type(layers[0]).__name__, sdpa=bool(getattr(model, "_supports_sdpa", True)),
        flash=bool(getattr(model, "_supports_flash_attn", True)),
        norm="layer" if any(isinstance(m, nn.LayerNorm) for m in _outside(model, prefix)) else "rms",
        sliding_window=window if isinstance(window, int) and window > 0 else None,
        layer_types=list(kinds) if isinstance(kinds, list) and len(kinds) == len(layers) else [],
        attn_dropout=float(getattr(text, "attention_dropout", 0.0) or 0.0),
        final_softcap=getattr(text, "final_logit_softcapping", None))
    if groups["lm_head"] and groups["lm_head"][0]["params"] != head.weight.numel():
        raise unsupported(cfg.name, cfg.model_type, "its output layer is not one weight matrix")
    return dict(
        vocab=emb.num_embeddings, hidden=hidden, layers=len(layers), heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads,
        inter=getattr(text, "intermediate_size", None) or max(lin["d_out"] for lin in linears),
        gated=any("gate" in lin["name"] for lin in linears),
        act=str(getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", None) or "silu"),
        tie=tie, positions=positions, prefix=prefix, linears=linears, traits=traits,
        layer_items=[asdict(_linear_item(Linear(**lin))) for lin in linears] + others,
        layer_other_params=sum(i["params"] for i in others), layer_norms=len(others),
        embedding=groups["embedding"], final=groups["final"],
        lm_head_in=head.weight.shape[1] if groups["lm_head"] else hidden,
        experts=max([lin["count"] for lin in linears if lin["kind"] == "experts"], default=0),
        top_k=getattr(text, "num_experts_per_tok", 0) or 0)


def _outside(model, prefix: str) -> list:
    """The modules outside the decoder layers (embeddings, final norm, heads)."""
    return [m for n, m in model.named_modules() if not n.startswith(prefix + ".")]


def _layer_parameters(layer) -> tuple[list[dict], list[dict]]:
    """A decoder layer's weight matrices as LoRA reaches them, and its other parameters: ``nn.Linear`` and
    transformers ``Conv1D`` modules; an MoE's fused expert stacks (3-D parameters of an ``...Experts``
    module, (count, d_out, d_in): peft's MoE conversion, as for Mixtral) and its router's weight (a
    ``...Router`` module's, used through F.linear: peft wraps it too)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    linears, covered = [], set()
    for path, m in layer.named_modules():
        attr = path.rpartition(".")[2]
        found = []
        if isinstance(m, nn.Linear):
            found = [Linear(attr, m.in_features, m.out_features, m.bias is not None, path=path)]
        elif isinstance(m, Conv1D):  # weight (d_in, d_out): peft needs fan_in_fan_out
            found = [Linear(attr, m.weight.shape[0], m.nf, m.bias is not None, path=path, kind="conv1d")]
        elif type(m).__name__.endswith("Experts"):
            found = [Linear(f"{attr}.{n}", p.shape[2], p.shape[1], False, p.shape[0], f"{path}.{n}", "experts")
                     for n, p in m.named_parameters(recurse=False) if p.dim() == 3]
        elif "Router" in type(m).__name__ and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
            bias = getattr(m, "bias", None) is not None
            found = [Linear(attr, m.weight.shape[1], m.weight.shape[0], bias, path=path, kind="router")]
        for lin in found:
            linears.append(asdict(lin))
            names = {"experts": [lin.name.split(".")[-1]], "router": ["weight", "bias"]}.get(lin.kind)
            covered.update(id(p) for n, p in m.named_parameters() if names is None or n in names)
    others = [asdict(ParamItem(path, p.numel(), " x ".join(map(str, p.shape))))
              for path, p in layer.named_parameters() if id(p) not in covered]
    return linears, others
