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

    The alarm fires at an evaluation when the validation loss rose at each of the last ``patience``
    evaluations and ends at least :data:`MIN_RISE` above the best so far, while the training loss (measured
    the same way, at fixed noise, so without the noise of per-step losses) ended lower than it was at the
    start of those evaluations: the gap between the pictures it trains on and the others widens.
    """

    patience: int = 3
    history: list[Evaluation] = field(default_factory=list)
    alarm_step: int | None = None

    @property
    def best(self) -> Evaluation | None:
        """The evaluation with the lowest validation loss (the earliest of equals)."""
        return min(self.history, key=lambda e: e.loss) if self.history else None

    def record(self, step: int, loss: float, train_loss: float) -> bool:
        """Add an evaluation; True when this one sets the alarm off."""
        self.history.append(Evaluation(step, float(loss), float(train_loss)))
        if self.alarm_step is None and self.overfitting():
            self.alarm_step = step
            return True
        return False

    def overfitting(self) -> bool:
        """Whether the latest evaluations show the overfitting pattern (see the class doc)."""
        n = self.patience
        if len(self.history) <= n:
            return False
        window = self.history[-(n + 1):]
        first, last = window[0], window[-1]
        rising = all(later.loss > earlier.loss for earlier, later in zip(window, window[1:], strict=False))
        risen = last.loss >= self.best.loss * (1 + MIN_RISE)
        return rising and risen and last.train_loss < first.train_loss

    def describe(self) -> str:
        """The alarm as one line for the CLI and the tab (after it fired)."""
        best, last = self.best, self.history[-1]
        return (f"overfitting: the validation loss rose for {self.patience} evaluations in a row "
                f"({self.history[-self.patience - 1].loss:.4f} -> {last.loss:.4f}) while the training loss fell; "
                f"the best step was {best.step} (validation loss {best.loss:.4f})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able state, stored in checkpoints so a resumed run keeps its history."""
        return {"patience": self.patience, "alarm_step": self.alarm_step,
                "history": [asdict(e) for e in self.history]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], patience: int) -> OverfitMonitor:
        return cls(patience, [Evaluation(**e) for e in data.get("history", [])], data.get("alarm_step"))
