"""SDXL as diffusers modules: two text encoders, pooled text and size conditioning.

The context is the penultimate hidden states of CLIP ViT-L (``text_encoder``) and of OpenCLIP bigG
(``text_encoder_2``, a ``CLIPTextModelWithProjection``) side by side; the pooled, projected output of the
second one and six size ids (original height/width, crop top/left, target height/width) enter through the
UNet's added embedding. Prompt conditioning travels as one tensor per prompt (context and pooled text packed
by :func:`~lora_trainer.models.webui.pack_sdxl_conditioning`), so the trainer caches and batches it like an
SD1 embedding; :meth:`SDXLBackbone.add_size_conditioning` adds each training image's sizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_trainer.data.images import center_crop_offset
from lora_trainer.models.diffusers_backbone import DiffusersBackbone
from lora_trainer.models.webui import pack_sdxl_conditioning, unpack_sdxl_conditioning


def size_ids(item: Any) -> list[int]:
    """SDXL's six size ids of a training item: original (h, w), crop (top, left), target (h, w)."""
    width, height = item.target
    top, left = center_crop_offset(item.width, item.height, width, height)
    return [item.height, item.width, top, left, height, width]


def vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """SDXL's VAE overflows in float16: it stays float32 then (bfloat16 is fine)."""
    return torch.float32 if dtype == torch.float16 else dtype


class SDXLBackbone(DiffusersBackbone):
    """SDXL (base and fine-tunes) as diffusers modules; LoRA roots ``lora_unet``, ``lora_te1``, ``lora_te2``."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module,
                 tokenizer: Any, tokenizer_2: Any, **schedule: Any) -> None:
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        super().__init__(unet, vae, text_encoder, tokenizer, model_version="sdxl", **schedule)
        self.context_dim = int(unet.config.cross_attention_dim)
        self.pooled_dim = int(text_encoder_2.config.projection_dim)

    def modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, self.text_encoder, self.text_encoder_2]

    def text_encoders(self) -> list[nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDXLBackbone:
        super().to(device, dtype)
        self.vae.to(dtype=vae_dtype(self.dtype))
        return self

    @staticmethod
    def _ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 77 * context + pooled]``: both encoders' penultimate layers and bigG's projected pooled output."""
        self.ensure_loaded(self._encoder_names(False, True))
        first = self.text_encoder(self._ids(self.tokenizer, prompts).to(self.device), output_hidden_states=True)
        second = self.text_encoder_2(self._ids(self.tokenizer_2, prompts).to(self.device), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return pack_sdxl_conditioning(context, second.text_embeds)

    def _unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = unpack_sdxl_conditioning(packed, self.context_dim, self.pooled_dim)
        return parts["crossattn"], parts["vector"]

    def add_size_conditioning(self, conditioning: Any, items: list[Any]) -> dict[str, torch.Tensor]:
        context, pooled = self._unpack(conditioning)
        time_ids = torch.tensor([size_ids(item) for item in items], dtype=torch.float32, device=context.device)
        return {"context": context, "pooled": pooled, "time_ids": time_ids}

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Any) -> torch.Tensor:
        """Without size ids (a bare :meth:`encode_prompts` tensor) the latents' own size is used, uncropped."""
        self.ensure_loaded(["unet"])
        if not isinstance(conditioning, dict):
            context, pooled = self._unpack(conditioning)
            height, width = (8 * s for s in noisy_latents.shape[-2:])
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * noisy_latents.shape[0],
                                    dtype=torch.float32, device=context.device)
            conditioning = {"context": context, "pooled": pooled, "time_ids": time_ids}
        dtype = self.dtype
        added = {"text_embeds": conditioning["pooled"].to(self.device, dtype),
                 "time_ids": conditioning["time_ids"].to(self.device, dtype)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=conditioning["context"].to(self.device, dtype),
                         added_cond_kwargs=added).sample

    def lora_roots(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        roots: dict[str, nn.Module] = {"lora_unet": self.unet}
        if train_text_encoder:
            roots.update(lora_te1=self.text_encoder, lora_te2=self.text_encoder_2)
        return roots

    def prompt_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        context, pooled = self._unpack(self.encode_prompts(prompts))
        return {"prompt_embeds": context, "pooled_prompt_embeds": pooled}
