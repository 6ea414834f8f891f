"""The processes of a `memplan train` run and the directory it writes: one run per output directory (a lock),
no worker outliving its launcher, an output directory that cannot be written found before anything loads,
and the checks of a run with several processes made before any of them starts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from memplan.train import launch, preflight
from memplan.train import lock as lock_mod

from helpers import SUBPROCESS_ENV, run_dir
from support import REPO

HEAVY = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes")
#: Generous bound for processes to be gone after a kill (they stop within a second or two; this is no
#: measure of speed, only a bound for the poll to give up on).
GONE_WITHIN_S = 120
#: A run that would go on for a long time, so that it is still running when the test acts on it.
LONG = dict(hparams={"max_steps": 100000, "eval_every": 100000, "save_every": 100000, "eval_samples": 0,
                     "log_every": 1}, micro_batch=2, grad_accum=1)


def _errors(err: str) -> list[str]:
    lines = err.splitlines()
    assert lines and all(line.startswith("memplan: error: ") for line in lines), err
    return [line.removeprefix("memplan: error: ") for line in lines]


def _memplan(*args: str) -> list[str]:
    return [sys.executable, "-m", "memplan", *args]


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)


def _wait_until_training(proc: subprocess.Popen, out: Path) -> None:
    """Until the run has logged a step (its processes are training); fails if it ended first."""
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before the test could act on it: {proc.stderr.read()[-3000:]}"


def _gone(pids: list[int]) -> list[int]:
    """Poll until none of `pids` runs (a zombie waiting for init counts as gone); returns those still running."""
    def running(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    end = time.monotonic() + GONE_WITHIN_S
    alive = [p for p in pids if running(p)]
    while alive and time.monotonic() < end:
        time.sleep(0.1)
        alive = [p for p in alive if running(p)]
    return alive


# ---------------------------------------------------------------- one run per output directory


def test_the_lock_excludes_a_second_holder_and_a_killed_holder_leaves_an_explained_file(tmp_path):
    out = tmp_path / "out"
    first = lock_mod.OutputLock(out).acquire()
    record = json.loads((out / lock_mod.LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and first.stale is None
    # another run (a descriptor of its own: flock locks exclude each other even within one process)
    with pytest.raises(Exception, match=rf"output_dir {out} is in use by another memplan train run \(pid {os.getpid()}"):
        lock_mod.OutputLock(out).acquire()
    assert "is in use by another memplan train run" in lock_mod.in_use(out)
    first.release()
    assert not (out / lock_mod.LOCK_NAME).exists() and lock_mod.in_use(out) is None
    # a run that was killed leaves its file, but no lock: the next one takes over and says whose it was
    (out / lock_mod.LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "node-7", "started": "2025-01-31 12:00:00"}))
    assert lock_mod.in_use(out) is None
    with lock_mod.OutputLock(out) as second:
        assert second.stale["pid"] == 4242
        assert "(pid 4242 on node-7, started 2025-01-31 12:00:00) ended without finishing" in second.stale_note()
    assert not (out / lock_mod.LOCK_NAME).exists()


def test_a_file_system_without_locks_runs_unlocked_and_says_so(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with lock_mod.OutputLock(tmp_path) as held:
        assert held.unlocked and "without file locks: a second memplan train run on it would not be stopped" \
            in held.stale_note()
        assert lock_mod.in_use(tmp_path) is None


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_stops_at_once(tmp_path, tiny):
    plan = run_dir(tmp_path, tiny, **LONG)
    out = plan.parent
    first = _start(_memplan("train", str(plan), "--quiet"))
    try:
        _wait_until_training(first, out)
        for args in ((), ("--resume",), ("--dry-run",)):  # (2 steps: were it to train, it would end soon)
            done = subprocess.run(_memplan("train", str(plan), "--set", "max_steps=2", *args), capture_output=True,
                                  text=True, env=SUBPROCESS_ENV)
            assert done.returncode == 2, (args, done.stderr)
            lines = _errors(done.stderr)
            assert len(lines) == 1 and lines[0].startswith(f"output_dir {out} is in use by another memplan train run "
                                                           f"(pid {first.pid} on "), (args, lines)
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # killed: the kernel dropped its lock with it; its file says who it was
    with lock_mod.OutputLock(out) as after:
        assert after.stale["pid"] == first.pid


# ---------------------------------------------------------------- no worker outlives its launcher


def _accelerate_launcher(code_after: str = "") -> str:
    """Python that runs `memplan train` with its launch through accelerate launch (one CPU process)."""
    return ("import sys\nfrom memplan.train import launch\n"
            "launch.needs_launcher = lambda plan: True\n"
            "launch.command = lambda resolved, args: [sys.executable, '-m', 'accelerate.commands.launch', '--cpu', "
            "'--num_processes', '1', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', "
            "'-m', 'memplan', *args]\n"
            "from memplan.cli import main\nmain(sys.argv[1:])\n")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher, killed", [("torchrun", "memplan train"), ("accelerate", "memplan train"),
                                              ("torchrun", "torchrun")])
def test_workers_die_with_their_launcher(tmp_path, tiny, launcher, killed):
    """SIGKILL, which nothing can catch, of `memplan train` (or of the launcher it started): every process of
    the run ends, and the output directory is free again."""
    if launcher == "torchrun":  # two CPU processes
        plan = run_dir(tmp_path, tiny, gpus=2, **LONG)
        cmd = _memplan("train", str(plan), "--quiet")
        workers = 2
    else:  # one process under accelerate launch
        plan = run_dir(tmp_path, tiny, **LONG)
        cmd = [sys.executable, "-c", _accelerate_launcher(), "train", str(plan), "--quiet"]
        workers = 1
    out = plan.parent
    proc = _start(cmd)
    tree = []
    try:
        _wait_until_training(proc, out)
        tree = psutil.Process(proc.pid).children(recursive=True)
        agent = [p for p in tree if p.ppid() == proc.pid]
        trainers = [p for p in tree if p.ppid() != proc.pid]
        assert len(agent) == 1 and len(trainers) == workers, [p.cmdline() for p in tree]
        errors = Path(agent[0].environ()[launch.ERRORS_ENV])
        assert errors.is_dir()
        victim = proc.pid if killed == "memplan train" else agent[0].pid
        os.kill(victim, signal.SIGKILL)
        assert _gone([p.pid for p in tree]) == []
        assert lock_mod.in_use(out) is None
        if killed != "memplan train":  # which then ends
            proc.wait(timeout=60)
        assert not errors.exists()  # its temporary directory goes with the run, however it ended
    finally:  # whatever the test found, it leaves no process behind
        for p in tree + [proc]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()


# ---------------------------------------------------------------- an output directory that cannot be written


def _train_before_heavy_imports(plan: Path, *sets: str, wrap=None) -> subprocess.CompletedProcess:
    """`memplan train` in a fresh Python that prints its exit code and the heavy modules it imported."""
    args = ["train", str(plan), *[a for s in sets for a in ("--set", s)]]
    code = (f"import sys\nfrom memplan.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    code = e.code\n"
            f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    cmd = [sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run(wrap(cmd) if wrap else cmd, cwd=REPO, capture_output=True, text=True, env=env)


def test_an_output_dir_that_is_a_file_is_found_before_anything_loads(tmp_path, tiny):
    plan = run_dir(tmp_path, tiny)
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    for output_dir, wanted in ((file, f"output_dir {file} exists and is not a directory"),
                               (file / "out", f"output_dir {file / 'out'}: {file} is not a directory, so it cannot "
                                              "be made")):
        done = _train_before_heavy_imports(plan, f"output_dir={output_dir}")
        assert done.stdout.splitlines()[-1] == "2 []", (done.stdout, done.stderr)
        lines = _errors(done.stderr)
        assert len(lines) == 1 and lines[0].startswith(wanted), lines
        assert lines[0].endswith("Hint: --set output_dir=DIR for a directory you can write in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("")
    lines = preflight.output_dir_lines(tmp_path / "out")
    assert lines and lines[0].startswith(f"{tmp_path / 'out' / 'checkpoints'} exists and is not a directory")


def _read_only_mount(directory: Path):
    """A command wrapper that runs it where `directory` is a read-only file system (a tmpfs mounted in a
    user and mount namespace of its own), or None where this machine allows no such namespace."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        return None
    return lambda cmd: [unshare, "-rm", "sh", "-c", 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"',
                        str(directory), *cmd]


def test_an_unwritable_output_dir_is_found_before_anything_loads(tmp_path, tiny):
    plan = run_dir(tmp_path, tiny)
    out = tmp_path / "read-only"
    out.mkdir()
    wrap = _read_only_mount(out)
    if wrap is None:
        if os.geteuid() == 0:
            pytest.skip("no mount namespace here, and root writes into any directory")
        out.chmod(0o555)
    for target, where in ((out, "cannot write there"), (out / "new" / "dir", f"cannot create it in {out}")):
        done = _train_before_heavy_imports(plan, f"output_dir={target}", wrap=wrap)
        assert done.stdout.splitlines()[-1] == "2 []", (done.stdout, done.stderr)
        lines = _errors(done.stderr)
        reason = "Read-only file system" if wrap else "Permission denied"
        assert lines == [f"output_dir {target}: {where}: {reason}. Hint: --set output_dir=DIR for a directory you can "
                         "write in"], lines
    out.chmod(0o755)


# ---------------------------------------------------------------- several processes: checked before the launch


def test_more_cpu_processes_than_cores_are_refused_before_the_launch(tmp_path, tiny, run_cli, monkeypatch):
    monkeypatch.setattr(preflight.Machine, "cpu_cores", property(lambda self: 2))
    plan = run_dir(tmp_path, tiny, micro_batch=1)
    for gpus in (3, 1000000):
        code, _, err = run_cli("train", str(plan), "--set", f"gpus={gpus}", "--dry-run")
        lines = _errors(err)
        assert code == 2 and lines[0] == (f"gpus {gpus}: a CPU plan starts that many processes here, at most one per "
                                          "CPU core, and this machine has 2 core(s) for them (allowed: gpus 1 to 2). "
                                          "Hint: --set gpus=2"), lines
    code, _, err = run_cli("train", str(plan), "--set", "gpus=2", "--dry-run")
    assert code == 0, err


def test_more_gpu_processes_than_devices_are_refused(tmp_path):
    from memplan.plan import build_plan

    machine = preflight.Machine()
    machine.__dict__.update(cuda=True, cuda_devices=2)  # cached_property values
    plan = build_plan(dict(model="llama-2-7b", method="lora", device="cuda", gpus=4, micro_batch=1))
    texts = [p.text for p in preflight.machine_problems(plan, tmp_path / "plan.yaml", machine)]
    assert any(t.startswith("gpus 4: the plan starts one process per GPU here, and torch sees 2 CUDA device(s) "
                            "(allowed: gpus 1 to 2") for t in texts), texts
    two = plan.model_copy(update={"gpus": 2})
    assert not any("CUDA device(s)" in p.text for p in preflight.machine_problems(two, tmp_path / "plan.yaml", machine))


# 160 examples, packed 256 tokens to a sequence: 35 sequences, fewer than 2 processes x micro-batch 60.
PACKED = dict(gpus=2, micro_batch=60, seq_len=256, data={"packing": True})


def test_data_that_cannot_fill_every_process_stops_before_the_launch(tmp_path, tiny, run_cli, monkeypatch):
    from memplan.train import launch

    monkeypatch.setattr(launch, "relaunch", lambda *a, **k: pytest.fail("launched"))
    plan = run_dir(tmp_path, tiny, **PACKED)
    code, out, err = run_cli("train", str(plan))
    assert code == 2 and _errors(err) == ["35 training examples cannot fill one batch of micro_batch 60 x 2 "
                                          "process(es). Hint: add data or lower micro_batch"]
    assert sorted(p.name for p in plan.parent.iterdir()) == sorted([p.name for p in tiny[1].iterdir()] + ["plan.yaml"])


@pytest.mark.slow
@pytest.mark.distributed
def test_a_problem_the_workers_stop_on_is_one_line_exit_2(tmp_path, tiny):
    """What only the processes can find (here the same shortfall, with the check before the launch taken
    out) is printed once by `memplan train`, not once per process under torchrun's failure report."""
    plan = run_dir(tmp_path, tiny, **PACKED)
    code = ("import sys\nfrom memplan.train import run\nrun.fill_every_process = lambda *a: None\n"
            "from memplan.cli import main\nmain(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", code, "train", str(plan), "--quiet"], capture_output=True, text=True,
                          env=SUBPROCESS_ENV)
    assert done.returncode == 2, done.stderr
    assert _errors(done.stderr) == ["35 training examples cannot fill one batch of micro_batch 60 x 2 process(es). "
                                    "Hint: add data or lower micro_batch"]


def test_recommend_refuses_more_processes_than_training_examples(run_cli):
    code, out, err = run_cli("recommend", "--model", "llama-2-7b", "--gpu", "h100-80gb", "--gpus", "1024",
                             "--nodes", "128", "--dataset-size", "50000")
    assert code == 2 and out == ""
    assert _errors(err) == ["131,072 processes (1,024 per node x 128 node(s)) need at least one training example each "
                            "per optimizer step, and there are 50,000: use at most 50,000 in all (--gpus x --nodes), "
                            "or more data"]
    code, _, err = run_cli("recommend", "--model", "llama-2-7b", "--gpu", "h100-80gb", "--gpus", "8",
                           "--nodes", "4", "--dataset-size", "50000")
    assert code == 0, err
