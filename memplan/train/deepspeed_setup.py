"""How `memplan train` runs a DeepSpeed plan: through accelerate's DeepSpeed integration, as accelerate
users do. No torch or deepspeed import at module level.

- Launch: always `accelerate launch --config_file DIR/accelerate_config.yaml --deepspeed_config_file
  DIR/ds_config.json` (one process too: DeepSpeed's engine needs the launcher's environment). The
  accelerate config names the JSON relative to its own directory (accelerate itself would read that name
  from the current directory; the explicit flag, which accelerate lets win over the file, makes the plan
  directory movable). Both files are checked against the plan before any process starts.
- The DeepSpeed JSON is the one HF Trainer-based tools read too: "auto" where transformers'
  HfTrainerDeepSpeedConfig fills a value from the training arguments (batch sizes, accumulation, clipping,
  the optimizer's lr / betas / eps / weight_decay); memplan fills them from the plan (`fill_auto`), and
  every value the plan fixes must agree: micro-batch, accumulation, clipping, bf16 with fp32 masters
  (`bf16.enabled` = precision bf16-master), the ZeRO stage, offload, the optimizer.
- The optimizer: the JSON's section describes the plan's AdamW (`optimizer_section`); memplan passes that
  optimizer itself (memplan.runtime.optim, the one `memplan profile` measures) and steps its own LR schedule,
  so the section is checked, then dropped from the launched process's config (accelerate refuses an
  optimizer given both ways). Under ZeRO-Offload accelerate hands the plan's torch AdamW to DeepSpeed as
  DeepSpeedCPUAdam with the same parameter groups (accelerate.utils.deepspeed.map_pytorch_optim_to_deepspeed),
  the optimizer DeepSpeed itself builds from the section: its C++ op is compiled on first use (checked here
  before launch).
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
from typing import Any

from memplan.errors import UserError
from memplan.estimator.sharding import DEEPSPEED_ALL_STAGES, DEEPSPEED_ZERO3_DEFAULTS
from memplan.plan import mixed_precision

INSTALL_HINT = "Hint: pip install deepspeed, or --set sharding=fsdp"
#: The DeepSpeed JSON's name in a plan directory; accelerate_config.yaml names it relative to itself.
DS_CONFIG_NAME = "ds_config.json"
#: torch.optim.AdamW's betas and eps, which memplan's AdamW keeps (memplan.runtime.optim sets lr and
#: weight_decay only); DeepSpeedCPUAdam's defaults are the same.
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
ADAMW_FAMILY = ("adamw", "adamw-fused", "adamw-forloop")
#: torch AdamW's implementation switches for each plan optimizer, as DeepSpeed's optimizer params pass them on.
TORCH_ADAMW_SWITCHES = {"adamw": {"foreach": True}, "adamw-fused": {"fused": True}, "adamw-forloop": {"foreach": False}}
#: The keys the JSON leaves "auto": those transformers' HfTrainerDeepSpeedConfig.trainer_config_process
#: fills from TrainingArguments (integrations/deepspeed.py).
AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
             "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps", "optimizer.params.weight_decay")
CHECKPOINT_TAG = "deepspeed"  # sub-directory of a memplan checkpoint holding DeepSpeed's own files
BACKWARD_KWARGS = {"scale_wrt_gas": False}  # the loss is already the mean over the optimizer step


def check_installed() -> None:
    """One line naming the install command, before anything is loaded."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(f"the plan uses DeepSpeed, which is not installed. {INSTALL_HINT}") from None


def _get(cfg: dict, dotted: str) -> Any:
    """The value at `dotted`; a ZeRO-3 size also under DeepSpeed's alias without "stage3_"."""
    node: Any = cfg
    for key in dotted.split("."):
        if isinstance(node, dict) and key not in node and key.startswith("stage3_"):
            key = key.removeprefix("stage3_")
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


def optimizer_section(plan) -> dict | None:
    """The JSON's optimizer section: the plan's AdamW, for tools that let DeepSpeed build the optimizer (HF
    Trainer given a JSON with this section, the deepspeed launcher). DeepSpeed builds "AdamW" as
    DeepSpeedCPUAdam (adamw_mode) under ZeRO-Offload, else as its FusedAdam CUDA op unless "torch_adam"
    asks for torch's AdamW, with foreach / fused as the plan says (deepspeed/runtime/engine.py,
    get_optimizer_configuration): the optimizer the estimate counts. None for 8-bit AdamW, Adafactor and
    SGD: DeepSpeed cannot build those by name, so the training tool builds its own."""
    if plan.optimizer not in ADAMW_FAMILY:
        return None
    params: dict[str, Any] = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if plan.offload == "none":
        params.update(torch_adam=True, **TORCH_ADAMW_SWITCHES[plan.optimizer])
    return {"type": "AdamW", "params": params}


def expected_values(plan) -> dict[str, Any]:
    """The DeepSpeed JSON values a plan fixes (dotted keys)."""
    offload = plan.offload
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.effective_batch,
        "gradient_clipping": float(plan.hparams.max_grad_norm),
        "bf16.enabled": plan.regime.deepspeed_bf16,
        "fp16.enabled": False,
        "zero_optimization.stage": plan.zero,
        "zero_optimization.offload_optimizer.device": "cpu" if offload != "none" else "none",
        "zero_optimization.offload_param.device": "cpu" if offload == "optimizer+params" else "none",
        "optimizer.params.lr": plan.hparams.effective_lr(plan.method),
        "optimizer.params.betas": list(ADAMW_BETAS),
        "optimizer.params.eps": ADAMW_EPS,
        "optimizer.params.weight_decay": plan.hparams.weight_decay,
        **_sizes(plan),
    }


def _set_sizes(plan) -> dict[str, Any]:
    """The zero_optimization sizes the plan sets that its ZeRO stage uses."""
    return {key: value for key, value in plan.deepspeed.model_dump().items()
            if value is not None and (plan.zero == 3 or key in DEEPSPEED_ALL_STAGES)}


def _sizes(plan) -> dict[str, Any]:
    """The zero_optimization sizes the estimate counted: those the plan sets, and under ZeRO-3 DeepSpeed's
    constant defaults of those it leaves unset (the buckets' defaults follow the hidden size, which the file
    states as memplan's ds_config wrote it)."""
    return {f"zero_optimization.{key}": value
            for key, value in ((DEEPSPEED_ZERO3_DEFAULTS if plan.zero == 3 else {}) | _set_sizes(plan)).items()}


def _same(actual: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(actual, bool):
        return str(actual).lower() == str(wanted).lower()
    if isinstance(wanted, (int, float)) and isinstance(actual, (int, float)):
        return float(actual) == float(wanted)
    if isinstance(wanted, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(wanted) and all(_same(a, w) for a, w in zip(actual, wanted))
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
    defaults |= {f"zero_optimization.{key}": value for key, value in DEEPSPEED_ZERO3_DEFAULTS.items()}
    set_sizes = {f"zero_optimization.{key}" for key in _set_sizes(plan)}
    for key, wanted in expected_values(plan).items():
        actual = _get(cfg, key)
        if actual is None and key in set_sizes and key not in defaults:
            out.append(f"{source}: {key} is not set (DeepSpeed's default) but the plan needs {wanted!r}")
            continue
        if actual is None:
            if key not in defaults:
                continue  # DeepSpeed derives the missing batch numbers from the others
            actual = defaults[key]
        if not _same(actual, wanted):
            out.append(f"{source}: {key} is {actual!r} but the plan needs {wanted!r}")
    if "optimizer" in cfg:
        out += _optimizer_problems(plan, cfg["optimizer"], source)
    if "scheduler" in cfg:
        out.append(f"{source}: has a 'scheduler' section, but memplan train runs the plan's schedule "
                   f"({plan.hparams.lr_scheduler} with warmup) itself; remove the section")
    return out


def _switches(params: dict) -> tuple:
    """What decides which AdamW DeepSpeed builds: torch's (and how) or its own."""
    return bool(params.get("torch_adam")), params.get("foreach"), bool(params.get("fused"))


def _optimizer_problems(plan, section: Any, source: str) -> list[str]:
    wanted = optimizer_section(plan)
    if wanted is None:
        return [f"{source}: has an 'optimizer' section, but the plan's optimizer {plan.optimizer} is built by "
                "memplan train itself; remove the section"]
    if not isinstance(section, dict):
        return [f"{source}: optimizer must be an object with type and params"]
    params = section.get("params") or {}
    kind = str(section.get("type", "")).lower()  # DeepSpeed matches optimizer names case-insensitively
    # "Adam" is AdamW in DeepSpeed unless adam_w_mode is false (engine._configure_basic_optimizer)
    if kind not in ("adamw", "adam") or (kind == "adam" and params.get("adam_w_mode") is False):
        return [f"{source}: optimizer.type is {section.get('type')!r} but the plan's optimizer is {plan.optimizer} "
                "(AdamW)"]
    have, want = _switches(params), _switches(wanted["params"])
    if have != want:
        names = ("torch_adam", "foreach", "fused")
        diff = ", ".join(f"{n} {h!r} (the plan needs {w!r})" for n, h, w in zip(names, have, want) if h != w)
        what = "DeepSpeed's CPU Adam (ZeRO-Offload)" if plan.offload != "none" else f"torch's AdamW ({plan.optimizer})"
        return [f"{source}: optimizer.params: {diff}; the plan's optimizer is {what}"]
    return []


def check_config(plan, cfg: dict, source: str) -> None:
    problems = config_problems(plan, fill_auto(plan, cfg), source)
    if problems:
        raise UserError(f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                        + ". Hint: memplan recommend ... -o DIR rewrites it for the plan, or edit the file")


def launch_files(plan_dir: Path) -> tuple[Path, dict]:
    """DIR/accelerate_config.yaml, read."""
    from memplan.files import read_yaml

    path = plan_dir / "accelerate_config.yaml"
    if not path.is_file():
        raise UserError(f"a DeepSpeed plan is launched with {path}, which does not exist. Hint: memplan recommend "
                        "... -o DIR writes it with ds_config.json next to plan.yaml")
    cfg = read_yaml(path, "launch config") or {}
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a mapping of accelerate settings, got {type(cfg).__name__}")
    return path, cfg


def check_launch_config(plan, path: Path, cfg: dict) -> Path:
    """The accelerate config must start DeepSpeed with the plan's process count; returns the JSON's path
    (a relative name is relative to the accelerate config's directory)."""
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


def _installed_ops() -> dict:
    """The ops DeepSpeed's setup.py built at install, read from its git_version_info_installed.py without
    importing deepspeed (which imports torch): {} when DeepSpeed is absent or was not installed by setup.py."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("deepspeed")
    except ValueError:  # a module without a spec already in sys.modules
        return {}
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "git_version_info_installed.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def check_cpu_adam() -> None:
    """ZeRO-Offload steps DeepSpeedCPUAdam, whose C++ op DeepSpeed compiles on first use (ninja and a C++
    compiler; op_builder/builder.py jit_load) unless it was built at install (DS_BUILD_CPU_ADAM=1)."""
    import os
    import shutil

    if _installed_ops().get("cpu_adam"):
        return
    missing = [what for what, ok in (("ninja", shutil.which("ninja")),
                                     (f"a C++ compiler ({os.environ.get('CXX', 'c++')})",
                                      shutil.which(os.environ.get("CXX", "c++")))) if not ok]
    if missing:
        raise UserError(f"the plan offloads the optimizer to DeepSpeed's CPU Adam, whose op DeepSpeed compiles on "
                        f"first use, and {' and '.join(missing)} cannot be found. Hint: install them (pip install "
                        "ninja; g++), or DS_BUILD_CPU_ADAM=1 pip install deepspeed to build it ahead")


def preflight(plan, plan_dir: Path) -> tuple[Path, Path]:
    """Everything checkable before the processes start; returns the accelerate config's and the
    DeepSpeed JSON's paths."""
    from memplan.files import read_json

    path, cfg = launch_files(plan_dir)
    ds_path = check_launch_config(plan, path, cfg).resolve()
    ds_cfg = read_json(ds_path, "DeepSpeed config")
    if not isinstance(ds_cfg, dict):
        raise UserError(f"{ds_path}: expected a JSON object of DeepSpeed settings, got {type(ds_cfg).__name__}")
    check_config(plan, ds_cfg, str(ds_path))
    if plan.offload != "none":
        check_cpu_adam()
    return path, ds_path


def accelerator_kwargs(plan) -> dict[str, Any]:
    """accelerate.Accelerator arguments for a DeepSpeed process. On the CPU the process group must be
    gloo: accelerate picks a backend only for accelerators, and without one it would count a single
    process although DeepSpeed joined all of them."""
    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision(plan),
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
    # memplan passes the optimizer the section describes itself (see the module docstring)
    cfg.pop("optimizer", None)
    return cfg


def global_grad_norm(engine) -> float | None:
    """The gradient norm DeepSpeed computed (before its clipping) in the last engine.step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if hasattr(norm, "item") else norm)
