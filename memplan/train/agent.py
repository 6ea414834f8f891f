"""The process between `memplan train` and its workers: torchrun (torch.distributed.run) or accelerate
launch, run here in-process (`python -m memplan.train.agent MODULE ARGS...`, MODULE one of the two).

- It ends with `memplan train`: SIGTERM when that process ends, however it ends (SIGKILL included). Both
  launchers stop their workers on SIGTERM (SIGTERM to each, SIGKILL after 30 s) and then exit; the
  workers also die with this process (memplan.train.run), should it be killed outright.
- Its parent removes the directory the workers report problems in; killed outright (SIGKILL), it cannot, and
  this process removes it as it ends.
- When the workers stop on problems they reported (memplan.train.launch.report: a UserError, which
  `memplan train` prints once), it exits 2 without the launcher's failure report and traceback. Any
  other failure is reported as the launcher reports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from memplan.train import launch

LAUNCHERS = ("torch.distributed.run", "accelerate.commands.launch")
# The loggers that report a failed worker and the stopping of the others (torch/distributed/elastic).
ELASTIC_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")


class _UntilReported(logging.Filter):
    """Drops records once the workers have reported their problems: memplan train prints those."""

    def __init__(self, errors: Path) -> None:
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        return not launch.reported(self.errors)


def _start(module: str, args: list[str]) -> None:
    if module == "torch.distributed.run":
        from torch.distributed.run import parse_args, run

        run(parse_args(args))
    else:
        from accelerate.commands.launch import launch_command, launch_command_parser

        launch_command(launch_command_parser().parse_args(args))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in LAUNCHERS:
        print(f"memplan.train.agent: expected one of {', '.join(LAUNCHERS)}, then its arguments", file=sys.stderr)
        return 2
    parent = os.environ.get(launch.PARENT_ENV)
    # SIGTERM unwinds this process (the launchers that stop their workers on it install their own handler, and
    # restore this one): the errors directory is removed on the way out, even where the launcher has no handler
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    launch.die_with_parent(signal.SIGTERM, int(parent) if parent else None)
    errors = Path(os.environ[launch.ERRORS_ENV]) if os.environ.get(launch.ERRORS_ENV) else None
    if errors is not None:
        for name in ELASTIC_LOGGERS:
            logging.getLogger(name).addFilter(_UntilReported(errors))
    stopped = False  # by SIGTERM: this handler's SystemExit, a launcher's, or torchrun's SignalException
    try:
        _start(argv[0], argv[1:])
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the launchers' ways to say that a worker failed
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        if isinstance(err, SignalException):  # the workers were stopped before it was raised
            stopped = True
            return 128 + int(err.sigval)
        if isinstance(err, (ChildFailedError, subprocess.CalledProcessError)) and errors is not None \
                and launch.reported(errors):
            return 2
        raise
    finally:
        stopped = stopped or isinstance(sys.exc_info()[1], SystemExit)
        # nobody reads them now (told by a signal, the parent may still be on its way out: wait a moment)
        if errors is not None and parent and _orphaned(int(parent), wait_s=5.0 if stopped else 0.0):
            shutil.rmtree(errors, ignore_errors=True)
    return 0


def _orphaned(parent: int, wait_s: float) -> bool:
    """Whether `memplan train` (pid `parent`) is gone or going. Killed outright, its threads end one by one, and
    this process can be told (PR_SET_PDEATHSIG) while one of them still is its parent: the thread that started
    this process is then exiting (PF_EXITING in its flags) or a zombie. Polls up to `wait_s` seconds for that."""
    deadline = time.monotonic() + wait_s
    while os.getppid() == parent:
        if _exiting(parent):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def _exiting(pid: int) -> bool:
    """Whether process `pid`'s main thread, the one that started this process (memplan train's launch runs
    there), is exiting or a zombie, or the process is gone."""
    try:  # after the command's closing parenthesis: state is field 3 of stat, flags field 9
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & PF_EXITING)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
