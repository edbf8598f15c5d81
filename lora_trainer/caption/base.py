"""What every captioner offers, and the error raised when its model files are not on disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image

from lora_trainer.errors import UserError


class CaptionModelMissing(UserError):
    """A captioner's model is not on disk: the message names the path tried and the files expected there."""

    def __init__(self, what: str, tried: str | Path | None, expected: Sequence[str], hint: str = "") -> None:
        self.tried = str(tried) if tried is not None else None
        self.expected = list(expected)
        files = ", ".join(self.expected)
        if self.tried is None:
            message = f"{what} model: no model folder given. Put these files in a folder and pass it: {files}"
        else:
            message = f"{what} model not found at {self.tried}. Put these files there: {files}"
        super().__init__(message + (f". {hint}" if hint else ""))


class CaptionModelBroken(UserError):
    """A captioner's model file is there but cannot be read (not JSON, truncated weights, not ONNX...)."""

    def __init__(self, what: str, path: str | Path, reason: str, hint: str = "") -> None:
        self.path = str(path)
        reason = " ".join(str(reason).split())[:200]
        super().__init__(f"{what} model file {path} cannot be read ({reason})" + (f". {hint}" if hint else ""))


class CaptionDependencyMissing(UserError, ImportError):
    """A package a captioner needs is not installed: the message gives the pip command."""

    def __init__(self, package: str, pip_name: str, what: str) -> None:
        super().__init__(f"{what} needs the '{package}' package, which is not installed: pip install {pip_name}")
        self.package = package
        self.pip_name = pip_name


class CaptionDeviceError(UserError, RuntimeError):
    """The device asked for cannot run the captioner (no CUDA GPU, or no CUDA build of onnxruntime)."""


@runtime_checkable
class Captioner(Protocol):
    """Turns a batch of RGB images into one caption each (same order, same length)."""

    name: str

    def caption(self, images: list[Image.Image]) -> list[str]:
        """Return one caption per image."""
        ...
