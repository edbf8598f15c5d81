"""Tiny random Stable Diffusion 1.5-topology models, built from configs (demo, tests, benchmarks).

Same block layout as SD1.5 (4-level UNet with cross-attention in the first three levels, 4-level VAE,
CLIP text transformer with the real 49,408-token vocabulary), tiny widths. Channel counts stay multiples
of 32 because the LDM code the WebUI runs uses 32-group GroupNorm everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_CONTEXT_DIM = 32


def tiny_unet_config() -> dict[str, Any]:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": TINY_CONTEXT_DIM,
        "norm_num_groups": 32,
        "use_linear_projection": False,
    }


def tiny_vae_config() -> dict[str, Any]:
    return {
        "sample_size": 128,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 32, 32, 32),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
    }


def tiny_clip_config() -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": TINY_CONTEXT_DIM,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": TINY_CONTEXT_DIM,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def build_tiny_components(seed: int = 0, tokenizer_dir: str | None = None) -> dict[str, Any]:
    """Random tiny ``unet``, ``vae``, ``text_encoder`` and the real CLIP ``tokenizer``, deterministic in seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_config()))
    for module in (unet, vae, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": load_clip_tokenizer(tokenizer_dir)}
