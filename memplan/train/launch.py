"""Several processes, or DeepSpeed: `memplan train` starts itself once per process and waits for them.

CUDA: `accelerate launch --config_file PLAN_DIR/accelerate_config.yaml` (written by `memplan recommend`;
DDP, FSDP, DeepSpeed, multi-node from the same file). CPU: `python -m torch.distributed.run` (torchrun)
with one process per `gpus` on gloo: `accelerate launch --cpu` starts a single process regardless of
--num_processes, so it cannot run a CPU data-parallel job. DeepSpeed always goes through accelerate launch
(one process too: the engine needs the launcher's environment and the config's DeepSpeed JSON, passed by
its absolute path so that the plan directory can move), on the CPU as well. The started processes see
MEMPLAN_LAUNCHED=1, so that none of them launches again.

Both launchers run inside memplan.train.agent, which ties the run's processes together:
- no process outlives the one that started it: the launcher gets SIGTERM when `memplan train` ends, however
  it ends (SIGKILL included), and stops its workers; a worker gets SIGKILL when its launcher ends
  (`die_with_parent`, Linux's PR_SET_PDEATHSIG);
- a problem the workers stop on (bad data, a checkpoint that does not fit the plan: a UserError) is
  written to a file (`report`) and printed here once, one line, exit code 2, instead of once per process
  under the launcher's failure report and traceback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from memplan.train.settings import Resolved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHED_ENV = "MEMPLAN_LAUNCHED"
#: The directory where launched processes leave the problems they stop on, one file per process.
ERRORS_ENV = "MEMPLAN_ERRORS"
#: The pid of the `memplan train` that started the launcher (memplan.train.agent checks it is still there).
PARENT_ENV = "MEMPLAN_PARENT_PID"
#: prctl option (linux/prctl.h): the signal this process gets when its parent ends.
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent: int | None = None) -> None:
    """Have Linux send `sig` to this process when the process that started it ends, however it ends
    (prctl PR_SET_PDEATHSIG). A parent gone before the call (this process was handed to init, or its
    parent is not `parent`) means `sig` now. Other systems have no such call: nothing happens there."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    ppid = os.getppid()
    if ppid == 1 or (parent is not None and ppid != parent):
        os.kill(os.getpid(), sig)


def report(lines: Iterable[str]) -> bool:
    """In a process that memplan launched: leave the problems it stops on for `memplan train` to print
    once (rank order, duplicates dropped), and say so; False elsewhere (print them yourself)."""
    where = os.environ.get(ERRORS_ENV)
    if os.environ.get(LAUNCHED_ENV) != "1" or not where or not Path(where).is_dir():
        return False
    path = Path(where) / f"rank-{int(os.environ.get('RANK', '0')):08d}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return True


def reported(errors: Path) -> list[str]:
    """The problems the launched processes left in `errors`, each once, in rank order."""
    lines: list[str] = []
    for path in sorted(errors.glob("rank-*")):
        if path.suffix != ".tmp":
            lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line not in lines]
    return lines


def needs_launcher(plan) -> bool:
    """Several processes, DeepSpeed (whose engine runs only under a launcher), or FSDP offloading on one GPU
    (accelerate applies FSDP from its launch config)."""
    return plan.world_size > 1 or plan.sharding == "deepspeed" or plan.fully_shards


def command(resolved: Resolved, args: list[str]) -> list[str]:
    """The launcher command line for the plan; `args` are `memplan` arguments (train PLAN ...). The launch
    files were checked with everything else (memplan.train.preflight)."""
    plan = resolved.plan
    if plan.sharding == "deepspeed":
        from memplan.train.deepspeed_setup import preflight as deepspeed_preflight

        config, ds_config = deepspeed_preflight(plan, resolved.plan_dir)
        # the JSON's absolute path: accelerate would read the config's relative name from the current directory
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                "--deepspeed_config_file", str(ds_config), "-m", "memplan", *args]
    if plan.device == "cpu":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", str(plan.gpus), "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port()), "-m", "memplan", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(resolved.plan_dir / "accelerate_config.yaml"), "-m", "memplan", *args]


def relaunch(resolved: Resolved, args: list[str], keep_fds: tuple[int, ...] = ()) -> int:
    """Run the launcher in the foreground (inside memplan.train.agent, with the descriptors `keep_fds`:
    the output directory's lock); its exit status becomes ours, or 2 with the problems the processes
    reported, each printed once."""
    import click

    cmd = command(resolved, args)  # [python, -m, launcher module, ...]
    errors = Path(tempfile.mkdtemp(prefix="memplan-errors-"))
    env = dict(os.environ, **{LAUNCHED_ENV: "1", ERRORS_ENV: str(errors), PARENT_ENV: str(os.getpid())})
    try:
        proc = subprocess.Popen([cmd[0], "-m", "memplan.train.agent", *cmd[2:]], env=env, pass_fds=keep_fds)
        code = _wait(proc)
        lines = reported(errors)
        for line in lines:
            click.echo(f"memplan: error: {line}", err=True)
        if lines:
            return 2
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's 128 + N
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _wait(proc: subprocess.Popen) -> int:
    """The launcher's exit status. Ctrl-C in the terminal reaches the launcher too, which stops its workers
    (they leave their checkpoints as they are) and exits: wait for that, telling it ourselves if it was
    not told; a second Ctrl-C stops it at once (its workers follow it)."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait()
        except KeyboardInterrupt:
            proc.kill()
            proc.wait()
        return 130
