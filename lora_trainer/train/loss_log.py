"""Step losses kept on the device and read back in one go: no host-device sync per step.

``loss.item()`` after every step makes the CPU wait for the GPU to finish that step before it may queue the next
one. The trainer instead hands each update's micro-batch losses (0-dim tensors) to :class:`LossLog`, which reads
all pending ones with a single transfer when :meth:`due` (every ``every_seconds``, default half a second, by the
host clock; every step on a CPU, where a read costs nothing) or when the trainer needs them (checkpoint, samples,
validation, the end). The values are computed exactly as before (each micro-batch loss as a Python float,
divided by the accumulation steps and summed in that order), so the bar, TensorBoard and the events show the same
numbers, only in small batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LoggedStep:
    step: int
    epoch: int
    lr: float
    loss: float
    seconds: float  # mean seconds per step over the window it was read back in


@dataclass
class _Pending:
    step: int
    epoch: int
    lr: float
    micro_losses: list[torch.Tensor]


class LossLog:
    """Collect per-update losses on the device; :meth:`flush` returns them as :class:`LoggedStep` values."""

    def __init__(self, every_seconds: float = 0.5, max_pending: int = 200,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.every_seconds = every_seconds
        self.max_pending = max_pending
        self.clock = clock
        self.pending: list[_Pending] = []
        self.reads = 0  # host reads so far (one per flush with something pending)
        self._window_start = clock()

    @staticmethod
    def interval_for(device: torch.device) -> float:
        """Seconds between reads on ``device``: a CPU computes synchronously, so its losses are read every step
        (prompt progress and Interrupt); accelerators queue work ahead, so theirs are read in batches."""
        return 0.0 if device.type == "cpu" else 0.5

    def add(self, step: int, epoch: int, lr: float, micro_losses: list[torch.Tensor]) -> None:
        self.pending.append(_Pending(step, epoch, lr, [loss.detach() for loss in micro_losses]))

    def due(self) -> bool:
        return bool(self.pending) and (len(self.pending) >= self.max_pending
                                       or self.clock() - self._window_start >= self.every_seconds)

    def flush(self) -> list[LoggedStep]:
        """Read every pending loss with one device-to-host transfer."""
        now = self.clock()
        if not self.pending:
            self._window_start = now
            return []
        flat = torch.stack([loss.float().reshape(()) for p in self.pending for loss in p.micro_losses])
        values = iter(self._read(flat))
        seconds = (now - self._window_start) / len(self.pending)
        out = []
        for p in self.pending:
            accumulation = len(p.micro_losses)
            loss = 0.0
            for _ in range(accumulation):
                loss += next(values) / accumulation
            out.append(LoggedStep(p.step, p.epoch, p.lr, loss, seconds))
        self.pending.clear()
        self._window_start = now
        return out

    def _read(self, flat: torch.Tensor) -> list[float]:
        self.reads += 1
        return flat.cpu().tolist()
