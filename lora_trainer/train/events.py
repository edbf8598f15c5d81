"""Events a training run emits; front ends (CLI bar, WebUI tab, TensorBoard) subscribe to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class StepEvent:
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    seconds_per_step: float


@dataclass
class SampleEvent:
    step: int
    paths: list[Path]
    images: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # text-generation: "prompt -> answer" lines


@dataclass
class EvalEvent:
    """Validation of a text-generation run: loss per answer token and its perplexity."""

    step: int
    loss: float
    perplexity: float


@dataclass
class CheckpointEvent:
    step: int
    path: Path


@dataclass
class ValidationEvent:
    """A validation loss (fixed noise and timesteps) and the same loss on a few training images."""

    step: int
    loss: float
    train_loss: float
    best_step: int
    best_loss: float


@dataclass
class OverfitEvent:
    """The overfitting alarm fired at ``step``; ``stopping`` when early_stop ends the run there."""

    step: int
    best_step: int
    best_loss: float
    text: str
    stopping: bool


@dataclass
class SnapshotEvent:
    """A LoRA snapshot was written (``kind``: epoch, best or final)."""

    step: int
    path: Path
    kind: str
    epoch: int | None = None


@dataclass
class GridEvent:
    """The epoch picker's grid image, with its rows (snapshot dicts), weights and prompts."""

    path: Path
    snapshots: list[dict]
    weights: list[float]
    prompts: list[str]


@dataclass
class MessageEvent:
    text: str
    level: str = "info"


class EventSink(Protocol):
    def __call__(self, event: Any) -> None: ...


class EventBus:
    """Fan an event out to every subscriber; a failing subscriber never stops training."""

    def __init__(self, *sinks: EventSink | None) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def subscribe(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Any) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception as err:  # noqa: BLE001 - a display problem must not kill a run
                print(f"[lora_trainer] event handler {sink!r} failed: {err}")
