"""The trainer's state as checkpoints hold it (trainer.json): the same file as earlier versions wrote, so
that their checkpoints resume, and one clear error for a file that does not fit."""

import json

import pytest

from memplan.errors import UserError
from memplan.train.state import TrainerState, Window

# trainer.json of a checkpoint at step 3 of a two-process run, as memplan has written it
WRITTEN = """{
 "step": 3,
 "best_loss": 2.5,
 "best_step": 2,
 "bad_evals": 1,
 "tokens": 384,
 "train_seconds": 1.25,
 "retention_before": 3.75,
 "window": {
  "loss": 5.5,
  "steps": 2,
  "tokens": 256,
  "seconds": 0.75,
  "positions": 512
 },
 "world_size": 2
}"""


def test_trainer_json_reads_and_writes_back_byte_for_byte():
    state = TrainerState.from_json(json.loads(WRITTEN))
    assert state == TrainerState(step=3, best_loss=2.5, best_step=2, bad_evals=1, tokens=384, train_seconds=1.25,
                                 retention_before=3.75, window=Window(loss=5.5, steps=2, tokens=256, seconds=0.75,
                                                                        positions=512))
    assert json.dumps(dict(state.to_json(), world_size=2), indent=1) == WRITTEN


def test_keys_a_trainer_json_lacks_keep_their_starting_values():
    state = TrainerState.from_json({"step": 5, "tokens": 10, "train_seconds": 2.0})
    assert state == TrainerState(step=5, tokens=10, train_seconds=2.0)
    assert state.window == Window()
    # a window written before it counted positions
    older = TrainerState.from_json({"step": 5, "window": {"loss": 1.0, "steps": 1, "tokens": 8, "seconds": 0.5}})
    assert older.window == Window(loss=1.0, steps=1, tokens=8, seconds=0.5, positions=0)


def test_counting_steps_and_evaluations():
    state = TrainerState(step=4)
    state.count_step(2.0, 100, 0.5, positions=128)
    state.count_step(3.0, 50, 0.25, positions=64)
    assert (state.tokens, state.train_seconds) == (150, 0.75)
    assert state.window == Window(loss=5.0, steps=2, tokens=150, seconds=0.75, positions=192)
    assert state.count_evaluation(1.5) and (state.best_loss, state.best_step, state.bad_evals) == (1.5, 4, 0)
    state.step = 6
    assert not state.count_evaluation(1.5) and (state.best_step, state.bad_evals) == (4, 1)
    assert state.count_evaluation(1.0) and (state.best_step, state.bad_evals) == (6, 0)


@pytest.mark.parametrize("text, problem", [
    ('{"step": 3, "window": [1, 2]}', "window is not a JSON object"),
    ('{"step": 3, "window": {"loss": 1.0, "lines": 2}}', "unexpected keyword argument 'lines'"),
    ("[3]", "not a JSON object"),
    ('{"step": 3', "Expecting"),
])
def test_a_trainer_json_that_does_not_fit_is_one_clear_error(tmp_path, text, problem):
    from memplan.train.checkpoint import _trainer_state

    (tmp_path / "trainer.json").write_text(text)
    with pytest.raises(UserError, match=f"trainer.json: unreadable \\(.*{problem}"):
        _trainer_state(tmp_path, 1)


def test_a_checkpoint_of_another_process_count_is_refused(tmp_path):
    from memplan.train.checkpoint import _trainer_state

    (tmp_path / "trainer.json").write_text(WRITTEN)
    with pytest.raises(UserError, match="written by 2 process\\(es\\); this run has 1. Resume with the same"):
        _trainer_state(tmp_path, 1)
    assert _trainer_state(tmp_path, 2).step == 3


def test_step_time_is_predicted_only_for_hardware_with_figures(monkeypatch):
    """memplan train compares its step time with the time model on this machine's CPU, or on a GPU NVML names as a
    preset with throughput figures; a GPU without them gets no prediction (none borrowed from another GPU)."""
    from memplan.catalog import gpus
    from memplan.plan import build_plan
    from memplan.train.loop import time_target

    assert time_target(build_plan({"model": "demo-tiny", "device": "cpu"})).device == "cpu"
    cuda = build_plan({"model": "demo-tiny", "device": "cuda"})
    monkeypatch.setattr(gpus, "local_gpus", lambda: [gpus.custom_gpu(80 * 2**30)])
    assert time_target(cuda) is None
    monkeypatch.setattr(gpus, "local_gpus", lambda: [gpus.resolve_gpu("h100-80gb")])
    assert time_target(cuda).gpu.id == "h100-80gb"
