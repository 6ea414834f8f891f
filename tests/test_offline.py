"""memplan makes no network call nobody asked for: `profile` and `train` run with every host name look-up
but this machine's refused and recorded, in the processes they start too, and with the user's own
HF_HUB_OFFLINE=0 (it allows downloads; train and profile ask for none, and bitsandbytes' optional-kernel
look-up at import is not the user's). The processes of a two-process run are checked so in
tests/profile/test_profile.py (`memplan profile --gpus 2` under DDP and FSDP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from support import without_network

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(tmp_path):
    return without_network(tmp_path)


def test_the_guard_sees_a_look_up_and_a_connection(no_network):
    code = ("import socket\n"
            "for call in (lambda: socket.getaddrinfo('huggingface.co', 443),\n"
            "             lambda: socket.socket().connect(('192.0.2.1', 443))):\n"
            "    try:\n        call()\n    except OSError:\n        pass\n")
    done, looked_up = no_network(code=code)
    assert done.returncode == 0, done.stderr
    assert [line.split(" ", 1)[1] for line in looked_up] == ["huggingface.co", "connect 192.0.2.1"]


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
