"""Random models of real architectures for the benchmarks: SD1.5 and SDXL (full and mid size), from configs.

Weights are random: speed and memory are those of the architecture, quality is not measured. ``mid`` is SD1.5's
topology at half the UNet width (model_channels 160: a quarter of the UNet's parameters) with the real CLIP ViT-L
text encoder and VAE, small enough for a CPU benchmark; ``full`` is SD1.5 exactly (UNet 860M, VAE 84M, TE 123M).
SDXL ``mid``: the UNet at half width (160: 728M parameters, 2.7 GiB in fp32), the real CLIP ViT-L and VAE, and
OpenCLIP bigG at its real width with 8 of its 32 layers (222M); together 4.3 GiB in fp32, SDXL's proportions
(the UNet about 60%). The text encoders' widths stay real: the UNet's context is both side by side (2048) and
kohya's SDXL UNet has that width written into its blocks. ``full`` is SDXL base exactly (UNet 2.6B, bigG 695M).
"""

from __future__ import annotations

from typing import Any

#: UNet widths (block_out_channels[0]) of the SD1.5-topology sizes.
SD15_WIDTHS = {"full": 320, "mid": 160}
#: (UNet width, OpenCLIP bigG layers) of the SDXL-topology sizes.
SDXL_SIZES = {"full": (320, 32), "mid": (160, 8)}
SDXL_VAE_SCALE = 0.13025


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


def open_clip_bigg_config(layers: int = 32) -> dict[str, Any]:
    """SDXL's second text encoder (OpenCLIP ViT-bigG/14's text tower) with ``layers`` of its 32 layers."""
    return {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": layers, "num_attention_heads": 20,
            "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280, "pad_token_id": 0}


def sdxl_unet_config(size: str = "full") -> dict[str, Any]:
    """SDXL base's UNet (2.6B parameters at ``full``): three levels, transformer depths 0/2/10, text_time
    embedding, 64-wide attention heads (diffusers calls their count ``attention_head_dim``)."""
    width = SDXL_SIZES[size][0]
    return {
        "sample_size": 128, "cross_attention_dim": 2048, "block_out_channels": (width, width * 2, width * 4),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": tuple(max(1, width * mult // 64) for mult in (1, 2, 4)),
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


def build_sdxl(size: str = "mid", seed: int = 0) -> dict[str, Any]:
    """SDXL's UNet and OpenCLIP bigG (at ``size``), VAE and CLIP ViT-L from their configs, random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sdxl_unet_config(size))
    vae = AutoencoderKL(**sd15_vae_config(), scaling_factor=SDXL_VAE_SCALE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_l_config()))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**open_clip_bigg_config(SDXL_SIZES[size][1])))
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
