"""OpenCLIP attention split into transformers-named projections: same outputs, LoRA lands where the WebUI
merges it, and the original modules come back untouched."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lora_trainer.host.openclip import OpenClipSplit
from lora_trainer.lora.inject import inject_lora, lora_modules, remove_lora
from lora_trainer.lora.kohya import to_kohya_state_dict
from lora_trainer.models.state import model_weights_hash, snapshot_model_state

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
WIDTH, HEADS, LENGTH = 32, 4, 7


class Block(nn.Module):
    """The layout of an OpenCLIP text residual block (ln_1, attn, ln_2, mlp of c_fc / gelu / c_proj)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(WIDTH, 4 * WIDTH), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * WIDTH, WIDTH)))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextModel(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block(batch_first) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x: [B, L, D]
        x = x if self.batch_first else x.transpose(0, 1)
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=mask)
        return x if self.batch_first else x.transpose(0, 1)


def causal_mask(as_bool: bool) -> torch.Tensor:
    upper = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)
    return upper if as_bool else torch.zeros(LENGTH, LENGTH).masked_fill(upper, float("-inf"))


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(2, LENGTH, WIDTH, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("as_bool", [False, True])
def test_split_model_computes_the_same(inputs, batch_first, as_bool):
    torch.manual_seed(0)
    model = TextModel(batch_first).eval().requires_grad_(False)
    with torch.no_grad():
        before = model(inputs, causal_mask(as_bool))
        split = OpenClipSplit(model)
        after = model(inputs, causal_mask(as_bool))
        split.restore()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_split_shares_storage_and_restore_gives_back_the_same_objects():
    model = TextModel(False).requires_grad_(False)
    attn, mlp = model.transformer.resblocks[0].attn, model.transformer.resblocks[0].mlp
    weights_hash, state = model_weights_hash(model), snapshot_model_state(model)
    split = OpenClipSplit(model)
    layer = split.root.text_model.encoder.layers[0]
    assert layer.self_attn.k_proj.weight.data_ptr() == attn.in_proj_weight[WIDTH:].data_ptr()
    assert layer.self_attn.out_proj is attn.out_proj and layer.mlp.fc1 is mlp.c_fc
    assert model.transformer.resblocks[0].attn is layer.self_attn
    split.restore()
    split.restore()
    assert model.transformer.resblocks[0].attn is attn and model.transformer.resblocks[0].mlp is mlp
    assert model_weights_hash(model) == weights_hash
    assert snapshot_model_state(model).module_types == state.module_types


def test_lora_on_the_split_model_equals_merging_into_the_fused_weights(inputs):
    """The WebUI applies q/k/v/out LoRA of an SD2 file by adding up @ down to the fused in_proj/out_proj."""
    torch.manual_seed(0)
    model = TextModel(False).eval().requires_grad_(False)
    merged = TextModel(False).eval().requires_grad_(False)
    merged.load_state_dict(model.state_dict())
    weights_hash = model_weights_hash(model)
    split = OpenClipSplit(model)
    roots = {"lora_te": split.root}
    params = inject_lora(roots, rank=2, alpha=4, dropout=0.0, unet_targets=["to_q"], te_targets=TE_TARGETS)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    state = to_kohya_state_dict(roots, alpha=4)
    assert "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight" in state
    assert "lora_te_text_model_encoder_layers_0_mlp_fc2.lora_up.weight" in state
    loss = model(inputs, causal_mask(False)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert not any(p.grad is not None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        with_lora = model(inputs, causal_mask(False))
        def delta(index: int, name: str) -> torch.Tensor:
            key = f"lora_te_text_model_encoder_layers_{index}_{name}"
            return state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"] * (4 / 2)

        for i, block in enumerate(merged.transformer.resblocks):
            block.attn.in_proj_weight += torch.cat([delta(i, f"self_attn_{p}_proj") for p in "qkv"])
            block.attn.out_proj.weight += delta(i, "self_attn_out_proj")
            block.mlp.c_fc.weight += delta(i, "mlp_fc1")
            block.mlp.c_proj.weight += delta(i, "mlp_fc2")
        torch.testing.assert_close(with_lora, merged(inputs, causal_mask(False)), atol=1e-5, rtol=1e-5)
    remove_lora(roots)
    assert not lora_modules(split.root)
    split.restore()
    assert model_weights_hash(model) == weights_hash
