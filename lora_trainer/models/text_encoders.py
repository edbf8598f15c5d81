"""CLIP text encoders from single-file checkpoints, as transformers models, sizes read from the weights.

SD1.x and SDXL's first encoder hold CLIP ViT-L/14 in the transformers layout already
(``cond_stage_model.transformer.text_model.*`` / ``conditioner.embedders.0.transformer.text_model.*``).
SD2.x and SDXL's second encoder hold an OpenCLIP text tower (``...model.transformer.resblocks.N.attn.in_proj_weight``
...), renamed here to the transformers layout with the fused q/k/v projection split into views (no copy;
diffusers' own conversion copies every split).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_trainer.models.weights import build_empty, fill_module

#: OpenCLIP residual-block names -> transformers CLIPEncoderLayer names (q/k/v come from ``attn.in_proj_*``).
OPEN_CLIP_BLOCK_NAMES = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "attn.out_proj.": "self_attn.out_proj.",
                         "mlp.c_fc.": "mlp.fc1.", "mlp.c_proj.": "mlp.fc2."}
#: OpenCLIP top-level names -> transformers names (``text_projection`` is stored transposed by OpenCLIP).
OPEN_CLIP_TOP_NAMES = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                       "positional_embedding": "text_model.embeddings.position_embedding.weight",
                       "ln_final.weight": "text_model.final_layer_norm.weight",
                       "ln_final.bias": "text_model.final_layer_norm.bias",
                       "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def attention_heads(hidden: int) -> int:
    """Attention heads of a CLIP text transformer: 64-wide heads (ViT-L, ViT-H, ViT-bigG); 8-wide below 64."""
    return hidden // 64 if hidden >= 64 else max(1, hidden // 8)


def count_blocks(weights: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks ``<prefix><N>.`` the weights hold."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in weights if (m := pattern.match(k))})


def open_clip_to_transformers(weights: dict[str, torch.Tensor], prefix: str,
                              layers: int | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower weights under ``prefix`` -> transformers CLIP names; blocks from ``layers`` on dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in OPEN_CLIP_TOP_NAMES:
            out[OPEN_CLIP_TOP_NAMES[name]] = value.t() if name == "text_projection" else value
            continue
        match = _BLOCK.fullmatch(name)
        if match is None or (layers is not None and int(match.group(1)) >= layers):
            continue  # logit_scale, attn_mask, dropped blocks
        block, rest = f"text_model.encoder.layers.{match.group(1)}.", match.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[f"{block}self_attn.{part}_proj.{kind}"] = chunk
            continue
        for old, new in OPEN_CLIP_BLOCK_NAMES.items():
            if rest.startswith(old):
                out[block + new + rest[len(old):]] = value
                break
    return out


def fit_text_keys(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``text_model.*`` keys -> the model's own layout (transformers >= 5.6 drops ``text_model.`` from
    ``CLIPTextModel``); other keys (``text_projection.weight``) unchanged."""
    nested = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for key, value in weights.items():
        if key.startswith("text_projection."):
            out[key] = value
            continue
        key = key if key.startswith("text_model.") else "text_model." + key
        out[key if nested else key.removeprefix("text_model.")] = value
    return out


def clip_config_from_weights(weights: dict[str, torch.Tensor], *, hidden_act: str, pad_token_id: int,
                             layers: int | None = None) -> Any:
    """A ``CLIPTextConfig`` with the sizes of transformers-named weights (heads by :func:`attention_heads`)."""
    from transformers import CLIPTextConfig

    tokens = weights["text_model.embeddings.token_embedding.weight"]
    hidden = int(tokens.shape[1])
    projection = weights.get("text_projection.weight")
    return CLIPTextConfig(
        vocab_size=int(tokens.shape[0]), hidden_size=hidden,
        intermediate_size=int(weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers or count_blocks(weights, "text_model.encoder.layers."),
        num_attention_heads=attention_heads(hidden),
        max_position_embeddings=int(weights["text_model.embeddings.position_embedding.weight"].shape[0]),
        hidden_act=hidden_act, projection_dim=int(projection.shape[0]) if projection is not None else 768,
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id)


def build_text_encoder(weights: dict[str, torch.Tensor], config: Any, *, what: str, source: Path,
                       with_projection: bool = False, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> nn.Module:
    """An empty ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) filled with transformers-named weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = build_empty(lambda: cls(config))
    if not with_projection:
        weights = {k: v for k, v in weights.items() if not k.startswith("text_projection.")}
    fill_module(model, fit_text_keys(model, weights), what=what, source=source, device=device, dtype=dtype)
    return model


def clip_weights(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers-layout CLIP weights under ``prefix`` -> ``text_model.*`` names (views, no copy)."""
    out = {}
    for key, value in weights.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            out[name if name.startswith("text_model.") else "text_model." + name] = value
    return out
