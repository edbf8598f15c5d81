"""Training the WebUI's own model class in place: Stability's ``ldm`` LatentDiffusion on a tiny config.

The ``ldm`` package comes from ``stable-diffusion-sdkit`` (installed with ``--no-deps``). Its training-only
imports (pytorch_lightning, torchvision's image grid) are stubbed when absent: the WebUI has the real ones,
and nothing under test uses them.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict
from lora_trainer.lora.inject import inject_lora, load_lora_state_dict, remove_lora
from lora_trainer.lora.kohya import from_kohya_state_dict
from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict
from lora_trainer.models.state import model_weights_hash, snapshot_model_state
from lora_trainer.models.webui import UnsupportedModel, WebUIBackbone, model_version
from lora_trainer.train.trainer import TE_TARGETS, Trainer


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


def make_config(data, out, **overrides):
    settings = {"train_data_dir": str(data), "base_model": "webui", "output_dir": str(out), "resolution": 64,
                "batch_size": 2, "max_steps": 2, "lora_rank": 4, "lora_alpha": 2, "learning_rate": 1e-2,
                "device": "cpu", "seed": 3}
    settings.update(overrides)
    return config_from_dict(settings)


def test_detects_sd1_and_reads_schedule(ldm_model):
    backbone = WebUIBackbone(ldm_model)
    assert model_version(ldm_model) == "sd_v1" and backbone.prediction_type == "epsilon"
    assert torch.allclose(backbone.alphas_cumprod, ldm_model.alphas_cumprod.float())
    latents = backbone.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.shape == (1, 4, 8, 8)
    cond = backbone.encode_prompts(["a photo"])
    assert backbone.predict(latents, torch.tensor([10]), cond).shape == latents.shape


def test_training_leaves_the_live_model_exactly_as_it_was(ldm_model, shapes_dataset, tmp_path):
    before_hash = model_weights_hash(ldm_model)
    before = snapshot_model_state(ldm_model)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True,
                                 gradient_checkpointing=True), WebUIBackbone(ldm_model)).run()
    assert result.lora_path is not None and result.steps_done == 2
    assert model_weights_hash(ldm_model) == before_hash
    after = snapshot_model_state(ldm_model)
    assert after.module_types == before.module_types
    assert after.requires_grad == before.requires_grad and after.training == before.training
    assert after.checkpoint_flags == before.checkpoint_flags
    keys = load_file(str(result.lora_path))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys


def test_exported_file_reproduces_the_trained_model(ldm_model, shapes_dataset, tmp_path):
    fresh = copy.deepcopy(ldm_model)
    trained = WebUIBackbone(ldm_model)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True), trained,
                     restore_backbone=False).run()
    reloaded = WebUIBackbone(fresh)
    roots = reloaded.lora_roots(True)
    inject_lora(roots, rank=4, alpha=4, dropout=0.0, unet_targets=["to_q", "to_k", "to_v", "to_out.0"],
                te_targets=TE_TARGETS)
    load_lora_state_dict(roots, from_kohya_state_dict(load_file(str(result.lora_path)), roots))
    for module in (*roots.values(), *trained.lora_roots(True).values()):
        module.eval()
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 700])
    with torch.no_grad():
        cond_trained = trained.encode_prompts(["a red circle", "sks"])
        cond_reloaded = reloaded.encode_prompts(["a red circle", "sks"])
        torch.testing.assert_close(cond_reloaded, cond_trained, atol=1e-4, rtol=0)
        torch.testing.assert_close(reloaded.predict(x, t, cond_reloaded), trained.predict(x, t, cond_trained),
                                   atol=1e-4, rtol=0)
        remove_lora(roots)
        base = reloaded.predict(x, t, reloaded.encode_prompts(["a red circle", "sks"]))
        assert (base - trained.predict(x, t, cond_trained)).abs().max() > 1e-3  # the LoRA changed the output


def test_sd2_text_encoder_training_is_refused_clearly(ldm_model):
    ldm_model.is_sd2 = True
    with pytest.raises(UnsupportedModel, match="train_text_encoder"):
        WebUIBackbone(ldm_model).lora_roots(True)


def test_preview_sampler_is_deterministic(ldm_model):
    backbone = WebUIBackbone(ldm_model)
    first = backbone.sample(["a red circle"], seed=5, steps=3, width=64, height=64)
    second = backbone.sample(["a red circle"], seed=5, steps=3, width=64, height=64)
    assert first[0].size == (64, 64) and first[0].tobytes() == second[0].tobytes()
