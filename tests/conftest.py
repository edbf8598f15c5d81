"""Shared fixtures: tiny random SD1.5- and SDXL-topology models and small image folders, built once per session."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

# Tiny models are dominated by per-op overhead: one thread is faster and immune to a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _tokenizer_cache(tmp_path_factory: pytest.TempPathFactory):
    """The tiny models' tokenizer as the cached CLIP tokenizer, so that a tiny checkpoint without a .yaml (whose
    tokenizer is looked up like a real model's) tokenizes as the tiny models do; nothing in ~/.cache is used."""
    import os

    from lora_trainer.models.tokenizer import write_demo_tokenizer_files

    cache = tmp_path_factory.mktemp("lora_trainer_cache")
    write_demo_tokenizer_files(cache / "clip_tokenizer")
    before = os.environ.get("LORA_TRAINER_CACHE")
    os.environ["LORA_TRAINER_CACHE"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("LORA_TRAINER_CACHE", None)
    else:
        os.environ["LORA_TRAINER_CACHE"] = before


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_trainer.models.tokenizer import write_demo_tokenizer_files

    return write_demo_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="session")
def _tiny_components(tokenizer_dir: Path) -> dict:
    from lora_trainer.models.tiny import build_tiny_components

    return build_tiny_components(seed=0, tokenizer_dir=str(tokenizer_dir))


@pytest.fixture
def tiny_components(_tiny_components: dict) -> dict:
    """Fresh deep copies of the tiny unet / vae / text_encoder (the tokenizer is shared)."""
    return {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in _tiny_components.items()}


@pytest.fixture
def tiny_backbone(tiny_components: dict):
    from lora_trainer.models.diffusers_backbone import DiffusersBackbone

    c = tiny_components
    return DiffusersBackbone(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])


@pytest.fixture
def make_tiny_backbone(_tiny_components: dict):
    """A factory of independent tiny backbones (each call deep-copies the same random weights)."""
    from lora_trainer.models.diffusers_backbone import DiffusersBackbone

    def make():
        c = {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in _tiny_components.items()}
        return DiffusersBackbone(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])

    return make


@pytest.fixture(scope="session")
def _tiny_sdxl_components(tokenizer_dir: Path) -> dict:
    from lora_trainer.models.tiny_sdxl import build_tiny_sdxl_components

    return build_tiny_sdxl_components(seed=0, tokenizer_dir=str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-sdxl.safetensors`` (sgm layout), ``.yaml`` and ``-clip/`` (seed 0: _tiny_sdxl_components' weights)."""
    from lora_trainer.models.tiny_sdxl import write_tiny_sdxl_checkpoint

    return write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("tiny_sdxl_checkpoint"))


@pytest.fixture
def make_tiny_sdxl_backbone(_tiny_sdxl_components: dict):
    """A factory of independent tiny SDXL backbones (each call deep-copies the same random weights)."""
    from lora_trainer.models.tiny_sdxl import tiny_sdxl_backbone

    def make(**schedule):
        c = {k: (v if k.startswith("tokenizer") else copy.deepcopy(v)) for k, v in _tiny_sdxl_components.items()}
        return tiny_sdxl_backbone(c, **schedule)

    return make


@pytest.fixture
def shapes_dataset(tmp_path: Path) -> Path:
    """Eight 64 px coloured-shape images captioned in metadata.csv (the demo's data set)."""
    from lora_trainer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path / "shapes", count=8, size=64)
