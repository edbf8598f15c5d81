"""Forge's transformer blocks add residuals in place; keep what their norms save for backward intact.

Forge (like ComfyUI) writes ``x += self.attn1(self.norm1(x))`` in its ``BasicTransformerBlock``. Inference is
unaffected, but in training ``norm1`` saves ``x`` for its backward and the in-place add then changes it:
"one of the variables needed for gradient computation has been modified by an inplace operation". A forward
pre-hook on each of the block's norms hands the norm a copy of ``x`` while gradients are recorded, so the
block computes the same values and its backward sees what the forward saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BLOCK_CLASS = "BasicTransformerBlock"
NORMS = ("norm_in", "norm1", "norm2", "norm3")


def _copy_input_when_training(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None  # previews and frozen passes run exactly as Forge wrote them
    return (args[0].clone(), *args[1:])


class InPlaceResidualGuard:
    """Pre-hooks on the norms of every transformer block below a root, removed by :meth:`release`."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __len__(self) -> int:
        return len(self._handles)

    def guard(self, root: nn.Module) -> int:
        """Hook the norms of ``root``'s transformer blocks; returns how many were hooked."""
        before = len(self._handles)
        for module in root.modules():
            if type(module).__name__ != BLOCK_CLASS:
                continue
            for name in NORMS:
                norm = getattr(module, name, None)
                if isinstance(norm, nn.Module):
                    self._handles.append(norm.register_forward_pre_hook(_copy_input_when_training))
        return len(self._handles) - before

    def release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
