"""The overfitting alarm: it fires on a planted overfit and not on a healthy run; early stop keeps the best."""

from __future__ import annotations

import json

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.lora.export import load_lora_file, read_lora_metadata
from lora_trainer.lora.inject import inject_lora, load_lora_state_dict
from lora_trainer.lora.kohya import from_kohya_state_dict
from lora_trainer.train.events import EventBus, MessageEvent, OverfitEvent, StepEvent, ValidationEvent
from lora_trainer.train.overfit import OverfitMonitor
from lora_trainer.train.trainer import Trainer
from lora_trainer.train.validation import ValidationLoss
from tests.train.test_trainer import make_config
from tests.train.toy import TARGETS, ToyBackbone, planted_overfit


def _record(monitor: OverfitMonitor, series: list[tuple[float, float]]) -> list[bool]:
    return [monitor.record((i + 1) * 10, val, train) for i, (val, train) in enumerate(series)]


def test_monitor_needs_validation_rising_while_training_falls():
    falling_then_rising = [(1.0, 1.0), (0.8, 0.7), (0.85, 0.6), (0.9, 0.5), (0.95, 0.4), (1.0, 0.3)]
    monitor = OverfitMonitor(patience=3)
    assert _record(monitor, falling_then_rising) == [False, False, False, False, True, False]
    assert monitor.alarm_step == 50 and monitor.best.step == 20
    assert "best step was 20" in monitor.describe() and "rose (0.8000 -> 1.0000)" in monitor.describe()
    noisy = [(1.0, 1.0), (0.8, 0.7), (0.83, 0.6), (0.81, 0.55), (0.84, 0.5)]  # a dip does not reset the count
    assert _record(OverfitMonitor(3), noisy) == [False, False, False, False, True]

    diverging = [(1.0, 1.0), (0.8, 0.7), (0.85, 0.75), (0.9, 0.8), (0.95, 0.85)]  # both rise: not overfitting
    assert not any(_record(OverfitMonitor(3), diverging))
    jitter = [(1.0, 1.0), (0.8, 0.7), (0.8001, 0.6), (0.8002, 0.5), (0.8003, 0.4)]  # a rise under 1%
    assert not any(_record(OverfitMonitor(3), jitter))
    new_best = [(1.0, 1.0), (0.8, 0.7), (0.85, 0.6), (0.79, 0.5), (0.9, 0.4), (0.9, 0.3)]  # counts from 0.79
    assert not any(_record(OverfitMonitor(3), new_best))
    restored = OverfitMonitor.from_dict(json.loads(json.dumps(monitor.to_dict())), 3)
    assert restored == monitor


def _run(cfg, backbone, **kwargs):
    events: list = []
    result = Trainer(cfg, backbone, events=EventBus(events.append), **kwargs).run()
    return result, events


def test_alarm_fires_on_a_planted_overfit_and_names_the_best_step(tmp_path):
    """Two pictures, trained long at a rate that fits them in about 45 steps: validation turns up after."""
    result, events = _run(config_from_dict(planted_overfit(tmp_path)), ToyBackbone())
    quality = result.quality
    evaluations = [e for e in events if isinstance(e, ValidationEvent)]
    assert [e.step for e in evaluations] == list(range(5, 101, 5))
    alarm = next(e for e in events if isinstance(e, OverfitEvent))
    best = min(evaluations, key=lambda e: e.loss)
    assert alarm.best_step == best.step == quality.best_step and 20 <= best.step < alarm.step < 100
    assert quality.overfit_step == alarm.step and not alarm.stopping and result.steps_done == 100
    before, after = best.step, alarm.step  # in between: validation up, the training pictures' loss down
    window = [e for e in evaluations if before <= e.step <= after]
    assert window[-1].loss > window[0].loss * 1.01 and window[-1].train_loss < window[0].train_loss
    said = [e.text for e in events if isinstance(e, MessageEvent) and e.level == "warning"]
    assert any(f"the best step was {best.step}" in text for text in said)
    best_file = tmp_path / "out" / "snapshots" / "toy-best.safetensors"  # kept to pick and install
    assert read_lora_metadata(best_file)["ss_steps"] == str(best.step)
    assert [s.kind for s in quality.snapshots] == ["best", "final"]


def _validation_of(lora_file, cfg) -> float:
    """The validation loss of a LoRA file, on a fresh toy backbone."""
    backbone = ToyBackbone()
    roots = backbone.lora_roots(False)
    inject_lora(roots, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=0.0, unet_targets=TARGETS,
                te_targets=[])
    load_lora_state_dict(roots, from_kohya_state_dict(load_lora_file(lora_file), roots))
    from lora_trainer.data.dataset import scan_dataset

    held = scan_dataset(cfg.validation_dir, resolution=64).items
    return ValidationLoss(backbone, held, encode_text=False, chunk=2)(roots.values())


def test_early_stop_keeps_the_best_snapshot(tmp_path):
    cfg = config_from_dict(planted_overfit(tmp_path, early_stop=True))
    result, events = _run(cfg, ToyBackbone())
    alarm = next(e for e in events if isinstance(e, OverfitEvent))
    assert alarm.stopping and result.steps_done == alarm.step < 100 and not result.interrupted
    assert result.quality.early_stopped and result.quality.best_step == alarm.best_step
    assert max(e.step for e in events if isinstance(e, StepEvent)) == alarm.step  # no step after the alarm
    assert read_lora_metadata(result.lora_path)["ss_steps"] == str(alarm.best_step)
    assert _validation_of(result.lora_path, cfg) == pytest.approx(alarm.best_loss, rel=1e-5)
    # the same run without early stop: its final LoRA is worse, its best snapshot is the early-stopped LoRA
    full, _ = _run(config_from_dict(planted_overfit(tmp_path / "full")), ToyBackbone())
    assert _validation_of(full.lora_path, cfg) > alarm.best_loss * 1.01
    best = tmp_path / "full" / "out" / "snapshots" / "toy-best.safetensors"
    saved, kept = load_lora_file(best), load_lora_file(result.lora_path)
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)


def test_resumed_run_keeps_its_evaluations(tmp_path):
    straight, _ = _run(config_from_dict(planted_overfit(tmp_path / "a")), ToyBackbone())
    steps: list[int] = []
    settings = planted_overfit(tmp_path / "b")
    Trainer(config_from_dict(settings), ToyBackbone(), should_stop=lambda: len(steps) >= 62,
            events=EventBus(lambda e: steps.append(e.step) if isinstance(e, StepEvent) else None)).run()
    resumed, _ = _run(config_from_dict({**settings, "resume_from": "latest"}), ToyBackbone())
    expected, got = straight.quality.validation, resumed.quality.validation
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    assert resumed.quality.overfit_step == straight.quality.overfit_step
    assert resumed.quality.best_step == straight.quality.best_step


def test_no_alarm_on_a_healthy_run(make_tiny_backbone, shapes_dataset, tmp_path):
    """The tiny SD model on eight shapes, two held out, at an ordinary rate: both losses fall together."""
    cfg = make_config(shapes_dataset, tmp_path / "out", validation_split=0.25, validate_every=4, max_steps=16,
                      learning_rate=1e-3, batch_size=2)
    result, events = _run(cfg, make_tiny_backbone())
    evaluations = [e for e in events if isinstance(e, ValidationEvent)]
    assert [e.step for e in evaluations] == [4, 8, 12, 16]
    assert not any(isinstance(e, OverfitEvent) for e in events) and result.quality.overfit_step is None
    assert evaluations[-1].loss < evaluations[0].loss and evaluations[-1].train_loss < evaluations[0].train_loss
    assert result.quality.best_step == 16 and [s.kind for s in result.quality.snapshots] == ["final"]
    assert read_lora_metadata(result.lora_path)["ss_num_train_images"] == "6"  # two images held out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(tmp_path / "out" / "logs"))
    logs.Reload()
    assert [s.step for s in logs.Scalars("validation_loss")] == [4, 8, 12, 16]
