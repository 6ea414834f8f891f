"""What `memplan train` writes and reads: never over its inputs or over what it did not write; checkpoints
complete or absent (fsync'ed, completion record last), the newest intact one resumed; a full disk; files
loaded as data only (weights_only), never as code; a resumed run's inputs compared with the checkpoint's."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from memplan.train import outputs

from helpers import metrics, run_dir

# 4 steps, a checkpoint every 2 (both kept), 2 warmup steps then cosine decay: a finished run to resume from.
SHORT = dict(hparams={"max_steps": 4, "eval_every": 2, "save_every": 2, "eval_samples": 0, "log_every": 1,
                      "save_total_limit": 2})


def _cli(*args: str):
    from click.testing import CliRunner

    from memplan.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, list(args))
    finally:
        torch.set_num_threads(before)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _error(args, match: str) -> str:
    code, out, err = _cli(*args)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("memplan: error: "), err
    assert match in err, err
    return err


def _digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file) -> its sha256."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny):
    """A finished 4-step full fine-tuning run (checkpoints at steps 2 and 4), to copy and resume."""
    plan = run_dir(tmp_path_factory.mktemp("finished"), tiny, **SHORT)
    code, _, err = _cli("train", str(plan), "--quiet")
    assert code == 0, err
    return plan


@pytest.fixture
def copy(tmp_path, finished):
    """A copy of the finished run's directory; returns its plan.yaml."""
    shutil.copytree(finished.parent, tmp_path / "run")
    return tmp_path / "run" / "plan.yaml"


def _ckpt(plan: Path, step: int) -> Path:
    return plan.parent / "checkpoints" / f"checkpoint-{step:06d}"


# ---------------------------------------------------------------- inputs and what memplan did not write


def test_an_output_that_overlaps_an_input_is_refused_before_anything_is_written(tmp_path, tiny):
    # the base model in ./model beside plan.yaml: full fine-tuning would save its model/ there
    plan = run_dir(tmp_path, tiny)
    shutil.copytree(tiny[0], plan.parent / "model")
    data = yaml.safe_load(plan.read_text())
    plan.write_text(yaml.safe_dump(dict(data, model="model")))
    before = _digest(plan.parent / "model")
    _error(["train", str(plan)], "which is the model directory (model: ")
    _error(["train", str(plan), "--set", f"output_dir={plan.parent / 'model' / 'out'}"], "or inside it")
    assert _digest(plan.parent / "model") == before
    assert not (plan.parent / "checkpoints").exists() and not (plan.parent / "metrics.jsonl").exists()

    # a data file, or the plan file, where the run writes its metrics or summary
    other = run_dir(tmp_path / "b", tiny)
    shutil.copy(other.parent / "train.jsonl", other.parent / "metrics.jsonl")
    _error(["train", str(other), "--set", f"train={other.parent / 'metrics.jsonl'}"],
           "metrics.jsonl at ")
    renamed = other.parent / "summary.json"
    shutil.copy(other, renamed)
    _error(["train", str(renamed)], "which is the plan file")


def test_what_memplan_did_not_write_is_never_replaced(tmp_path, tiny):
    plan = run_dir(tmp_path, tiny, hparams={"max_steps": 2, "eval_every": 2, "eval_samples": 0})
    run = plan.parent
    (run / "model").mkdir()
    (run / "model" / "notes.txt").write_text("mine")
    (run / "summary.json").write_text("{}")
    code, _, err = _cli("train", str(plan))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("was not written by memplan train" in line for line in lines), err
    assert (run / "model" / "notes.txt").read_text() == "mine" and (run / "summary.json").read_text() == "{}"

    # and the last guard, where the replacement happens
    tmp = outputs.make_owned_dir(tmp_path / ".tmp-model", "model")
    from memplan.errors import UserError

    with pytest.raises(UserError, match="was not written by memplan train"):
        outputs.publish(tmp, run / "model")
    assert (run / "model" / "notes.txt").read_text() == "mine"


def test_a_new_run_keeps_off_an_earlier_runs_model(copy):
    shutil.rmtree(copy.parent / "checkpoints")
    _error(["train", str(copy)], "already holds model/ of an earlier run")


def test_folders_made_by_hand_in_checkpoints_are_left_alone(tmp_path, tiny):
    plan = run_dir(tmp_path, tiny, hparams={"max_steps": 2, "eval_every": 2, "eval_samples": 0,
                                            "save_total_limit": 1})
    ckpts = plan.parent / "checkpoints"
    for name in ("checkpoint-000004-backup", "checkpoint-000001.old"):
        (ckpts / name).mkdir(parents=True)
        (ckpts / name / "trainer.json").write_text('{"step": 1}')
    before = _digest(ckpts)
    code, _, err = _cli("train", str(plan), "--quiet")
    assert code == 0, err
    after = _digest(ckpts)
    assert {k: v for k, v in after.items() if "-backup" in k or ".old" in k} == before
    code, _, err = _cli("train", str(plan), "--quiet", "--resume")
    assert code == 0, err
    assert _digest(ckpts).items() >= before.items()


# ---------------------------------------------------------------- loading: data only


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MEMPLAN_TEST_MARK']}",))


@pytest.mark.parametrize("name", ["rng-0.pt", "optimizer.pt", "scheduler.pt"])
def test_a_crafted_pickle_in_a_checkpoint_never_runs(copy, tmp_path, monkeypatch, name):
    mark = tmp_path / "ran"
    monkeypatch.setenv("MEMPLAN_TEST_MARK", str(mark))
    ckpt = _ckpt(copy, 4)
    torch.save({"state": _RunsCode()}, ckpt / name)
    complete = json.loads((ckpt / outputs.COMPLETE).read_text())  # the record rewritten to match, as an attacker can
    complete["files"][name] = (ckpt / name).stat().st_size
    (ckpt / outputs.COMPLETE).write_text(json.dumps(complete))
    err = _error(["train", str(copy), "--resume"], f"{name}: not a checkpoint file memplan can load safely")
    assert "weights_only=True" in err and "system" in err
    assert not mark.exists()


def test_deepspeeds_files_load_as_data_only(tmp_path, monkeypatch):
    """DeepSpeed's own loader unpickles with weights_only=False; memplan swaps in its data-only one for the
    call, allowing the three data classes DeepSpeed's ZeRO files hold."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from memplan.errors import UserError
    from memplan.train import checkpoint
    from memplan.train.deepspeed_setup import CHECKPOINT_TAG

    ckpt = tmp_path / "checkpoint-000002"
    (ckpt / CHECKPOINT_TAG).mkdir(parents=True)
    good, bad = ckpt / CHECKPOINT_TAG / "optim_states.pt", ckpt / CHECKPOINT_TAG / "model_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}}, good)
    mark = tmp_path / "ran"
    monkeypatch.setenv("MEMPLAN_TEST_MARK", str(mark))
    torch.save({"module": _RunsCode()}, bad)

    class Engine:  # what _deepspeed_load sees of DeepSpeedEngine: its checkpoint engine, and a load that uses it
        checkpoint_engine = TorchCheckpointEngine()

        def load_checkpoint(self, load_dir, tag, **kwargs):
            states = [self.checkpoint_engine.load(str(Path(load_dir) / tag / f.name), map_location=None)
                      for f in (good, bad)]
            return load_dir, states

    engine = Engine()
    with pytest.raises(UserError, match="model_states.pt: not a checkpoint file memplan can load safely "
                                        r"\(it names posix.system"):
        checkpoint._deepspeed_load(ckpt, engine, optimizer_states=True)
    assert not mark.exists()
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method again after the call
    state = checkpoint._deepspeed_loader(str(good))["optimizer_state_dict"]
    assert state["zero_stage"] == 2 and state["loss_scaler"].cur_scale == 1.0
    assert state["param_slice_mappings"][0]["w"].numel == 4


# ---------------------------------------------------------------- complete or absent


def _cut_last_metrics_line(run: Path) -> None:
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 25])


@pytest.mark.parametrize("damage", ["empty optimizer.pt", "half model.pt", "no completion record"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(copy, finished, damage):
    ckpt = _ckpt(copy, 4)
    if damage == "empty optimizer.pt":
        (ckpt / "optimizer.pt").write_bytes(b"")
    elif damage == "half model.pt":
        data = (ckpt / "model.pt").read_bytes()
        (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    else:
        (ckpt / outputs.COMPLETE).unlink()
    _cut_last_metrics_line(copy.parent)
    code, out, err = _cli("train", str(copy), "--resume")
    assert code == 0, err
    assert f"{ckpt} is damaged" in out and "resuming from checkpoint-000002 instead" in out
    assert "cut off (not JSON)" in out
    # steps 3 and 4 trained again from step 2's state: the uninterrupted run's lines, each once
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss")
    resumed, straight = ([{k: r[k] for k in keys if k in r} for r in metrics(run)] for run in (copy.parent,
                                                                                            finished.parent))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):
        assert a == pytest.approx(b, rel=1e-6), (a, b)
    assert outputs.damage(ckpt) is None  # step 4 saved again, complete


def test_a_checkpoint_is_fsynced_and_its_completion_record_written_last(tmp_path, tiny, monkeypatch):
    events = []
    fsync_path, replace = outputs.fsync_path, os.replace
    monkeypatch.setattr(outputs, "fsync_path", lambda p: (events.append(("fsync", Path(p))), fsync_path(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(a), Path(b))), replace(a, b)))
    plan = run_dir(tmp_path, tiny, hparams={"max_steps": 2, "eval_every": 2, "eval_samples": 0})
    code, _, err = _cli("train", str(plan), "--quiet")
    assert code == 0, err
    final = _ckpt(plan, 2)
    tmp = final.with_name(".tmp-" + final.name)
    publish = events.index(("rename", tmp, final))
    synced = {e[1] for e in events[:publish] if e[0] == "fsync"}
    files = {tmp / p.relative_to(final) for p in final.rglob("*") if p.is_file()}
    assert files - {tmp / outputs.COMPLETE} <= synced and tmp in synced
    record = events.index(("rename", tmp / (outputs.COMPLETE + ".tmp"), tmp / outputs.COMPLETE))
    last_data = max(i for i, e in enumerate(events) if e[0] == "fsync" and e[1] in files)
    assert last_data < record < publish
    assert ("fsync", final.parent) in events[publish:]
    assert outputs.damage(final) is None


def test_a_partial_save_left_by_a_kill_is_removed_at_the_next_start_and_only_memplans(tmp_path):
    ckpts = tmp_path / "checkpoints"
    stale = outputs.make_owned_dir(ckpts / ".tmp-checkpoint-000004", "checkpoint")
    (stale / "model.pt").write_bytes(b"x" * 1000)
    old = outputs.make_owned_dir(tmp_path / ".old-model", "model")
    mine = ckpts / ".tmp-notes"
    mine.mkdir()
    assert sorted(outputs.remove_stale(tmp_path)) == sorted([stale, old])
    assert not stale.exists() and not old.exists() and mine.is_dir()


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, tiny, monkeypatch):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (writes to it fail with ENOSPC) on this system")
    plan = run_dir(tmp_path, tiny, **SHORT)
    make = outputs.temp_dir

    def full_at_step_4(final, what):
        tmp = make(final, what)
        if final.name == "checkpoint-000004":
            (tmp / "model.pt").symlink_to("/dev/full")  # the kernel's full device: every write is ENOSPC
        return tmp

    monkeypatch.setattr(outputs, "temp_dir", full_at_step_4)
    err = _error(["train", str(plan), "--quiet"], "disk full at ")
    assert ".tmp-checkpoint-000004/model.pt, " in err and " bytes needed for checkpoint-000004" in err
    assert "checkpoint-000002 is the last good checkpoint" in err
    ckpts = plan.parent / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-000002"]
    assert outputs.damage(ckpts / "checkpoint-000002") is None
    monkeypatch.undo()
    code, _, err = _cli("train", str(plan), "--quiet", "--resume")
    assert code == 0, err
    assert [r["step"] for r in metrics(plan.parent) if "loss" in r] == [1, 2, 3, 4]


def test_a_save_that_cannot_fit_is_refused_before_writing(copy, tmp_path, tiny, monkeypatch):
    written = sum((_ckpt(copy, 2) / n).stat().st_size for n in ("model.pt", "optimizer.pt", "scheduler.pt"))
    monkeypatch.setattr(outputs, "free_bytes", lambda path: 1000)
    plan = run_dir(tmp_path / "b", tiny, **SHORT)
    err = _error(["train", str(plan), "--quiet"], "bytes needed for checkpoint-000002 (1,000 were free)")
    needed = int(err.split(", ")[1].split(" bytes")[0].replace(",", ""))
    assert written <= needed <= written + 2 * 2**16
    assert "there is no earlier checkpoint" in err
    assert not any((plan.parent / "checkpoints").iterdir())


# ---------------------------------------------------------------- a resumed run's inputs


def test_resume_refuses_changed_data_model_or_plan(copy, tmp_path, tiny):
    train = copy.parent / "train.jsonl"
    original = train.read_text()
    rows = original.splitlines(keepends=True)
    train.write_text("".join(rows[1:] + rows[:1]))  # shuffled
    _error(["train", str(copy), "--resume"], "data.train")
    train.write_text("".join(rows[: len(rows) // 2]))  # halved
    err = _error(["train", str(copy), "--resume"], "changed since the run started")
    assert "restore the file" in err
    train.write_text(original)

    model = tmp_path / "model"
    shutil.copytree(tiny[0], model)
    (model / "tokenizer_config.json").write_text((model / "tokenizer_config.json").read_text().replace("<pad>", "<s>"))
    _error(["train", str(copy), "--resume", "--set", f"model={model}"], "tokenizer_config.json differ")

    data = yaml.safe_load(copy.read_text())
    copy.write_text(yaml.safe_dump(dict(data, hparams=dict(data["hparams"], lr=0.01))))
    err = _error(["train", str(copy), "--resume"], "hparams.lr is 0.01 now but was 0.003 when the run started")
    assert "Hint: --set hparams.lr=0.003 to continue as it started, or --set hparams.lr=0.01" in err
    copy.write_text(yaml.safe_dump(data))
    _error(["train", str(copy), "--resume", "--set", "micro_batch=2"], "micro_batch cannot change in a resumed run")
    code, _, err = _cli("train", str(copy), "--resume", "--quiet")  # unchanged: resumes
    assert code == 0, err


def test_resume_applies_a_changed_learning_rate_given_with_set(copy):
    code, out, err = _cli("train", str(copy), "--resume", "--set", "lr=0.01", "--set", "max_steps=6")
    assert code == 0, err
    assert "resuming with the changes given with --set, from step 4 on: hparams.lr 0.003 -> 0.01; " \
           "hparams.max_steps 4 -> 6" in out
    lr = {r["step"]: r["lr"] for r in metrics(copy.parent) if "loss" in r}
    # transformers' cosine schedule, 2 warmup steps of 6: at step index 4 half the new peak, at 5 (1 + cos 3π/4) / 2
    assert lr[5] == pytest.approx(0.005) and lr[6] == pytest.approx(0.01 * (1 - 2**-0.5) / 2)
    assert lr[3] == pytest.approx(0.003)  # the steps before the resume keep theirs
