"""Must show #2: an exported LoRA, loaded by a fresh diffusers pipeline, reproduces the in-memory model."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_trainer.lora.export import save_lora
from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.kohya import to_kohya_state_dict
from tests.lora.helpers import TE_TARGETS, UNET_TARGETS, randomize_lora


def test_diffusers_load_lora_weights_reproduces_trained_outputs(_tiny_components, tmp_path):
    from diffusers.utils import USE_PEFT_BACKEND

    if not USE_PEFT_BACKEND:
        pytest.skip("diffusers' load_lora_weights needs its PEFT backend (transformers >= 4.34); the WebUI's "
                    "own loader is what reads the file on its pinned stack")
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    base = _tiny_components
    unet, text_encoder = copy.deepcopy(base["unet"]), copy.deepcopy(base["text_encoder"])
    roots = {"lora_unet": unet, "lora_te": text_encoder}
    rank, alpha = 4, 2.0  # alpha != rank, so a wrong alpha convention would show
    randomize_lora(inject_lora(roots, rank=rank, alpha=alpha, dropout=0.0, unet_targets=UNET_TARGETS,
                               te_targets=TE_TARGETS))
    for module in roots.values():
        module.eval()

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([10, 700])
    cond = torch.randn(2, 77, 32, generator=gen)
    ids = base["tokenizer"](["a photo of a red circle", "blue square"], padding="max_length", max_length=77,
                            truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        unet_expected = unet(latents, timesteps, encoder_hidden_states=cond).sample
        text_expected = text_encoder(ids)[0]
        unet_base = base["unet"](latents, timesteps, encoder_hidden_states=cond).sample
        text_base = base["text_encoder"](ids)[0]
    # the LoRA must matter, or the comparison below would prove nothing
    assert (unet_expected - unet_base).abs().max() > 1e-2
    assert (text_expected - text_base).abs().max() > 1e-2

    path = save_lora(tmp_path / "parity.safetensors", to_kohya_state_dict(roots, alpha), {"ss_network_dim": "4"})

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(base["vae"]), text_encoder=copy.deepcopy(base["text_encoder"]),
        tokenizer=base["tokenizer"], unet=copy.deepcopy(base["unet"]),
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        unet_loaded = pipe.unet(latents, timesteps, encoder_hidden_states=cond).sample
        text_loaded = pipe.text_encoder(ids)[0]
    assert torch.allclose(unet_loaded, unet_expected, atol=1e-4, rtol=0), \
        (unet_loaded - unet_expected).abs().max()
    assert torch.allclose(text_loaded, text_expected, atol=1e-4, rtol=0), \
        (text_loaded - text_expected).abs().max()
