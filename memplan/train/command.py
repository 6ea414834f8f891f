"""`memplan train`: resolve the plan, check that it can run here (memplan.train.preflight: every problem at
once, before any heavy import), then a dry run, a launch of several processes, or the run itself."""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from memplan.errors import UserError
from memplan.train.settings import Resolved, resolve_plan


def _verdict_for(resolved: Resolved):
    """The plan's estimate and fit verdict, as `memplan estimate --config PLAN` gives them (the plan's
    recorded target, else this machine's GPUs or RAM)."""
    from memplan.fit import plan_verdict
    from memplan.catalog.resolve import resolve_model

    spec = resolve_model(resolved.plan.model)
    return spec, plan_verdict(spec, resolved.plan)


def dry_run(resolved: Resolved, as_json: bool, problems: list[str], warnings: list[str]) -> tuple[list[str], bool]:
    """The resolved plan, its estimate, and what the checks found; returns the problems (with the
    estimate's own, when there is no estimate for the model) and whether the plan fits."""
    from memplan.report import estimate as report
    from memplan.plan import plan_to_yaml

    try:
        spec, verdict = _verdict_for(resolved)
    except UserError as err:
        spec = verdict = None
        problems = problems if problems else [str(err)]
    result = verdict.estimate if verdict else None
    fits = verdict is None or verdict.exit_code == 0
    if as_json:
        click.echo(json.dumps({"plan": resolved.plan.model_dump(mode="json"),
                               "output_dir": str(resolved.output_dir),
                               "estimate": report.estimate_json(spec.name, spec.params_total, [result])
                               if result else None,
                               "fit": verdict.to_json() if verdict else None,
                               "runs_here": not problems, "problems": problems, "warnings": warnings}, indent=2))
        return problems, fits
    click.echo(f"# resolved plan ({resolved.plan_path}" + (f" with --set {', '.join(resolved.overrides)}"
                                                          if resolved.overrides else "") + ")")
    click.echo(plan_to_yaml(resolved.plan))
    click.echo(f"output directory: {resolved.output_dir}\n")
    if result is not None:
        click.echo(f"{spec.name}: {spec.params_total:,} parameters; estimate per "
                   f"{'process' if resolved.plan.device == 'cpu' else 'GPU'}:\n")
        click.echo(report.breakdown_table(result))
        for line in verdict.assumptions:
            click.echo(f"assumed: {line}")
        click.echo(verdict.text)
    for line in warnings:
        click.echo(f"warning: {line}")
    if problems:
        click.echo(f"cannot run here: {len(problems)} problem(s), listed on stderr")
    return problems, fits


def _launched() -> bool:
    """True inside a process started by torchrun / accelerate launch (by memplan or by hand)."""
    from memplan.train.launch import LAUNCHED_ENV

    return os.environ.get(LAUNCHED_ENV) == "1" or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def human_summary(summary: dict) -> str:
    from tabulate import tabulate

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    rows = [["optimizer steps", f"{summary['steps']}" + (" (stopped early)" if summary["stopped_early"] else "")]]
    if summary["train_loss_first"] is not None:
        rows.append(["train loss (first -> last log)", f"{summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}"])
    first, best, last = summary["eval_first"], summary["eval_best"], summary["eval_last"]
    if first:
        rows.append(["validation loss (start -> best)",
                     f"{first['eval_loss']:.4f} -> {best['eval_loss']:.4f} (step {best['step']})"])
        if first.get("eval_accuracy") is not None:
            rows.append(["exact match (start -> best-loss step -> last)",
                         f"{100 * first['eval_accuracy']:.1f} % -> {100 * best['eval_accuracy']:.1f} % -> "
                         f"{100 * last['eval_accuracy']:.1f} %"])
    ret = summary["retention"]
    if ret:
        rows.append(["retention perplexity (before -> after)",
                     f"{ret['perplexity_before']:.2f} -> {ret['perplexity_after']:.2f} ({100 * ret['change']:+.1f} %)"])
    if summary["tokens_per_s_median"]:
        rows.append(["throughput (median)", f"{summary['tokens_per_s_median']:.0f} tokens/s"])
    mem = summary["memory"]
    if mem:
        flag = "  <-- gap over 10 %" if mem["flag"] else ""
        rows.append(["peak memory measured", f"{size(mem['measured_bytes'])} ({mem['what']})"])
        rows.append([f"estimate at measured shape (seq {mem['measured_seq_len']})",
                     f"{size(mem['estimated_bytes'])}, gap {100 * mem['gap']:+.1f} %{flag}"])
        rows.append(["estimate for the plan (seq_len)", size(mem['estimate_plan_bytes'])])
    for key, path in summary["files"].items():
        rows.append([key, path])
    return tabulate(rows, tablefmt="plain", disable_numparse=True)


def _report(problems: list[str]) -> int:
    """Every problem on its own line, as the CLI prints one error (in a launched process: left for
    `memplan train` to print once); exit code 2."""
    from memplan.train.launch import report

    if not report(problems):
        for line in problems:
            click.echo(f"memplan: error: {line}", err=True)
    return UserError.exit_code


def _takes_lock() -> bool:
    """The process that holds the output directory's lock (memplan.train.lock): the `memplan train` the
    user started; among processes started by hand (torchrun ... -m memplan train), global rank 0."""
    from memplan.train.launch import LAUNCHED_ENV

    return os.environ.get(LAUNCHED_ENV) != "1" and os.environ.get("RANK", "0") == "0"


def run(plan_file: str, sets: tuple[str, ...], resume: bool, dry: bool, as_json: bool, quiet: bool,
        trust_remote_code: bool) -> Optional[int]:
    launched = _launched()
    if launched:  # no worker outlives its launcher (memplan.train.launch)
        import signal

        from memplan.train.launch import die_with_parent

        die_with_parent(signal.SIGKILL)
    try:
        return _run(plan_file, sets, resume, dry, as_json, quiet, trust_remote_code)
    except UserError as err:
        if launched:
            return _report(str(err).splitlines())
        raise


def _run(plan_file: str, sets: tuple[str, ...], resume: bool, dry: bool, as_json: bool, quiet: bool,
         trust_remote_code: bool) -> Optional[int]:
    from memplan.train import preflight

    resolved = resolve_plan(plan_file, sets)
    locks = _takes_lock()
    checked, problems = preflight.check(resolved, resume, trust_remote_code, probe_lock=locks)
    if dry:
        records = checked.records
        warnings = preflight.small_data_warnings(resolved.plan, len(records.train), len(records.validation)) \
            if records else []
        problems, fits = dry_run(resolved, as_json, problems, warnings)
        if problems:
            return _report(problems)
        return None if fits else 1
    if problems:
        return _report(problems)
    from memplan.train.lock import OutputLock

    lock = OutputLock(resolved.output_dir).acquire() if locks else None
    try:
        if lock is not None:
            # under the lock: what a run that ended since the checks may have left
            problems = preflight.output_state_lines(resolved, checked, resume)
            if problems:
                return _report(problems)
            note = lock.stale_note()
            if note and not quiet:
                click.echo(f"memplan: note: {note}", err=True)
        return _start(resolved, checked, lock, plan_file, sets, resume, as_json, quiet, trust_remote_code)
    finally:
        if lock is not None:
            lock.release()


def _start(resolved: Resolved, checked, lock, plan_file: str, sets: tuple[str, ...], resume: bool, as_json: bool,
           quiet: bool, trust_remote_code: bool) -> Optional[int]:
    """Launch the processes, or train in this one."""
    from memplan.train.launch import needs_launcher

    if needs_launcher(resolved.plan) and not _launched():
        from memplan.train.launch import relaunch

        fill_every_process(resolved, checked, trust_remote_code)
        return relaunch(resolved, _argv(plan_file, sets, resume, as_json, quiet, trust_remote_code),
                        keep_fds=(lock.fd,) if lock is not None else ())
    from memplan.train.loop import train

    echo = (lambda _m: None) if (quiet or as_json) else click.echo
    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = train(resolved, resume=resume, trust_remote_code=trust_remote_code, echo=echo,
                        progress=not (quiet or as_json), checked=checked)
    except KeyboardInterrupt:
        if rank == 0:
            click.echo(f"\nmemplan: interrupted; continue from the newest checkpoint with: memplan train "
                       f"{plan_file} --resume", err=True)
        return 130
    if rank != 0:
        return None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        click.echo(human_summary(summary))
    return None


def fill_every_process(resolved: Resolved, checked, trust_remote_code: bool) -> None:
    """Before any process starts: every process gets a micro-batch of every step. The training examples
    are counted after tokenizing (an example whose answer starts after seq_len tokens is dropped; packing
    joins several into one sequence), which the checks before it cannot do without the tokenizer: here it
    is loaded once, so that a shortfall is one line rather than one per process after the launch."""
    from memplan.runtime.hf import offline_and_quiet

    offline_and_quiet()
    from memplan.train.data import Stream, load_run_data
    from memplan.runtime.model import load_tokenizer

    plan = resolved.plan
    data = load_run_data(plan, load_tokenizer(checked.model_dir, trust_remote_code), checked.records)
    Stream(data.train, plan.micro_batch, plan.world_size, 0, plan.hparams.seed)


def _argv(plan_file: str, sets: tuple[str, ...], resume: bool, as_json: bool, quiet: bool,
          trust_remote_code: bool) -> list[str]:
    """`memplan train ...` arguments for the launched processes."""
    args = ["train", plan_file]
    for s in sets:
        args += ["--set", s]
    args += [flag for flag, on in (("--resume", resume), ("--json", as_json), ("--quiet", quiet),
                                   ("--trust-remote-code", trust_remote_code)) if on]
    return args
