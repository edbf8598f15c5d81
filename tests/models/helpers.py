"""Shared helpers for the model tests."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_checkpoint(checkpoint: Path, folder: Path, name: str, *, with_yaml: bool = True) -> Path:
    """``<folder>/<name>.safetensors``, a copy of ``checkpoint``, with a copy of its ``.yaml`` when asked."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    shutil.copyfile(checkpoint, target)
    if with_yaml:
        shutil.copyfile(checkpoint.with_suffix(".yaml"), target.with_suffix(".yaml"))
    return target
