"""Tiny random Stable Diffusion 1.5-topology models, built from configs (demo, tests, benchmarks).

Same block layout as SD1.5 (4-level UNet with cross-attention in the first three levels, 4-level VAE,
CLIP text transformer with a 49,408-token vocabulary of CLIP's size and special-token ids, generated offline
by :func:`~lora_trainer.models.tokenizer.write_demo_tokenizer_files`), tiny widths. Channel counts stay
multiples of 32 because the LDM code the WebUI runs uses 32-group GroupNorm everywhere. ``width`` multiplies the
UNet's and the text encoder's widths (memory measurements want a model of a measurable size).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

TINY_CONTEXT_DIM = 32


def tiny_unet_config(width: int = 1) -> dict[str, Any]:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": tuple(width * c for c in (32, 64, 64, 64)),
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": width * TINY_CONTEXT_DIM,
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


def tiny_clip_config(width: int = 1) -> dict[str, Any]:
    from lora_trainer.models.text_encoders import attention_heads

    return {
        "vocab_size": 49408,
        "hidden_size": width * TINY_CONTEXT_DIM,
        "intermediate_size": width * 64,
        "num_hidden_layers": 2,
        "num_attention_heads": attention_heads(width * TINY_CONTEXT_DIM),
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": width * TINY_CONTEXT_DIM,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def build_tiny_components(seed: int = 0, tokenizer_dir: str | None = None, width: int = 1) -> dict[str, Any]:
    """Random tiny ``unet``, ``vae``, ``text_encoder`` and the demo ``tokenizer`` (its files in ``tokenizer_dir``,
    written there if absent; a temporary folder when None), deterministic in seed."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizer import load_demo_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(width))
    vae = AutoencoderKL(**tiny_vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_config(width)))
    randomise_final_norm(text_encoder, seed)
    for module in (unet, vae, text_encoder):
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": load_demo_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny_clip_"))}


def randomise_final_norm(text_encoder: torch.nn.Module, seed: int) -> None:
    """Give the final LayerNorm a non-trivial scale and a positive shift, as trained encoders have.

    With the default (weight 1, bias 0) every output token averages exactly 0, and the WebUI's emphasis
    normalisation (which rescales by the ratio of output means) divides by ~0.
    """
    modules = dict(text_encoder.named_modules())
    final = modules.get("text_model.final_layer_norm", modules.get("final_layer_norm"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        final.weight.copy_(1.0 + 0.1 * torch.randn(final.weight.shape, generator=generator))
        final.bias.copy_(0.2 + 0.1 * torch.randn(final.bias.shape, generator=generator))


def tiny_ldm_config(clip_dir: str | Path, width: int = 1) -> dict[str, Any]:
    """The tiny models' ``v1-inference.yaml`` equivalent; the text encoder is built from ``clip_dir``."""
    from lora_trainer.models.ldm_config import V1_INFERENCE

    unet, vae = tiny_unet_config(width), tiny_vae_config()
    config = copy.deepcopy(V1_INFERENCE)
    params = config["model"]["params"]
    params["image_size"] = unet["sample_size"]
    params["scale_factor"] = vae["scaling_factor"]
    params["unet_config"]["params"].update(
        model_channels=unet["block_out_channels"][0],
        channel_mult=[c // unet["block_out_channels"][0] for c in unet["block_out_channels"]],
        num_res_blocks=unet["layers_per_block"], attention_resolutions=[4, 2, 1],
        num_heads=unet["attention_head_dim"], context_dim=unet["cross_attention_dim"],
        use_linear_in_transformer=unet["use_linear_projection"])
    params["first_stage_config"]["params"]["ddconfig"].update(
        ch=vae["block_out_channels"][0], ch_mult=[c // vae["block_out_channels"][0] for c in vae["block_out_channels"]],
        num_res_blocks=vae["layers_per_block"], z_channels=vae["latent_channels"])
    params["cond_stage_config"]["params"] = {"version": str(Path(clip_dir).resolve())}
    return config


def write_clip_folder(clip_dir: Path, text_encoder: torch.nn.Module) -> None:
    """``config.json`` and ``model.safetensors`` (``text_model.*`` names, read by old and new transformers)
    of a CLIP text encoder beside the tokenizer files in ``clip_dir``: what the WebUI's ``FrozenCLIPEmbedder``
    builds from, offline."""
    from safetensors.torch import save_file

    from lora_trainer.fsutil import atomic_write, atomic_write_text
    from lora_trainer.models.ldm_checkpoint import CLIP_PREFIX, text_encoder_to_ldm

    atomic_write_text(clip_dir / "config.json", text_encoder.config.to_json_string())
    te_weights = {k.removeprefix(CLIP_PREFIX): v.contiguous() for k, v in text_encoder_to_ldm(text_encoder).items()}
    atomic_write(clip_dir / "model.safetensors", lambda tmp: save_file(te_weights, str(tmp), {"format": "pt"}))


def as_dtype(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The floating-point tensors of ``state`` in ``dtype`` (real checkpoints are mostly float16)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def new_clip_folder(folder: Path, name: str) -> Path:
    """``<folder>/<name>-clip/`` with the tiny models' tokenizer files (the folder is created as needed)."""
    from lora_trainer.models.tokenizer import write_demo_tokenizer_files

    return write_demo_tokenizer_files(Path(folder) / f"{name}-clip")


def write_model_files(folder: Path, name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """``<name>.safetensors`` (the single-file checkpoint) and ``<name>.yaml`` (its config), written atomically."""
    import yaml
    from safetensors.torch import save_file

    from lora_trainer.fsutil import atomic_write, atomic_write_text

    checkpoint = Path(folder) / f"{name}.safetensors"
    atomic_write(checkpoint, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    atomic_write_text(checkpoint.with_suffix(".yaml"), yaml.safe_dump(config, sort_keys=False))
    return checkpoint


def write_tiny_checkpoint(folder: str | Path, name: str = "tiny-sd15", seed: int = 0, width: int = 1,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write ``<name>.safetensors`` (LDM single-file layout), ``<name>.yaml`` and ``<name>-clip/``.

    The folder ``<name>-clip`` holds the CLIP tokenizer files, ``config.json`` and the text encoder's weights
    (see :func:`write_clip_folder`), so the WebUI's ``FrozenCLIPEmbedder`` builds from it offline. ``width``:
    see :func:`tiny_unet_config`; ``dtype``: of the checkpoint's floating-point weights. Returns its path.
    """
    from lora_trainer.models.ldm_checkpoint import diffusers_to_ldm_state_dict

    clip_dir = new_clip_folder(folder, name)
    parts = build_tiny_components(seed, tokenizer_dir=str(clip_dir), width=width)
    write_clip_folder(clip_dir, parts["text_encoder"])
    state = diffusers_to_ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"])
    return write_model_files(folder, name, as_dtype(state, dtype), tiny_ldm_config(clip_dir, width))
