"""Preview images from a :class:`DiffusersBackbone` with diffusers' StableDiffusion(XL)Pipeline, LoRA included.

The pipeline is assembled around the backbone's own modules (nothing is copied), with a DDIM scheduler on the
backbone's noise schedule and prediction type. Prompts are encoded by the backbone itself, so its clip skip and
any LoRA in the text encoders apply. Every prompt uses the same seed: an image depends only on (prompt, seed).
SDXL latents are decoded here, in the VAE's own dtype (it stays float32 when the rest is float16).
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
    zero_snr = bool(train.get("rescale_betas_zero_snr", False))
    # with zero terminal SNR, v-prediction starts from pure noise (t = 999); epsilon cannot predict there
    trailing = zero_snr and backbone.prediction_type == "v_prediction"
    return DDIMScheduler(
        num_train_timesteps=train.num_train_timesteps, beta_start=train.beta_start, beta_end=train.beta_end,
        beta_schedule=train.beta_schedule, prediction_type=backbone.prediction_type, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="trailing" if trailing else "leading", rescale_betas_zero_snr=zero_snr)


def make_pipeline(backbone: Any) -> Any:
    """A StableDiffusion(XL)Pipeline sharing the backbone's unet, vae, text encoders and tokenizers."""
    if backbone.model_version == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=backbone.vae, text_encoder=backbone.text_encoder, text_encoder_2=backbone.text_encoder_2,
            tokenizer=backbone.tokenizer, tokenizer_2=backbone.tokenizer_2, unet=backbone.unet,
            scheduler=make_scheduler(backbone), force_zeros_for_empty_prompt=False, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
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
    sdxl = backbone.model_version == "sdxl"
    images = []
    with eval_mode(*backbone.modules()), torch.no_grad():
        negative = {}
        if guidance_scale > 1:
            negative = {f"negative_{k}": v for k, v in backbone.prompt_embeds([negative_prompt]).items()}
        for prompt in prompts:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            result = pipe(**backbone.prompt_embeds([prompt]), **negative, height=height, width=width,
                          num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                          output_type="latent" if sdxl else "pil")
            images.append(_decode(pipe, backbone, result.images) if sdxl else result.images[0])
    return images


def _decode(pipe: Any, backbone: Any, latents: torch.Tensor) -> Image.Image:
    """Latents -> one PIL image, through the VAE in its own dtype."""
    vae = backbone.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]
