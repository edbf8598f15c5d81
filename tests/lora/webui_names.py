"""How the AUTOMATIC1111 WebUI 1.10 (extensions-builtin/Lora) finds the module a LoRA key belongs to, re-stated
for tests.

The WebUI names every module of the loaded model by its path with dots as underscores: the UNet as
``diffusion_model_...`` (``sd_model.model``), the SD1/SD2 text encoder by its path inside the cond stage
(``transformer_text_model_...``, ``model_transformer_resblocks_...``), SDXL's embedders with their index in
front (``0_transformer_text_model_...``, ``1_model_transformer_resblocks_...``). A key is converted from kohya's
diffusers-style name to that form; a ``..._q_proj`` / ``_k_proj`` / ``_v_proj`` key that names no module is
looked up without the suffix (OpenCLIP's fused attention); SDXL UNet keys in LDM form only swap ``lora_unet``
for ``diffusion_model``, and ``lora_te1_text_model`` becomes ``0_transformer_text_model``.
"""

from __future__ import annotations

import re

import torch

# single-file key prefix -> the WebUI's module-name prefix
_PREFIXES = (("model.diffusion_model.", "diffusion_model."), ("conditioner.embedders.0.", "0_"),
             ("conditioner.embedders.1.", "1_"), ("cond_stage_model.", ""))
_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")
_OPEN_CLIP_MLP = (("mlp_fc1", "mlp_c_fc"), ("mlp_fc2", "mlp_c_proj"))


def module_names_of(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The names the WebUI gives a built SDXL model's modules (``networks.assign_network_names_to_compvis_modules``:
    each embedder under its index, the UNet under ``model``) -> their weight's shape (OpenCLIP's fused
    attention: ``in_proj_weight``)."""
    named = [(f"{index}_{name}", module) for index, embedder in enumerate(model.conditioner.embedders)
             for name, module in embedder.named_modules()]
    out: dict[str, tuple[int, ...]] = {}
    for name, module in [*named, *model.model.named_modules()]:
        weight = getattr(module, "in_proj_weight", None)
        weight = getattr(module, "weight", None) if weight is None else weight
        if isinstance(weight, torch.Tensor):
            out[name.replace(".", "_")] = tuple(weight.shape)
    return out


def webui_modules(checkpoint: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The WebUI's module names of a model loaded from ``checkpoint`` (single-file keys) -> their weight's shape."""
    out: dict[str, tuple[int, ...]] = {}
    for key, value in checkpoint.items():
        module, _, param = key.rpartition(".")
        if param not in ("weight", "in_proj_weight"):
            continue
        for prefix, name in _PREFIXES:
            if module.startswith(prefix):
                out[(name + module[len(prefix):]).replace(".", "_")] = tuple(value.shape)
    return out


def _open_clip(prefix: str, layer: str, rest: str) -> str:
    for old, new in _OPEN_CLIP_MLP:
        if old in rest:
            return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace(old, new)}"
    return f"{prefix}model_transformer_resblocks_{layer}_{rest.replace('self_attn', 'attn')}"


def _compvis_name(key: str, is_sd2: bool) -> str:
    """kohya's diffusers-style name -> the WebUI's module name (keys it does not know come back unchanged)."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        kind = 1 if m[2] == "attentions" else 0
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{kind}_{m[4]}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        kind = 1 if m[2] == "attentions" else 0
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{kind}_{m[4]}"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return _open_clip("", m[1], m[2]) if is_sd2 else f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        return _open_clip("1_", m[1], m[2])
    return key


def webui_module_for(key: str, modules: dict[str, tuple[int, ...]], *, is_sd2: bool = False) -> str | None:
    """The WebUI module name a LoRA key (``<name>.lora_down.weight`` ...) is applied to; None: "didn't match"."""
    name = key.partition(".")[0]
    converted = _compvis_name(name, is_sd2)
    if converted in modules:
        return converted
    if (m := _X_PROJ.fullmatch(converted)) and m[1] in modules:
        return m[1]
    if "lora_unet" in name:
        converted = name.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in name:
        converted = name.replace("lora_te1_text_model", "0_transformer_text_model")
        if converted not in modules:
            converted = name.replace("lora_te1_text_model", "transformer_text_model")
    return converted if converted in modules else None


def unmatched_keys(lora: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor] | None = None, *,
                   is_sd2: bool = False, modules: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """LoRA keys the WebUI would report as not matched, or whose shapes do not fit their module's weight.

    ``modules``: the module names and weight shapes of a model the WebUI built (:func:`webui_modules` of
    ``checkpoint`` when None).
    """
    modules = webui_modules(checkpoint) if modules is None else modules
    bad = []
    for key, value in lora.items():
        module = webui_module_for(key, modules, is_sd2=is_sd2)
        if module is None:
            bad.append(key)
            continue
        shape = modules[module]
        fused = len(shape) == 2 and module.endswith("_attn") and _X_PROJ.fullmatch(key.partition(".")[0])
        out_features = shape[0] // 3 if fused else shape[0]
        if key.endswith("lora_down.weight") and value.shape[1] != shape[1]:
            bad.append(f"{key} (in {value.shape[1]}, module {shape})")
        if key.endswith("lora_up.weight") and value.shape[0] != out_features:
            bad.append(f"{key} (out {value.shape[0]}, module {shape})")
    return bad
