"""LoRA layers in and out of frozen modules, with peft; the base modules come back untouched.

Roots are keyed by their kohya prefix (``lora_unet``, ``lora_te``, ``lora_te1``, ``lora_te2``). Targets are
module-name suffixes (``to_q``, ``to_out.0``, ``q_proj``...), so diffusers modules and the WebUI's original
LDM modules are both matched by name, never by class.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER = "default"
UNET_PREFIX = "lora_unet"
PARTS = ("lora_A", "lora_B")


def _tuner_layer_type() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every peft LoRA layer in ``root`` by its module path (outermost wrappers only)."""
    tuner = _tuner_layer_type()
    found: dict[str, nn.Module] = {}
    inside: str | None = None  # named_modules is depth-first: a wrapper's own modules follow it
    for name, module in root.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, tuner):
            found[name] = module
            inside = f"{name}."
    return found


def is_target(name: str, targets: list[str]) -> bool:
    """Whether the module called ``name`` is one of ``targets`` (the whole name or its last dotted parts)."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _check_targets(prefix: str, root: nn.Module, targets: list[str]) -> None:
    if not targets:
        raise ValueError(f"{prefix}: no target modules given")
    names = [name for name, _ in root.named_modules() if name]
    missing = [t for t in targets if not any(is_target(name, [t]) for name in names)]
    if missing:
        raise ValueError(f"{prefix}: no module in {type(root).__name__} ends with {', '.join(map(repr, missing))}")
    for name, module in root.named_modules():
        if is_target(name, targets) and not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"{prefix}: target module {name!r} is a {type(module).__name__}; LoRA layers "
                             f"can only wrap Linear or Conv2d modules")


def inject_lora(roots: dict[str, nn.Module], *, rank: int, alpha: float, dropout: float,
                unet_targets: list[str], te_targets: list[str]) -> list[nn.Parameter]:
    """Wrap the target modules of every root in LoRA layers; return the LoRA parameters (float32).

    ``lora_unet`` gets ``unet_targets``, every other root ``te_targets``. All other parameters of the roots
    are frozen. ``lora_B`` starts at zero, so outputs are unchanged until training moves it.
    """
    from peft import LoraConfig, inject_adapter_in_model

    for prefix, root in roots.items():
        if lora_modules(root):
            raise ValueError(f"{prefix} already has LoRA layers; call remove_lora first")
        _check_targets(prefix, root, list(unet_targets if prefix == UNET_PREFIX else te_targets))
    params: list[nn.Parameter] = []
    for prefix, root in roots.items():
        targets = list(unet_targets if prefix == UNET_PREFIX else te_targets)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                            init_lora_weights=True, bias="none")
        attrs = vars(root)
        previous = attrs.get("peft_config")
        saved = dict(previous) if isinstance(previous, dict) else previous
        inject_adapter_in_model(config, root, adapter_name=ADAPTER)
        # peft records its config on the root; keep the root's attributes exactly as they were
        if "peft_config" in attrs and previous is None:
            del root.peft_config
        elif isinstance(previous, dict):
            previous.clear()
            previous.update(saved)
            root.peft_config = previous
        for layer in lora_modules(root).values():
            for part in PARTS:
                for param in getattr(layer, part)[ADAPTER].parameters():
                    param.data = param.data.float()
                    param.requires_grad_(True)
                    params.append(param)
    return params


def _lora_params(roots: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """``{prefix}.{module path}.lora_A.weight`` -> the live parameter."""
    out: dict[str, nn.Parameter] = {}
    for prefix, root in roots.items():
        for path, layer in lora_modules(root).items():
            for part in PARTS:
                out[f"{prefix}.{path}.{part}.weight"] = getattr(layer, part)[ADAPTER].weight
    return out


def lora_state_dict(roots: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Detached CPU float32 copies of the LoRA weights, keyed ``{prefix}.{module path}.lora_A.weight``."""
    return {key: p.detach().to("cpu", torch.float32, copy=True) for key, p in _lora_params(roots).items()}


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


@torch.no_grad()
def load_lora_state_dict(roots: dict[str, nn.Module], state: dict[str, torch.Tensor], *,
                         strict: bool = True) -> None:
    """Copy a :func:`lora_state_dict` back into the injected layers (shapes must match).

    ``strict`` also requires every injected layer to be present in ``state``; unknown keys always raise.
    """
    params = _lora_params(roots)
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state)) if strict else []
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        raise KeyError("LoRA state does not match the injected layers; " + "; ".join(parts))
    for key, value in state.items():
        param = params[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{key}: shape {tuple(value.shape)} in the state, {tuple(param.shape)} in the model "
                             f"(different rank or model?)")
        param.copy_(value)


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def remove_lora(roots: dict[str, nn.Module]) -> None:
    """Put every original base module back in place (the same objects); LoRA weights are dropped."""
    for root in roots.values():
        for path, layer in lora_modules(root).items():
            _set_child(root, path, layer.get_base_layer())
