"""OpenCLIP text encoders (SD2.x, SDXL's second encoder) seen through transformers CLIP module names.

OpenCLIP's attention is one ``nn.MultiheadAttention`` whose q/k/v projections are a single fused
``in_proj_weight`` and whose ``out_proj`` is never called as a module, so LoRA layers cannot wrap them. For
the length of a run, :class:`OpenClipSplit` swaps each residual block's ``attn`` and ``mlp`` for modules with
separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` and ``fc1``/``fc2`` Linear layers that share the
original weight storage (no copy, nothing written), and exposes them under the transformers path
``text_model.encoder.layers.N.self_attn.q_proj``: the names kohya files use (``lora_te_...`` for SD2,
``lora_te2_...`` for SDXL), which the WebUI maps back onto the fused attention. :meth:`OpenClipSplit.restore`
puts the original module objects back.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _shared_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear whose parameters are views of ``weight`` / ``bias`` (same storage, no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return linear


class SplitAttention(nn.Module):
    """Self-attention computed like ``nn.MultiheadAttention`` with separate projection modules."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        if not getattr(attn, "_qkv_same_embed_dim", True) or attn.in_proj_weight is None:
            raise ValueError("only self-attention with a fused in_proj_weight can be split")
        width = attn.embed_dim
        weights = attn.in_proj_weight
        biases = attn.in_proj_bias
        for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(index * width, (index + 1) * width)
            setattr(self, name, _shared_linear(weights[rows], biases[rows] if biases is not None else None))
        self.out_proj = attn.out_proj
        self.num_heads, self.batch_first, self.dropout = attn.num_heads, attn.batch_first, attn.dropout

    def forward(self, query: torch.Tensor, key: Any = None, value: Any = None, key_padding_mask: Any = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None, **_: Any) -> tuple:
        if key_padding_mask is not None or (key is not None and key is not query):
            raise NotImplementedError("split OpenCLIP attention supports self-attention without padding masks")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, width = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, heads, width // heads).transpose(1, 2)

        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # MHA: True = masked; SDPA: True = attend
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask, float("-inf"))
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                             attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


class SplitMLP(nn.Module):
    """OpenCLIP's ``mlp`` (c_fc, activation, c_proj) with the Linear layers named ``fc1`` / ``fc2``."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = mlp.c_fc, mlp.c_proj
        self.middle = nn.ModuleList(m for name, m in mlp.named_children() if name not in ("c_fc", "c_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for module in self.middle:
            x = module(x)
        return self.fc2(x)


class _Layer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp


def resblocks_of(text_model: nn.Module) -> nn.ModuleList:
    """The residual blocks of an OpenCLIP text model (``CLIP`` or its ``transformer``)."""
    transformer = getattr(text_model, "transformer", text_model)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise ValueError(f"{type(text_model).__name__} has no transformer.resblocks; not an OpenCLIP text model")
    return blocks


class OpenClipSplit:
    """Swap an OpenCLIP text model's attention and MLP for split modules until :meth:`restore`.

    ``root`` holds the split modules under transformers names; pass it to LoRA injection as the text-encoder
    root. Base weights are shared, never copied or written.
    """

    def __init__(self, text_model: nn.Module) -> None:
        self._saved: list[tuple[nn.Module, nn.Module, nn.Module]] = []
        layers = nn.ModuleList()
        for block in resblocks_of(text_model):
            attn, mlp = SplitAttention(block.attn), SplitMLP(block.mlp)
            self._saved.append((block, block.attn, block.mlp))
            block.attn, block.mlp = attn, mlp
            layers.append(_Layer(attn, mlp))
        self.root = nn.Module()
        self.root.text_model = nn.Module()
        self.root.text_model.encoder = nn.Module()
        self.root.text_model.encoder.layers = layers

    def restore(self) -> None:
        """Put the original attention and MLP objects back (idempotent)."""
        for block, attn, mlp in self._saved:
            block.attn, block.mlp = attn, mlp
        self._saved.clear()
