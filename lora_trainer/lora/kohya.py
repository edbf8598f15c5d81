"""Injected LoRA layers <-> the kohya ``.safetensors`` layout that the WebUI, ComfyUI and diffusers load.

One LoRA module gives three tensors: ``<name>.lora_down.weight`` (peft ``lora_A``), ``<name>.lora_up.weight``
(``lora_B``) and ``<name>.alpha`` (the configured alpha; the update is scaled by alpha / rank). ``<name>`` is
the root prefix plus the module path with dots turned into underscores, in the diffusers / transformers
naming: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, whatever layout the module came from (the WebUI's
LDM UNet, or a transformers CLIPTextModel without its ``text_model`` level).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lora_trainer.lora.inject import ADAPTER, UNET_PREFIX, lora_modules

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
_UNET_STARTS = ("down_blocks.", "mid_block.", "up_blocks.", "input_blocks.", "middle_block.", "output_blocks.")
_LDM_IN = re.compile(r"input_blocks\.(\d+)\.1\.(.+)")
_LDM_MID = re.compile(r"middle_block\.1\.(.+)")
_LDM_OUT = re.compile(r"output_blocks\.(\d+)\.1\.(.+)")
_DIF_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_DIF_MID = re.compile(r"mid_block\.attentions\.0\.(.+)")
_DIF_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_TE_ANCHOR = "encoder.layers."


def _unet_tail(path: str) -> str:
    """Drop wrapper levels above the UNet's own blocks (``model.diffusion_model.`` in the WebUI)."""
    for start in [0] + [i + 1 for i, ch in enumerate(path) if ch == "."]:
        if path.startswith(_UNET_STARTS, start):
            return path[start:]
    return path


def ldm_to_diffusers_unet_path(path: str) -> str:
    """``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` -> ``down_blocks.0.attentions.0.transformer_...``.

    Covers the spatial transformers of SD1/SD2/SDXL (two resnets per down level); other paths are returned
    unchanged (kohya and the WebUI accept the LDM names as ``lora_unet_input_blocks_...`` too).
    """
    if m := _LDM_IN.fullmatch(path):
        slot = int(m[1]) - 1
        return f"down_blocks.{slot // 3}.attentions.{slot % 3}.{m[2]}"
    if m := _LDM_MID.fullmatch(path):
        return f"mid_block.attentions.0.{m[1]}"
    if m := _LDM_OUT.fullmatch(path):
        slot = int(m[1])
        return f"up_blocks.{slot // 3}.attentions.{slot % 3}.{m[2]}"
    return path


def diffusers_to_ldm_unet_path(path: str) -> str:
    """The inverse of :func:`ldm_to_diffusers_unet_path` for attention modules; others unchanged."""
    if m := _DIF_DOWN.fullmatch(path):
        return f"input_blocks.{1 + int(m[1]) * 3 + int(m[2])}.1.{m[3]}"
    if m := _DIF_MID.fullmatch(path):
        return f"middle_block.1.{m[1]}"
    if m := _DIF_UP.fullmatch(path):
        return f"output_blocks.{int(m[1]) * 3 + int(m[2])}.1.{m[3]}"
    return path


def text_encoder_path(path: str) -> str:
    """Any CLIP text-encoder module path -> the transformers ``CLIPTextModel`` path (``text_model.encoder...``).

    transformers 5.x builds ``CLIPTextModel`` without the ``text_model`` level and the WebUI wraps it in
    ``transformer.``; the file always uses the classic path.
    """
    index = path.find(_TE_ANCHOR)
    if index < 0 or (index > 0 and path[index - 1] != "."):
        raise ValueError(f"text-encoder module {path!r} is not inside a CLIP encoder ('encoder.layers.N...'); "
                         f"no kohya name for it")
    return "text_model." + path[index:]


def kohya_names(prefix: str, path: str) -> list[str]:
    """The kohya module name for one injected module, first the one written, then accepted aliases."""
    if prefix == UNET_PREFIX:
        tail = _unet_tail(path)
        paths = [ldm_to_diffusers_unet_path(tail)]
        paths.append(diffusers_to_ldm_unet_path(paths[0]))
    else:
        paths = [text_encoder_path(path)]
    names: list[str] = []
    for p in paths:
        name = f"{prefix}_{p.replace('.', '_')}"
        if name not in names:
            names.append(name)
    return names


def to_kohya_state_dict(roots: dict[str, nn.Module], alpha: float) -> dict[str, torch.Tensor]:
    """The injected LoRA weights as a kohya state dict (float32 CPU copies; ``alpha`` as a scalar tensor)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, root in roots.items():
        for path, layer in lora_modules(root).items():
            name = kohya_names(prefix, path)[0]
            if f"{name}.{DOWN}" in out:
                raise ValueError(f"two modules map to the kohya name {name!r} (second: {prefix}.{path})")
            out[f"{name}.{DOWN}"] = layer.lora_A[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True)
            out[f"{name}.{UP}"] = layer.lora_B[ADAPTER].weight.detach().to("cpu", torch.float32, copy=True)
            out[f"{name}.{ALPHA}"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def from_kohya_state_dict(state: dict[str, torch.Tensor], roots: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A kohya state dict -> a :func:`~lora_trainer.lora.inject.lora_state_dict` for the injected layers.

    The file's alpha / rank scale is folded into ``lora_B`` so the loaded layers (with their own alpha)
    reproduce the file's update exactly. Keys that match no injected module raise, naming them.
    """
    modules: dict[str, tuple[str, str, nn.Module]] = {}
    for prefix, root in roots.items():
        for path, layer in lora_modules(root).items():
            for name in kohya_names(prefix, path):
                modules[name] = (prefix, path, layer)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        name, _, part = key.partition(".")
        if name not in modules or part not in (DOWN, UP, ALPHA):
            unknown.append(key)
            continue
        groups.setdefault(name, {})[part] = value
    if unknown:
        shown = ", ".join(sorted(unknown)[:8]) + (f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise KeyError(f"{len(unknown)} key(s) in the LoRA file match no LoRA layer of this model: {shown}")
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        prefix, path, layer = modules[name]
        if DOWN not in parts or UP not in parts:
            raise KeyError(f"{name}: needs both {DOWN} and {UP} in the LoRA file")
        down, up = parts[DOWN].float(), parts[UP].float()
        rank = down.shape[0]
        if rank != layer.r[ADAPTER]:
            raise ValueError(f"{name}: rank {rank} in the file, {layer.r[ADAPTER]} in the injected layer")
        file_alpha = float(parts[ALPHA]) if ALPHA in parts else float(rank)
        factor = (file_alpha / rank) / layer.scaling[ADAPTER]
        out[f"{prefix}.{path}.lora_A.weight"] = down.clone()
        out[f"{prefix}.{path}.lora_B.weight"] = up * factor
    return out
