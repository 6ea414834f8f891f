"""FSDP as transformers' Trainer takes it (TRL, LLaMA-Factory, axolotl): `fsdp` (true, or the older string /
list of options) and `fsdp_config` (inline or a file), with or without the `fsdp_` prefix on its keys.

Sources (transformers 5.25 training_args.py): FSDPOption (full_shard, shard_grad_op, no_shard, hybrid_shard,
hybrid_shard_zero2, offload, auto_wrap); _apply_legacy_fsdp_to_config (full_shard -> reshard_after_forward
True, shard_grad_op -> False, offload -> cpu_offload); the fsdp_config keys (version defaults to 2,
reshard_after_forward to True, cpu_offload, activation_checkpointing). The Plan's zero: 3 = FULL_SHARD
(parameters resharded after the forward), 2 = SHARD_GRAD_OP, 0 = NO_SHARD.
"""

from __future__ import annotations

from typing import Any

from memplan.trainers.hf import section
from memplan.trainers.source import Reading

_STAGES = {"full_shard": 3, "shard_grad_op": 2, "no_shard": 0, "hybrid_shard": 3, "hybrid_shard_zero2": 2,
           "1": 3, "2": 2, "3": 0, "4": 3, "5": 2, "true": 3, "false": 2}
_HYBRID = "hybrid sharding shards within a node and replicates across nodes: memplan shards across every GPU"
_QUIET = {"version", "use_orig_params", "sync_module_states", "state_dict_type", "min_num_params",
          "auto_wrap_policy", "transformer_layer_cls_to_wrap", "xla", "xla_fsdp_grad_ckpt"}
_UNMODELLED = {
    "backward_prefetch": "prefetching the next layer's parameters in the backward",
    "forward_prefetch": "prefetching the next layer's parameters in the forward",
    "limit_all_gathers": "rate-limiting all-gathers (fewer in flight)",
    "cpu_ram_efficient_loading": "host RAM while loading: rank 0 alone reads the weights",
}


#: Values that turn an unmodelled option off (BackwardPrefetch's NO_PREFETCH included).
_OFF = ("false", "0", "no", "none", "no_prefetch")


def _bool(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _options(r: Reading, value: Any) -> tuple[int, bool]:
    """The `fsdp` key: true, or the older option string / list. Its stage and whether it offloads."""
    items = str(value).split() if isinstance(value, (str, bool)) else [str(v) for v in value]
    stage, offload = 3, False
    for item in items:
        item = item.lower()
        if item in _STAGES:
            stage = _STAGES[item]
            if item.startswith("hybrid"):
                r.unmodelled("fsdp", item, _HYBRID)
        offload = offload or item == "offload"
    return stage, offload


def read(r: Reading, origin: str = "fsdp") -> dict[str, Any]:
    """Map `fsdp` / `fsdp_config` onto sharding, zero, offload and grad_ckpt (when fsdp_config sets
    activation_checkpointing: FSDP's own checkpointing of every decoder layer). `origin`: what turned FSDP on, as
    the report names it (an accelerate config's distributed_type). Returns fsdp_config, without fsdp_ prefixes."""
    stage, offload = _options(r, r.get("fsdp", True))
    keys = origin
    config: dict[str, Any] = {}
    if r.has("fsdp_config"):
        config, where = section(r, "fsdp_config", "FSDP config")
        config = {k.removeprefix("fsdp_"): v for k, v in config.items()}
        keys = f"{origin} + {where}"
    strategy = config.get("sharding_strategy", config.get("reshard_after_forward"))
    if strategy is not None:
        stage = _STAGES.get(str(strategy).lower(), stage)
        if str(strategy).lower().startswith(("hybrid", "_hybrid")) or str(strategy) in ("4", "5"):
            r.unmodelled("fsdp_config.sharding_strategy", strategy, _HYBRID)
    offload = offload or _bool(config.get("offload_params", False)) or _bool(config.get("cpu_offload", False))
    r.take("sharding", "fsdp", keys)
    r.take("zero", stage, keys)
    r.take("offload", "optimizer+params" if offload else "none", keys)
    if _bool(config.get("activation_checkpointing", False)):
        r.take("grad_ckpt", True, "fsdp_config.activation_checkpointing")
    for key, value in config.items():
        if key in _UNMODELLED and str(value).lower() in _OFF:
            r.count(f"fsdp_config.{key}", value, "off, as memplan counts")
        elif key in _UNMODELLED:
            r.unmodelled(f"fsdp_config.{key}", value, _UNMODELLED[key])
        elif key == "transformer_layer_cls_to_wrap" or value == "TRANSFORMER_BASED_WRAP":
            r.count(f"fsdp_config.{key}", value, "one FSDP unit per decoder layer, as memplan counts")
        elif key not in _QUIET and key not in ("sharding_strategy", "reshard_after_forward", "offload_params",
                                               "cpu_offload", "activation_checkpointing"):
            r.unknown.append(f"fsdp_config.{key}")
    return config
