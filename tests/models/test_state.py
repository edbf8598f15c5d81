"""Snapshot and restore of what training may change on a live model."""

from __future__ import annotations

import pytest
from torch import nn

from lora_trainer.host.forge_blocks import _copy_input_when_training
from lora_trainer.models.state import restore_model_state, snapshot_model_state


def test_requires_grad_and_train_flags_come_back():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).eval()
    model[1].weight.requires_grad_(False)
    state = snapshot_model_state(model)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    restore_model_state(model, state)
    assert not model.training and not model[1].training
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, True]


def test_a_hook_of_ours_left_behind_is_reported_by_module_name():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[0].register_forward_hook(lambda *args: None)  # the host's own hook stays: it was there before
    state = snapshot_model_state(model)
    handle = model[1].register_forward_pre_hook(_copy_input_when_training)
    with pytest.raises(RuntimeError, match=r"hooks left on the model: \['1'\]"):
        restore_model_state(model, state)
    handle.remove()
    restore_model_state(model, state)


def test_hooks_the_host_library_adds_stay_and_removed_host_hooks_are_reported():
    """transformers >= 4.5x hooks its layers on the first call that asks for hidden states: not ours to judge."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    host_hook = model[0].register_forward_hook(lambda *args: None)
    state = snapshot_model_state(model)
    model[1].register_forward_hook(lambda *args: None)
    restore_model_state(model, state)
    host_hook.remove()
    with pytest.raises(RuntimeError, match=r"host hooks removed: \['0'\]"):
        restore_model_state(model, state)


def test_a_forward_override_or_a_swapped_module_is_reported():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    state = snapshot_model_state(model)
    model[0].forward = lambda x: x
    with pytest.raises(RuntimeError, match="forward overrides left"):
        restore_model_state(model, state)
    del model[0].forward
    original = model[1]
    model[1] = nn.Sequential(original)
    with pytest.raises(RuntimeError, match="module structure differs"):
        restore_model_state(model, state)
    model[1] = original
    restore_model_state(model, state)
