"""Resumable checkpoints: LoRA weights, optimizer, schedule, RNG and data position, written atomically.

Nothing is pickled: tensors go to safetensors files and everything else to JSON. Pickled ``.pt`` files are
also what the WebUI's ``torch.load`` replacement refuses when newer torch releases write them, so a run
could not be resumed inside the WebUI.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_DIR = "checkpoints"
KEEP_LAST = 3
TRAINING_STATE = "training_state"  # .json (structure and numbers) + .safetensors (its tensors)


@dataclass
class Progress:
    """Where a run stands: updates done and micro-batches consumed, and the losses so far."""

    global_step: int = 0
    micro_step: int = 0
    losses: list[float] = field(default_factory=list)
    started_at: float = 0.0


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    state["python_version"] = random.getstate()[0]
    state["python_gauss"] = random.getstate()[2]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def save_checkpoint(output_dir: str | Path, progress: Progress, lora_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, extra_files: dict[str, Any] | None = None
                    ) -> Path:
    """Write ``<output_dir>/checkpoints/step-NNNNNN`` whole or not at all; keep the last few."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.global_step:06d}"
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in lora_state.items()}, str(tmp / "lora_state.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": rng_state()}, tensors)
    save_file(tensors, str(tmp / f"{TRAINING_STATE}.safetensors"))
    (tmp / f"{TRAINING_STATE}.json").write_text(json.dumps(skeleton), encoding="utf-8")
    (tmp / "progress.json").write_text(json.dumps(asdict(progress)), encoding="utf-8")
    for name, write in (extra_files or {}).items():
        write(tmp / name)
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` -> newest checkpoint in output_dir (None when there is none); else the given folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"resume_from: {path} is not a checkpoint folder (no progress.json in it)")
    return path


@dataclass
class LoadedCheckpoint:
    path: Path
    progress: Progress
    lora_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint folder (JSON and safetensors only: no pickled code runs)."""
    path = Path(path)
    progress = Progress(**json.loads((path / "progress.json").read_text(encoding="utf-8")))
    if not (path / f"{TRAINING_STATE}.json").is_file():
        raise FileNotFoundError(f"{path} has no {TRAINING_STATE}.json (written by an older lora-trainer?); "
                                f"start the run again without resume_from")
    skeleton = json.loads((path / f"{TRAINING_STATE}.json").read_text(encoding="utf-8"))
    state = _join_tensors(skeleton, load_file(str(path / f"{TRAINING_STATE}.safetensors")))
    return LoadedCheckpoint(path, progress, load_file(str(path / "lora_state.safetensors")),
                            state["optimizer"], state["scheduler"], state["rng"])


def _split_tensors(value: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """``value`` as JSON-able data, its tensors moved to ``tensors`` (tuples and non-string keys kept)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone().contiguous()  # safetensors refuses shared storage
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _split_tensors(item, tensors, f"{path}.{key}") for key, item in value.items()}
        return {"__items__": [[key, _split_tensors(item, tensors, f"{path}.{index}")]
                              for index, (key, item) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_split_tensors(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`_split_tensors`."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {key: _join_tensors(item, tensors) for key, item in value["__items__"]}
        if "__tuple__" in value:
            return tuple(_join_tensors(item, tensors) for item in value["__tuple__"])
        return {key: _join_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_join_tensors(item, tensors) for item in value]
    return value
