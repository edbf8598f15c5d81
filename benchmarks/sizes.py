"""Random models of real architectures for the benchmarks: SD1.5 (full and mid size) and SDXL, from configs.

Weights are random: speed and memory are those of the architecture, quality is not measured. ``mid`` is SD1.5's
topology at half the UNet width (model_channels 160: a quarter of the UNet's parameters) with the real CLIP ViT-L
text encoder and VAE, small enough for a CPU benchmark; ``full`` is SD1.5 exactly (UNet 860M, VAE 84M, TE 123M).
"""

from __future__ import annotations

from typing import Any

#: UNet widths (block_out_channels[0]) of the SD1.5-topology sizes.
SD15_WIDTHS = {"full": 320, "mid": 160}


def sd15_unet_config(size: str = "full") -> dict[str, Any]:
    """diffusers UNet2DConditionModel kwargs of SD1.5 at ``size`` (full / mid)."""
    width = SD15_WIDTHS[size]
    return {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
            "block_out_channels": (width, width * 2, width * 4, width * 4)}


def sd15_vae_config() -> dict[str, Any]:
    return {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


def clip_l_config() -> dict[str, Any]:
    return {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768}


def sdxl_unet_config() -> dict[str, Any]:
    """SDXL base's UNet (2.6B parameters): three levels, transformer depths 0/2/10, text_time embedding."""
    return {
        "sample_size": 128, "cross_attention_dim": 2048, "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "layers_per_block": 2,
    }


def build_sd15(size: str = "full", seed: int = 0) -> dict[str, Any]:
    """SD1.5's UNet (at ``size``), VAE and CLIP-L text encoder from their configs, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd15_unet_config(size))
    vae = AutoencoderKL(**sd15_vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_l_config()))
    for module in (unet, vae, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": load_clip_tokenizer()}
