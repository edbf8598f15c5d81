"""Checks made before the model loads: the device exists, the output folder is writable, the step count is sane.

Each failure is one line naming what to change (a :class:`~lora_trainer.errors.UserError`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_trainer.config import ConfigError, TrainConfig
from lora_trainer.data.dataset import TrainItem, epoch_batches
from lora_trainer.errors import UserError
from lora_trainer.fsutil import StorageError, reporting_os_errors
from lora_trainer.validation import MAX_TOTAL_STEPS

MIN_FREE_BYTES = 64 << 20
# Rough seconds per image and step at 512 px for an SD1.x-size model (fwd + bwd, LoRA only): a guess shown
# before the first step; the progress bar then shows the measured ETA.
_SECONDS_PER_IMAGE = {"cuda": 0.3, "cpu": 12.0}


class DeviceError(UserError):
    """The configured device does not exist on this machine or this build of torch."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` must exist (DeviceError otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this build of torch has no CUDA support" if torch.version.cuda is None
                   else "torch sees no CUDA GPU on this machine")
            raise DeviceError(f"device: {name} is asked for, but {why} (torch {torch.__version__}); use device: auto "
                              "or cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device: {name} does not exist; this machine has {torch.cuda.device_count()} CUDA "
                              f"GPU(s): cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


def check_output_dir(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, with some space left (StorageError if not)."""
    with reporting_os_errors(folder, "write"):
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise StorageError(f"cannot write {folder}: the disk is full ({free >> 20} MiB free); free some space or "
                           "choose another output_dir")


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer updates the run makes, and how they divide into epochs."""

    total: int
    batches_per_epoch: int
    updates_per_epoch: int


def plan_steps(cfg: TrainConfig, items: list[TrainItem], processes: int = 1) -> StepPlan:
    """The run's step count from the data set (``processes`` share each batch of ``batch_size`` x processes);
    more than MAX_TOTAL_STEPS is refused before any work."""
    batches = len(epoch_batches(items, cfg.batch_size * processes, seed=cfg.seed, epoch=0, repeats=cfg.repeats))
    updates = math.ceil(batches / cfg.gradient_accumulation_steps)
    total = cfg.max_steps or cfg.epochs * updates
    if total > MAX_TOTAL_STEPS:
        raise ConfigError(f"epochs: {cfg.epochs} epochs of {updates} steps is {total} steps, more than "
                          f"{MAX_TOTAL_STEPS}; lower epochs or repeats, or set max_steps")
    return StepPlan(total, batches, updates)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(cfg: TrainConfig, plan: StepPlan, images: int, device: torch.device, processes: int = 1) -> str:
    """One line printed before training: the step count, the batch and a rough duration."""
    per_image = _SECONDS_PER_IMAGE.get(device.type, _SECONDS_PER_IMAGE["cpu"]) * (cfg.resolution / 512) ** 2
    seconds = plan.total * cfg.batch_size * cfg.gradient_accumulation_steps * per_image
    batch = f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps}"
    if processes > 1:
        batch += (f" x {processes} processes = {cfg.batch_size * cfg.gradient_accumulation_steps * processes} "
                  "per step")
    return (f"plan: {plan.total} steps ({plan.total / plan.updates_per_epoch:.3g} epochs of {plan.updates_per_epoch} "
            f"steps; {images} images x {cfg.repeats} repeats, {batch}, {cfg.resolution} px); rough duration "
            f"{format_duration(seconds)} on {device.type} for an SD1.x-size model (the progress bar shows the "
            "measured ETA)")
