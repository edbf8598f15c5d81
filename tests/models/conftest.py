"""Fixtures for the model tests: the tiny model as a real single-file checkpoint, and as the WebUI's LDM model."""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch

from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny-sd15.safetensors``, ``.yaml`` and ``-clip/`` (seed 0: the same weights as tiny_components)."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


def _stub_training_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import pytorch_lightning  # noqa: F401
    except ImportError:
        pl = types.ModuleType("pytorch_lightning")
        pl.LightningModule = torch.nn.Module
        rank_zero = types.ModuleType("pytorch_lightning.utilities.distributed")
        rank_zero.rank_zero_only = lambda fn: fn
        utilities = types.ModuleType("pytorch_lightning.utilities")
        utilities.distributed = rank_zero
        pl.utilities = utilities
        for name, module in (("pytorch_lightning", pl), ("pytorch_lightning.utilities", utilities),
                             ("pytorch_lightning.utilities.distributed", rank_zero)):
            monkeypatch.setitem(sys.modules, name, module)
    try:
        import torchvision.utils  # noqa: F401
    except (ImportError, RuntimeError):
        tv = types.ModuleType("torchvision")
        tv_utils = types.ModuleType("torchvision.utils")
        tv_utils.make_grid = lambda *a, **k: None
        tv.utils = tv_utils
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.utils", tv_utils)


class TinyCLIPEmbedder(torch.nn.Module):
    """The shape of ldm's FrozenCLIPEmbedder: ``.transformer`` (a CLIPTextModel) and ``encode(texts)``."""

    def __init__(self, text_encoder: torch.nn.Module, tokenizer) -> None:
        super().__init__()
        self.transformer, self.tokenizer = text_encoder, tokenizer

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return self.transformer(ids.input_ids.to(next(self.parameters()).device))[0]

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self(texts)


@pytest.fixture
def ldm_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytorch_lightning / torchvision stand-ins where absent (ldm and sgm import them; nothing here uses them)."""
    _stub_training_imports(monkeypatch)


@pytest.fixture
def ldm_model(monkeypatch, _tiny_components):
    """A tiny SD1-layout LatentDiffusion in eval mode, frozen the way the WebUI leaves it (UNet trainable)."""
    _stub_training_imports(monkeypatch)
    ddpm = pytest.importorskip("ldm.models.diffusion.ddpm", reason="needs stable-diffusion-sdkit (ldm)")
    from lora_trainer.models.tiny import tiny_ldm_config

    params = copy.deepcopy(tiny_ldm_config("/unused")["model"]["params"])
    params["unet_config"]["params"]["use_checkpoint"] = False  # what the WebUI's repair_config does
    params["cond_stage_config"] = "__is_unconditional__"
    params.pop("use_ema", None)
    torch.manual_seed(0)
    model = ddpm.LatentDiffusion(**params, use_ema=False)
    model.cond_stage_model = TinyCLIPEmbedder(copy.deepcopy(_tiny_components["text_encoder"]),
                                              _tiny_components["tokenizer"])
    model.cond_stage_model.requires_grad_(False)
    model.model.conditioning_key = "crossattn"  # "__is_unconditional__" cleared it; the text stage is set above
    # ldm zero-initialises output layers: load the tiny random weights (in the LDM layout) so outputs are real
    c = _tiny_components
    state = diffusers_to_ldm_state_dict(c["unet"], c["vae"], c["text_encoder"])
    parts = {k: v for k, v in state.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}
    missing, unexpected = model.load_state_dict(parts, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith(("model.", "first_stage_model."))]
    return model.eval()
