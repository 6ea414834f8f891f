"""accelerate's launch config (the file `accelerate config` writes and `accelerate launch --config_file` takes), read
alone or beside a trainer's config (`memplan estimate --config sft.yaml --accelerate-config fsdp.yaml`, TRL's
`accelerate_config: zero3`): how many processes run on how many machines, FSDP or DeepSpeed and their settings,
and the mixed precision.

Sources (accelerate 1.16): commands/config/config_args.py (ClusterConfig: num_processes counts the processes of
all machines, num_machines defaults to 1, distributed_type is required, a missing mixed_precision is "no");
commands/launch.py (_validate_launch_command: distributed_type NO runs one process whatever num_processes says;
fsdp_config / deepspeed_config are used only for FSDP / DEEPSPEED; a mixed_precision from the file is one of the
DeepSpeed fields accelerate refuses beside a deepspeed_config_file) and utils/launch.py (nproc_per_node =
num_processes // num_machines; the FSDP_* and ACCELERATE_DEEPSPEED_* variables); utils/dataclasses.py
(FullyShardedDataParallelPlugin: FULL_SHARD / reshard_after_forward true by default; DeepSpeedPlugin: zero_stage
2, no offload by default, and _deepspeed_config_checks, which refuses zero_stage, offload devices, accumulation,
clipping, zero3_save_16bit_model or mixed_precision from the accelerate config beside a DeepSpeed config file).

Beside a transformers Trainer (TRL, axolotl, LLaMA-Factory; transformers 5.25 training_args.py and trainer.py):
the Trainer's own `deepspeed` / `fsdp` settings are passed to accelerate as explicit plugins, so they stand, and
FSDP settings the trainer's fsdp_config leaves out (offload, activation checkpointing) come from the accelerate
config's FSDP_* variables; a trainer's DeepSpeed beside accelerate's FSDP (or the reverse) is refused, as are the
DeepSpeed fields accelerate refuses beside a DeepSpeed file. TrainingArguments.mixed_precision is bf16 / fp16 when
the trainer's bf16 / fp16 is on, else accelerate's mixed_precision: the autocast of a plan without DeepSpeed. Under
accelerate's DeepSpeed its engine is bf16 when that mixed precision is, and transformers refuses a bf16 engine
the trainer's bf16: false contradicts (HfTrainerDeepSpeedConfig.trainer_config_process).

Pure Python: no torch, no transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memplan.errors import UserError
from memplan.files import read_yaml
from memplan.trainers.source import ConfigSource, Reading, shown_value

#: distributed_type values memplan reads (accelerate's DistributedType): one process, DDP on GPUs or CPUs, FSDP,
#: DeepSpeed.
DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")
#: accelerate's PrecisionType (utils/dataclasses.py) -> the autocast it turns on.
AUTOCAST = {"no": None, "bf16": "bf16", "fp16": "fp16", "fp8": "bf16"}
#: TRL's named configs (trl/accelerate_configs/NAME.yaml; memplan ships them: data/trl_accelerate_configs).
TRL_NAMES = ("zero1", "zero2", "zero3", "fsdp1", "fsdp2", "multi_gpu", "single_gpu")
#: deepspeed_config keys accelerate refuses beside a DeepSpeed config file (DeepSpeedPlugin._deepspeed_config_checks).
REFUSED_BESIDE_FILE = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                       "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                       "zero3_save_16bit_model")
#: Top-level keys with no effect on a training step's memory (where the processes run, how they meet, TPU pods).
QUIET = {"compute_environment", "machine_rank", "main_process_ip", "main_process_port", "rdzv_backend", "same_network",
         "main_training_function", "gpu_ids", "debug", "enable_cpu_affinity", "downcast_bf16", "tpu_env",
         "tpu_use_cluster", "tpu_use_sudo", "tpu_name", "tpu_zone", "tpu_vm", "command_file", "commands",
         "mpirun_config", "fp8_config", "megatron_lm_config", "deepspeed_config", "fsdp_config", "dynamo_config",
         "parallelism_config", "num_processes", "num_machines", "mixed_precision", "use_cpu", "distributed_type"}
#: deepspeed_config keys with no effect on the training step (launchers, paths, load-time partitioning).
_DS_QUIET = {"deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_exclusion_filter",
             "deepspeed_inclusion_filter", "offload_optimizer_nvme_path", "offload_param_nvme_path",
             "gradient_clipping", "zero3_init_flag", "deepspeed_config_file", "zero_stage",
             "offload_optimizer_device", "offload_param_device", "gradient_accumulation_steps"}


def is_accelerate(data: dict[str, Any]) -> bool:
    """An accelerate config: it names distributed_type or compute_environment (every `accelerate config` does)."""
    return "distributed_type" in data or "compute_environment" in data


def locate(value: str, config_path: str, key: str) -> Path:
    """An accelerate config a trainer's config or --accelerate-config names: a file (from the current directory,
    else the config's directory and those above it), else one of TRL's names (trl/cli/accelerate_config.py:
    resolve_accelerate_config_argument tries the file first too)."""
    from memplan.trainers.hf import find_file

    if value in TRL_NAMES and not Path(value).expanduser().is_file():
        from memplan.catalog.paths import data_dir

        return data_dir() / "trl_accelerate_configs" / f"{value}.yaml"
    if Path(value).expanduser().is_file():
        return Path(value).expanduser()  # as given: the report names it so
    try:
        return find_file(value, config_path, key)
    except UserError as err:
        raise UserError(f"{err} (or one of TRL's accelerate configs: {', '.join(TRL_NAMES)})") from None


def load(path: str | Path) -> dict[str, Any]:
    data = read_yaml(path, "accelerate config")
    if not isinstance(data, dict) or not is_accelerate(data):
        raise UserError(f"{path}: not an accelerate config (the file `accelerate config` writes, with "
                        "distributed_type: NO, MULTI_GPU, FSDP or DEEPSPEED)")
    return data


def read(data: dict[str, Any], path: str) -> ConfigSource:
    """An accelerate config alone (`memplan estimate --config fsdp.yaml -m MODEL`): the training script is not
    known, so its weights are assumed fp32 (from_pretrained without a dtype) under accelerate's autocast."""
    launch = Launch(path, data)
    launch.apply(None)
    return launch.r.finish(QUIET)


class Launch:
    """An accelerate config read into its own Reading (`r`), whose fields and provenance `merge_into` moves to a
    trainer's reading, each key named with the file (`fsdp.yaml: num_processes`)."""

    def __init__(self, path: str | Path, data: dict[str, Any] | None = None) -> None:
        self.path, self.name = str(path), Path(path).name
        self.data = load(path) if data is None else data
        self.r = Reading("accelerate", self.path, self.data)
        env = str(self.data.get("compute_environment") or "LOCAL_MACHINE")
        if env != "LOCAL_MACHINE":
            raise UserError(f"{self.path}: compute_environment {env}: memplan reads LOCAL_MACHINE accelerate configs "
                            "(accelerate launch on your machines)")
        kind = self.data.get("distributed_type")
        if kind is None:
            raise UserError(f"{self.path}: no distributed_type (accelerate requires it): one of "
                            f"{', '.join(DISTRIBUTED)}")
        self.distributed = str(kind).upper()
        if self.distributed not in DISTRIBUTED:
            raise UserError(f"{self.path}: distributed_type {kind} is not one memplan reads; it reads "
                            f"{', '.join(DISTRIBUTED)}")
        mp = self.data.get("mixed_precision")
        self.mixed_precision = None if mp is None else str(mp).lower()
        if self.mixed_precision is not None and self.mixed_precision not in AUTOCAST:
            raise UserError(f"{self.path}: mixed_precision {mp} is not one of {', '.join(AUTOCAST)}")
        self.kind = {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(self.distributed)
        ds = self.data.get("deepspeed_config") or {}
        fs = self.data.get("fsdp_config") or {}
        for key, section in (("deepspeed_config", ds), ("fsdp_config", fs)):
            if not isinstance(section, dict):
                raise UserError(f"{self.path}: {key} is a mapping of settings, got {shown_value(section)}")
        self.ds, self.fsdp = ds, fs

    @property
    def autocast(self) -> str | None:
        return AUTOCAST[self.mixed_precision or "no"]

    # ---- what the trainer's config and this one decide together
    def check(self, trainer_kind: str | None, trainer_path: str) -> None:
        """The combinations accelerate and transformers refuse, as one line."""
        both = f"{trainer_path} and {self.path}"
        if trainer_kind and self.kind and trainer_kind != self.kind:
            raise UserError(f"{both} disagree: the trainer's config sets {trainer_kind} and the accelerate config "
                            f"distributed_type {self.distributed}; a run uses one. Hint: drop the trainer's "
                            f"{trainer_kind} settings, or use an accelerate config with distributed_type "
                            f"{trainer_kind.upper()}")
        if trainer_kind == "deepspeed" and self.kind == "deepspeed":
            refused = self._refused()
            if refused:
                raise UserError(f"{both}: the trainer's config names a DeepSpeed config and the accelerate config "
                                f"sets {', '.join(refused)} too, which accelerate refuses (DeepSpeedPlugin: they "
                                "belong in the DeepSpeed file). Hint: remove them from the accelerate config")

    def apply(self, trainer: dict[str, Any] | None) -> None:
        """Map the file onto self.r. `trainer`: None (the file alone), or the trainer's `kind` (its own "deepspeed"
        / "fsdp" or None), `args` (memplan.trainers.hf.training_arguments), `path` and `grad_ckpt`."""
        r = self.r
        kind = trainer["kind"] if trainer else None
        self._processes()
        if kind is None and self.kind == "fsdp":
            self._fsdp()
        elif kind is None and self.kind == "deepspeed":
            self._deepspeed(trainer)
        elif kind == "fsdp" and self.kind == "fsdp":
            self._fsdp_beside(trainer)
        elif kind is None:
            r.take("sharding", "ddp", f"distributed_type: {self.distributed}")
        else:
            for key in ("fsdp_config", "deepspeed_config"):
                if self.data.get(key):
                    r.count(key, self.data[key], f"the trainer's {kind} settings run (transformers passes them to "
                                                 "accelerate as its plugin)")
        if trainer is None and self.kind != "deepspeed":
            self._precision_alone()
        self._extras()

    def _processes(self) -> None:
        r = self.r
        if bool(self.data.get("use_cpu")) or self.distributed == "MULTI_CPU":
            r.take("device", "cpu", "use_cpu" if self.data.get("use_cpu") else "distributed_type: MULTI_CPU")
        machines = self.data.get("num_machines")
        processes = self.data.get("num_processes")
        if self.distributed == "NO":
            why = "distributed_type NO: accelerate launch starts one process (commands/launch.py: simple_launcher)"
            r.take("gpus", 1, "distributed_type: NO")
            r.take("nodes", 1, "distributed_type: NO")
            if processes not in (None, 1):
                r.count("num_processes", processes, "not used: " + why)
            return
        machines = 1 if machines is None else machines
        if not isinstance(machines, int) or machines < 1:
            raise UserError(f"{self.path}: num_machines {shown_value(machines)} is not a number of machines "
                            "(1 or more)")
        if processes in (None, -1):
            r.assume("gpus", 1, "num_processes not in the accelerate config (accelerate launch asks for "
                                "--num_processes): pass --gpus")
        elif not isinstance(processes, int) or processes < 1 or processes % machines:
            raise UserError(f"{self.path}: num_processes {shown_value(processes)} is not a whole number of processes "
                            f"per machine over num_machines {machines} (num_processes counts all machines' processes)")
        else:
            r.take("gpus", processes // machines, "num_processes / num_machines" if machines > 1 else "num_processes")
        if "num_machines" in self.data:
            r.take("nodes", machines, "num_machines")
        else:
            r.assume("nodes", 1, "num_machines not set; accelerate's default (commands/config/config_args.py)")

    def _fsdp(self) -> None:
        """FSDP from the accelerate config alone: memplan.trainers.fsdp reads its fsdp_-prefixed keys."""
        from memplan.trainers import fsdp

        fsdp.read(self.r, origin=f"distributed_type: {self.distributed}")

    def _fsdp_beside(self, trainer: dict[str, Any]) -> None:
        """Both FSDP: the trainer's fsdp_config is the plugin; its offload (when off) and its activation
        checkpointing (when not given) fall back to the accelerate config's FSDP_* variables."""
        r, t = self.r, trainer["r"]
        options = {k.removeprefix("fsdp_"): v for k, v in self.fsdp.items()}
        from memplan.trainers.fsdp import _bool

        if t.plan.get("offload") == "none" and _bool(options.get("offload_params", False)):
            r.take("offload", "optimizer+params", "fsdp_config.fsdp_offload_params")
        if "activation_checkpointing" not in trainer["fsdp_config"] and _bool(options.get("activation_checkpointing",
                                                                                           False)):
            r.take("grad_ckpt", True, "fsdp_config.fsdp_activation_checkpointing")
        r.count("fsdp_config", self.fsdp, "the trainer's fsdp_config runs (transformers passes it to accelerate as "
                                          "its plugin); offload and activation checkpointing it leaves out come from "
                                          "here")

    def _deepspeed(self, trainer: dict[str, Any] | None) -> None:
        """DeepSpeed from the accelerate config: its deepspeed_config_file (read by memplan.trainers.deepspeed), or
        the config DeepSpeedPlugin builds from zero_stage and the offload devices."""
        r, ds = self.r, self.ds
        r.seen.add("deepspeed_config")
        args = trainer["args"] if trainer else None
        mp = self.autocast
        if trainer and args["autocast"] is None and mp is not None:
            raise UserError(f"{trainer['path']} and {self.path}: the accelerate config's mixed_precision "
                            f"{self.mixed_precision} turns on DeepSpeed's {mp} engine, which the trainer's "
                            f"{args['half_key']} (off) contradicts; transformers refuses the mismatch. Hint: set "
                            f"{mp}: true in the trainer's config")
        if ds.get("deepspeed_config_file"):
            self._deepspeed_file(args)
            return
        r.take("sharding", "deepspeed", "distributed_type: DEEPSPEED")
        if "zero_stage" in ds:
            r.take("zero", int(ds["zero_stage"]), "deepspeed_config.zero_stage")
        else:
            r.assume("zero", 2, "deepspeed_config.zero_stage not set; accelerate's DeepSpeedPlugin default "
                                "(utils/dataclasses.py)")
        opt, par = (str(ds.get(k, "none")).lower() for k in ("offload_optimizer_device", "offload_param_device"))
        if par in ("cpu", "nvme"):
            r.take("offload", "optimizer+params", "deepspeed_config.offload_param_device")
        elif opt in ("cpu", "nvme"):
            r.take("offload", "optimizer", "deepspeed_config.offload_optimizer_device")
        elif "offload_optimizer_device" in ds or "offload_param_device" in ds:
            r.take("offload", "none", "deepspeed_config.offload_optimizer_device / offload_param_device")
        else:
            r.assume("offload", "none", "no offload devices in deepspeed_config; accelerate's DeepSpeedPlugin default")
        if "nvme" in (opt, par):
            r.unmodelled("deepspeed_config: offload to nvme", "nvme", "NVMe offload: counted as offload to host RAM")
        if "gradient_accumulation_steps" in ds:
            steps = ds["gradient_accumulation_steps"]
            if args is None:
                r.take("grad_accum", int(steps), "deepspeed_config.gradient_accumulation_steps")
            elif steps != "auto" and int(steps) != args["grad_accum"]:
                raise UserError(f"{trainer['path']} and {self.path}: deepspeed_config.gradient_accumulation_steps = "
                                f"{steps} but the trainer's {args['grad_accum_key']} is {args['grad_accum']}; "
                                "transformers refuses the mismatch. Hint: remove it from the accelerate config")
        autocast = args["autocast"] if args else mp
        keys = f"{args['half_key']} (DeepSpeed's engine)" if args else \
            ("mixed_precision" if self.mixed_precision else "mixed_precision not set (accelerate: no)")
        record = r.assume if "not set" in keys else r.take
        record("precision", "bf16-master" if autocast else "fp32", keys)
        if autocast == "fp16":
            r.unmodelled("mixed_precision", "fp16", "DeepSpeed's fp16 engine: counted as its bf16 engine (the same "
                                                    "16-bit weights and fp32 masters); loss scaling is not")
        if ds.get("zero3_save_16bit_model"):
            r.unmodelled("deepspeed_config.zero3_save_16bit_model", True,
                         "the 16-bit weights gathered on rank 0 when saving")
        if ds.get("deepspeed_moe_layer_cls_names"):
            r.unmodelled("deepspeed_config.deepspeed_moe_layer_cls_names", ds["deepspeed_moe_layer_cls_names"],
                         "ZeRO-3 leaf modules: each MoE layer's experts gathered whole")
        for key in ds:
            if key not in _DS_QUIET and key not in ("zero3_save_16bit_model", "deepspeed_moe_layer_cls_names"):
                r.unknown.append(f"deepspeed_config.{key}")

    def _deepspeed_file(self, args: dict[str, Any] | None) -> None:
        """deepspeed_config_file: the DeepSpeed JSON accelerate's DeepSpeedPlugin runs, read by
        memplan.trainers.deepspeed ("auto" from the trainer's arguments, or as accelerate fills it)."""
        from memplan.trainers import deepspeed

        refused = self._refused()
        if refused:
            raise UserError(f"{self.path}: deepspeed_config_file with {', '.join(refused)} beside it, which "
                            "accelerate refuses (DeepSpeedPlugin: they belong in the DeepSpeed file). Hint: "
                            "remove them from the accelerate config")
        path = locate_file(str(self.ds["deepspeed_config_file"]), self.path)
        config = read_yaml(path, "DeepSpeed config")
        if not isinstance(config, dict):
            raise UserError(f"{path}: a DeepSpeed config is a mapping of settings, got {type(config).__name__}")
        self.r.files.append(str(path))
        if args is None:  # a script without a trainer: "auto" is what accelerate's Accelerator fills
            args = _script_args(config, self.mixed_precision)
        deepspeed.read(self.r, config, f"deepspeed_config.deepspeed_config_file ({path.name})", args)

    def _refused(self) -> list[str]:
        """The keys accelerate refuses beside a DeepSpeed config file (a mixed_precision from the file is one)."""
        return [k for k in REFUSED_BESIDE_FILE if k in self.ds] + \
            (["mixed_precision"] if "mixed_precision" in self.data else [])

    def _precision_alone(self) -> None:
        """Without a trainer's config: the script's weights are not known; memplan assumes fp32 (from_pretrained
        without a dtype) under accelerate's autocast (accelerate's Accelerator: mixed_precision autocasts the
        forward, it does not cast the weights)."""
        from memplan.trainers.hf import precision

        mp = "mixed_precision" if self.mixed_precision else "mixed_precision not set (accelerate: no)"
        self.r.seen.add("mixed_precision")
        precision(self.r, "float32", self.autocast,
                  f"{mp} + weights' dtype not set (the training script loads them: float32 assumed)")
        if self.mixed_precision == "fp8":
            self.r.unmodelled("mixed_precision", "fp8", "FP8 matmuls (Transformer Engine / torchao): counted as bf16 "
                                                        "autocast")

    def _extras(self) -> None:
        r = self.r
        dynamo = self.data.get("dynamo_config") or {}
        backend = str(dynamo.get("dynamo_backend", "NO")).upper() if isinstance(dynamo, dict) else "NO"
        if backend != "NO":
            r.unmodelled("dynamo_config.dynamo_backend", backend, "torch.compile fuses kernels and changes which "
                                                                  "activations are kept")
        if self.data.get("parallelism_config"):
            r.unmodelled("parallelism_config", self.data["parallelism_config"],
                         "accelerate's ParallelismConfig (tensor / context parallel sizes): memplan counts data "
                         "parallelism only")

    # ---- into a trainer's reading
    def merge_into(self, t: Reading) -> None:
        """This file's fields and provenance into the trainer's reading `t` (this file wins for what it sets)."""
        src = self.r.finish(QUIET)
        label = self.name
        for path, keys in src.taken.items():
            t.take(path, _get(src.plan, path), f"{label}: {keys}")
        for path, why in src.assumed.items():
            t.set(path, _get(src.plan, path))
            t.assumed[path] = why
        t.not_modelled += [dict(n, key=f"{label}: {n['key']}") for n in src.not_modelled]
        t.counted.update({f"{label}: {k}": v for k, v in src.counted.items()})
        t.ignored += [f"{label}: {k}" for k in src.ignored]
        t.unknown += [f"{label}: {k}" for k in src.unknown]
        t.files += [self.path, *src.files]
        t.launcher = self.path


def _get(plan: dict[str, Any], path: str) -> Any:
    head, _, leaf = path.partition(".")
    return plan[head][leaf] if leaf else plan[head]


def locate_file(value: str, config_path: str) -> Path:
    """deepspeed_config_file: accelerate opens it from the current directory; memplan also looks beside the
    accelerate config and above it (memplan.trainers.hf.find_file)."""
    from memplan.trainers.hf import find_file

    return find_file(value, config_path, "deepspeed_config.deepspeed_config_file")


def _script_args(config: dict[str, Any], mixed_precision: str | None) -> dict[str, Any]:
    """What "auto" becomes without a trainer: the file's own batch numbers, the Accelerator's mixed precision."""
    mp = AUTOCAST[mixed_precision or "no"]
    return {"micro_batch": config.get("train_micro_batch_size_per_gpu", "auto"), "micro_batch_key": "own value",
            "grad_accum": config.get("gradient_accumulation_steps", "auto"), "grad_accum_key": "own value",
            "bf16": mp == "bf16", "fp16": mp == "fp16", "half_key": "mixed_precision", "autocast": mp}
