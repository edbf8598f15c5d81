"""Write and read LoRA ``.safetensors`` files; a file appears whole or not at all."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lora_trainer.fsutil import atomic_write


def tensor_data_hash(data: bytes) -> str:
    """sha256 of a safetensors file's tensor bytes (after the header): the WebUI's ``sshs_model_hash``."""
    header_len = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def save_lora(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str], *,
              overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Save ``state`` (cast to ``dtype``, contiguous, CPU) with string ``metadata``, atomically.

    Adds ``sshs_model_hash`` (so the WebUI need not hash the file) unless given. An existing file raises
    FileExistsError naming it unless ``overwrite``.
    """
    from safetensors.torch import save

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"LoRA metadata values must be strings; not for: {', '.join(map(str, bad))}")
    if not state:
        raise ValueError(f"refusing to write {path}: the LoRA state is empty (no LoRA layers injected?)")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    metadata = dict(metadata)
    metadata.setdefault("sshs_model_hash", tensor_data_hash(save(tensors)))
    data = save(tensors, metadata=metadata)  # written with Python I/O: a full disk is a plain OSError
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty when it has none)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"{path} is not a readable .safetensors file: {err}") from err


def load_lora_file(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA ``.safetensors`` file, on CPU (no pickle is ever loaded)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise ValueError(f"{path} is not a readable .safetensors file: {err}") from err
