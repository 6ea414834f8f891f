"""A DeepSpeed config as transformers' Trainer runs it (TRL, LLaMA-Factory, axolotl name one by path or inline):
ZeRO stage, CPU offload, the bf16/fp16 engine, and its "auto" values filled from the trainer's arguments the
way transformers does (integrations/deepspeed.py, HfTrainerDeepSpeedConfig.trainer_config_process: "auto"
takes the argument's value; a number that differs from the argument is refused there, and here).
"""

from __future__ import annotations

import math
from typing import Any

from memplan.errors import UserError
from memplan.estimator.sharding import DEEPSPEED_ALL_STAGES, DEEPSPEED_ZERO3_DEFAULTS
from memplan.trainers.source import Reading, shown_value

#: zero_optimization keys that do not change memory, or only at save time.
_QUIET = {"stage", "offload_optimizer", "offload_param", "contiguous_gradients", "round_robin_gradients",
          "allgather_partitions", "reduce_scatter", "overlap_comm"}
#: zero_optimization sizes memplan's estimate counts (Plan.deepspeed), by the names DeepSpeed takes (a ZeRO-3 key
#: also without its "stage3_" prefix: deepspeed/runtime/zero/config.py aliases); "auto" is what transformers fills
#: and memplan counts when the plan leaves the size unset (memplan.estimator.sharding, zero3_gather).
_SIZES = {"reduce_bucket_size": "reduce_bucket_size", "sub_group_size": "sub_group_size"} | {
    name: key for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                          "stage3_max_live_parameters", "stage3_max_reuse_distance")
    for name in (key, key.removeprefix("stage3_"))}
_AUTO = {"reduce_bucket_size": "HF's auto: hidden_size², as memplan counts the reduce bucket",
         "stage3_prefetch_bucket_size": "HF's auto: 0.9 x hidden_size², as memplan counts the prefetch",
         "stage3_param_persistence_threshold": "HF's auto: 10 x hidden_size, as memplan counts the parameters ZeRO-3 "
                                               "keeps whole"}
#: DeepSpeed's defaults (DEEPSPEED_ZERO3_DEFAULTS), which memplan counts when the plan leaves the size unset: the
#: same number is not taken.
_DEFAULTS = {"sub_group_size": "DeepSpeed's default, as memplan counts the stage-3 optimizer step",
             "stage3_max_live_parameters": "DeepSpeed's default, as memplan counts ZeRO-3's prefetch",
             "stage3_max_reuse_distance": "DeepSpeed's default, as memplan counts the parameters ZeRO-3 keeps gathered"}
#: zero_optimization keys that change memory and that memplan's estimate does not count.
_UNMODELLED = {
    "allgather_bucket_size": "ZeRO-1/2 all-gather bucket",
    "stage3_gather_16bit_weights_on_model_save": "the 16-bit weights gathered on rank 0 when saving",
    "gather_16bit_weights_on_model_save": "the 16-bit weights gathered on rank 0 when saving",
    "zero_quantized_weights": "ZeRO++ quantized weights", "zero_hpz_partition_size": "ZeRO++ secondary partition",
    "zero_quantized_gradients": "ZeRO++ quantized gradients",
}
#: Top-level keys with no memory effect (or filled from the trainer's own settings: train_batch_size).
_TOP_QUIET = {"train_batch_size", "gradient_clipping", "wall_clock_breakdown", "zero_allow_untested_optimizer",
              "steps_per_print", "scheduler", "fp16", "bf16", "zero_optimization", "optimizer",
              "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_force_ds_cpu_optimizer",
              "communication_data_type", "prescale_gradients", "gradient_predivide_factor"}


def _filled(r: Reading, ds: dict, key: str, arg_value: Any, arg_name: str, where: str) -> None:
    """A batch key: "auto" (or absent) is the trainer's own value; a number must equal it."""
    value = ds.get(key, "auto")
    if value != "auto" and value != arg_value:
        raise UserError(f"{r.path}: {where} sets {key} = {shown_value(value)} but the trainer's {arg_name} is "
                        f"{shown_value(arg_value)}; transformers refuses the mismatch. Hint: set it to \"auto\"")


def read(r: Reading, ds: dict[str, Any], where: str, args: dict[str, Any]) -> None:
    """Map a DeepSpeed config onto the plan. `args`: the trainer's micro_batch, grad_accum, bf16 and fp16
    (what "auto" becomes); `where` names the config in the report ("deepspeed (ds_z3_config.json)")."""
    r.take("sharding", "deepspeed", where)
    _filled(r, ds, "train_micro_batch_size_per_gpu", args["micro_batch"], args["micro_batch_key"], where)
    _filled(r, ds, "gradient_accumulation_steps", args["grad_accum"], args["grad_accum_key"], where)
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    r.take("zero", stage, f"{where}: zero_optimization.stage")
    _offload(r, zero, where)
    _engine(r, ds, where, args)
    _buckets(r, zero, where, stage)
    opt = ds.get("optimizer")
    if isinstance(opt, dict):
        kind = str(opt.get("type", ""))
        if kind.lower() in ("adam", "adamw"):
            r.take("optimizer", "adamw", f"{where}: optimizer.type")
        else:
            r.unmodelled(f"{where}: optimizer.type", kind, "a DeepSpeed optimizer memplan does not model; "
                                                           "counted as the trainer's optimizer")
    for key in ds:
        if key not in _TOP_QUIET:
            r.unknown.append(f"{where}: {key}")


def _offload(r: Reading, zero: dict, where: str) -> None:
    opt = (zero.get("offload_optimizer") or {}).get("device", "none")
    par = (zero.get("offload_param") or {}).get("device", "none")
    if par in ("cpu", "nvme"):
        r.take("offload", "optimizer+params", f"{where}: zero_optimization.offload_param.device")
    elif opt in ("cpu", "nvme"):
        r.take("offload", "optimizer", f"{where}: zero_optimization.offload_optimizer.device")
    else:
        r.take("offload", "none", f"{where}: zero_optimization (no offload_optimizer / offload_param)")
    if "nvme" in (opt, par):
        r.unmodelled(f"{where}: offload to nvme", "nvme", "NVMe offload: counted as offload to host RAM")


def _engine(r: Reading, ds: dict, where: str, args: dict[str, Any]) -> None:
    """bf16.enabled / fp16.enabled ("auto": the trainer's bf16 / fp16). DeepSpeed's bf16 and fp16 engines both
    keep 16-bit weights and fp32 master weights and states = bf16-master; neither = fp32."""
    def enabled(name: str) -> bool:
        value = (ds.get(name) or {}).get("enabled", False)
        return bool(args[name]) if value == "auto" else bool(value)

    bf16, fp16 = enabled("bf16"), enabled("fp16")
    auto = any((ds.get(n) or {}).get("enabled") == "auto" for n in ("bf16", "fp16"))
    keys = f"{where}: bf16.enabled / fp16.enabled" + (f" (auto: {args['half_key']})" if auto else "")
    r.take("precision", "bf16-master" if (bf16 or fp16) else "fp32", keys)
    if fp16 and not bf16:
        r.unmodelled(f"{where}: fp16.enabled", True, "DeepSpeed's fp16 engine: counted as its bf16 engine (the "
                                                     "same 16-bit weights and fp32 masters); loss scaling is not")


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _buckets(r: Reading, zero: dict, where: str, stage: int) -> None:
    for key, value in zero.items():
        name = f"{where}: zero_optimization.{key}"
        field = _SIZES.get(key)
        number = _number(value)
        if field and stage < 3 and field not in DEEPSPEED_ALL_STAGES:
            r.count(name, value, f"ZeRO-3's alone: no memory at stage {stage}")
        elif field and value == "auto" and field in _AUTO:
            r.count(name, value, _AUTO[field])
        elif field in _DEFAULTS and number == DEEPSPEED_ZERO3_DEFAULTS[field]:
            r.count(name, value, _DEFAULTS[field])
        elif field and number is not None and math.isfinite(number) and number >= 0 and number.is_integer():
            r.take(f"deepspeed.{field}", int(number), name)
        elif field or key in _UNMODELLED:
            r.unmodelled(name, value, _UNMODELLED.get(key) or "a size memplan cannot read (a whole number of "
                                                              "elements, or HF's auto)")
        elif key not in _QUIET:
            r.unknown.append(name)
