"""Exact tensor-memory accounting on any device, for checking the memory plan where no CUDA counters exist.

:class:`TensorMemoryMeter` is a ``TorchDispatchMode``: every tensor an operator returns has its storage counted once
(by the storage's identity) until the storage is freed (a weak reference on it fires), so ``peak`` is the highest
sum of live tensor storages while it was active, byte for byte: what ``torch.cuda.max_memory_allocated`` reports on
a GPU, without the caching allocator's rounding. Process RSS is no use for this at small sizes (allocator arenas,
Python objects and libraries swamp a few MiB of tensors). Storages that existed before the meter started (weights,
caches) count only when passed to :meth:`track`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryMeter(TorchDispatchMode):
    """Live and peak bytes of tensor storages on ``device`` (a type: ``"cpu"``, ``"cuda"``...)."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def _add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        size = storage.nbytes()
        if key in self._sizes:
            if size != self._sizes[key]:  # resized in place
                self.live += size - self._sizes[key]
                self._sizes[key] = size
        else:
            self._sizes[key] = size
            self.live += size
            self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)
        self._refs.pop(key, None)

    def track(self, *objects: Any) -> None:
        """Count storages that already exist: tensors, modules (parameters, buffers, grads), optimizers (state)."""
        for obj in tree_flatten(objects)[0]:
            if isinstance(obj, torch.nn.Module):
                for tensor in [*obj.parameters(), *obj.buffers()]:
                    self._add(tensor)
                    if tensor.grad is not None:
                        self._add(tensor.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for value in state.values():
                        self._add(value)
            else:
                self._add(obj)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._add(tensor)
        return out
