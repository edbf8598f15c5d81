"""Checkpoint tensors into modules without ever holding the model twice.

Modules are built on the meta device (accelerate's ``init_empty_weights``: parameters without storage, buffers
real), then filled with ``load_state_dict(assign=True)``: each parameter *becomes* a tensor from the file, in the
training dtype on the training device; nothing is allocated twice. A ``.safetensors`` file's header (checked by
safetensors itself) gives each tensor's place in the file.

Where the file already holds a tensor in the training dtype, at an offset aligned as torch's allocator aligns
(see :data:`ALIGNMENT`), and the training runs on the CPU, the tensor is a view of a private (copy-on-write)
memory mapping of the file: nothing is read or copied at load, the weights' pages are the page cache's own,
brought in by the first step that uses them, and clean: under memory pressure the system can drop them and read
them again rather than swap (README's performance section has the time it saves). Results are the same, to the
bit, as from allocated memory. Each :meth:`CheckpointFile.tensors` call maps the file anew, so a component
released from memory (its views dropped) unmaps its pages. The file must not be rewritten in place while a run
uses it (a new file renamed over it is safe: the mapping keeps the old one).

Other tensors (converted to another dtype, bound for a GPU, unaligned, or where the platform cannot map the file) are
read straight into memory of their own (one copy from the page cache), through one scratch buffer when converted.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lora_trainer.errors import UserError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
EXPECTED = ("expected a Stable Diffusion 1.x/2.x/SDXL single-file checkpoint (.safetensors, .ckpt or .pt) "
            "or a diffusers folder (model_index.json with unet/, vae/, text_encoder/, tokenizer/)")
M = TypeVar("M", bound=nn.Module)
#: torch's CPU allocator aligns to 64 bytes (a cache line). A file's tensor at another offset is read into memory of
#: its own: CPU kernels round some unaligned operands differently in the last bit (convolutions), and run slower on
#: operands that straddle cache lines (SD1.5 matrices mapped at 4-byte offsets: 1.5-6% more time per step).
ALIGNMENT = 64


class ModelLoadError(UserError):
    """A base model file or folder that cannot be loaded; the message names the file and what was expected."""


def listed(keys: list[str], limit: int = 6) -> str:
    """``a, b, c (and 4 more)``."""
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _torch_load(path: Path) -> dict[str, Any]:
    """``torch.load`` of plain weights only; memory-mapped when the file is in the zip format."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelLoadError(
            f"{path}: refused to unpickle it: the file holds Python objects other than tensors, and loading "
            f"them could run arbitrary code. Only plain weights are read (torch.load(weights_only=True)). "
            f"Convert the checkpoint to .safetensors with a tool you trust, or use a .safetensors "
            f"version of this model. (torch said: {str(error).splitlines()[0]})") from error
    except Exception as error:
        raise ModelLoadError(f"{path} is not a readable PyTorch checkpoint ({error})") from error


def _only_tensors(path: Path, data: Any) -> dict[str, torch.Tensor]:
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds a {type(data).__name__}, not a dictionary of weights; {EXPECTED}")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _meta_tensor(view: Any) -> torch.Tensor:
    """A tensor with the shape and dtype of a safetensors slice and no data."""
    return torch.empty(view.get_shape(), dtype=_DTYPES.get(view.get_dtype(), torch.uint8), device="meta")


class CheckpointFile:
    """The tensors of a ``.safetensors`` / ``.ckpt`` / ``.pt`` file (a ``state_dict`` wrapper is unwrapped).

    :attr:`index` maps every name to a tensor with its shape and dtype (for ``.safetensors``, meta tensors made
    from the header: no data read); :meth:`tensors` reads the tensors under a prefix.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        suffix = path.suffix.lower()
        if suffix not in CHECKPOINT_SUFFIXES:
            raise ModelLoadError(f"{path}: unknown file type {suffix or '(none)'!r}; {EXPECTED}")
        self.is_safetensors = suffix == ".safetensors"
        self._loaded: dict[str, torch.Tensor] | None = None
        self.index = self._read_index()
        if not self.is_safetensors:
            self._loaded = self.index

    def _read_index(self) -> dict[str, torch.Tensor]:
        """Every tensor: for ``.safetensors`` as meta tensors from the header alone (safetensors checks it)."""
        if not self.is_safetensors:
            return _only_tensors(self.path, _torch_load(self.path))
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                index = {k: _meta_tensor(handle.get_slice(k)) for k in handle.keys()}
            self._places = _data_places(self.path)
        except Exception as error:  # safetensors raises its own error types (and OSError) for bad files
            raise ModelLoadError(f"{self.path} is not a readable .safetensors file ({error})") from error
        return index

    def shapes(self, *prefixes: str) -> dict[str, torch.Tensor]:
        """The tensors whose names start with one of ``prefixes`` as ``meta`` tensors: names, shapes and dtypes
        only, nothing read."""
        return {k: v if v.is_meta else v.to("meta") for k, v in self.index.items() if k.startswith(prefixes)}

    def tensors(self, *prefixes: str, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with one of ``prefixes`` (names unchanged), floating point in
        ``dtype``, on ``device``, never sharing memory with another call's. From a ``.safetensors`` file: a view
        of the mapped file where no conversion is needed on the CPU and the file holds the tensor aligned (see the
        module's docstring); otherwise read
        straight into its own memory, or, when it must be converted, into one scratch buffer reused for every such
        tensor (a buffer per tensor leaves the allocator's heap full of freed holes too small for the converted
        tensors: ~20% more RSS)."""
        device = torch.device(device)
        names = sorted(k for k in self.index if k.startswith(prefixes))
        if self._loaded is not None:
            return {k: _copied(self._loaded[k], device, dtype) for k in names}
        converted = [k for k in names if self._needs_conversion(self.index[k], device, dtype)]
        scratch = torch.empty(max((self._bytes(k) for k in converted), default=0), dtype=torch.uint8)
        mapping = self._mapping() if len(converted) < len(names) else None
        out: dict[str, torch.Tensor] = {}
        try:
            with open(self.path, "rb", buffering=0) as handle:
                for name in names:
                    meta, size = self.index[name], self._checked_bytes(name)
                    if not self._needs_conversion(meta, device, dtype):
                        view = self._mapped_view(mapping, name)
                        out[name] = view if view is not None else self._read_into(
                            handle, name, torch.empty(meta.shape, dtype=meta.dtype))
                        continue
                    raw = scratch[:size].view(meta.dtype).view(meta.shape)
                    target = dtype if meta.is_floating_point() else meta.dtype
                    out[name] = torch.empty(meta.shape, dtype=target, device=device)
                    out[name].copy_(self._read_into(handle, name, raw))
        except OSError as error:
            raise ModelLoadError(f"{self.path} could not be read ({error})") from error
        return out

    def _mapping(self) -> torch.Tensor | None:
        """The whole file as bytes, mapped privately (writes stay in this process); None where it cannot be."""
        try:
            storage = torch.UntypedStorage.from_file(str(self.path), False, self.path.stat().st_size)
        except (OSError, RuntimeError):  # a platform or file system without private mappings: read instead
            return None
        return torch.empty(0, dtype=torch.uint8).set_(storage)

    def _mapped_view(self, mapping: torch.Tensor | None, name: str) -> torch.Tensor | None:
        """``name`` as a view of ``mapping``; None when there is none, when the file is now shorter than the header
        says (reading then names the tensor), or when the data is not at the allocator's alignment (see
        :data:`ALIGNMENT`)."""
        start, end = self._places[name]
        meta = self.index[name]
        if mapping is None or end > mapping.numel() or start % ALIGNMENT:
            return None
        return mapping[start:end].view(meta.dtype).view(meta.shape)

    def _bytes(self, name: str) -> int:
        start, end = self._places[name]
        return end - start

    def _checked_bytes(self, name: str) -> int:
        """The bytes of ``name`` in the file, which must be what its shape and dtype take."""
        meta = self.index[name]
        if meta.numel() * meta.element_size() != self._bytes(name):
            raise ModelLoadError(f"{self.path}: the tensor {name} has a data type this loader cannot read")
        return self._bytes(name)

    @staticmethod
    def _needs_conversion(meta: torch.Tensor, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type != "cpu" or (meta.is_floating_point() and meta.dtype != dtype)

    def _read_into(self, handle: Any, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (contiguous, of the file's shape and dtype: see :meth:`_checked_bytes`) filled with the bytes
        of ``name``."""
        start, end = self._places[name]
        handle.seek(start)
        target = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
        done = 0
        while done < end - start:
            read = handle.readinto(target[done:])
            if not read:
                raise ModelLoadError(f"{self.path} ends early, inside the tensor {name}: the file was cut short or "
                                     f"changed while it was read")
            done += read
        return tensor


def _data_places(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a ``.safetensors`` file: an 8-byte little-endian header length, the JSON
    header (``data_offsets`` relative to the data after it), then the data."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    base = 8 + length
    return {name: (base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
            for name, info in header.items() if name != "__metadata__"}


@contextmanager
def empty_modules() -> Iterator[None]:
    """Build modules on the meta device: parameters take no memory and are not initialised; buffers are real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def build_empty(factory: Callable[[], M]) -> M:
    """``factory()`` with its parameters on the meta device (see :func:`empty_modules`)."""
    with empty_modules():
        return factory()


def _copied(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A new tensor in ``dtype`` (floating point only) on ``device``."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def fill_module(module: nn.Module, weights: dict[str, torch.Tensor], *, what: str, source: Path,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    """Make ``weights`` the parameters of an empty ``module`` (assigned, not copied), in ``dtype`` on ``device``.

    Every parameter must be filled and every weight used (``position_ids`` buffers excepted: the module has
    its own); otherwise a :class:`ModelLoadError` names what is missing or left over.
    """
    device = torch.device(device)
    weights = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)  # no copy when in place
               for k, v in weights.items() if not k.endswith("position_ids")}
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise ModelLoadError(f"{source}: the {what} weights do not fit the architecture described by its "
                             f"config: {str(error).splitlines()[-1].strip()}") from error
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {listed(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {listed(unexpected)}" if unexpected else ""]
        raise ModelLoadError(f"{source}: the {what} weights do not match the architecture described by its "
                             f"config ({'; '.join(p for p in parts if p)}). If a .yaml sits beside the "
                             f"checkpoint, check that it belongs to this model.")
    if device.type != "meta":  # on meta: the weights' names and shapes checked, the data read later
        module.to(device)  # buffers the file does not hold (position ids)
    module.eval()


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``modules``."""
    return sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
