"""Forge's loaded weights made trainable for one run, and put back exactly as they were afterwards.

Forge loads checkpoints under ``torch.inference_mode()``, so every parameter is an *inference tensor*:
autograd refuses to save one for backward, and LoRA training needs backward through every frozen layer
after the first LoRA. Its layers are also Forge's own ``Linear`` class (an ``nn.Module`` that is not an
``nn.Linear``), which LoRA libraries do not wrap. For the length of a run:

* :class:`ThawedTensors` replaces each inference parameter and buffer with an ordinary copy (one module at a
  time, each original freed once replaced, so the weights are never held twice) and, at the end, with an
  inference copy again, with the original ``requires_grad``;
* :class:`LinearSwap` puts a ``torch.nn.Linear`` holding the very same parameter objects in place of each of
  Forge's ``Linear`` modules, and the original module objects back at the end.

Nothing here imports Forge; its modules are recognised by their attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lora_trainer.errors import UserError


@dataclass
class _Thawed:
    module: nn.Module
    name: str
    is_parameter: bool
    requires_grad: bool


def _copy_parameter(tensor: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=requires_grad)


class ThawedTensors:
    """Inference-mode parameters and buffers of ``modules`` swapped for ordinary tensors until :meth:`refreeze`.

    Idempotent over several calls of :meth:`thaw` (only tensors that are still inference tensors change); a
    tensor shared by two modules stays shared.
    """

    def __init__(self) -> None:
        self._thawed: list[_Thawed] = []

    def __len__(self) -> int:
        return len(self._thawed)

    @torch.no_grad()
    def thaw(self, modules: list[nn.Module]) -> int:
        """Thaw every inference tensor below ``modules``; return how many were replaced."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("cannot make trainable tensors inside torch.inference_mode()")
        # id of an original -> its copy. Originals are not kept: each is freed once no module holds it, so the
        # weights are never held twice. An id is only looked up for an original still held by a module, which
        # was alive alongside every freed one, so a stale id cannot match it.
        replaced: dict[int, torch.Tensor] = {}
        before = len(self._thawed)
        for root in modules:
            for module in root.modules():
                for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
                    for name, tensor in list(table.items()):
                        if tensor is None or not tensor.is_inference():
                            continue
                        if id(tensor) not in replaced:
                            replaced[id(tensor)] = (_copy_parameter(tensor, tensor.requires_grad) if is_parameter
                                                    else tensor.clone())
                        table[name] = replaced[id(tensor)]
                        self._thawed.append(_Thawed(module, name, is_parameter, tensor.requires_grad))
        return len(self._thawed) - before

    def refreeze(self) -> None:
        """Inference copies of the current values back in place, with the original ``requires_grad``."""
        done: dict[int, torch.Tensor] = {}  # id of a thawed tensor -> its frozen copy (ids as in thaw)
        with torch.inference_mode():
            for item in reversed(self._thawed):
                table = item.module._parameters if item.is_parameter else item.module._buffers
                current = table[item.name]
                if current.is_inference():
                    continue  # already put back
                if id(current) not in done:
                    done[id(current)] = (_copy_parameter(current, item.requires_grad) if item.is_parameter
                                         else current.clone())
                table[item.name] = done[id(current)]
        self._thawed.clear()


def is_forge_linear(module: nn.Module) -> bool:
    """A Linear layer of Forge's own operations (computes ``F.linear(x, weight, bias)``), not a torch one."""
    return (not isinstance(module, nn.Linear) and type(module).__name__ == "Linear"
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


_STREAMED = ("Forge streams part of the model from the CPU on every step (it does not fit in the GPU memory Forge "
             "gives it); raise 'GPU Weights' at the top of the page, close other models and try again")


def _refusal(path: str, module: nn.Module, devices: set[torch.device]) -> str | None:
    """Why a Forge Linear cannot be trained through as a :class:`CastingLinear` (``None`` when it can).

    Forge builds some parts with "manual cast" Linears, which cast their weights to the input's device and dtype
    on every call (its CLIP text encoders always: weights stored in fp16, computed in fp32). A
    :class:`CastingLinear` casts the same way, so that is trained through while the part's weights stay on one
    device (``devices``: those of the part's parameters); layers Forge streams from the CPU are refused.
    """
    if hasattr(module, "prev_parameters_manual_cast"):  # set by Forge's memory manager on layers it offloads
        return f"{_STREAMED} (Forge streams this layer from {module.weight.device})"
    if len(devices) > 1:
        return f"{_STREAMED} (its weights are spread over {', '.join(sorted(map(str, devices)))})"
    if getattr(module, "scale_weight", None) is not None or getattr(module, "forge_online_loras", None):
        return "the checkpoint is stored scaled/quantized or has online LoRAs applied; load a plain fp16/fp32 one"
    if not module.weight.dtype.is_floating_point or module.weight.dtype.itemsize < 2:
        return (f"its weights are stored as {module.weight.dtype}; set Forge's Diffusion in Low Bits to Automatic "
                f"(fp16/bf16/fp32) to train a LoRA")
    return None


class CastingLinear(nn.Linear):
    """An ``nn.Linear`` (so LoRA layers wrap it) that computes in its input's dtype, as Forge's Linear does.

    Forge stores some weights in a narrower dtype than it computes in and casts them per call; casting a
    weight already in the input's dtype is free (``Tensor.to`` returns it as it is).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class LinearSwap:
    """Forge ``Linear`` modules below a root replaced by :class:`CastingLinear` modules sharing their parameters."""

    def __init__(self) -> None:
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, child name, original)

    def __len__(self) -> int:
        return len(self._swapped)

    def swap(self, root: nn.Module) -> int:
        """Swap every Forge Linear below ``root``; raise :class:`UserError` (swapping nothing) if one cannot be."""
        found = [(path, module) for path, module in root.named_modules() if is_forge_linear(module)]
        devices = {p.device for p in root.parameters()}
        for path, module in found:
            reason = _refusal(path, module, devices)
            if reason:
                raise UserError(f"cannot train on this model as Forge holds it ({path}): {reason}")
        for path, module in found:
            parent_path, _, child = path.rpartition(".")
            parent = root.get_submodule(parent_path) if parent_path else root
            linear = CastingLinear(module.weight.shape[1], module.weight.shape[0], bias=module.bias is not None,
                                   device="meta")
            linear.weight = module.weight
            linear.bias = module.bias
            linear.train(module.training)
            setattr(parent, child, linear)
            self._swapped.append((parent, child, module))
        return len(found)

    def restore(self) -> None:
        """The original Forge modules back in place, holding the parameters the swapped ones hold now."""
        for parent, child, original in reversed(self._swapped):
            base = getattr(parent, child)
            if hasattr(base, "get_base_layer"):  # LoRA layers still in place: keep their base weights
                base = base.get_base_layer()
            original.weight = base.weight
            original.bias = base.bias
            setattr(parent, child, original)
        self._swapped.clear()
