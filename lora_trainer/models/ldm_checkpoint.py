"""diffusers SD1.x / SDXL modules -> one original-layout ("LDM" / sgm) single-file state dict.

The inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``):
``model.diffusion_model.*`` (UNet; SDXL's added embedding as ``label_emb.0.*``), ``first_stage_model.*`` (VAE,
mid-block attention as 1x1 convs) and the text encoders: ``cond_stage_model.transformer.text_model.*`` (SD1),
or SDXL's ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP bigG layout: fused q/k/v, transposed ``text_projection``).
Used to write real single-file checkpoints in the exact layout users (and the WebUI) have; correctness is
checked by converting back with diffusers' own functions.
"""

from __future__ import annotations

import torch
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."),
                ("conv_shortcut.", "skip_connection."))
_VAE_TOP = {"conv_norm_out.": "norm_out."}
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
             ("to_out.0.", "proj_out."))


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _unet_key(key: str, layers: int) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM ``UNetModel`` key (without prefix)."""
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    if parts[0] in ("down_blocks", "up_blocks"):
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
            slot = 1 + block * (layers + 1) + index
            prefix = "input_blocks"
        else:
            if kind == "upsamplers":
                return f"output_blocks.{block * (layers + 1) + layers}.{{up}}.{rest}"
            slot = block * (layers + 1) + index
            prefix = "output_blocks"
        if kind == "resnets":
            return f"{prefix}.{slot}.0.{_rename(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"{prefix}.{slot}.1.{rest}"
    raise KeyError(f"no LDM name for the UNet weight {key!r}")


def unet_to_ldm(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` (SD1.x/SD2.x layout) as ``model.diffusion_model.*`` weights."""
    layers = int(unet.config.layers_per_block)
    state = unet.state_dict()
    has_attention = {k.split(".")[1] for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ldm = _unet_key(key, layers)
        if "{up}" in ldm:
            ldm = ldm.replace("{up}", "2" if key.split(".")[1] in has_attention else "1")
        out[UNET_PREFIX + ldm] = value
    return out


def _vae_key(key: str, num_blocks: int) -> tuple[str, bool]:
    """One diffusers AutoencoderKL key -> (LDM key without prefix, whether it is a mid-attention weight)."""
    parts = key.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return key, False
    rest = ".".join(parts[1:])
    for old, new in _VAE_TOP.items():
        if rest.startswith(old):
            return f"{side}.{new}{rest[len(old):]}", False
    if parts[1] == "mid_block":
        kind, index, tail = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"{side}.mid.block_{index + 1}.{_rename(tail, (('conv_shortcut.', 'nin_shortcut.'),))}", False
        return f"{side}.mid.attn_1.{_rename(tail, _VAE_ATTN)}", True
    if parts[1] in ("down_blocks", "up_blocks"):
        block, kind, tail = int(parts[2]), parts[3], ".".join(parts[4:])
        name, level = ("down", block) if parts[1] == "down_blocks" else ("up", num_blocks - 1 - block)
        if kind == "resnets":
            index, tail = tail.split(".", 1)
            tail = _rename(tail, (("conv_shortcut.", "nin_shortcut."),))
            return f"{side}.{name}.{level}.block.{index}.{tail}", False
        if kind in ("downsamplers", "upsamplers"):
            sampler = "downsample" if kind == "downsamplers" else "upsample"
            return f"{side}.{name}.{level}.{sampler}.{tail.removeprefix('0.')}", False
    return f"{side}.{rest}", False


def vae_to_ldm(vae: nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` as ``first_stage_model.*`` weights (attention as 1x1 conv kernels)."""
    num_blocks = len(vae.config.down_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        ldm, is_attention = _vae_key(key, num_blocks)
        if is_attention and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + ldm] = value
    return out


def text_encoder_to_ldm(text_encoder: nn.Module, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` as ``<prefix>text_model.*`` weights (SD1: ``cond_stage_model.transformer.``).

    Works with both the nested (``text_model.``) and the flattened (transformers >= 5.6) module layout;
    ``embeddings.position_ids`` is included as real SD1.x checkpoints carry it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        if not key.startswith("text_model."):
            key = "text_model." + key
        out[prefix + key] = value
    positions = prefix + "text_model.embeddings.position_ids"
    if positions not in out:
        length = int(text_encoder.config.max_position_embeddings)
        out[positions] = torch.arange(length, dtype=torch.int64)[None]
    return out


def text_encoder_to_open_clip(text_encoder: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model as OpenCLIP text-tower weights under ``prefix`` (SD2, SDXL's second).

    ``text_projection`` (``CLIPTextModelWithProjection``) is stored transposed, as OpenCLIP multiplies by it.
    """
    from lora_trainer.models.text_encoders import OPEN_CLIP_BLOCK_NAMES, OPEN_CLIP_TOP_NAMES

    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
             for k, v in text_encoder.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name, key in OPEN_CLIP_TOP_NAMES.items():
        if key in state:
            out[prefix + name] = state[key].t() if name == "text_projection" else state[key]
    for index in range(int(text_encoder.config.num_hidden_layers)):
        src, dst = f"text_model.encoder.layers.{index}.", f"{prefix}transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for open_name, name in OPEN_CLIP_BLOCK_NAMES.items():
                out[f"{dst}{open_name}{kind}"] = state[f"{src}{name}{kind}"]
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def sdxl_to_ldm_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                           text_encoder_2: nn.Module) -> dict[str, torch.Tensor]:
    """SDXL diffusers components -> one sgm single-file state dict (contiguous CPU tensors)."""
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **text_encoder_to_ldm(text_encoder, SDXL_CLIP_PREFIX),
             **text_encoder_to_open_clip(text_encoder_2, SDXL_OPEN_CLIP_PREFIX)}
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


def diffusers_to_ldm_state_dict(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """SD1.x diffusers components -> one LDM single-file state dict (contiguous CPU tensors)."""
    state: dict[str, torch.Tensor] = {}
    for part in (unet_to_ldm(unet), vae_to_ldm(vae), text_encoder_to_ldm(text_encoder)):
        state.update(part)
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
