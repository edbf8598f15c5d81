"""Tiny random SDXL-topology models, built from configs (tests, benchmarks), and their single-file checkpoint.

Same block layout as SDXL base: a 3-level UNet (no attention at the first level, deeper transformers further
down, linear projections), the ``text_time`` added embedding of pooled text and six size ids, a 4-level VAE,
CLIP ViT-L-style and OpenCLIP-bigG-style text encoders (the second with a text projection) on the demo
49,408-token vocabulary (:func:`~lora_trainer.models.tokenizer.write_demo_tokenizer_files`); tiny widths. The
checkpoint is written in the original sgm layout (``conditioner.embedders.0.transformer.*``,
``conditioner.embedders.1.model.*``) with an sgm ``.yaml``.
``width`` multiplies the UNet's and the text encoders' widths, as in :mod:`lora_trainer.models.tiny`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_trainer.models.tiny import randomise_final_norm, tiny_clip_config, tiny_vae_config

TE_WIDTH = 32  # both text encoders; the UNet's context is both side by side
SIZE_EMBED = 8  # width of each size id's embedding (256 in SDXL)
SDXL_SCALE_FACTOR = 0.13025


def tiny_sdxl_unet_config(width: int = 1) -> dict[str, Any]:
    base = 32 * width
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (base, 2 * base, 2 * base),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 1, 2),
        # heads per level: 64 wide as in SDXL, narrower only in models thinner than one head
        "attention_head_dim": tuple(base // min(64, base) * mult for mult in (1, 2, 2)),
        "cross_attention_dim": 2 * width * TE_WIDTH,
        "use_linear_projection": True,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SIZE_EMBED,
        "projection_class_embeddings_input_dim": width * TE_WIDTH + 6 * SIZE_EMBED,
    }


def tiny_open_clip_config(width: int = 1) -> dict[str, Any]:
    """The second text encoder: OpenCLIP bigG's shape (gelu, a text projection, pads with token 0, an MLP 4x
    as wide as the model: OpenCLIP text towers always build that, whatever their config says)."""
    config = tiny_clip_config(width)
    return {**config, "num_hidden_layers": 3, "hidden_act": "gelu", "pad_token_id": 0,
            "intermediate_size": 4 * config["hidden_size"]}


def build_tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | None = None, width: int = 1) -> dict[str, Any]:
    """Random tiny ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` and both tokenizers (the demo vocabulary,
    its files in ``tokenizer_dir``, written there if absent; a temporary folder when None), deterministic in seed."""
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.models.tokenizer import load_demo_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(width))
    vae = AutoencoderKL(**{**tiny_vae_config(), "scaling_factor": SDXL_SCALE_FACTOR})
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_clip_config(width)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_open_clip_config(width)))
    randomise_final_norm(text_encoder, seed)
    randomise_final_norm(text_encoder_2, seed + 1)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    folder = tokenizer_dir or tempfile.mkdtemp(prefix="tiny_clip_")
    tokenizer_2 = load_demo_tokenizer(folder)
    tokenizer_2.pad_token = "!"  # OpenCLIP pads with token 0
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": load_demo_tokenizer(folder), "tokenizer_2": tokenizer_2}


def tiny_sdxl_backbone(components: dict[str, Any], **schedule: Any) -> Any:
    """An :class:`SDXLBackbone` over (not copying) ``components``."""
    from lora_trainer.models.sdxl_backbone import SDXLBackbone

    c = components
    return SDXLBackbone(c["unet"], c["vae"], c["text_encoder"], c["text_encoder_2"], c["tokenizer"],
                        c["tokenizer_2"], **schedule)


def tiny_sdxl_config(clip_dir: str | Path | None = None, *, v_prediction: bool = False,
                     width: int = 1) -> dict[str, Any]:
    """The tiny model's sgm config (the structure of ``sd_xl_base.yaml``)."""
    from lora_trainer.models.ldm_config import FIRST_STAGE, sdxl_config

    unet, vae = tiny_sdxl_unet_config(width), tiny_vae_config()
    base = unet["block_out_channels"][0]
    network = {
        "adm_in_channels": unet["projection_class_embeddings_input_dim"], "num_classes": "sequential",
        "use_checkpoint": False, "in_channels": 4, "out_channels": 4, "model_channels": base,
        "attention_resolutions": [2 ** level for level, kind in enumerate(unet["down_block_types"])
                                  if kind.startswith("CrossAttn")],
        "num_res_blocks": unet["layers_per_block"], "channel_mult": [c // base for c in unet["block_out_channels"]],
        "num_head_channels": min(64, base), "use_spatial_transformer": True, "use_linear_in_transformer": True,
        "transformer_depth": list(unet["transformer_layers_per_block"]), "context_dim": unet["cross_attention_dim"],
        "spatial_transformer_attn_type": "softmax", "legacy": False}
    ddconfig = {**FIRST_STAGE["params"]["ddconfig"], "ch": vae["block_out_channels"][0],
                "ch_mult": [c // vae["block_out_channels"][0] for c in vae["block_out_channels"]],
                "num_res_blocks": vae["layers_per_block"], "z_channels": vae["latent_channels"]}
    return sdxl_config(network, ddconfig, size_embed_dim=unet["addition_time_embed_dim"],
                       scale_factor=SDXL_SCALE_FACTOR, v_prediction=v_prediction,
                       clip_version=str(Path(clip_dir).resolve()) if clip_dir else None,
                       clip_layers=tiny_clip_config(width)["num_hidden_layers"])


def write_tiny_sdxl_checkpoint(folder: str | Path, name: str = "tiny-sdxl", seed: int = 0, *,
                               markers: tuple[str, ...] = (), dtype: torch.dtype = torch.float32,
                               width: int = 1) -> Path:
    """Write ``<name>.safetensors`` (sgm single-file layout), ``<name>.yaml`` and ``<name>-clip/``.

    ``markers``: empty marker tensors to add (``"v_pred"``, ``"ztsnr"``: what v-prediction checkpoints carry);
    ``dtype``: of the floating-point weights (real checkpoints are mostly float16). Returns the checkpoint's path.
    """
    from lora_trainer.models.ldm_checkpoint import sdxl_to_ldm_state_dict
    from lora_trainer.models.tiny import as_dtype, new_clip_folder, write_clip_folder, write_model_files

    clip_dir = new_clip_folder(folder, name)
    parts = build_tiny_sdxl_components(seed, tokenizer_dir=str(clip_dir), width=width)
    write_clip_folder(clip_dir, parts["text_encoder"])
    state = sdxl_to_ldm_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"])
    state = {**as_dtype(state, dtype), **{marker: torch.zeros(0) for marker in markers}}
    return write_model_files(folder, name, state, tiny_sdxl_config(clip_dir, v_prediction="v_pred" in markers,
                                                                   width=width))
