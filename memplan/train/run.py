"""What `memplan train` does, without printing: resolve the plan, check that it can run here
(memplan.train.preflight: every problem at once, before any heavy import), then a dry run, a launch of
several processes, or the run itself. The result says what happened; memplan.report.train words it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memplan.errors import UserError
from memplan.train.settings import Resolved, resolve_plan


@dataclass
class TrainRequest:
    """`memplan train`'s arguments, under the names of its options (memplan.cli.train)."""

    plan_file: str
    sets: tuple[str, ...] = ()
    resume: bool = False
    dry: bool = False
    as_json: bool = False
    quiet: bool = False
    trust_remote_code: bool = False

    def argv(self) -> list[str]:
        """The same `memplan train ...` arguments, for the launched processes."""
        args = ["train", self.plan_file]
        for s in self.sets:
            args += ["--set", s]
        args += [flag for flag, on in (("--resume", self.resume), ("--json", self.as_json), ("--quiet", self.quiet),
                                       ("--trust-remote-code", self.trust_remote_code)) if on]
        return args


@dataclass
class DryRun:
    """The resolved plan, its estimate and fit verdict (None when the model has no estimate), and what the
    checks found."""

    resolved: Resolved
    spec: Any
    verdict: Any
    problems: list[str]
    warnings: list[str]

    @property
    def fits(self) -> bool:
        return self.verdict is None or self.verdict.exit_code == 0


@dataclass
class TrainResult:
    """code: the exit status (None: 0). problems: the lines to print as errors (none when they were left
    for the launching `memplan train` to print once). summary: the finished run's, on rank 0."""

    code: int | None = None
    problems: list[str] = field(default_factory=list)
    dry_run: DryRun | None = None
    summary: dict | None = None
    interrupted: bool = False


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch (by memplan or by hand)."""
    from memplan.train.launch import LAUNCHED_ENV

    return os.environ.get(LAUNCHED_ENV) == "1" or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _takes_lock() -> bool:
    """The process that holds the output directory's lock (memplan.train.lock): the `memplan train` the
    user started; among processes started by hand (torchrun ... -m memplan train), global rank 0."""
    from memplan.train.launch import LAUNCHED_ENV

    return os.environ.get(LAUNCHED_ENV) != "1" and os.environ.get("RANK", "0") == "0"


def _refused(problems: list[str], dry_run: DryRun | None = None) -> TrainResult:
    """Exit code 2 with every problem; in a launched process they are left for `memplan train` to print once
    (memplan.train.launch.report)."""
    from memplan.train.launch import report

    return TrainResult(code=UserError.exit_code, problems=[] if report(problems) else problems, dry_run=dry_run)


def execute(request: TrainRequest, echo: Callable[[str], None], note: Callable[[str], None]) -> TrainResult:
    """`echo` prints the run's progress lines, `note` a note on stderr while it runs."""
    is_launched = launched()
    if is_launched:  # no worker outlives its launcher (memplan.train.launch)
        import signal

        from memplan.train.launch import die_with_parent

        die_with_parent(signal.SIGKILL)
    try:
        return _checked_run(request, echo, note)
    except UserError as err:
        if is_launched:
            return _refused(str(err).splitlines())
        raise


def dry_run(resolved: Resolved, problems: list[str], warnings: list[str]) -> DryRun:
    """The plan's estimate and fit verdict, as `memplan estimate --config PLAN` gives them (the plan's
    recorded target, else this machine's GPUs or RAM); without an estimate for the model, its reason is
    the problem when there is no other."""
    from memplan.catalog.resolve import resolve_model
    from memplan.fit import plan_verdict

    try:
        spec = resolve_model(resolved.plan.model)
        verdict = plan_verdict(spec, resolved.plan)
    except UserError as err:
        spec = verdict = None
        problems = problems if problems else [str(err)]
    return DryRun(resolved, spec, verdict, problems, warnings)


def _checked_run(request: TrainRequest, echo: Callable[[str], None], note: Callable[[str], None]) -> TrainResult:
    from memplan.train import preflight

    resolved = resolve_plan(request.plan_file, request.sets)
    locks = _takes_lock()
    checked, problems = preflight.check(resolved, request.resume, request.trust_remote_code, probe_lock=locks)
    if request.dry:
        records = checked.records
        warnings = preflight.small_data_warnings(resolved.plan, len(records.train), len(records.validation)) \
            if records else []
        result = dry_run(resolved, problems, warnings)
        if result.problems:
            return _refused(result.problems, result)
        return TrainResult(code=None if result.fits else 1, dry_run=result)
    if problems:
        return _refused(problems)
    from memplan.train.lock import OutputLock

    lock = OutputLock(resolved.output_dir).acquire() if locks else None
    try:
        if lock is not None:
            # under the lock: what a run that ended since the checks may have left
            problems = preflight.output_state_lines(resolved, checked, request.resume)
            if problems:
                return _refused(problems)
            stale = lock.stale_note()
            if stale:
                note(stale)
        return _launch_or_train(request, resolved, checked, lock, echo)
    finally:
        if lock is not None:
            lock.release()


def _launch_or_train(request: TrainRequest, resolved: Resolved, checked, lock,
                     echo: Callable[[str], None]) -> TrainResult:
    """Launch the processes, or train in this one."""
    from memplan.runtime import cuda_allocator
    from memplan.train.launch import needs_launcher

    cuda_allocator.apply(resolved.plan.allocator, os.environ)  # before CUDA starts, here and in the launched

    if needs_launcher(resolved.plan) and not launched():
        from memplan.train.launch import relaunch

        fill_every_process(resolved, checked, request.trust_remote_code)
        return TrainResult(code=relaunch(resolved, request.argv(), keep_fds=(lock.fd,) if lock is not None else ()))
    from memplan.train.loop import train

    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = train(resolved, resume=request.resume, trust_remote_code=request.trust_remote_code, echo=echo,
                        progress=not (request.quiet or request.as_json), checked=checked)
    except KeyboardInterrupt:
        return TrainResult(code=130, interrupted=rank == 0)
    return TrainResult(summary=summary if rank == 0 else None)


def fill_every_process(resolved: Resolved, checked, trust_remote_code: bool) -> None:
    """Before any process starts: every process gets a micro-batch of every step. The training examples
    are counted after tokenizing (an example whose answer starts after seq_len tokens is dropped; packing
    joins several into one sequence), which the checks before it cannot do without the tokenizer: here it
    is loaded once, so that a shortfall is one line rather than one per process after the launch."""
    from memplan.runtime.hf import offline_and_quiet

    offline_and_quiet()
    from memplan.runtime.model import load_tokenizer
    from memplan.train.data import Stream, load_run_data

    plan = resolved.plan
    data = load_run_data(plan, load_tokenizer(checked.model_dir, trust_remote_code), checked.records)
    Stream(data.train, plan.micro_batch, plan.world_size, 0, plan.hparams.seed)
