"""The overfitting alarm: the validation loss keeps rising while the training loss keeps falling.

That pattern means the LoRA is learning the training pictures themselves rather than what they share: later
steps reproduce them more and generalise worse. (Both rising means the run diverges, a different problem.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MIN_RISE = 0.01  # the validation loss must end at least 1% above its best, so numerical jitter never fires it


@dataclass
class Evaluation:
    """One validation: the step, its validation loss, and the same fixed-noise loss on training images."""

    step: int
    loss: float
    train_loss: float


@dataclass
class OverfitMonitor:
    """Records evaluations, tracks the best one, and says when the alarm fires (once per run).

    The alarm fires when the last ``patience`` evaluations all came after the best one (no new best for that
    long: validation curves are noisy, so one dip does not reset the count), the latest is at least
    :data:`MIN_RISE` above the best, and the training loss (measured the same way, at fixed noise, so without the
    noise of per-step losses) is lower than it was at the best evaluation: the gap between the pictures it
    trains on and the others widens.
    """

    patience: int = 3
    history: list[Evaluation] = field(default_factory=list)
    alarm_step: int | None = None

    @property
    def best(self) -> Evaluation | None:
        """The evaluation with the lowest validation loss (the earliest of equals)."""
        return self.history[self._best_index()] if self.history else None

    def _best_index(self) -> int:
        return min(range(len(self.history)), key=lambda i: self.history[i].loss)

    def record(self, step: int, loss: float, train_loss: float) -> bool:
        """Add an evaluation; True when this one sets the alarm off."""
        self.history.append(Evaluation(step, float(loss), float(train_loss)))
        if self.alarm_step is None and self.overfitting():
            self.alarm_step = step
            return True
        return False

    def overfitting(self) -> bool:
        """Whether the evaluations so far show the overfitting pattern (see the class doc)."""
        if len(self.history) - 1 - self._best_index() < self.patience if self.history else True:
            return False
        best, last = self.best, self.history[-1]
        return last.loss >= best.loss * (1 + MIN_RISE) and last.train_loss < best.train_loss

    def describe(self) -> str:
        """The alarm as one line for the CLI and the tab (after it fired)."""
        best, last = self.best, self.history[-1]
        since = len(self.history) - 1 - self._best_index()
        return (f"overfitting: the validation loss has not improved for {since} evaluations and rose "
                f"({best.loss:.4f} -> {last.loss:.4f}) while the training loss fell "
                f"({best.train_loss:.4f} -> {last.train_loss:.4f}); the best step was {best.step} "
                f"(validation loss {best.loss:.4f})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, stored in checkpoints so a resumed run keeps its history."""
        return {"patience": self.patience, "alarm_step": self.alarm_step,
                "history": [asdict(e) for e in self.history]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], patience: int) -> OverfitMonitor:
        return cls(patience, [Evaluation(**e) for e in data.get("history", [])], data.get("alarm_step"))
