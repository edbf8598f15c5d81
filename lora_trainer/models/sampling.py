"""Preview images from a :class:`DiffusersBackbone` with diffusers' StableDiffusionPipeline (LoRA layers included).

The pipeline is assembled around the backbone's own modules (nothing is copied), with a DDIM scheduler on the
backbone's noise schedule and prediction type. Prompts are encoded by the backbone itself, so its clip skip and
any LoRA in the text encoder apply. Every prompt uses the same seed: an image depends only on (prompt, seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image


def make_scheduler(backbone: Any) -> Any:
    """A DDIM scheduler on the backbone's training schedule (betas, steps, prediction type)."""
    from diffusers import DDIMScheduler

    train = backbone.noise_scheduler.config
    return DDIMScheduler(
        num_train_timesteps=train.num_train_timesteps, beta_start=train.beta_start, beta_end=train.beta_end,
        beta_schedule=train.beta_schedule, prediction_type=backbone.prediction_type, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def make_pipeline(backbone: Any) -> Any:
    """A StableDiffusionPipeline sharing the backbone's unet, vae, text encoder and tokenizer."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        scheduler=make_scheduler(backbone), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode; restore every submodule's own train/eval flag afterwards."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, training in saved:
            module.training = training


def sample_images(backbone: Any, prompts: list[str], *, seed: int, steps: int, width: int, height: int,
                  guidance_scale: float = 7.0, negative_prompt: str = "") -> list[Image.Image]:
    """One PIL image per prompt, each rendered from ``seed``; deterministic for the same inputs."""
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise ValueError(f"sample size {width}x{height}: width and height must be positive multiples of 8")
    if steps < 1:
        raise ValueError(f"sample steps must be at least 1, got {steps}")
    pipe = make_pipeline(backbone)
    images = []
    with eval_mode(backbone.unet, backbone.vae, backbone.text_encoder), torch.no_grad():
        negative = backbone.encode_prompts([negative_prompt]) if guidance_scale > 1 else None
        for prompt in prompts:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            result = pipe(prompt_embeds=backbone.encode_prompts([prompt]), negative_prompt_embeds=negative,
                          height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generator, output_type="pil")
            images.append(result.images[0])
    return images
