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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import UserError
from lora_trainer.validation import inside, short_repr

KEEP_LAST = 3
TRAINING_STATE = "training_state"  # .json (structure and numbers) + .safetensors (its tensors)
TMP_SUFFIX = ".tmp"


class CheckpointError(UserError):
    """A checkpoint folder that cannot be read or does not belong to the run that asks for it."""


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


def save_checkpoint(run_dir: str | Path, progress: Progress, lora_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, extra_files: dict[str, Any] | None = None
                    ) -> Path:
    """Write ``<run_dir>/step-NNNNNN`` whole or not at all; keep this run's last :data:`KEEP_LAST`.

    Files are written into ``.step-NNNNNN.tmp`` and the folder is renamed when complete; an interrupted write
    leaves only that temporary folder, which :func:`remove_unfinished` deletes at the next start.
    """
    from safetensors.torch import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = step_folder(run_dir, progress.global_step)
    tmp = inside(run_dir, f".{final.name}{TMP_SUFFIX}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    lora = {k: v.detach().contiguous().cpu() for k, v in lora_state.items()}
    (tmp / "lora_state.safetensors").write_bytes(save(lora))  # Python I/O: a full disk is a plain OSError
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "rng": rng_state()}, tensors)
    (tmp / f"{TRAINING_STATE}.safetensors").write_bytes(save(tensors))
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
    for old in list_checkpoints(run_dir)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def step_folder(run_dir: str | Path, global_step: int) -> Path:
    """The folder of the checkpoint a run writes after ``global_step`` updates."""
    return inside(run_dir, f"step-{global_step:06d}")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of one run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_unfinished(folder: str | Path) -> list[Path]:
    """Delete what interrupted writes left in ``folder``: ``.step-*.tmp`` folders and ``.*.tmp`` files."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(TMP_SUFFIX):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@dataclass
class LoadedCheckpoint:
    path: Path
    progress: Progress
    lora_state: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]


def read_progress(path: str | Path) -> Progress:
    """The ``progress.json`` of a checkpoint folder; CheckpointError when it cannot be read."""
    path = Path(path)
    try:
        return Progress(**json.loads((path / "progress.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable: progress.json: {short_repr(str(err))}") from None


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint folder (JSON and safetensors only: no pickled code runs).

    A missing, truncated or corrupt file raises CheckpointError naming the folder and the file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    progress = read_progress(path)
    if not (path / f"{TRAINING_STATE}.json").is_file():
        raise CheckpointError(f"{path} has no {TRAINING_STATE}.json (written by an older lora-trainer?); "
                              f"start the run again without resume_from")
    current = f"{TRAINING_STATE}.json"
    try:
        skeleton = json.loads((path / current).read_text(encoding="utf-8"))
        current = f"{TRAINING_STATE}.safetensors"
        state = _join_tensors(skeleton, load_file(str(path / current)))
        current = "lora_state.safetensors"
        lora_state = load_file(str(path / current))
        return LoadedCheckpoint(path, progress, lora_state, state["optimizer"], state["scheduler"], state["rng"])
    except Exception as err:  # noqa: BLE001 - safetensors, json and a damaged structure raise many kinds
        raise CheckpointError(f"checkpoint {path} is unreadable: {current}: {short_repr(str(err))}") from None


def restore_training_state(loaded: LoadedCheckpoint, load_weights: Callable[[dict[str, torch.Tensor]], None],
                           optimizer: torch.optim.Optimizer, scheduler: Any, what: str) -> Progress:
    """Put a checkpoint's trained weights (through ``load_weights``), optimizer, schedule and RNG back; its
    progress. A checkpoint that does not fit (``what``: the run's LoRA layers, its adapter) is a CheckpointError."""
    try:
        load_weights(loaded.lora_state)
        optimizer.load_state_dict(loaded.optimizer)
        scheduler.load_state_dict(loaded.scheduler)
        restore_rng_state(loaded.rng)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {loaded.path} does not fit this run's {what} ({str(err)[:300]}); start a "
                              "new run without resume_from") from None
    return loaded.progress


def load_newest_readable(run_dir: str | Path, warn: Any = print) -> LoadedCheckpoint | None:
    """The newest checkpoint of a run that reads completely; a damaged newer one is skipped with a warning."""
    candidates = list_checkpoints(run_dir)[::-1]
    for index, path in enumerate(candidates):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            older = candidates[index + 1].name if index + 1 < len(candidates) else None
            warn(f"{err}; " + (f"falling back to the previous checkpoint {older}" if older else
                               "no older checkpoint is left"))
    return None


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
