"""LoRA snapshots of a run: one file every few epochs and one of the best validation step, to pick from.

They live in ``<output_dir>/snapshots/`` as ordinary kohya ``.safetensors`` LoRAs (kohya's own naming,
``<name>-000003.safetensors`` for epoch 3, plus ``<name>-best.safetensors``), so any of them can be installed
and used as the finished LoRA. Their metadata says which step, epoch and validation loss they hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_trainer.lora.export import load_lora_file, read_lora_metadata, save_lora
from lora_trainer.lora.inject import load_lora_state_dict, lora_state_dict
from lora_trainer.lora.kohya import from_kohya_state_dict, to_kohya_state_dict
from lora_trainer.train.layout import RunLayout

KIND_KEY = "lora_trainer_snapshot"  # metadata: "epoch", "best" or "final"
VALIDATION_KEY = "lora_trainer_validation_loss"


@dataclass(frozen=True)
class Snapshot:
    """One LoRA file of the run and what it holds."""

    path: Path
    kind: str  # "epoch", "best" (lowest validation loss) or "final" (the LoRA the run ended with)
    step: int
    epoch: int | None = None
    validation_loss: float | None = None

    @property
    def label(self) -> str:
        """How the picker and the grid name it, e.g. ``epoch 3 (step 120)``."""
        where = f"step {self.step}"
        if self.kind == "epoch":
            text = f"epoch {self.epoch} ({where})"
        elif self.kind == "best":
            text = f"best validation ({where})"
        else:
            text = f"final ({where})"
        return text + (f", val {self.validation_loss:.4f}" if self.validation_loss is not None else "")

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "step": self.step, "epoch": self.epoch,
                "validation_loss": self.validation_loss, "label": self.label}


def epoch_snapshot_path(output_dir: str | Path, name: str, epoch: int) -> Path:
    return RunLayout(Path(output_dir), name).snapshot_file(f"{epoch:06d}")


def best_snapshot_path(output_dir: str | Path, name: str) -> Path:
    return RunLayout(Path(output_dir), name).snapshot_file("best")


def preview_path(path: Path) -> Path:
    """``<name>.preview.png`` beside a LoRA file: the grid's picture of it (the WebUI's preview naming)."""
    return path.with_name(f"{path.stem}.preview.png")


def save_snapshot(path: Path, roots: dict[str, nn.Module], alpha: float, metadata: dict[str, str], *,
                  kind: str, validation_loss: float | None = None) -> Path:
    """The LoRA layers as they are now, written (atomically, replacing an older file) as a kohya LoRA."""
    meta = {**metadata, KIND_KEY: kind}
    if validation_loss is not None:
        meta[VALIDATION_KEY] = f"{validation_loss:.6g}"
    return save_lora(path, to_kohya_state_dict(roots, alpha), meta, overwrite=True)


def read_snapshot(path: Path, kind: str | None = None) -> Snapshot:
    """A snapshot's step, epoch and validation loss from its metadata."""
    meta = read_lora_metadata(path)
    loss = meta.get(VALIDATION_KEY)
    kind = kind or meta.get(KIND_KEY, "epoch")
    return Snapshot(path, kind, int(meta.get("ss_steps", 0)),
                    int(meta["ss_epoch"]) if kind == "epoch" and "ss_epoch" in meta else None,
                    float(loss) if loss else None)


def list_snapshots(output_dir: str | Path, name: str) -> list[Snapshot]:
    """The run's snapshots on disk, by step (the best one after the epoch it equals, if any)."""
    folder = RunLayout(Path(output_dir), name).snapshots_dir
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(name) + r"-(\d{6}|best)\.safetensors")
    found = []
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match:
            found.append(read_snapshot(path, "best" if match[1] == "best" else "epoch"))
    return sorted(found, key=lambda s: (s.step, s.kind == "best"))


def clear_snapshots(output_dir: str | Path, name: str) -> None:
    """Remove the snapshots (and their previews) an earlier run of ``name`` left: a fresh run replaces them."""
    for snapshot in list_snapshots(output_dir, name):
        snapshot.path.unlink(missing_ok=True)
        preview_path(snapshot.path).unlink(missing_ok=True)


def load_snapshot(roots: dict[str, nn.Module], path: Path) -> None:
    """Put a snapshot's weights into the injected LoRA layers (same rank and targets)."""
    load_lora_state_dict(roots, from_kohya_state_dict(load_lora_file(path), roots))


@contextmanager
def weights_of(roots: dict[str, nn.Module], path: Path | None = None,
               state: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the block the LoRA layers hold the snapshot at ``path`` (or ``state``); afterwards, exactly
    the weights they held before."""
    saved = lora_state_dict(roots)
    try:
        if path is not None:
            load_snapshot(roots, path)
        elif state is not None:
            load_lora_state_dict(roots, state)
        yield
    finally:
        load_lora_state_dict(roots, saved)
