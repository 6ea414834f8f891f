"""memplan makes no network call nobody asked for: `profile` and `train` run with every host name look-up
but this machine's refused and recorded, in the processes they start too, and with the user's own
HF_HUB_OFFLINE=0 (it allows downloads; train and profile ask for none, and bitsandbytes' optional-kernel
look-up at import is not the user's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# Loaded by every Python process started with this directory on PYTHONPATH (site imports sitecustomize):
# host name look-ups and connections to anything but this machine are recorded and refused.
GUARD = '''
import ipaddress, os, socket
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
_getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

def _record(what):
    with open(os.environ["MEMPLAN_TEST_LOOKUPS"], "a") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network refused by the test: {what}")

def _lookup(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL:
        _record(name)
    return _getaddrinfo(host, *args, **kwargs)

def _remote(address):
    if not isinstance(address, tuple):
        return False  # a Unix socket
    try:
        return not ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
        return address[0] not in _LOCAL

def _connecting(original):
    def connect(self, address):
        if _remote(address):
            _record(f"connect {address[0]}")
        return original(self, address)
    return connect

socket.getaddrinfo = _lookup
socket.socket.connect, socket.socket.connect_ex = _connecting(_connect), _connecting(_connect_ex)
'''


@pytest.fixture
def no_network(tmp_path):
    """run(args) -> (CompletedProcess, host names looked up) for `python -m memplan ARGS` under the guard,
    with HF_HUB_OFFLINE=0 as a user may have it."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "lookups.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="0", MEMPLAN_TEST_LOOKUPS=str(log), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(guard), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("TRANSFORMERS_OFFLINE", None)

    def run(*args: str, code: str | None = None):
        cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "memplan", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
        return done, (log.read_text().splitlines() if log.exists() else [])

    return run


def test_the_guard_sees_a_look_up_and_a_connection(no_network):
    code = ("import socket\n"
            "for call in (lambda: socket.getaddrinfo('huggingface.co', 443),\n"
            "             lambda: socket.socket().connect(('192.0.2.1', 443))):\n"
            "    try:\n        call()\n    except OSError:\n        pass\n")
    done, looked_up = no_network(code=code)
    assert done.returncode == 0, done.stderr
    assert [line.split(" ", 1)[1] for line in looked_up] == ["huggingface.co", "connect 192.0.2.1"]


@pytest.mark.slow
@pytest.mark.distributed
def test_profile_with_lora_in_two_processes_looks_nothing_up(no_network):
    done, looked_up = no_network("profile", "--model", "demo-tiny", "--method", "lora", "--device", "cpu",
                                 "--precision", "fp32", "--backend", "cpu", "--gpus", "2", "--batch-size", "1",
                                 "--seq-len", "32", "--steps", "1", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert looked_up == []


@pytest.mark.slow
def test_train_with_lora_looks_nothing_up(no_network, tmp_path):
    plan = {"model": "demo-tiny", "method": "lora", "device": "cpu", "precision": "fp32", "micro_batch": 4,
            "seq_len": 64, "grad_ckpt": False, "output_dir": str(tmp_path / "out"),
            "hparams": {"max_steps": 1, "eval_every": 1, "eval_samples": 0, "lr": 1e-3},
            "data": {"train": str(ROOT / "data" / "demo" / "train.jsonl"),
                     "validation": str(ROOT / "data" / "demo" / "val.jsonl")}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    done, looked_up = no_network("train", str(path), "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert looked_up == []
    assert (tmp_path / "out" / "adapter").is_dir()
