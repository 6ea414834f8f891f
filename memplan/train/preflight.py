"""Can the plan run here? Everything `memplan train` can check before it imports torch, transformers, peft,
accelerate or deepspeed, checked all at once, so that every problem is reported together: one line each
(`memplan: error: ...`, with its hint), exit code 2. `--dry-run` makes the same checks.

- this machine: CUDA for a cuda plan, DeepSpeed, bitsandbytes, flash-attn, the launch files
  (accelerate_config.yaml, ds_config.json) and whether they match the plan, and the combinations
  memplan's trainer does not run;
- the model: a directory with config.json and weights, or a preset that ships weights; remote code;
- the data: every line of every data file, and enough examples for one batch;
- the processes: no more on this machine than it has CPU cores (a CPU plan) or CUDA devices;
- the output directory: that it is (or can be made) a directory this user can write in, that no other run
  holds it (memplan.train.lock), checkpoints of an earlier run, or none to --resume from; outputs that
  would overlap the run's inputs or replace what memplan did not write (memplan.train.outputs); on
  --resume the newest intact checkpoint and whether the plan, data and model are the ones it was trained
  with (memplan.train.inputs).

Packages are looked up (importlib.util.find_spec, importlib.metadata), not imported: importing bitsandbytes
alone takes seconds. CUDA: a torch build for neither CUDA nor ROCm (torch/version.py: `cuda = None`,
`hip = None`) has no CUDA device, which is read from that file; only a CUDA or ROCm build is imported to
ask torch.cuda.is_available(), the answer the run itself would get.

Hints: a hint that changes the plan (`--set key=value`) is given only when the changed plan passes these
machine checks with no problem that is not already reported, and when the hints given together do too, so
that following a hint never leads into another error.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.errors import UserError
from memplan.plan import Plan, build_plan, merge
from memplan.train.outputs import list_checkpoints
from memplan.train.settings import Resolved, resolve_key


class CannotRun(UserError):
    """The plan cannot run here; `lines` holds one line per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


@dataclass
class Checked:
    """What the checks found and the run uses: the model directory and the data's records (None where
    they have a problem); what the run depends on (memplan.train.inputs.record); on --resume the checkpoint
    to resume from, the damaged newer ones skipped, and the changes given with --set to apply."""

    model_dir: Path | None
    records: Any  # memplan.train.data.RunRecords
    inputs: dict | None = None
    resume_from: Path | None = None
    skipped: tuple[str, ...] = ()
    changes: dict | None = None


class Machine:
    """What this machine has, each looked up once, when first asked."""

    @staticmethod
    def has(package: str) -> bool:
        try:
            return importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            return False

    @staticmethod
    def version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    @functools.cached_property
    def torch_build(self) -> str | None:
        """'cuda', 'rocm' or 'cpu' as torch/version.py says without importing torch; None if unreadable."""
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        try:
            text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
        except OSError:
            return None
        fields = dict(re.findall(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", text, flags=re.M))
        if set(fields) != {"cuda", "hip"}:
            return None
        if fields["cuda"] != "None":
            return "cuda"
        return "rocm" if fields["hip"] != "None" else "cpu"

    @functools.cached_property
    def cuda(self) -> bool:
        if self.torch_build == "cpu":
            return False
        import torch

        return torch.cuda.is_available()

    @functools.cached_property
    def cuda_devices(self) -> int:
        """CUDA devices torch sees here (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
        if not self.cuda:
            return 0
        import torch

        return torch.cuda.device_count()

    @functools.cached_property
    def cpu_cores(self) -> int:
        """The CPU cores this process may run on (its affinity mask: what taskset, cgroups' cpusets and
        container limits leave), else all of them."""
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1


@dataclass(frozen=True)
class Problem:
    """One thing that stops the plan from running here. `hint` needs no plan change (pip install ...);
    `fixes` are plan changes that would remove the problem, best first, offered once verified."""

    text: str
    hint: str = ""
    fixes: tuple[dict[str, Any], ...] = ()


def _fsdp_instead(plan: Plan) -> dict[str, Any]:
    """FSDP at the DeepSpeed stage's sharding (FSDP has no optimizer-only stage 1)."""
    return {"sharding": "fsdp", **({"zero": 2} if plan.zero == 1 else {})}


def _launch_problems(plan: Plan, plan_path: Path) -> list[Problem]:
    """The launch files a plan with several processes on GPUs, or with DeepSpeed, is started with."""
    plan_dir = plan_path.parent
    if plan.sharding == "deepspeed":
        from memplan.train.deepspeed_setup import preflight as deepspeed_files

        try:
            deepspeed_files(plan, plan_dir)
        except UserError as err:
            return [Problem(str(err))]
        return []
    if plan.world_size == 1 and not plan.fully_shards:
        return []
    if plan.device == "cpu":
        if plan.nodes > 1:
            return [Problem(f"a multi-node CPU run is started on every node by you: torchrun --nnodes {plan.nodes} "
                            f"--nproc_per_node {plan.gpus} --node_rank N --master_addr HOST -m memplan train "
                            f"{plan_path} [--set ...]")]
        return []
    config = plan_dir / "accelerate_config.yaml"
    if not config.is_file():
        return [Problem(f"{plan.world_size} GPUs need {config} (the launch settings)",
                        "memplan recommend ... -o DIR writes it next to plan.yaml")]
    from memplan.files import read_yaml
    from memplan.recommend.writers import distributed_type

    try:
        cfg = read_yaml(config, "launch config") or {}
    except UserError as err:
        return [Problem(str(err))]
    if not isinstance(cfg, dict):
        return [Problem(f"{config}: expected a mapping of accelerate settings, got {type(cfg).__name__}")]
    wanted = distributed_type(plan)
    out = []
    if cfg.get("distributed_type") != wanted:
        out.append(Problem(f"{config}: distributed_type is {cfg.get('distributed_type')!r}, but the plan's "
                           f"sharding {plan.sharding} needs {wanted!r}",
                           "memplan recommend ... -o DIR rewrites it for the plan"))
    if str(cfg.get("num_processes", 1)) != str(plan.world_size):
        out.append(Problem(f"{config}: num_processes is {cfg.get('num_processes')}, but the plan has "
                           f"{plan.world_size} (gpus x nodes)",
                           "memplan recommend ... -o DIR rewrites it for the plan"))
    return out


def _process_problems(plan: Plan, machine: Machine) -> list[Problem]:
    """The processes this machine would start: a CPU plan `gpus` of them (torchrun), at most one per core
    (more would only take turns on the same cores); a CUDA plan one per GPU."""
    if plan.gpus == 1:
        return []
    if plan.device == "cpu":
        cores = machine.cpu_cores
        if plan.gpus > cores:
            return [Problem(f"gpus {plan.gpus}: a CPU plan starts that many processes here, at most one per CPU core, "
                            f"and this machine has {cores} core(s) for them (allowed: gpus 1 to {cores})",
                            fixes=({"gpus": cores},))]
        return []
    devices = machine.cuda_devices
    if devices and plan.gpus > devices:
        return [Problem(f"gpus {plan.gpus}: the plan starts one process per GPU here, and torch sees {devices} CUDA "
                        f"device(s) (allowed: gpus 1 to {devices}; CUDA_VISIBLE_DEVICES hides the others)",
                        fixes=({"gpus": devices},))]
    return []


def machine_problems(plan: Plan, plan_path: Path, machine: Machine) -> list[Problem]:
    """What stops the plan on this machine: software, devices, launch files, unsupported combinations."""
    out: list[Problem] = []
    ds = plan.sharding == "deepspeed"
    if ds and plan.zero == 0:
        # benchmarks/deepspeed_cpu_check.py: DeepSpeed's stage-0 bf16 optimizer drifted from DDP and ZeRO-1/2
        # (which agree with each other to 3e-4) within 8 steps, so memplan does not run it.
        out.append(Problem("memplan train runs DeepSpeed with ZeRO stages 1-3; stage 0 replicates everything as DDP "
                           "does (with bf16-master, memplan's own fp32 masters)",
                           fixes=({"zero": 1}, {"sharding": "ddp"})))
    if ds and not machine.has("deepspeed"):
        out.append(Problem("the plan uses DeepSpeed, which is not installed", "pip install deepspeed",
                           fixes=(_fsdp_instead(plan),)))
    if plan.offload_activations:
        out.append(Problem("memplan train does not offload activations (TRL's activation_offloading and torchtune's "
                           "enable_activation_offloading do: recommend --emit writes their configs)",
                           fixes=({"offload_activations": False},)))
    if plan.liger and not machine.has("liger_kernel"):
        out.append(Problem("the plan uses Liger's kernels, which are not installed", "pip install 'memplan[liger]'",
                           fixes=({"liger": []},)))
    out += _launch_problems(plan, plan_path)
    if plan.device == "cuda" and not machine.cuda:
        build = {"cpu": " (this torch is a CPU build)"}.get(machine.torch_build or "", "")
        out.append(Problem(f"the plan trains on CUDA, but torch sees no CUDA device{build}",
                           "run it where torch sees a GPU", fixes=({"device": "cpu"},)))
    out += _process_problems(plan, machine)
    if plan.precision == "bf16-master" and plan.fully_shards:
        if plan.device == "cuda":
            out.append(Problem("memplan train runs precision bf16-master with FSDP on the CPU only: on CUDA "
                               "accelerate prepares FSDP's optimizer over the model's own parameters, not fp32 masters",
                               fixes=({"sharding": "deepspeed"}, {"precision": "amp-bf16"})))
        if plan.optimizer not in ("adamw", "adamw-fused", "adamw-forloop", "sgd"):
            out.append(Problem(f"precision bf16-master with FSDP keeps each process's shards of the optimizer states, "
                               f"which needs states shaped like the parameters; '{plan.optimizer}' has others",
                               fixes=({"optimizer": "adamw"}, {"sharding": "ddp", "zero": 0})))
    if plan.sharding == "fsdp" and plan.world_size > 1 and plan.device == "cpu" and plan.zero not in (2, 3):
        out.append(Problem("FSDP on the CPU shards with ZeRO stage 2 (SHARD_GRAD_OP) or 3 (FULL_SHARD); stage 0 "
                           "replicates everything, which is DDP", fixes=({"zero": 3}, {"sharding": "ddp"})))
    if plan.uses_bitsandbytes:
        what = {"nf4": "QLoRA's 4-bit layers", "int8": "lora-8bit's 8-bit layers"}.get(
            plan.quantized_base or "", f"the {plan.optimizer} optimizer")
        version = machine.version("bitsandbytes")
        if version is None:
            out.append(Problem(f"{what} need bitsandbytes, which is not installed",
                               "pip install 'bitsandbytes>=0.50' (0.50 and later also run on the CPU)"))
        elif plan.device == "cpu":
            parts = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
            if parts < (0, 50):
                out.append(Problem(f"{what} on the CPU need bitsandbytes >= 0.50 (installed: {version})",
                                   "pip install -U bitsandbytes, or train on CUDA"))
    if plan.attn == "flash" and not machine.has("flash_attn"):
        out.append(Problem("attn flash needs flash-attention 2 (the flash_attn package), which is not installed",
                           "pip install flash-attn", fixes=({"attn": "sdpa"},)))
    return out


def _set_args(fix: dict[str, Any]) -> str:
    return " ".join(f"--set {k}={v}" for k, v in fix.items())


def _changed(plan: Plan, fix: dict[str, Any]) -> Plan | None:
    try:
        return build_plan(merge(plan.model_dump(mode="json"), {resolve_key(k): v for k, v in fix.items()}))
    except UserError:  # not a valid plan
        return None


def machine_lines(plan: Plan, plan_path: Path, machine: Machine) -> list[str]:
    """The machine problems, one line each, with the hints that hold (see the module's docstring)."""
    problems = machine_problems(plan, plan_path, machine)
    texts = {p.text for p in problems}

    def left_after(fix: dict[str, Any]) -> set[str] | None:
        changed = _changed(plan, fix)
        return None if changed is None else {p.text for p in machine_problems(changed, plan_path, machine)}

    good: list[list[dict[str, Any]]] = []
    for p in problems:
        ok = []
        for fix in p.fixes:
            left = left_after(fix)
            if left is not None and p.text not in left and left <= texts:
                ok.append(fix)
        good.append(ok)
    # all the first choices together must hold too; drop the last ones until they do
    chosen = [i for i, ok in enumerate(good) if ok]
    while chosen:
        together: dict[str, Any] = {}
        clash = False
        for i in chosen:
            for k, v in good[i][0].items():
                clash |= together.get(k, v) != v
                together[k] = v
        left = None if clash else left_after(together)
        if left is not None and left <= texts - {problems[i].text for i in chosen}:
            break
        good[chosen.pop()] = []
    lines = []
    for p, ok in zip(problems, good):
        hints = ([p.hint] if p.hint else []) + [_set_args(f) for f in ok]
        lines.append(p.text + (f". Hint: {', or '.join(hints)}" if hints else ""))
    return lines


def _model_lines(plan: Plan, trust_remote_code: bool) -> tuple[Path | None, list[str]]:
    from memplan.catalog.spec import read_config
    from memplan.catalog.vision import refuse_runtime
    from memplan.runtime.model import check_remote_code, model_dir

    try:
        path = model_dir(plan.model)
        check_remote_code(path, trust_remote_code)
        refuse_runtime(plan.model, read_config(path / "config.json"), "train")
    except UserError as err:
        return None, [str(err)]
    return path, []


def _probe_write(directory: Path) -> OSError | None:
    """Create and remove a file in `directory`: the error that stops it (EACCES, EROFS, ENOSPC...), or None.
    A try rather than os.access, which a read-only mount or an ACL can contradict."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".memplan-write-check-")
    except OSError as err:
        return err
    os.close(fd)
    os.unlink(name)
    return None


def output_dir_lines(out: Path) -> list[str]:
    """Can this run write its output: `out` is a directory it can write in, or can be made one in the
    nearest directory above it that exists; an existing checkpoints/ is a directory too."""
    hint = "Hint: --set output_dir=DIR for a directory you can write in"
    if os.path.lexists(out):
        if not out.is_dir():
            return [f"output_dir {out} exists and is not a directory. {hint}"]
        place = out
    else:
        place = out.parent
        while not os.path.lexists(place):
            place = place.parent
        if not place.is_dir():
            return [f"output_dir {out}: {place} is not a directory, so it cannot be made. {hint}"]
    err = _probe_write(place)
    if err is not None:
        what = "cannot write there" if place == out else f"cannot create it in {place}"
        return [f"output_dir {out}: {what}: {err.strerror}. {hint}"]
    ckpt = out / "checkpoints"
    if os.path.lexists(ckpt) and not ckpt.is_dir():
        return [f"{ckpt} exists and is not a directory: the run keeps its checkpoints there. {hint}"]
    if ckpt.is_dir() and (err := _probe_write(ckpt)) is not None:
        return [f"{ckpt}: cannot write there: {err.strerror}. {hint}"]
    return []


def _output_lines(resolved: Resolved, resume: bool) -> list[str]:
    out, root = resolved.output_dir, resolved.output_dir / "checkpoints"
    existing = list_checkpoints(root)
    if existing and not resume:
        return [f"{out} already holds checkpoints of a run. Hint: --resume to continue it, or "
                "--set output_dir=NEW_DIR for a new run"]
    if resume and not existing:
        return [f"--resume: no checkpoint in {root}"]
    return []


def _batch_lines(plan: Plan, records) -> list[str]:
    """One batch needs micro_batch x processes examples; packing and answers cut off leave fewer still."""
    from memplan.train.data import replay_count

    n = len(records.train)
    available = n + (replay_count(n, plan.data.replay_ratio) if records.replay else 0)
    if available >= plan.micro_batch * plan.world_size:
        return []
    return [f"{available} training examples cannot fill one batch of micro_batch {plan.micro_batch} x "
            f"{plan.world_size} process(es). Hint: add data or lower micro_batch"]


def small_data_warnings(plan: Plan, n_train: int, n_validation: int) -> list[str]:
    """What the data's size costs the run (it still runs): steps that follow one or two examples; a
    validation set too small for its loss to stop the run or choose the weights."""
    from memplan.recommend.hparams import MIN_EFFECTIVE_BATCH
    from memplan.train.data import MIN_EARLY_STOPPING_EXAMPLES

    out = []
    batch = plan.effective_batch
    if batch < MIN_EFFECTIVE_BATCH <= n_train:
        per = plan.micro_batch * plan.world_size
        accum = -(-MIN_EFFECTIVE_BATCH // per)
        also = " (ds_config.json must say the same)" if plan.sharding == "deepspeed" else ""
        out.append(f"effective batch {batch}: each optimizer step follows fewer than {MIN_EFFECTIVE_BATCH} examples, "
                   f"so single examples steer it. Hint: --set grad_accum={accum} (effective batch {accum * per}){also}")
    if 0 < n_validation < MIN_EARLY_STOPPING_EXAMPLES:
        off = "early stopping and the choice of the best checkpoint are" if plan.hparams.early_stopping_patience \
            else "the choice of the best checkpoint is"
        out.append(f"{n_validation} validation example(s), fewer than {MIN_EARLY_STOPPING_EXAMPLES}: their loss is "
                   f"logged, but {off} off (too noisy to act on) and the last step's weights are kept. Hint: "
                   f"--set validation=FILE with {MIN_EARLY_STOPPING_EXAMPLES} or more examples")
    return out


def check(resolved: Resolved, resume: bool, trust_remote_code: bool,
          machine: Machine | None = None, probe_lock: bool = True) -> tuple[Checked, list[str]]:
    """What the run uses, and every problem that stops the plan here, one line each. `probe_lock`: also
    whether another run holds the output directory (not in the processes a run launched: their launcher
    holds it)."""
    from memplan.train.data import read_run_records
    from memplan.train.lock import in_use

    plan = resolved.plan
    lines = machine_lines(plan, resolved.plan_path, machine or Machine())
    path, model = _model_lines(plan, trust_remote_code)
    records, data = read_run_records(plan)
    lines += model + data + (_batch_lines(plan, records) if records else [])
    out = output_dir_lines(resolved.output_dir)
    busy = in_use(resolved.output_dir) if probe_lock and not out else None
    checked = Checked(model_dir=path, records=records)
    # another run's checkpoints say nothing about this run until that run has ended
    if out or busy:
        return checked, lines + (out or [busy])
    return checked, lines + output_state_lines(resolved, checked, resume)


def output_state_lines(resolved: Resolved, checked: Checked, resume: bool) -> list[str]:
    """What the output directory holds, against this run: an earlier run's checkpoints, overlaps with the
    inputs, the checkpoint --resume continues from. Run again under the run's lock (another run may have
    ended, and written, since the first look)."""
    return _output_lines(resolved, resume) + _files_lines(resolved, checked, resume)


def _files_lines(resolved: Resolved, checked: Checked, resume: bool) -> list[str]:
    """Outputs that overlap inputs or are in the way; on --resume the checkpoint and its inputs."""
    from memplan.train import inputs, outputs

    lines = outputs.overlap_lines(resolved, checked.model_dir) or outputs.existing_lines(resolved, resume)
    if checked.model_dir is None or checked.records is None:
        return lines
    try:
        if checked.inputs is None:  # hashed once, also when the lines are checked again under the lock
            checked.inputs = inputs.record(resolved.plan, checked.model_dir)
    except OSError as err:
        return lines + [f"cannot read {err.filename or 'an input'} to record what the run depends on: "
                        f"{err.strerror or err}"]
    if not resume:
        return lines
    root = resolved.output_dir / outputs.CHECKPOINTS
    checked.resume_from, skipped = outputs.resume_point(root)
    checked.skipped = tuple(skipped)
    if checked.resume_from is None:
        return lines + ([f"--resume: no intact checkpoint in {root}: {'; '.join(skipped)}"] if skipped else [])
    then = inputs.read(checked.resume_from)
    if then is None:
        return lines + [f"--resume: {checked.resume_from} holds no readable {inputs.FILE} (the record of the "
                        "plan, data and model it was trained with)"]
    checked.changes, refused = inputs.differences(then, checked.inputs, resolved.overrides)
    return lines + refused


def require(resolved: Resolved, resume: bool, trust_remote_code: bool) -> Checked:
    checked, lines = check(resolved, resume, trust_remote_code)
    if lines:
        raise CannotRun(lines)
    return checked
