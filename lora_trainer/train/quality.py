"""Knowing when a run is done: validation, the overfitting alarm, epoch snapshots and the grid to pick from.

:class:`RunWatch` is what the training loop calls: once after every update (validate, snapshot, maybe stop),
when it writes a checkpoint (the history travels with it), and at the end (the best weights for an early stop,
the best-validation snapshot, the grid).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.config import TrainConfig
from lora_trainer.data.dataset import DatasetScan, TrainItem
from lora_trainer.lora.inject import load_lora_state_dict, lora_state_dict
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train import grid as grids
from lora_trainer.train import snapshots as snaps
from lora_trainer.train.events import (
    EventBus,
    GridEvent,
    MessageEvent,
    OverfitEvent,
    SnapshotEvent,
    ValidationEvent,
)
from lora_trainer.train.layout import RunLayout
from lora_trainer.train.overfit import OverfitMonitor
from lora_trainer.train.validation import ValidationLoss, probe_items, split_validation

STATE_FILE = "validation.json"  # in a checkpoint folder: the evaluations so far
BEST_FILE = "best_lora_state.safetensors"  # in a checkpoint folder: the LoRA weights of the best evaluation
TRAIN_PROBE = 4  # training images measured the same way as the held-out ones (the training side of the alarm)


def hold_out(scan: DatasetScan, cfg: TrainConfig, log: Callable[[str, str], None]) -> tuple[DatasetScan,
                                                                                             list[TrainItem]]:
    """The training scan without the validation images, and those images (see :func:`split_validation`)."""
    train_scan, held, notes = split_validation(scan, cfg)
    for line in notes:
        log(line, "warning")
    if held:
        where = cfg.validation_dir or f"{len(held)} of the {len(scan.items)} training images"
        log(f"validation: {len(held)} image(s) from {where}, loss at fixed noise and timesteps", "info")
    return train_scan, held


@dataclass
class QualityReport:
    """What a finished run says about itself: validation history, best step, alarm, snapshots, grid."""

    validation: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float | None = None
    overfit_step: int | None = None
    early_stopped: bool = False
    snapshots: list[snaps.Snapshot] = field(default_factory=list)
    grid_path: Path | None = None
    grid_cells: int = 0


def snapshot_due(cfg: TrainConfig, step: int, epoch: int, new_epoch: bool, total: int) -> bool:
    """An epoch snapshot after update ``step``: it ended epoch ``epoch`` (``new_epoch``), one of every
    ``save_every_n_epochs``, and it is not the last update (the final LoRA is that one)."""
    every = cfg.save_every_n_epochs
    return bool(every) and new_epoch and epoch % every == 0 and step < total


def validation_due(cfg: TrainConfig, step: int, new_epoch: bool, total: int) -> bool:
    """A validation after update ``step``: every ``validate_every`` updates (0: at each epoch's end) and at the end."""
    every = cfg.validate_every
    return step >= total or (step % every == 0 if every else new_epoch)


def watch_due(cfg: TrainConfig, validating: bool, step: int, epoch: int, new_epoch: bool, total: int) -> bool:
    """Whether :meth:`RunWatch.after_update` has work after update ``step``: the same answer in every process of
    a data-parallel run (the trainer reads its pending losses first, and the processes agree on stopping)."""
    return snapshot_due(cfg, step, epoch, new_epoch, total) or (validating and validation_due(cfg, step, new_epoch,
                                                                                             total))


@dataclass
class Validators:
    """The two fixed-noise measures of a run: on the held-out images, and on a few training images."""

    held_out: ValidationLoss
    train_probe: ValidationLoss


def prepare_validation(cfg: TrainConfig, backbone: Any, train_items: list[TrainItem], held_out: list[TrainItem],
                       autocast: Callable[[], Any] = contextlib.nullcontext) -> Validators | None:
    """Encode and noise the validation images once (None without any): call it while the VAE and the text
    encoders are on the training device (``backbone.encoders_on_device()``)."""
    if not held_out:
        return None

    def measure(items: list[TrainItem]) -> ValidationLoss:
        return ValidationLoss(backbone, items, encode_text=cfg.train_text_encoder, chunk=cfg.batch_size,
                              autocast=autocast)

    return Validators(measure(held_out), measure(probe_items(train_items, TRAIN_PROBE)))


class RunWatch:
    """Validation, overfitting alarm, snapshots and grid around one training loop.

    ``metadata(step)`` gives the LoRA metadata of the run at ``step`` (for snapshot files). In a data-parallel
    run only the main process has one (it writes the files; the others follow its decision to stop).
    """

    def __init__(self, cfg: TrainConfig, backbone: Any, roots: dict, validators: Validators | None,
                 bus: EventBus, writer: Any, resume_path: Path | None, *, metadata: Callable[[int], dict[str, str]],
                 fallback_prompt: str = "") -> None:
        self.cfg, self.backbone, self.roots, self.bus, self.writer = cfg, backbone, roots, bus, writer
        self.output_dir = Path(cfg.output_dir)
        self.metadata = metadata
        self.prompts = list(cfg.sample_prompts) or [cfg.trigger_word or fallback_prompt or cfg.output_name]
        self.monitor = OverfitMonitor(cfg.overfit_patience)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.early_stopped = False
        self.validators = validators
        if resume_path is not None:
            self._resume(resume_path)
        elif cfg.save_every_n_epochs or validators:
            snaps.clear_snapshots(self.output_dir, cfg.output_name)  # left by an earlier run of this name
        if validators and writer is not None:
            writer.add_custom_scalars({"training": {"loss and validation loss": ["Multiline",
                                                                                 ["loss", "validation_loss"]]}})

    # ---- during the loop --------------------------------------------------------------------------
    def after_update(self, step: int, epoch: int, new_epoch: bool, total: int) -> bool:
        """Snapshot and validate when due (see :func:`watch_due`; ``epoch``: the epochs completed, ``new_epoch``:
        this update completed one); True when the run should stop here (early stop). Reads the device only then."""
        cfg = self.cfg
        if snapshot_due(cfg, step, epoch, new_epoch, total):
            path = snaps.save_snapshot(snaps.epoch_snapshot_path(self.output_dir, cfg.output_name, epoch),
                                       self.roots, cfg.lora_alpha, self.metadata(step), kind="epoch")
            self.bus.emit(SnapshotEvent(step, path, "epoch", epoch))
        return self.validators is not None and validation_due(cfg, step, new_epoch, total) and self._validate(step)

    def _validate(self, step: int) -> bool:
        loss = self.validators.held_out(self.roots.values())
        train_loss = self.validators.train_probe(self.roots.values())
        fired = self.monitor.record(step, loss, train_loss)
        best = self.monitor.best
        if best.step == step:
            self.best_state = lora_state_dict(self.roots)
        if self.writer is not None:
            self.writer.add_scalar("validation_loss", loss, step)
        self.bus.emit(ValidationEvent(step, loss, train_loss, best.step, best.loss))
        if not fired:
            return False
        stop = self.cfg.early_stop
        text = self.monitor.describe() + (f"; stopping early and keeping the LoRA of step {best.step}" if stop
                                          else "; the LoRA of that step is kept as a snapshot to pick")
        self.bus.emit(MessageEvent(text, "warning"))
        self.bus.emit(OverfitEvent(step, best.step, best.loss, text, stop))
        self.early_stopped = stop
        return stop

    def checkpoint_files(self) -> dict[str, Callable[[Path], None]]:
        """Extra files for a checkpoint folder, so a resumed run keeps its evaluations and best weights."""
        if self.validators is None:
            return {}
        files = {STATE_FILE: lambda path: path.write_text(json.dumps(self.monitor.to_dict()), encoding="utf-8")}
        if self.best_state is not None:
            state = self.best_state
            files[BEST_FILE] = lambda path: save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return files

    def _resume(self, folder: Path) -> None:
        state_file, best_file = folder / STATE_FILE, folder / BEST_FILE
        if self.validators is not None and state_file.is_file():
            data = json.loads(state_file.read_text(encoding="utf-8"))
            self.monitor = OverfitMonitor.from_dict(data, self.cfg.overfit_patience)
            if best_file.is_file():
                self.best_state = load_file(str(best_file))
            self._replay()

    def _replay(self) -> None:
        """Announce a resumed run's earlier evaluations (and alarm), so the tab's plot shows the whole run."""
        history = self.monitor.history
        for index, evaluation in enumerate(history):
            so_far = OverfitMonitor(self.monitor.patience, history[:index + 1])
            best = so_far.best
            self.bus.emit(ValidationEvent(evaluation.step, evaluation.loss, evaluation.train_loss, best.step,
                                          best.loss))
            if evaluation.step == self.monitor.alarm_step:
                self.bus.emit(OverfitEvent(evaluation.step, best.step, best.loss, so_far.describe(), False))

    # ---- at the end -------------------------------------------------------------------------------
    def before_export(self, progress: ckpt.Progress) -> ckpt.Progress:
        """After an early stop, put the best weights in the layers; the progress to name in the metadata."""
        best = self.monitor.best
        if not self.early_stopped or best is None or self.best_state is None:
            return progress
        load_lora_state_dict(self.roots, self.best_state)
        self.bus.emit(MessageEvent(f"early stop: the LoRA holds the weights of step {best.step} "
                                   f"(validation loss {best.loss:.4f}), not of step {progress.global_step}"))
        return replace(progress, global_step=best.step)

    def finish(self, lora_file: Path, final_step: int, should_stop: Callable[[], bool]) -> QualityReport:
        """Write the best-validation snapshot (when it is not the final LoRA) and render the grid."""
        cfg = self.cfg
        best = self.monitor.best
        report = QualityReport(validation=[(e.step, e.loss) for e in self.monitor.history],
                               best_step=best.step if best else None, best_loss=best.loss if best else None,
                               overfit_step=self.monitor.alarm_step, early_stopped=self.early_stopped)
        if best is not None:
            self.bus.emit(MessageEvent(f"validation: best step {best.step} (loss {best.loss:.4f}) of "
                                       f"{len(self.monitor.history)} evaluations"))
        if best is not None and best.step != final_step and self.best_state is not None:
            path = snaps.best_snapshot_path(self.output_dir, cfg.output_name)
            with snaps.weights_of(self.roots, state=self.best_state):
                snaps.save_snapshot(path, self.roots, cfg.lora_alpha, self.metadata(best.step), kind="best",
                                    validation_loss=best.loss)
            self.bus.emit(SnapshotEvent(best.step, path, "best"))
        losses = dict(report.validation)
        report.snapshots = [replace(s, validation_loss=s.validation_loss or losses.get(s.step))
                            for s in snaps.list_snapshots(self.output_dir, cfg.output_name)]
        report.snapshots.append(snaps.Snapshot(lora_file, "final", final_step, None, losses.get(final_step)))
        if cfg.save_every_n_epochs:
            self._grid(report, should_stop)
        return report

    def _grid(self, report: QualityReport, should_stop: Callable[[], bool]) -> None:
        cfg = self.cfg
        rows = grids.pick_rows(report.snapshots)
        weights, prompts = list(grids.GRID_WEIGHTS), self.prompts
        count = len(rows) * len(weights) * len(prompts)
        self.bus.emit(MessageEvent(f"rendering the epoch grid: {len(rows)} LoRA(s) x {len(weights)} weights x "
                                   f"{len(prompts)} prompt(s) = {count} images, seed {cfg.seed}"))
        cells = grids.render_cells(self.backbone, self.roots, rows, weights, prompts, seed=cfg.seed,
                                   steps=cfg.sample_steps, size=cfg.resolution, should_stop=should_stop)
        if cells is None:
            self.bus.emit(MessageEvent("the epoch grid was interrupted; the snapshots are kept", "warning"))
            return
        for snapshot, picture in grids.preview_cells(cells).items():
            if snapshot.kind != "final":  # the final LoRA's picture is the run's own preview
                grids.save_png(picture, snaps.preview_path(snapshot.path))
        image = grids.compose_grid(cells)
        report.grid_path = grids.save_png(image, RunLayout.of(cfg).grid_file)
        report.grid_cells = len(cells)
        if self.writer is not None:
            import numpy as np

            self.writer.add_image("epoch_grid", np.asarray(image), report.snapshots[-1].step, dataformats="HWC")
        self.bus.emit(GridEvent(report.grid_path, [s.to_dict() for s in rows], weights, list(prompts)))
