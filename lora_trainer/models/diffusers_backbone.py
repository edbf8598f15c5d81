"""Backbone over diffusers components (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_trainer.models.backbone import Backbone


class DiffusersBackbone(Backbone):
    """An SD1.x / SD2.x model held as diffusers modules; the CLI's and the tests' backbone."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: Any, *,
                 prediction_type: str = "epsilon", model_version: str = "sd_v1",
                 beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                 clip_skip: int = 1) -> None:
        from diffusers import DDPMScheduler

        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.prediction_type = prediction_type
        self.model_version = model_version
        self.clip_skip = clip_skip
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.float().cpu()
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusersBackbone:
        """Move every module; ``dtype`` applies to the frozen base weights."""
        self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(self.device, dtype=self.dtype)
        return self

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample()
        return latents * self.vae.config.scaling_factor

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.device)
        if self.clip_skip > 1:
            out = self.text_encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[-self.clip_skip]
            modules = dict(self.text_encoder.named_modules())  # transformers >= 5.6 drops the text_model level
            norm = modules.get("text_model.final_layer_norm") or modules["final_layer_norm"]
            return norm(hidden)
        return self.text_encoder(ids)[0]

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=conditioning).sample

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        roots: dict[str, nn.Module] = {"lora_unet": self.unet}
        if train_text_encoder:
            roots["lora_te"] = self.text_encoder
        return roots

    def frozen_modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        te = self.text_encoder
        if enabled:
            self.unet.enable_gradient_checkpointing()
            getattr(te, "activation_checkpointing_enable", te.gradient_checkpointing_enable)()
        else:
            self.unet.disable_gradient_checkpointing()
            getattr(te, "activation_checkpointing_disable", te.gradient_checkpointing_disable)()

    def sample(self, prompts: list[str], *, seed: int, steps: int, width: int, height: int) -> list[Any]:
        from lora_trainer.models.sampling import sample_images

        return sample_images(self, prompts, seed=seed, steps=steps, width=width, height=height)
