"""Optional GPU fast paths for the denoiser: channels-last memory format and ``torch.compile``.

Both are off by default, so the default path (and so the CPU path's results) is untouched. Attention already runs
through PyTorch's fused ``scaled_dot_product_attention`` (diffusers' default ``AttnProcessor2_0``; see
:func:`attention_kinds`), and mixed precision is autocast over fp32 LoRA weights (the trainer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def attention_kinds(module: nn.Module) -> set[str]:
    """The class names of the attention processors of a diffusers model (``AttnProcessor2_0`` = SDPA)."""
    processors = getattr(module, "attn_processors", None)
    return {type(p).__name__ for p in processors.values()} if isinstance(processors, dict) else set()


@contextlib.contextmanager
def fast_paths(denoiser: nn.Module, *, channels_last: bool, compile_model: bool,
               notify=lambda text: None) -> Iterator[None]:
    """Apply the asked-for fast paths to ``denoiser`` for the duration of the block, then undo them."""
    formats: list[nn.Parameter] = []
    compiled = False
    try:
        if channels_last:
            for param in denoiser.parameters():
                if param.dim() == 4 and param.is_contiguous():
                    formats.append(param)
                    param.data = param.data.contiguous(memory_format=torch.channels_last)
            notify(f"channels_last: {len(formats)} convolution weights in channels-last format")
        if compile_model:
            denoiser.compile()
            compiled = True
            notify("torch_compile: the denoiser is compiled on its first steps (slow first steps)")
        yield
    finally:
        if compiled:
            denoiser._compiled_call_impl = None
        for param in formats:  # back to the ordinary layout (same values)
            param.data = param.data.contiguous()
