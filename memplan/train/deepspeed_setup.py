"""How `memplan train` runs a DeepSpeed plan: through accelerate's DeepSpeed integration, as accelerate
users do. No torch or deepspeed import at module level.

- Launch: always `accelerate launch --config_file DIR/accelerate_config.yaml` (one process too: DeepSpeed's
  engine needs the launcher's environment); the file names DIR/ds_config.json (both written by
  `memplan recommend`). Both are checked against the plan before any process starts.
- The DeepSpeed JSON owns what DeepSpeed owns: micro-batch, gradient accumulation, clipping
  (`gradient_clipping`), bf16 with fp32 masters (`bf16.enabled` = precision bf16-master), the ZeRO stage and
  offload. Its numbers must equal the plan's; "auto" is filled from the plan. memplan passes its own
  optimizer (the plan's, over fp32 partitions) and steps its own LR schedule, so the JSON names neither.
- The loop: `accelerator.backward` runs `engine.backward` on every micro-batch and `engine.step` (reduce,
  clip, step, zero the grads) on the last one, where `accelerator.sync_gradients` is set. memplan's loss is
  already normalised per optimizer step (token sum / labelled tokens of the step), so the engine must not
  divide it by gradient_accumulation_steps again: `engine.backward(loss, scale_wrt_gas=False)`. DeepSpeed
  averages gradients over the data-parallel processes as DDP does.
- Checkpoints: `engine.save_checkpoint` / `load_checkpoint` (each process writes its ZeRO partition of the
  optimizer states and fp32 masters); weights for people and the final model through
  `accelerator.get_state_dict`, which gathers ZeRO-3's partitions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from memplan.errors import UserError

INSTALL_HINT = "Hint: pip install deepspeed, or --set sharding=fsdp"
CHECKPOINT_TAG = "deepspeed"  # sub-directory of a memplan checkpoint holding DeepSpeed's own files
BACKWARD_KWARGS = {"scale_wrt_gas": False}  # the loss is already the mean over the optimizer step


def check_installed() -> None:
    """One line naming the install command, before anything is loaded."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(f"the plan uses DeepSpeed, which is not installed. {INSTALL_HINT}") from None


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def expected_values(plan) -> dict[str, Any]:
    """The DeepSpeed JSON values a plan fixes (dotted keys)."""
    offload = plan.offload
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.effective_batch,
        "gradient_clipping": float(plan.hparams.max_grad_norm),
        "bf16.enabled": plan.precision == "bf16-master",
        "fp16.enabled": False,
        "zero_optimization.stage": plan.zero,
        "zero_optimization.offload_optimizer.device": "cpu" if offload != "none" else "none",
        "zero_optimization.offload_param.device": "cpu" if offload == "optimizer+params" else "none",
    }


def _same(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(actual, bool):
        return str(actual).lower() == str(wanted).lower()
    if isinstance(wanted, (int, float)) and isinstance(actual, (int, float)):
        return float(actual) == float(wanted)
    return actual == wanted


def fill_auto(plan, cfg: dict) -> dict:
    """Replace "auto" values (HF's convention) by the plan's, in place; returns cfg."""
    for key, value in expected_values(plan).items():
        if _get(cfg, key) == "auto":
            _set(cfg, key, value)
    return cfg


def config_problems(plan, cfg: dict, source: str) -> list[str]:
    """Where the DeepSpeed JSON disagrees with the plan (after fill_auto), one sentence each."""
    out = []
    defaults = {"zero_optimization.offload_optimizer.device": "none", "zero_optimization.offload_param.device": "none",
                "fp16.enabled": False, "bf16.enabled": False, "zero_optimization.stage": 0, "gradient_clipping": 0.0,
                "gradient_accumulation_steps": 1}
    for key, wanted in expected_values(plan).items():
        actual = _get(cfg, key)
        if actual is None:
            if key not in defaults:
                continue  # DeepSpeed derives the missing batch numbers from the others
            actual = defaults[key]
        if not _same(actual, wanted):
            out.append(f"{source}: {key} is {actual!r} but the plan needs {wanted!r}")
    for owned in ("optimizer", "scheduler"):
        if owned in cfg:
            out.append(f"{source}: has an '{owned}' section, but memplan train passes the plan's {owned} itself")
    return out


def check_config(plan, cfg: dict, source: str) -> None:
    problems = config_problems(plan, fill_auto(plan, cfg), source)
    if problems:
        raise UserError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                        + ". Hint: memplan recommend ... -o DIR rewrites it for the plan, or edit the file")


def launch_files(plan_dir: Path) -> tuple[Path, dict]:
    """DIR/accelerate_config.yaml, read."""
    import yaml

    path = plan_dir / "accelerate_config.yaml"
    if not path.is_file():
        raise UserError(f"a DeepSpeed plan is launched with {path}, which does not exist. Hint: memplan recommend "
                        "... -o DIR writes it with ds_config.json next to plan.yaml")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a mapping of accelerate settings, got {type(cfg).__name__}")
    return path, cfg


def check_launch_config(plan, path: Path, cfg: dict) -> Path:
    """The accelerate config must start DeepSpeed with the plan's process count; returns the JSON's path."""
    if cfg.get("distributed_type") != "DEEPSPEED":
        raise UserError(f"{path}: distributed_type is {cfg.get('distributed_type')!r}, but the plan's sharding is "
                        "deepspeed. Hint: memplan recommend ... -o DIR rewrites it for the plan")
    if int(cfg.get("num_processes", 1)) != plan.world_size:
        raise UserError(f"{path}: num_processes is {cfg.get('num_processes')}, but the plan has {plan.world_size} "
                        "(gpus x nodes). Hint: memplan recommend ... -o DIR rewrites it for the plan")
    ds_file = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if not ds_file:
        raise UserError(f"{path}: deepspeed_config has no deepspeed_config_file. Hint: memplan recommend ... -o DIR "
                        "writes ds_config.json and points to it")
    ds_path = Path(ds_file).expanduser()
    if not ds_path.is_absolute():
        ds_path = path.parent / ds_path
    if not ds_path.is_file():
        raise UserError(f"{path}: its DeepSpeed config {ds_path} does not exist")
    return ds_path


def preflight(plan, plan_dir: Path) -> Path:
    """Everything checkable before the processes start; returns the accelerate config's path."""
    import json

    path, cfg = launch_files(plan_dir)
    ds_path = check_launch_config(plan, path, cfg)
    try:
        ds_cfg = json.loads(ds_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{ds_path}: not JSON ({err})") from None
    if not isinstance(ds_cfg, dict):
        raise UserError(f"{ds_path}: expected a JSON object of DeepSpeed settings, got {type(ds_cfg).__name__}")
    check_config(plan, ds_cfg, str(ds_path))
    return path


def accelerator_kwargs(plan) -> dict[str, Any]:
    """accelerate.Accelerator arguments for a DeepSpeed process. On the CPU the process group must be
    gloo: accelerate picks a backend only for accelerators, and without one it would count a single
    process although DeepSpeed joined all of them."""
    kwargs: dict[str, Any] = {"mixed_precision": "bf16" if plan.precision == "bf16-master" else "no",
                              "gradient_accumulation_steps": plan.grad_accum}  # = the JSON's (checked)
    if plan.device == "cpu":
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    return kwargs


def configure(accelerator, plan) -> dict:
    """The launched process's DeepSpeed config, checked against the plan ("auto" filled in)."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        raise UserError("the plan says DeepSpeed but this process was not started by accelerate launch with a "
                        "DeepSpeed config. Hint: memplan train PLAN starts it (with DIR/accelerate_config.yaml)")
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    check_config(plan, cfg, "the DeepSpeed config")
    return cfg


def global_grad_norm(engine) -> Optional[float]:
    """The gradient norm DeepSpeed computed (before its clipping) in the last engine.step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if hasattr(norm, "item") else norm)
