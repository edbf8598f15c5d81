"""What the tab and the API show of a run's validation, overfitting alarm, snapshots and grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_trainer.train.events import GridEvent, OverfitEvent, SnapshotEvent, ValidationEvent
from lora_trainer.train.snapshots import Snapshot


@dataclass
class QualityState:
    """Fed with the trainer's events (under the job's lock); :meth:`snapshot` is JSON-able."""

    validation: list[list[float]] = field(default_factory=list)  # [step, validation loss, training-images loss]
    best_step: int | None = None
    best_loss: float | None = None
    overfit: dict[str, Any] | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    grid_path: str | None = None
    grid_weights: list[float] = field(default_factory=list)
    grid_prompts: list[str] = field(default_factory=list)

    def on_event(self, event: Any) -> None:
        if isinstance(event, ValidationEvent):
            self.validation.append([event.step, event.loss, event.train_loss])
            self.best_step, self.best_loss = event.best_step, event.best_loss
        elif isinstance(event, OverfitEvent):
            self.overfit = {"step": event.step, "best_step": event.best_step, "best_loss": event.best_loss,
                            "text": event.text, "stopped": event.stopping}
        elif isinstance(event, SnapshotEvent):
            snapshot = Snapshot(event.path, event.kind, event.step, event.epoch)
            self.snapshots = [s for s in self.snapshots if s["path"] != str(event.path)] + [snapshot.to_dict()]
        elif isinstance(event, GridEvent):
            self.grid_path = str(event.path)
            self.grid_weights, self.grid_prompts = list(event.weights), list(event.prompts)

    def finished(self, report: Any) -> None:
        """The run's own list of snapshots (with validation losses and the final LoRA) replaces the events'."""
        self.snapshots = [s.to_dict() for s in report.snapshots]
        if report.grid_path is not None:
            self.grid_path = str(report.grid_path)

    def snapshot(self) -> dict[str, Any]:
        return {"validation": [list(v) for v in self.validation], "best_step": self.best_step,
                "best_loss": self.best_loss, "overfit": dict(self.overfit) if self.overfit else None,
                "snapshots": [dict(s) for s in self.snapshots], "grid_path": self.grid_path,
                "grid_weights": list(self.grid_weights), "grid_prompts": list(self.grid_prompts)}
