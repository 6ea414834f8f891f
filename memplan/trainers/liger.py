"""Liger's kernels as the trainers switch them on, mapped onto Plan.liger.

- transformers / TRL: `use_liger_kernel: true` applies the model type's apply_liger_kernel_to_<type> with its
  defaults, or with `liger_kernel_config` as its keyword arguments (transformers/integrations/liger.py
  apply_liger_kernel -> liger_kernel.transformers._apply_liger_kernel_to_instance). For the model types memplan
  models Liger for (memplan.estimator.liger.MODEL_TYPES) the defaults are rope, rms_norm, swiglu and
  fused_linear_cross_entropy on, cross_entropy off (monkey_patch.py apply_liger_kernel_to_llama and siblings).
- LLaMA-Factory: `enable_liger_kernel: true` calls the same function with its defaults (model/model_utils/
  liger_kernel.py apply_liger_kernel; its `use_kernels` and training-only checks aside).
- axolotl: the LigerPlugin in `plugins`, then liger_rope / liger_rms_norm / liger_glu_activation / liger_cross_entropy
  / liger_fused_linear_cross_entropy as that function's arguments (src/axolotl/integrations/liger/plugin.py);
  without the plugin the flags do nothing.

Liger's cross_entropy (its kernel on the full logits) is not modelled: the logits are still materialized.

Pure Python.
"""

from __future__ import annotations

from typing import Any

from memplan.plan import LIGER_KERNELS
from memplan.trainers.source import Reading

CROSS_ENTROPY = ("Liger's cross-entropy kernel on the full logits (computed in place, not the fused loss): "
                 "memplan counts the standard loss")


def take(r: Reading, switches: dict[str, Any], keys: str) -> None:
    """Plan.liger from Liger's keyword arguments (`switches`: rope, rms_norm, swiglu, cross_entropy,
    fused_linear_cross_entropy, each on or off), read from the file's `keys`."""
    on = [k for k in LIGER_KERNELS if _on(switches.get(k))]
    r.take("liger", on, keys)
    if _on(switches.get("cross_entropy")):
        r.unmodelled(keys.split(" ")[0], "cross_entropy", CROSS_ENTROPY)


def defaults() -> dict[str, bool]:
    """apply_liger_kernel_to_llama's defaults (the same for mistral, qwen2, qwen3, smollm3)."""
    return {**{k: True for k in LIGER_KERNELS}, "cross_entropy": False}


def _on(value: Any) -> bool:
    return value in (True, 1, "true", "True", "1")


def read_hf(r: Reading, switch_key: str, config_key: str | None = None) -> None:
    """`switch_key` (use_liger_kernel / enable_liger_kernel) with the model type's defaults, overridden by the
    mapping under `config_key` (liger_kernel_config)."""
    if not _on(r.get(switch_key)):
        if config_key and r.has(config_key):
            r.ignore(config_key)  # which kernels would run, were they switched on
        r.ignore(switch_key)
        return
    switches, keys = defaults(), switch_key
    if config_key and r.has(config_key):
        extra = r.get(config_key)
        keys = f"{switch_key} + {config_key}"
        if isinstance(extra, dict):
            for name, value in extra.items():
                if name in switches:
                    switches[name] = _on(value)
                else:
                    r.unknown.append(f"{config_key}.{name}")
        else:
            r.unknown.append(config_key)
    take(r, switches, keys)


# ---------------------------------------------------------------- writing (memplan.trainers.emit)


def transformers_arguments(plan) -> dict[str, Any]:
    """use_liger_kernel, and liger_kernel_config where the plan runs only some of the kernels."""
    if not plan.liger:
        return {}
    if list(plan.liger) == list(LIGER_KERNELS):
        return {"use_liger_kernel": True}
    return {"use_liger_kernel": True, "liger_kernel_config": {k: k in plan.liger for k in LIGER_KERNELS}}


def all_or_none(n, trainer: str, switch: str) -> None:
    """A trainer with one switch for Liger (the model type's defaults): some kernels -> all of them."""
    if n.plan.liger and list(n.plan.liger) != list(LIGER_KERNELS):
        n.change("liger", list(LIGER_KERNELS), f"liger {','.join(n.plan.liger)} -> all: {trainer}'s {switch} applies "
                                               "the model type's default kernels, all four")
