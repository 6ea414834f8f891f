"""The model families memplan counts, one module each, and the registry from ``model_type`` to module.

A family module defines ``build(cfg: Cfg) -> Arch`` (types in :mod:`memplan.catalog.spec`), mirroring the
module constructors of transformers' ``models/<type>/modeling_<type>.py``; shared pieces (the rotary
attention, the gated MLP, the llama-like builder) are in :mod:`.common`.  Adding a family = one module here
and one line in ``FAMILIES``.  A module is imported only when a config of its type is read, so the estimate
path loads one family, however many there are.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# model_type (config.json) -> the module in this package that builds it
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mixtral",
    "qwen2": "qwen2",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
    "gpt2": "gpt2",
    "opt": "opt",
    "qwen3": "qwen3",
    "olmo2": "olmo2",
    "gemma3_text": "gemma3_text",
    "smollm3": "smollm3",
    "granite": "granite",
    "gpt_oss": "gpt_oss",
    "llama4_text": "llama4_text",
    "qwen2_moe": "qwen2_moe",
    "deepseek_v3": "deepseek_v3",
    "deepseek_v2": "deepseek_v2",
    "qwen3_moe": "qwen3_moe",
    "qwen2_5_vl_text": "qwen2_5_vl_text",
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


# How a family's estimate is obtained, when its module does not say (a module may set ESTIMATE): "analytic" =
# the parameter counts and the layer replay (memplan.estimator.layers) from the config alone.
DEFAULT_ESTIMATE = "analytic"


def family_rows() -> list[dict]:
    """One row per registered model_type, for ``memplan models``: the module, how its estimate is obtained
    (the module's ESTIMATE, else DEFAULT_ESTIMATE) and what the module says of the family (its docstring's
    first sentence)."""
    rows = []
    for model_type, name in FAMILIES.items():
        module = importlib.import_module(f"{__name__}.{name}")
        doc = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
        rows.append({"model_type": model_type, "module": f"{__name__}.{name}",
                     "estimate": getattr(module, "ESTIMATE", DEFAULT_ESTIMATE),
                     "about": doc.split(": ", 1)[0].rstrip(".") if doc else ""})
    return rows + [_calibrated_row()]


def _calibrated_row() -> dict:
    """Every other decoder-only model_type: read from transformers' model and calibrated by trace on first use
    (memplan.catalog.traced); the models already calibrated on this machine, from the cache."""
    from memplan.catalog import cache

    done = cache.cached_models()
    where = f"cached in {cache.cache_dir() / 'traced'}"
    about = (f"any other decoder-only causal LM the installed transformers builds ({where}: "
             + (", ".join(done) if done else "none yet") + ")")
    return {"model_type": "*", "module": "memplan.catalog.traced", "estimate": "calibrated by trace",
            "about": about}


def builder(model_type: str) -> Callable | None:
    """The ``build`` function of ``model_type``'s family module, or None for an unsupported type."""
    module = FAMILIES.get(model_type)
    if module is None:
        return None
    return importlib.import_module(f"{__name__}.{module}").build
