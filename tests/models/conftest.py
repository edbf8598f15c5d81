"""Fixtures for the model tests: the tiny model written as a real single-file checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-sd15.safetensors``, ``.yaml`` and ``-clip/`` (seed 0: the same weights as tiny_components)."""
    import torch

    from lora_trainer.models.tiny import write_tiny_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread; two threads on a busy 2-core machine are ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
