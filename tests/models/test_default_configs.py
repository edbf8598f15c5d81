"""Without a .yaml, real SD1.5 / SD2 weight shapes must give the real architectures (checked on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.models.ldm_checkpoint import unet_to_ldm, vae_to_ldm
from lora_trainer.models.ldm_config import default_original_config, diffusers_unet_config, diffusers_vae_config

SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
SD15_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "attention_head_dim": 8,
             "cross_attention_dim": 768, "use_linear_projection": False, "sample_size": 64}
SD2_UNET = {**SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": True}


def _ldm_shapes(unet_config: dict) -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SD_VAE)
    return {**unet_to_ldm(unet), **vae_to_ldm(vae)}


@pytest.mark.parametrize(("version", "unet_config"), [("sd_v1", SD15_UNET), ("sd_v2", SD2_UNET)])
def test_real_sizes_give_the_real_architecture(version: str, unet_config: dict) -> None:
    config = default_original_config(_ldm_shapes(unet_config), version)
    unet = diffusers_unet_config(config, version, "epsilon", Path("model.safetensors"))
    for key, value in unet_config.items():
        got = unet[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == (
            list(value) if isinstance(value, (list, tuple)) else value), key
    assert list(unet["down_block_types"]) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet["up_block_types"]) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet["in_channels"], unet["out_channels"]) == (4, 4)
    vae = diffusers_vae_config(config)
    assert list(vae["block_out_channels"]) == [128, 256, 512, 512]
    assert (vae["layers_per_block"], vae["latent_channels"], vae["scaling_factor"]) == (2, 4, 0.18215)
    assert config["model"]["params"]["cond_stage_config"]["target"].endswith(
        "FrozenOpenCLIPEmbedder" if version == "sd_v2" else "FrozenCLIPEmbedder")


SDXL_UNET = {"block_out_channels": (320, 640, 1280), "layers_per_block": 2, "attention_head_dim": (5, 10, 20),
             "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128}


def test_real_sdxl_sizes_give_the_real_architecture() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_trainer.models.ldm_config import infer_vae_params, sdxl_unet_diffusers_config
    from lora_trainer.models.sdxl_loading import sdxl_original_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SD_VAE)
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae),
             "conditioner.embedders.1.model.text_projection": torch.empty(1280, 1280, device="meta")}
    config, size_dim, clip_folder = sdxl_original_config(Path("/nowhere/sdxl.safetensors"), state)
    assert (size_dim, clip_folder) == (256, None)
    assert infer_vae_params(state)["ch_mult"] == [1, 2, 4, 4]
    got = sdxl_unet_diffusers_config(config, size_dim, Path("sdxl.safetensors"))
    for key, value in SDXL_UNET.items():
        wanted = list(value) if isinstance(value, tuple) else value
        have = list(got[key]) if isinstance(got[key], (list, tuple)) else got[key]
        if key == "transformer_layers_per_block":  # the first level has no attention: its depth is unused
            have, wanted = have[1:], wanted[1:]
        assert have == wanted, key
    assert got["class_embed_type"] is None
