"""Load SDXL (base and its fine-tunes: Pony, Illustrious, NoobAI ...) offline as an :class:`SDXLBackbone`.

A single file in the original sgm layout: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, transformers layout) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG). A same-named ``.yaml`` in sgm's format (``sd_xl_base.yaml``) gives the UNet's config, the size
embedding width and v-prediction (``VScaling``); without one, or when it describes no sgm ``DiffusionEngine``, every
size is read from the weights. The text encoders' sizes always come from the weights. Or a diffusers folder with
``text_encoder_2/`` and ``tokenizer_2/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_trainer.models.ldm_checkpoint import SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX
from lora_trainer.models.ldm_config import (
    UNET_PREFIX,
    VAE_PREFIX,
    infer_sdxl_network_params,
    infer_vae_params,
    sdxl_config,
    sdxl_unet_diffusers_config,
)
from lora_trainer.models.loading import (
    META,
    build_clip,
    build_open_clip,
    build_unet,
    build_vae,
    check_subfolders,
    clip_tokenizer,
    first_text_encoder,
    first_unet,
    first_vae,
    load_pretrained,
    noise_markers,
    read_yaml,
    scheduler_settings,
    with_source,
)
from lora_trainer.models.sdxl_backbone import SDXLBackbone, vae_dtype
from lora_trainer.models.weights import CheckpointFile, ModelLoadError

log = logging.getLogger(__name__)


def _check_parts(path: Path, state: dict[str, torch.Tensor]) -> None:
    parts = {"UNet": UNET_PREFIX, "VAE": VAE_PREFIX, "first text encoder (CLIP ViT-L)": SDXL_CLIP_PREFIX,
             "second text encoder (OpenCLIP bigG)": SDXL_OPEN_CLIP_PREFIX}
    missing = [f"{name} ({prefix}*)" for name, prefix in parts.items() if not any(k.startswith(prefix) for k in state)]
    if missing:
        raise ModelLoadError(f"{path} looks like an SDXL checkpoint but has no {', '.join(missing)} weights; "
                             f"an SDXL refiner or a partial file cannot be trained")


def _size_embed_dim(path: Path, network: dict[str, Any], state: dict[str, torch.Tensor]) -> int:
    """The width of each size id's embedding: (added-embedding input - pooled text) / 6 ids."""
    pooled = int(state[SDXL_OPEN_CLIP_PREFIX + "text_projection"].shape[1])
    rest = int(network["adm_in_channels"]) - pooled
    if rest <= 0 or rest % 6:
        raise ModelLoadError(f"{path}: the UNet's added embedding takes {network['adm_in_channels']} inputs, which "
                             f"is not the {pooled}-wide pooled text plus six equal size embeddings")
    return rest // 6


def _yaml_config(yaml_path: Path) -> tuple[dict[str, Any], int | None, Path | None] | None:
    """(config, size embedding width, local CLIP folder) from an sgm yaml; None when it describes no SDXL model."""
    config = read_yaml(yaml_path)
    params = config["model"]["params"]
    network = (params.get("network_config") or {}).get("params")
    ddconfig = ((params.get("first_stage_config") or {}).get("params") or {}).get("ddconfig")
    if not str(config["model"].get("target", "")).endswith("DiffusionEngine") or not isinstance(network, dict) \
            or not isinstance(ddconfig, dict) or "adm_in_channels" not in network:
        return None
    size_dim, clip_folder = None, None
    for embedder in (params.get("conditioner_config") or {}).get("params", {}).get("emb_models", []):
        target, args = str(embedder.get("target", "")), embedder.get("params") or {}
        if target.endswith("ConcatTimestepEmbedderND"):
            size_dim = int(args.get("outdim", 256))
        elif target.endswith(".FrozenCLIPEmbedder") and isinstance(args.get("version"), str):
            folder = Path(args["version"]).expanduser()
            clip_folder = folder if folder.is_dir() else None
    return config, size_dim, clip_folder


def sdxl_original_config(path: Path, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int, Path | None]:
    """(sgm config, size embedding width, local CLIP folder): the same-named yaml's, or read from the weights."""
    yaml_path = path.with_suffix(".yaml")
    found = _yaml_config(yaml_path) if yaml_path.is_file() else None
    if found is not None:
        log.info("using the model config %s", yaml_path)
        config, size_dim, clip_folder = found
        network = config["model"]["params"]["network_config"]["params"]
        return config, size_dim or _size_embed_dim(path, network, state), clip_folder
    if yaml_path.is_file():
        log.warning("%s describes no SDXL (sgm DiffusionEngine) model; the architecture is read from the weights "
                    "of %s", yaml_path, path.name)
    network = infer_sdxl_network_params(state)
    ddconfig = infer_vae_params(state)
    size_dim = _size_embed_dim(path, network, state)
    return sdxl_config(network, ddconfig, size_embed_dim=size_dim), size_dim, None


def load_sdxl_single_file(checkpoint: CheckpointFile, device: torch.device, dtype: torch.dtype) -> SDXLBackbone:
    """An sgm-layout SDXL checkpoint (with an optional same-named ``.yaml``) -> a backbone on ``device``."""
    path, state = checkpoint.path, checkpoint.index
    _check_parts(path, state)
    v_marked, ztsnr = noise_markers(path, state)
    config, size_dim, clip_folder = sdxl_original_config(path, state)
    params = config["model"]["params"]
    scaling = str(((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config", {}).get(
        "target", ""))
    prediction = "v_prediction" if v_marked or scaling.endswith("VScaling") else "epsilon"
    tokenizer = clip_tokenizer(clip_folder)  # first: a missing tokenizer fails before model building
    tokenizer_2 = clip_tokenizer(clip_folder, pad_with_zero=True)  # the same vocabulary, OpenCLIP's padding

    def read(prefix: str, as_dtype: torch.dtype = dtype) -> dict[str, torch.Tensor]:
        return checkpoint.tensors(prefix, device=device, dtype=as_dtype)

    def vae() -> nn.Module:
        return build_vae(config, read(VAE_PREFIX, vae_dtype(dtype)), path, device, vae_dtype(dtype))

    def clip_from(weights: dict[str, torch.Tensor], on: torch.device) -> nn.Module:
        return build_clip(weights, SDXL_CLIP_PREFIX, clip_folder, path, on, dtype)

    def open_clip_from(weights: dict[str, torch.Tensor], on: torch.device) -> nn.Module:
        return build_open_clip(weights, SDXL_OPEN_CLIP_PREFIX, path, on, dtype, penultimate=False,
                               with_projection=True)

    def text_encoder() -> nn.Module:
        return clip_from(read(SDXL_CLIP_PREFIX), device)

    def text_encoder_2() -> nn.Module:
        return open_clip_from(read(SDXL_OPEN_CLIP_PREFIX), device)

    unet_config = sdxl_unet_diffusers_config(config, size_dim, path)

    def unet() -> nn.Module:
        return build_unet(unet_config, read(UNET_PREFIX), path, device, dtype)

    backbone = SDXLBackbone(first_unet(unet, unet_config, checkpoint, dtype), first_vae(vae, checkpoint),
                            first_text_encoder(text_encoder, lambda: clip_from(checkpoint.shapes(SDXL_CLIP_PREFIX),
                                                                               META), checkpoint),
                            first_text_encoder(text_encoder_2, lambda: open_clip_from(
                                checkpoint.shapes(SDXL_OPEN_CLIP_PREFIX), META), checkpoint),
                            tokenizer, tokenizer_2,
                            prediction_type=prediction, zero_terminal_snr=ztsnr, device=device, dtype=dtype)
    return with_source(backbone, checkpoint,
                       {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2})


def load_sdxl_folder(path: Path, device: torch.device, dtype: torch.dtype) -> SDXLBackbone:
    """A local diffusers SDXL folder -> a backbone (``local_files_only``, safetensors only)."""
    check_subfolders(path, ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = load_pretrained(UNet2DConditionModel, path / "unet", device, dtype)
    vae = load_pretrained(AutoencoderKL, path / "vae", device, vae_dtype(dtype))
    text_encoder = load_pretrained(CLIPTextModel, path / "text_encoder", device, dtype)
    text_encoder_2 = load_pretrained(CLIPTextModelWithProjection, path / "text_encoder_2", device, dtype)
    tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(path / "tokenizer_2"), local_files_only=True)
    return SDXLBackbone(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, device=device, dtype=dtype,
                        **scheduler_settings(path))
