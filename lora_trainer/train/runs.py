"""Run identity: a run is its output_name, its data and the settings that shape its weights.

Each run keeps a record (``run.json``) and its checkpoints in ``<output_dir>/checkpoints/<name>-<run id>/``, so
``resume_from: latest`` resumes only the same run, pruning touches only that run's checkpoints, and resuming a
different run is refused with what differs. :func:`list_resumable_runs` finds interrupted runs after a restart.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.config import IMAGE_KEYS, TrainConfig
from lora_trainer.data.dataset import DatasetScan
from lora_trainer.fsutil import atomic_write_text
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train.layout import CHECKPOINT_DIR, RunLayout
from lora_trainer.validation import inside, short_repr

RECORD = "run.json"
RECORD_FORMAT = 1
# Settings that shape the weights or the order of the data; changing one makes another run. Cosmetic and
# machine-specific ones (samples, save cadence, device, precision, caching, logging) are not part of it.
IDENTITY_KEYS = ("task_type", "trigger_word", "resolution", "bucket", "repeats", "flip_aug", "caption_dropout",
                 "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "train_text_encoder", "epochs",
                 "max_steps", "learning_rate", "text_encoder_lr", "optimizer", "weight_decay", "max_grad_norm",
                 "scheduler", "warmup_steps", "min_snr_gamma", "noise_offset", "seed")
# a text-generation run: the same minus the image-only keys, plus what shapes its token sequences
TEXT_IDENTITY_KEYS = (*(key for key in IDENTITY_KEYS if key not in IMAGE_KEYS), "max_seq_length", "train_on_prompt",
                      "validation_split")
Log = Callable[[str], None]


class ResumeRefused(ckpt.CheckpointError):
    """A resume that would continue another run, or that has nothing to continue."""


class InterruptedRunExists(ResumeRefused):
    """A fresh start of a run whose interrupted checkpoints exist; ``status`` is e.g. ``"step 30/200"``."""

    def __init__(self, output_name: str, status: str, run_dir: Path) -> None:
        self.output_name, self.status, self.run_dir = output_name, status, run_dir
        super().__init__(f"an interrupted run of {output_name!r} with these data and settings exists ({status}, "
                         f"{run_dir}); resume it (--resume, or resume_from: latest), or set overwrite: true to "
                         "start it again from step 0")


def data_files(scan: DatasetScan, with_times: bool = True) -> dict[str, list]:
    """``relative path -> [size, mtime_ns, caption hash]`` of every usable image: cheap, and any edit shows.
    Without ``with_times``, ``[size, caption hash]`` (the same on a copy of the data on another machine)."""
    files: dict[str, list] = {}
    for item in scan.items:
        stat = item.path.stat()
        name = item.path.relative_to(scan.folder).as_posix() if scan.folder else str(item.path)
        caption = hashlib.sha256(item.caption.encode()).hexdigest()[:16]
        files[name] = [stat.st_size, stat.st_mtime_ns, caption] if with_times else [stat.st_size, caption]
    return files


def weight_settings(cfg: TrainConfig, processes: int = 1) -> dict[str, Any]:
    """The identity settings of ``cfg`` trained by ``processes`` data-parallel processes (``epochs`` only counts
    when ``max_steps`` is unset)."""
    keys = TEXT_IDENTITY_KEYS if cfg.task_type == "text-generation" else IDENTITY_KEYS
    settings = {key: getattr(cfg, key) for key in keys}
    settings["target_modules"] = list(cfg.target_modules)
    settings["base_model"] = Path(cfg.base_model).name if cfg.base_model else None
    # the batch per update, not how it is split: the out-of-memory ladder halves batch_size and doubles the
    # accumulation, a run may resume with a smaller batch that fits, or under another number of processes
    settings["effective_batch"] = cfg.batch_size * cfg.gradient_accumulation_steps * processes
    if cfg.max_steps:
        settings["epochs"] = None
    return settings


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@dataclass
class RunIdentity:
    """What makes a run the same run; ``run_id`` is a short hash of all of it."""

    output_name: str
    files: dict[str, list]
    settings: dict[str, Any]

    @property
    def data_hash(self) -> str:
        return _digest(self.files)[:16]

    @property
    def run_id(self) -> str:
        return _digest({"name": self.output_name, "data": self.data_hash, "settings": self.settings})[:12]

    @classmethod
    def of(cls, cfg: TrainConfig, scan: DatasetScan, processes: int = 1) -> RunIdentity:
        return cls(cfg.output_name, data_files(scan), weight_settings(cfg, processes))


def differences(record: dict[str, Any], identity: RunIdentity) -> list[str]:
    """Human lines: how the run recorded in ``record`` differs from ``identity`` (empty: the same run)."""
    lines = []
    if record.get("output_name") != identity.output_name:
        lines.append(f"output_name {record.get('output_name')!r} -> {identity.output_name!r}")
    old_settings = record.get("settings", {})
    for key in sorted(set(old_settings) | set(identity.settings)):
        before, now = old_settings.get(key), identity.settings.get(key)
        if before != now:
            lines.append(f"{key} {short_repr(before)} -> {short_repr(now)}")
    old_files = record.get("files", {})
    if old_files != identity.files:
        added = sorted(set(identity.files) - set(old_files))
        removed = sorted(set(old_files) - set(identity.files))
        changed = sorted(k for k in set(old_files) & set(identity.files) if old_files[k] != identity.files[k])
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in (("added", added), ("removed", removed), ("changed", changed)) if names]
        lines.append("training data: " + "; ".join(parts))
    return lines


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """A run folder's ``run.json``, or None when it is missing or unreadable."""
    try:
        record = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(inside(run_dir, RECORD), json.dumps(record, indent=1))


def run_dirs(root: Path, name: str | None = None) -> list[Path]:
    """Run folders in the checkpoints folder ``root`` (of runs named ``name`` when given) that have a record."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if path.is_dir() and not path.name.startswith("."):
            record = read_record(path)
            if record is not None and (name is None or record.get("output_name") == name):
                found.append(path)
    return found


def remove_stale_temporaries(layout: RunLayout) -> list[Path]:
    """Delete what a killed run named ``layout.output_name`` left half-written: temporary files (or folders) of
    its outputs (``.<name>.safetensors.*.tmp``), unfinished checkpoint folders of its runs, and the old layout's."""
    removed = []
    prefixes = tuple(f".{name}." for name in layout.output_names())
    if layout.output_dir.is_dir():
        for path in layout.output_dir.iterdir():
            if path.name.startswith(prefixes) and path.name.endswith(ckpt.TMP_SUFFIX) and not path.is_symlink():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    root = layout.checkpoints_root
    if root.is_dir():
        legacy = [p for p in root.iterdir() if p.name.startswith(".step-") and p.name.endswith(ckpt.TMP_SUFFIX)]
        for path in legacy:
            shutil.rmtree(path, ignore_errors=True)
        removed += legacy
    for run_dir in run_dirs(root, layout.output_name):
        removed += ckpt.remove_unfinished(run_dir)
    return removed


def prepare_output(layout: RunLayout, outputs: Iterable[Path], *, overwrite: bool, log: Callable[[str], None]
                   ) -> None:
    """Make ``layout.output_dir`` ready for a run (the main process's job, before anything is trained): refuse an
    existing one of ``outputs`` (the run's LoRA file or adapter folders) unless ``overwrite``, prove the folder
    writable, and remove what an interrupted run of the same name left half-written."""
    from lora_trainer.train import preflight

    for path in outputs:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; set overwrite: true or choose another output_name")
    preflight.check_output_dir(layout.output_dir)
    for path in remove_stale_temporaries(layout):
        log(f"removed {path.name}, left unfinished by an interrupted run")


@dataclass
class RunPlan:
    """The run about to start: its folder, its record and, when resuming, the checkpoint to continue."""

    run_dir: Path
    record: dict[str, Any]
    resume: ckpt.LoadedCheckpoint | None = None
    notes: list[str] = field(default_factory=list)


def _status(run_dir: Path, record: dict[str, Any]) -> str:
    found = ckpt.list_checkpoints(run_dir)
    step = ckpt.read_progress(found[-1]).global_step if found else 0
    return f"step {step}/{record.get('total_steps', '?')}"


def plan_run(cfg: TrainConfig, layout: RunLayout, identity: RunIdentity, total_steps: int, log: Log) -> RunPlan:
    """Decide what this run continues (if anything) and write its record; everything is refused before work.

    * no ``resume_from``: a new run. An interrupted run with the same identity is not thrown away unless
      ``overwrite`` (resume it instead); a finished one's old checkpoints are removed.
    * ``resume_from: latest``: the newest readable checkpoint of this same run (a damaged newer one is skipped
      with a warning). Checkpoints of the same name from another run are refused with what differs; no
      checkpoint at all is an error, not a silent fresh start.
    * ``resume_from: <folder>``: that checkpoint, when it belongs to this run.
    """
    run_dir = layout.run_dir(identity.run_id)
    record = read_record(run_dir)
    existing = ckpt.list_checkpoints(run_dir) if record is not None else []
    plan = RunPlan(run_dir, record or {})
    if not cfg.resume_from:
        if existing and not record.get("finished") and not cfg.overwrite:
            raise InterruptedRunExists(cfg.output_name, _status(run_dir, record), run_dir)
        for path in existing:
            shutil.rmtree(path, ignore_errors=True)
        if existing:
            plan.notes.append(f"removed {len(existing)} old checkpoint(s) of this run from {run_dir}")
    elif cfg.resume_from == "latest":
        plan.resume = _resume_latest(cfg, layout, identity, run_dir, record, existing, log)
    else:
        plan.resume = _resume_folder(Path(cfg.resume_from), identity)
    plan.record = {
        "format": RECORD_FORMAT, "output_name": identity.output_name, "run_id": identity.run_id,
        "data_hash": identity.data_hash, "settings": identity.settings, "files": identity.files,
        "total_steps": total_steps, "created_at": (record or {}).get("created_at", time.time()),
        "finished": False, "config": {**cfg.to_dict(), "resume_from": None},
    }
    write_record(run_dir, plan.record)
    return plan


def _resume_latest(cfg: TrainConfig, layout: RunLayout, identity: RunIdentity, run_dir: Path,
                   record: dict[str, Any] | None, existing: list[Path], log: Log) -> ckpt.LoadedCheckpoint:
    if existing:
        if record.get("finished"):
            raise ResumeRefused(f"resume_from: latest: the run {cfg.output_name!r} with these data and settings "
                                f"already finished; nothing to resume (start without resume_from to train it again)")
        loaded = ckpt.load_newest_readable(run_dir, warn=log)
        if loaded is None:
            raise ResumeRefused(f"resume_from: latest: no checkpoint of this run in {run_dir} can be read")
        return loaded
    others = [d for d in run_dirs(layout.checkpoints_root, cfg.output_name)
              if d != run_dir and ckpt.list_checkpoints(d)]
    if others:
        newest = max(others, key=lambda d: ckpt.list_checkpoints(d)[-1].stat().st_mtime)
        what = "; ".join(differences(read_record(newest) or {}, identity)) or "an unreadable run record"
        raise ResumeRefused(
            f"resume_from: latest: the checkpoints of {cfg.output_name!r} in {newest} belong to another run "
            f"({what}); put those back to resume it, or start without resume_from to train a new run")
    raise ResumeRefused(
        f"resume_from: latest: there is no checkpoint of {cfg.output_name!r} in {layout.checkpoints_root} to resume; "
        "start without --resume / resume_from to train a new run")


def _resume_folder(path: Path, identity: RunIdentity) -> ckpt.LoadedCheckpoint:
    if not (path / "progress.json").is_file():
        raise ResumeRefused(f"resume_from: {path} is not a checkpoint folder (no progress.json in it)")
    record = read_record(path.parent)
    if record is None:
        raise ResumeRefused(f"resume_from: {path} has no run record ({path.parent / RECORD}; written by an older "
                            "lora-trainer?), so it cannot be checked to belong to this run; start a new run")
    what = differences(record, identity)
    if what:
        raise ResumeRefused(f"resume_from: {path} belongs to another run ({'; '.join(what)})")
    return ckpt.load_checkpoint(path)


def mark_finished(plan: RunPlan, lora_file: Path) -> None:
    """Record that the run produced its LoRA (it is no longer offered for resuming)."""
    write_record(plan.run_dir, {**plan.record, "finished": True, "finished_at": time.time(),
                                "lora_file": str(lora_file)})


@dataclass
class ResumableRun:
    """An interrupted run that can be continued: pass ``config`` to ``config_from_dict`` and start it."""

    output_name: str
    run_id: str
    step: int
    total_steps: int
    saved_at: float  # when its newest checkpoint was written (seconds since the epoch)
    checkpoint: Path
    run_dir: Path
    config: dict[str, Any]  # the run's settings with resume_from: "latest"


def list_resumable_runs(output_dir: str | Path) -> list[ResumableRun]:
    """The interrupted runs in ``output_dir`` (unfinished, with a complete checkpoint), newest first."""
    runs = []
    for run_dir in run_dirs(inside(output_dir, CHECKPOINT_DIR)):
        record = read_record(run_dir) or {}
        found = ckpt.list_checkpoints(run_dir)
        if record.get("finished") or not found or not isinstance(record.get("config"), dict):
            continue
        try:
            step = ckpt.read_progress(found[-1]).global_step
        except ckpt.CheckpointError:
            continue
        runs.append(ResumableRun(
            output_name=str(record.get("output_name")), run_id=str(record.get("run_id")), step=step,
            total_steps=int(record.get("total_steps") or 0), saved_at=(found[-1] / "progress.json").stat().st_mtime,
            checkpoint=found[-1], run_dir=run_dir, config={**record["config"], "resume_from": "latest"}))
    return sorted(runs, key=lambda run: run.saved_at, reverse=True)
