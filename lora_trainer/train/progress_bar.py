"""A tqdm bar for the command line, fed by training events."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from lora_trainer.train.events import (
    CheckpointEvent,
    EvalEvent,
    GridEvent,
    MessageEvent,
    SampleEvent,
    SnapshotEvent,
    StepEvent,
    ValidationEvent,
)


class ProgressBar:
    """Shows step, loss, it/s and ETA; prints messages above the bar."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, StepEvent):
            if self.bar is None:
                self.bar = tqdm(total=event.total_steps, initial=event.step - 1, unit="step", dynamic_ncols=True)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", epoch=event.epoch)
        elif isinstance(event, MessageEvent):
            tqdm.write(f"{event.level}: {event.text}" if event.level != "info" else event.text)
        elif isinstance(event, CheckpointEvent):
            tqdm.write(f"checkpoint: {event.path}")
        elif isinstance(event, SampleEvent):
            tqdm.write(f"samples at step {event.step}: {', '.join(str(p) for p in event.paths)}")
            for text in event.texts:
                tqdm.write(f"  {text}")
        elif isinstance(event, EvalEvent):
            tqdm.write(f"step {event.step}: eval loss {event.loss:.4f}, perplexity {event.perplexity:.2f}")
        elif isinstance(event, ValidationEvent):
            tqdm.write(f"validation at step {event.step}: {event.loss:.4f} (training images {event.train_loss:.4f};"
                       f" best: step {event.best_step}, {event.best_loss:.4f})")
        elif isinstance(event, SnapshotEvent):
            tqdm.write(f"snapshot ({event.kind}) at step {event.step}: {event.path}")
        elif isinstance(event, GridEvent):
            tqdm.write(f"epoch grid ({len(event.snapshots)} LoRAs x weights {', '.join(map(str, event.weights))} x "
                       f"{len(event.prompts)} prompt(s)): {event.path}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
