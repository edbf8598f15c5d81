"""Surviving a real out-of-memory error mid-run, and noticing when memory spills to system RAM.

:class:`OomGuard` wraps each update (its micro-batches' forward and backward passes). When one raises
``torch.cuda.OutOfMemoryError``, nothing of that update has reached the weights or the optimizer yet: the guard frees
what the failed attempt held, puts the data position and the random state back to the start of the update, steps
down the memory plan's ladder (batch down with accumulation up, then gradient checkpointing) and the update runs
again with the new settings: no update lost or done twice, the same effective batch.

:class:`SpillWatch` reports, once, a step that suddenly runs many times slower than usual while the device memory is
nearly full: on Windows the NVIDIA driver then silently pages GPU memory to system RAM ("sysmem fallback").
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_trainer.train.memory_plan import Settings, next_rung

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


@dataclass
class UpdateStart:
    """Where an update starts: its first micro-step and the random state, to run it again from there."""

    micro_step: int
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None

    @classmethod
    def capture(cls, micro_step: int, device: torch.device) -> UpdateStart:
        return cls(micro_step, torch.get_rng_state(),
                   torch.cuda.get_rng_state_all() if device.type == "cuda" else None)

    def restore(self) -> int:
        """Put the random state back; the micro-step to start the update from."""
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        return self.micro_step


class OomGuard:
    """Remembers where each update starts; :meth:`recover` rolls back and steps down the ladder."""

    def __init__(self, settings: Settings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.changes: list[str] = []
        self._start: UpdateStart | None = None

    def begin(self, micro_step: int) -> None:
        self._start = UpdateStart.capture(micro_step, self.device)

    def recover(self, error: BaseException, optimizer: torch.optim.Optimizer) -> tuple[Settings, str, int]:
        """Free memory, restore the random state; return the stepped-down settings, what changed and the
        micro-step to restart the update from. Re-raises ``error`` when the ladder has no rung left."""
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        step = next_rung(self.settings, device=self.device, mid_run=True)
        if step is None or self._start is None:
            raise error
        self.settings, change = step
        self.changes.append(change)
        return self.settings, change, self.rollback()

    def rollback(self) -> int:
        """Put the random state back to the start of the update; the micro-step it started from."""
        if self._start is None:
            raise RuntimeError("rollback() before begin()")
        return self._start.restore()


def device_memory_fraction(device: torch.device) -> float | None:
    """How full the device memory is (0..1), or None where there is no such figure (CPU)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return 1.0 - free / total


class SpillWatch:
    """Flags a window of steps ``factor`` times slower than the usual pace while memory is over ``near_full``."""

    def __init__(self, memory_fraction: Callable[[], float | None], *, factor: float = 4.0,
                 near_full: float = 0.92, warmup_steps: int = 2, baseline_windows: int = 5) -> None:
        self.memory_fraction = memory_fraction
        self.factor, self.near_full = factor, near_full
        self.warmup_steps, self.baseline_windows = warmup_steps, baseline_windows
        self.steps_seen = 0
        self.paces: list[float] = []
        self.reported = False

    def observe(self, seconds_per_step: float, steps: int = 1) -> str | None:
        """A window of ``steps`` steps at ``seconds_per_step`` each; returns the warning the first time it fires."""
        self.steps_seen += steps
        if self.steps_seen <= self.warmup_steps or self.reported:
            return None
        usual = statistics.median(self.paces) if self.paces else None
        if usual is not None and seconds_per_step > self.factor * usual:
            fraction = self.memory_fraction()
            if fraction is not None and fraction >= self.near_full:
                self.reported = True
                return (f"steps slowed from {usual:.2f} s to {seconds_per_step:.2f} s each with the GPU memory "
                        f"{fraction:.0%} full: the driver is most likely spilling GPU memory to system RAM. Lower "
                        f"batch_size or resolution, turn on gradient_checkpointing, or disable the driver's "
                        f"'CUDA - Sysmem Fallback Policy' to get an out-of-memory error instead.")
            return None
        self.paces = (self.paces + [seconds_per_step])[-self.baseline_windows:]
        return None
