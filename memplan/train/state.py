"""The trainer's state: what the loop counts as it goes, saved in every checkpoint (trainer.json), so
that a resumed run continues with the same counts, the same best evaluation and the same metrics lines
as an uninterrupted one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Window:
    """The steps since the last metrics line: their summed mean losses, count, tokens and seconds, and the
    positions this process computed (padding included: what the time model's FLOPs count)."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    positions: int = 0


@dataclass
class TrainerState:
    """Counts of the run so far (all processes together)."""

    step: int = 0  # optimizer steps done; also the data position (memplan.train.data.Stream)
    best_loss: float | None = None  # the lowest validation loss so far, and its step
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best: early stopping's patience counts them
    tokens: int = 0  # input tokens trained on
    train_seconds: float = 0.0  # time in optimizer steps (evaluations and saves not counted)
    retention_before: float | None = None  # the untouched model's mean loss on the retention text
    window: Window = field(default_factory=Window)

    def count_step(self, loss: float, tokens: int, seconds: float, positions: int = 0) -> None:
        """An optimizer step's mean loss, tokens, time and this process's positions, into the totals and the
        metrics window."""
        self.window.positions += positions
        self.tokens += tokens
        self.train_seconds += seconds
        self.window.loss += loss
        self.window.steps += 1
        self.window.tokens += tokens
        self.window.seconds += seconds

    def count_evaluation(self, loss: float) -> bool:
        """A validation loss measured at this step; True when it is the best so far."""
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = loss, self.step, 0
            return True
        self.bad_evals += 1
        return False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, saved: dict) -> TrainerState:
        """The state trainer.json holds; keys it lacks keep their starting values, others are ignored.
        Raises TypeError or ValueError when a value has the wrong shape."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in names}
        if "window" in values:
            if not isinstance(values["window"], dict):
                raise ValueError("window is not a JSON object")
            values["window"] = Window(**values["window"])
        return cls(**values)
