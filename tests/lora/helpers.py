"""Shared helpers for the LoRA tests: target lists, structure hashes, an LDM-named view of a diffusers UNet."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def state_hash(module: nn.Module) -> str:
    """sha256 over every state-dict key, dtype, shape and value."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def structure(module: nn.Module) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(path, class, object id, attribute names) of every submodule: any swap or added attribute shows."""
    return [(name, type(m).__name__, id(m), tuple(sorted(vars(m)))) for name, m in module.named_modules()]


def randomize_lora(params: list[nn.Parameter], seed: int = 1, scale: float = 0.1) -> None:
    """Non-zero LoRA weights, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def ldm_view(unet: nn.Module) -> nn.Module:
    """A module tree named like the WebUI's LDM ``UNetModel`` (``diffusion_model.input_blocks.1.1...``)
    whose spatial transformers are the diffusers UNet's own modules (shared, not copied)."""
    count = 3 * len(unet.down_blocks)  # two resnets and a sampler per level (SD1/SD2: 12 blocks, SDXL: 9)
    blocks = {"input_blocks": nn.ModuleList(nn.Identity() for _ in range(count)),
              "output_blocks": nn.ModuleList(nn.Identity() for _ in range(count))}
    for b, block in enumerate(unet.down_blocks):
        for i, attn in enumerate(getattr(block, "attentions", None) or []):
            blocks["input_blocks"][1 + 3 * b + i] = nn.ModuleList([nn.Identity(), attn])
    for b, block in enumerate(unet.up_blocks):
        for i, attn in enumerate(getattr(block, "attentions", None) or []):
            blocks["output_blocks"][3 * b + i] = nn.ModuleList([nn.Identity(), attn])
    model = nn.Module()
    model.input_blocks = blocks["input_blocks"]
    model.middle_block = nn.ModuleList([nn.Identity(), unet.mid_block.attentions[0], nn.Identity()])
    model.output_blocks = blocks["output_blocks"]
    wrapper = nn.Module()
    wrapper.diffusion_model = model
    return wrapper
