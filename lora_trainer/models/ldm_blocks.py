"""Pieces shared by the backbones that train a WebUI's live LDM-layout UNet (A1111 and Forge).

Block-level gradient checkpointing that leaves the model's own switches alone, and a plain DDIM preview
over any :class:`~lora_trainer.models.backbone.Backbone` (used when the host gives no sampler).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CHECKPOINT_SWITCHES = ("checkpoint", "use_checkpoint")


def _on_a_copy(forward: Callable[..., Any], x: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward`` on a copy of its input: Forge's blocks add residuals into ``x`` in place, which would change
    the input that checkpointing keeps for the recomputation (the copy is recomputed too, never stored)."""
    return forward(x.clone() if isinstance(x, torch.Tensor) else x, *args, **kwargs)


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(functools.partial(_on_a_copy, forward), *args, use_reentrant=False,
                                             **kwargs)


def set_block_checkpointing(unet: nn.Module, enabled: bool) -> None:
    """Non-reentrant torch checkpointing on every block below ``unet`` that has a checkpoint switch.

    The blocks' own switches are not used: ldm's runs a custom autograd function that differentiates every
    parameter of the block (which fails once base weights are frozen) and Forge's raises. The block's
    ``forward`` is overridden on the instance instead, and disabling deletes that attribute again.
    """
    for name, module in unet.named_modules():
        if not name:
            continue  # the UNet's own flag: checkpointing its whole forward would only add recomputation
        if not any(isinstance(getattr(module, flag, None), bool) for flag in CHECKPOINT_SWITCHES):
            continue
        if enabled and "forward" not in vars(module):
            module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))
        elif not enabled and isinstance(vars(module).get("forward"), functools.partial):
            del module.forward


def images_from_decoded(images: torch.Tensor) -> list[Any]:
    """Decoded pixels in [-1, 1], ``[B, 3, H, W]`` -> PIL images."""
    from PIL import Image

    arrays = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


@torch.no_grad()
def ddim_preview(backbone: Any, prompt: str, *, seed: int, steps: int, width: int, height: int,
                 channels: int = 4, guidance: float = 7.0) -> Any:
    """A deterministic DDIM (eta 0) image with classifier-free guidance, from the backbone's own calls.

    Uses ``encode_prompts``, ``predict``, ``alphas_cumprod``, ``prediction_type`` and ``decode_latents``.
    """
    alphas = backbone.alphas_cumprod
    device = backbone.device
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, channels, height // 8, width // 8), generator=gen).to(device)
    cond, uncond = backbone.encode_prompts([prompt]), backbone.encode_prompts([""])
    times = torch.linspace(len(alphas) - 1, 0, steps).round().long().tolist()
    for index, t in enumerate(times):
        t_batch = torch.full((1,), t, device=device, dtype=torch.long)
        out_c = backbone.predict(x, t_batch, cond).float()
        out_u = backbone.predict(x, t_batch, uncond).float()
        out = out_u + guidance * (out_c - out_u)
        a_t = alphas[t].to(device)
        if backbone.prediction_type == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = (1 - a_t).sqrt() * x + a_t.sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        a_prev = alphas[times[index + 1]].to(device) if index + 1 < len(times) else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return backbone.decode_latents(x)[0]
