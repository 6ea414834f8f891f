"""One run per output directory: `memplan train` holds an exclusive lock on OUTPUT_DIR/.memplan-train.lock
(fcntl.flock) from before it writes anything until its last process has ended, so that a second run on the
same directory stops at once (one line, exit code 2) instead of interleaving its checkpoints, metrics and
final model with the first one's.

- Who holds it: the `memplan train` the user started. With several processes, the launcher it starts
  (torchrun or accelerate launch, which stop their workers before they exit) inherits the lock's
  descriptor, so the lock lasts while either of them runs; the workers take nothing (they would wait on
  their own launcher). Processes started by hand (`torchrun ... -m memplan train`) have no memplan
  launcher: there global rank 0 takes the lock.
- The kernel drops a flock when the last descriptor of it is closed, however the process ends (exit,
  exception, SIGKILL, a crash), so a lock never outlives its run. The file says who took it (pid, host,
  start time) and is removed on a normal exit; a file found without a lock was left by a run that was
  killed, which the next run says before it takes the directory over.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from memplan.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not kept apart
    fcntl = None

LOCK_NAME = ".memplan-train.lock"
#: What flock raises on a file system that has no locks (some FUSE and network mounts).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)

#: Tries, 0.05 s apart, before a lock held by someone else counts as taken: another run's --dry-run (or
#: the check before a run) holds it for the microseconds of a look, a run for as long as it trains.
ATTEMPTS = 5
RETRY_S = 0.05


def lock_path(out: Path) -> Path:
    return Path(out) / LOCK_NAME


def _record(fd: int) -> dict | None:
    """Who took the lock, as its file says; None for an empty or unreadable file."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(record: dict | None) -> str:
    """'pid 123 on host, started 2025-01-31 12:00:00' (what is known of it)."""
    if not record:
        return "no record of it"
    parts = [f"pid {record.get('pid')}" + (f" on {record['host']}" if record.get("host") else "")]
    if record.get("started"):
        parts.append(f"started {record['started']}")
    return ", ".join(parts)


def busy_line(out: Path, record: dict | None) -> str:
    return (f"output_dir {out} is in use by another memplan train run ({describe(record)}). Hint: wait for it to "
            "finish (or stop it), or --set output_dir=NEW_DIR for a separate run")


class NoLocks(Exception):
    """The file system (or the system) has no file locks."""


def _try_lock(fd: int, mode: str) -> bool:
    """Take the flock ("shared" or "exclusive") without waiting for it: False when another holds it."""
    if fcntl is None:
        raise NoLocks()
    flag = fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX
    for attempt in range(ATTEMPTS):
        try:
            fcntl.flock(fd, flag | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in NO_LOCKS:
                raise NoLocks() from None
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if attempt + 1 < ATTEMPTS:
            time.sleep(RETRY_S)
    return False


def in_use(out: Path) -> str | None:
    """The line saying that another run holds `out`, or None. Creates nothing: a look with a shared lock,
    which a running run's exclusive one refuses."""
    try:
        fd = os.open(lock_path(out), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (or no directory): nobody holds it; unreadable: the run itself will say
        return None
    try:
        if _try_lock(fd, "shared"):
            return None
        return busy_line(out, _record(fd))
    except (NoLocks, OSError):
        return None
    finally:
        os.close(fd)


class OutputLock:
    """The exclusive lock on an output directory, for one run. `acquire` raises UserError when another run
    holds it; `stale` is then what a killed run left in the file (or None); `release` ends it."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.fd: int | None = None
        self.stale: dict | None = None
        self.unlocked = False  # no file locks here: the run goes on without one

    def acquire(self) -> OutputLock:
        fd = None
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            while fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    taken = _try_lock(fd, "exclusive")
                except NoLocks:
                    taken = self.unlocked = True
                if not taken:
                    record = _record(fd)
                    os.close(fd)
                    raise UserError(busy_line(self.out, record))
                # the run that held it may have removed the file between our open and our lock: then the
                # lock is on a file nobody else will look at; take the one at the path
                try:
                    current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    os.close(fd)
                    fd = None
            self.stale = None if self.unlocked else _record(fd)
            text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError as err:
            if fd is not None:
                os.close(fd)
            raise UserError(f"output_dir {self.out}: cannot write there: {err.strerror} "
                            f"({err.filename or self.path})") from None
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the file, then let go (in that order: a run waiting on this file then sees it replaced)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def stale_note(self) -> str | None:
        """What the run should say about the lock: a killed run's file it found, or no locks here."""
        if self.unlocked:
            return (f"{self.out} is on a file system without file locks: a second memplan train run on it would "
                    "not be stopped")
        if not self.stale:
            return None
        return (f"the previous memplan train run in {self.out} ({describe(self.stale)}) ended without finishing "
                "(killed, or its machine stopped); its lock ended with it, and this run takes the directory over")

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
