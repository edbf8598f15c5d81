"""Fixtures for the model tests: the tiny model written as a real single-file checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-sd15.safetensors``, ``.yaml`` and ``-clip/`` (seed 0: the same weights as tiny_components)."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))
