"""Forge's in-place residual adds: training through them needs the norms' inputs kept intact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_trainer.host.forge_blocks import InPlaceResidualGuard


class BasicTransformerBlock(nn.Module):
    """The shape of Forge's block: ``x += attn(norm(x))`` twice, then the feed-forward with a residual."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn1, self.attn2, self.ff = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.in_place = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.in_place:  # the same computation, out of place
            x = x + self.attn1(self.norm1(x))
            x = x + self.attn2(self.norm2(x))
            return self.ff(self.norm3(x)) + x
        x += self.attn1(self.norm1(x))
        x += self.attn2(self.norm2(x))
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def _gradients(block: BasicTransformerBlock, x: torch.Tensor) -> list[torch.Tensor]:
    block.zero_grad()
    block(x.clone()).square().sum().backward()
    return [p.grad.clone() for p in block.parameters()]


def test_in_place_residuals_fail_in_training_without_the_guard():
    block = BasicTransformerBlock()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        _gradients(block, torch.randn(2, 3, 8))


def test_guarded_block_computes_and_differentiates_as_the_out_of_place_one():
    torch.manual_seed(0)
    block, x = BasicTransformerBlock(), torch.randn(2, 3, 8)
    guard = InPlaceResidualGuard()
    assert guard.guard(nn.Sequential(block)) == 3
    with torch.no_grad():
        out = block(x.clone())
    guarded = _gradients(block, x)
    block.in_place = False
    with torch.no_grad():
        assert torch.equal(block(x.clone()), out)
    assert all(torch.allclose(a, b) for a, b in zip(guarded, _gradients(block, x), strict=True))


def test_release_takes_every_hook_off_and_frozen_passes_copy_nothing():
    block = BasicTransformerBlock()
    seen = []
    block.norm1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # runs after the guard's
    guard = InPlaceResidualGuard()
    guard.guard(block)
    x = torch.randn(1, 2, 8)
    with torch.no_grad():
        block(x)
    assert seen[-1] is x  # no copy outside training
    guard.release()
    assert len(guard) == 0 and len(block.norm2._forward_pre_hooks) == 0 and len(block.norm1._forward_pre_hooks) == 1
