"""Frozen weights dropped from memory while they are not needed, and read back from the checkpoint file.

Once latents and text-encoder outputs are cached, a CLI run on the CPU has no use for the VAE and the text
encoders until it renders a preview; the VAE's decoder is not needed before the first preview at all. Their
parameters are swapped for ``meta`` tensors (their memory is given back) and, when something needs them again,
the module is rebuilt from the checkpoint by the loader's own code and its tensors are assigned back in place,
so every reference to the module stays valid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from lora_trainer.models.weights import ModelLoadError

#: Builds a fresh copy of one module, filled from the checkpoint (the loader's own build function).
Rebuild = Callable[[], nn.Module]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def return_freed_memory() -> None:
    """Hand memory freed inside the C heap back to the system. glibc keeps freed blocks below its (growing)
    mmap threshold in the process, so released weights would otherwise still count as resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _parts(module: nn.Module, parts: Iterable[str] | None) -> list[nn.Module]:
    return [module] if parts is None else [module.get_submodule(part) for part in parts]


def is_released(module: nn.Module, parts: Iterable[str] | None = None) -> bool:
    """Whether any parameter of ``module`` (or of its submodules ``parts``) is released (on ``meta``)."""
    return any(p.is_meta for part in _parts(module, parts) for p in part.parameters())


def release(module: nn.Module, parts: Iterable[str] | None = None) -> None:
    """Swap the parameters of ``module`` (or of its submodules ``parts``) for meta tensors of the same shape
    and dtype; their memory is freed once nothing else holds them. Buffers stay."""
    for part in _parts(module, parts):
        for owner in part.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and not param.is_meta:
                    owner._parameters[name] = nn.Parameter(param.detach().to("meta"),
                                                           requires_grad=param.requires_grad)
    return_freed_memory()


class CheckpointSource:
    """The checkpoint file a backbone was read from, and how to rebuild each of its released modules."""

    def __init__(self, path: Path, rebuilds: dict[str, Rebuild]) -> None:
        self.path = path
        self.rebuilds = rebuilds
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int]:
        stat = self.path.stat()
        return stat.st_size, stat.st_mtime_ns

    def can_rebuild(self, name: str) -> bool:
        return name in self.rebuilds

    def restore(self, name: str, module: nn.Module, device: torch.device) -> None:
        """Fill the released parameters of ``module`` (the backbone's attribute ``name``) from the checkpoint,
        each in the dtype it had, on ``device``."""
        try:
            changed = self._stat() != self._stamp
        except OSError as error:
            raise ModelLoadError(f"{self.path} can no longer be read ({error}); the {name} was released from "
                                 f"memory after caching and cannot be read back") from None
        if changed:
            raise ModelLoadError(f"{self.path} changed on disk since it was loaded; the {name} was released from "
                                 f"memory after caching and cannot be read back from the changed file")
        fresh = self.rebuilds[name]()
        dtypes = {key: tensor.dtype for key, tensor in module.state_dict(keep_vars=True).items()}
        weights = {key: tensor.to(device=device, dtype=dtypes.get(key, tensor.dtype))
                   if tensor.is_floating_point() else tensor.to(device)
                   for key, tensor in fresh.state_dict().items()}
        del fresh
        module.load_state_dict(weights, strict=True, assign=True)
        module.to(device)  # buffers outside the state dict
