"""LoRA layers on a causal LM with peft: target modules checked against the model, memory options applied."""

from __future__ import annotations

from typing import Any

import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.validation import ALL_LINEAR


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Names (last part) of the layers LoRA can adapt: Linear and GPT-2's Conv1D, without the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if module is not head and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(model: torch.nn.Module, targets: list[str]) -> str | list[str]:
    """``"all-linear"`` or the list of module names, each checked to match a layer of ``model``."""
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise UserError(f"target_modules: {', '.join(map(repr, missing))} match no layer of this "
                        f"{type(model).__name__}; its linear layers are: {', '.join(linear_layer_names(model))} "
                        f"(or use {ALL_LINEAR})")
    return list(targets)


def add_lora(model: Any, cfg: TrainConfig) -> Any:
    """Wrap ``model`` in a peft LoRA model for ``cfg``; only the LoRA weights train (kept in float32)."""
    from peft import LoraConfig, get_peft_model

    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad into checkpoints
    model.config.use_cache = False
    conv1d = any(type(module).__name__ == "Conv1D" for module in model.modules())  # GPT-2 stores W transposed
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=resolve_targets(model, list(cfg.target_modules)), bias="none",
                        fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return peft_model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained (LoRA) weights by parameter name, for checkpoints."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`trainable_state` back; the names must match exactly (same model and targets)."""
    params = trainable_state(model)
    if set(params) != set(state):
        raise UserError("the checkpoint's LoRA weights do not match this model and target_modules; resume with the "
                        "settings it was trained with, or start without resume_from")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.device, param.dtype))
