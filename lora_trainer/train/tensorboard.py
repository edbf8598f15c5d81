"""TensorBoard event files for a run, when tensorboard is installed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_trainer.train.events import MessageEvent


def open_summary_writer(log_dir: Path, notify: Callable[[Any], None] | None = None) -> Any:
    """A ``SummaryWriter`` on ``log_dir``, or None (with a warning) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if notify:
            notify(MessageEvent("tensorboard is not installed; no event files are written", "warning"))
        return None
    return SummaryWriter(str(log_dir))
