"""Capture and restore what training may change on a live model, and hash its weights.

Used around every run so that a model handed to the trainer (the WebUI's loaded checkpoint above all) comes
back exactly as it was: the same weights, module objects, ``requires_grad``, train/eval and checkpointing flags.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# per-module gradient-checkpointing switches: ldm blocks, ldm res blocks, diffusers blocks
CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint", "gradient_checkpointing")


def model_weights_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes), in a fixed order."""
    digest = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ModelState:
    """What training may change on a live model, captured to be put back exactly."""

    requires_grad: dict[str, bool] = field(default_factory=dict)  # by name: a host may swap parameter objects
    training: dict[int, bool] = field(default_factory=dict)
    checkpoint_flags: dict[int, tuple[str, Any]] = field(default_factory=dict)
    module_types: list[tuple[str, type]] = field(default_factory=list)
    forward_overrides: list[str] = field(default_factory=list)
    hooks: dict[str, dict[int, Any]] = field(default_factory=dict)  # module name -> its hooks by handle id


HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
OWN_MODULES = ("lora_trainer", "peft")  # hooks from these are ours; libraries may add their own lazily


def _hooks(module: nn.Module) -> dict[int, Any]:
    return {key: hook for table in HOOK_TABLES for key, hook in getattr(module, table, {}).items()}


def _is_ours(hook: Any) -> bool:
    function = getattr(hook, "func", hook)  # functools.partial
    return getattr(function, "__module__", "").split(".")[0] in OWN_MODULES


def snapshot_model_state(model: nn.Module) -> ModelState:
    state = ModelState()
    for name, p in model.named_parameters():
        state.requires_grad[name] = p.requires_grad
    for name, module in model.named_modules():
        state.training[id(module)] = module.training
        state.module_types.append((name, type(module)))
        if "forward" in vars(module):
            state.forward_overrides.append(name)
        hooks = _hooks(module)
        if hooks:
            state.hooks[name] = hooks
        for flag in CHECKPOINT_FLAGS:
            if isinstance(getattr(module, flag, None), bool):
                state.checkpoint_flags[id(module)] = (flag, getattr(module, flag))
    return state


def _set_requires_grad(p: torch.Tensor, value: bool) -> None:
    """``requires_grad_`` that also works on inference tensors (Forge loads weights in inference mode)."""
    if p.is_inference():
        with torch.inference_mode():
            p.requires_grad_(value)
    else:
        p.requires_grad_(value)


def restore_model_state(model: nn.Module, state: ModelState) -> None:
    """Put requires_grad, train/eval and checkpointing flags back; fail loudly if modules were left behind."""
    for name, p in model.named_parameters():
        wanted = state.requires_grad.get(name, p.requires_grad)
        if p.requires_grad != wanted:
            _set_requires_grad(p, wanted)
    for module in model.modules():
        if id(module) in state.training:
            module.training = state.training[id(module)]
        if id(module) in state.checkpoint_flags:
            flag, value = state.checkpoint_flags[id(module)]
            setattr(module, flag, value)
    now = [(name, type(module)) for name, module in model.named_modules()]
    if now != state.module_types:
        raise RuntimeError("the model's module structure differs from before training (modules left behind)")
    overrides = [name for name, module in model.named_modules() if "forward" in vars(module)]
    if overrides != state.forward_overrides:
        left = sorted(set(overrides) - set(state.forward_overrides))
        raise RuntimeError(f"forward overrides left on the model: {left}")
    left, removed = [], []
    for name, module in model.named_modules():
        now, before = _hooks(module), state.hooks.get(name, {})
        if any(_is_ours(hook) for key, hook in now.items() if key not in before):
            left.append(name)
        if any(key not in now for key in before):
            removed.append(name)
    if left or removed:
        raise RuntimeError(f"hooks left on the model: {left[:5]}; host hooks removed: {removed[:5]}")
