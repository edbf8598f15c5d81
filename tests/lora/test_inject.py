"""peft injection: only LoRA weights train, outputs start unchanged, removal restores the exact modules."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.lora.inject import inject_lora, load_lora_state_dict, lora_modules, lora_state_dict, remove_lora
from tests.lora.helpers import TE_TARGETS, UNET_TARGETS, randomize_lora, state_hash, structure


def inject(roots: dict, rank: int = 4, alpha: float = 2.0) -> list:
    return inject_lora(roots, rank=rank, alpha=alpha, dropout=0.0, unet_targets=UNET_TARGETS, te_targets=TE_TARGETS)


def unet_out(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([300]), encoder_hidden_states=cond).sample


def test_injection_is_lossless_and_removal_restores_everything(tiny_components):
    unet, te = tiny_components["unet"], tiny_components["text_encoder"]
    roots = {"lora_unet": unet, "lora_te": te}
    for root in roots.values():
        root.requires_grad_(False)
    hashes = {k: state_hash(m) for k, m in roots.items()}
    shapes = {k: structure(m) for k, m in roots.items()}
    out_before = unet_out(unet)
    linear = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q

    params = inject(roots)
    wrapped = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert wrapped is not linear and wrapped.get_base_layer() is linear
    # 16 spatial transformers x 12 targets (2 attentions x 4, ff x 2, proj_in/out) + 2 CLIP layers x 6
    assert len(lora_modules(unet)) == 192 and len(lora_modules(te)) == 12
    trainable = [p for m in roots.values() for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params} and len(params) == 2 * 204
    assert all(p.dtype == torch.float32 for p in params)
    assert torch.equal(unet_out(unet), out_before)  # lora_B starts at zero
    assert "peft_config" not in vars(unet) and "peft_config" not in vars(te)

    randomize_lora(params)
    assert not torch.allclose(unet_out(unet), out_before, atol=1e-3)

    remove_lora(roots)
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q is linear
    for key, root in roots.items():
        assert state_hash(root) == hashes[key]
        assert structure(root) == shapes[key]
        assert not any(p.requires_grad for p in root.parameters())
    assert torch.equal(unet_out(unet), out_before)
    remove_lora(roots)  # idempotent


def test_state_dict_round_trip(tiny_components):
    roots = {"lora_unet": tiny_components["unet"], "lora_te": tiny_components["text_encoder"]}
    params = inject(roots)
    randomize_lora(params, seed=3)
    state = lora_state_dict(roots)
    assert "lora_unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    assert "lora_te.encoder.layers.1.mlp.fc2.lora_B.weight" in state or \
        "lora_te.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in state
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and not v.requires_grad for v in state.values())
    first = next(iter(state))
    state[first].add_(1.0)  # a copy: the live weight is untouched
    assert not torch.equal(lora_state_dict(roots)[first], state[first])
    state[first].sub_(1.0)

    randomize_lora(params, seed=4)
    load_lora_state_dict(roots, state)
    after = lora_state_dict(roots)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_load_is_strict_and_names_keys(tiny_components):
    roots = {"lora_unet": tiny_components["unet"]}
    inject(roots)
    state = lora_state_dict(roots)
    missing_key = next(iter(state))
    partial = {k: v for k, v in state.items() if k != missing_key}
    with pytest.raises(KeyError, match="missing keys: " + missing_key.replace(".", r"\.")):
        load_lora_state_dict(roots, partial)
    load_lora_state_dict(roots, partial, strict=False)
    with pytest.raises(KeyError, match=r"unexpected keys: lora_unet\.nope\.lora_A\.weight"):
        load_lora_state_dict(roots, {**state, "lora_unet.nope.lora_A.weight": torch.zeros(1)})
    wrong = dict(state)
    wrong[missing_key] = torch.zeros(7, 7)
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_dict(roots, wrong)


def test_bad_targets_and_double_injection_are_refused(tiny_components):
    unet = tiny_components["unet"]
    with pytest.raises(ValueError, match="'to_qq'"):
        inject_lora({"lora_unet": unet}, rank=2, alpha=2, dropout=0, unet_targets=["to_qq"], te_targets=[])
    with pytest.raises(ValueError, match="GroupNorm"):
        inject_lora({"lora_unet": unet}, rank=2, alpha=2, dropout=0, unet_targets=["norm"], te_targets=[])
    assert not lora_modules(unet)
    inject({"lora_unet": unet})
    with pytest.raises(ValueError, match="already has LoRA layers"):
        inject({"lora_unet": unet})
