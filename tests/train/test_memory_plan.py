"""The memory plan: its estimate against the measured peak, the ladder, and the trainer following it."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.demo import make_demo_dataset
from lora_trainer.train import memory_plan
from lora_trainer.train.events import EventBus, MessageEvent
from lora_trainer.train.memory_meter import TensorMemoryMeter
from lora_trainer.train.memory_plan import Model, Settings, plan_memory
from lora_trainer.train.trainer import Trainer

MIB = 2**20


def tiny_config(data, out, **overrides):
    return config_from_dict({"train_data_dir": str(data), "base_model": "given", "output_dir": str(out),
                             "output_name": "plan", "resolution": 256, "lora_rank": 4, "lora_alpha": 4,
                             "max_steps": 1, "device": "cpu", "preview": False, **overrides})


def test_meter_counts_live_storages_once_and_frees_them():
    with TensorMemoryMeter() as meter:
        a = torch.ones(1024)  # 4 KiB
        view = a[:10]  # same storage: not counted again
        b = torch.ones(2048)  # 8 KiB
        del a, view, b
        c = torch.ones(256)
    assert meter.peak == 12 * 1024 and meter.live == 1024
    del c


@pytest.mark.parametrize(("checkpointing", "batch"), [(False, 1), (False, 2), (True, 4)])
def test_estimate_is_within_25_percent_of_the_measured_peak(checkpointing, batch, make_tiny_backbone, tmp_path,
                                                            monkeypatch):
    """Measured: every tensor storage alive on the CPU during the whole run (model, caches, LoRA, optimizer,
    activations), by TensorMemoryMeter; estimated: the plan printed before the first step."""
    data = make_demo_dataset(tmp_path / "data", count=4, size=256)
    plans = []
    monkeypatch.setattr("lora_trainer.train.trainer.plan_memory",
                        lambda *a, **k: plans.append(memory_plan.plan_run(*a, **k)) or plans[-1])
    backbone = make_tiny_backbone()
    cfg = tiny_config(data, tmp_path / "out", batch_size=batch, gradient_checkpointing=checkpointing)
    meter = TensorMemoryMeter()
    meter.track(backbone.unet, backbone.vae, backbone.text_encoder)
    with meter:
        Trainer(cfg, backbone).run()
    estimated = plans[0].estimate.total
    assert plans[0].settings == Settings.of(cfg)  # it fits: nothing changed
    assert abs(estimated - meter.peak) <= 0.25 * meter.peak, (estimated / MIB, meter.peak / MIB)
    assert meter.peak > 2 * sum(plans[0].estimate.weights.values())  # activations matter at this size


def fake_model(per_sample: int) -> Model:
    """Weights 100 MiB; per image a step keeps ``per_sample`` (an eighth with checkpointing, plus a recomputed
    block of a sixteenth), scaling with the pixels; an encode adds 1 MiB."""
    def dry_run(resolution: int, checkpointing: bool) -> tuple[int, int, int]:
        scaled = per_sample * (resolution / 512) ** 2
        return (int(scaled / 8), int(scaled / 16), MIB) if checkpointing else (int(scaled), 0, MIB)
    return Model(weights={"unet": 100 * MIB}, lora_parameters=1000, num_latents=0, num_prompts=0, prompt_bytes=0,
                 dry_run=dry_run)


def test_ladder_halves_the_batch_then_checkpoints_then_lowers_resolution_only_with_auto_fit():
    settings = Settings(batch_size=4, gradient_accumulation_steps=1, gradient_checkpointing=False,
                        optimizer="adamw", resolution=512, train_text_encoder=False)
    cpu = torch.device("cpu")
    budget = int(160 * MIB / memory_plan.HEADROOM)
    plan = plan_memory(fake_model(100 * MIB), settings, budget=budget, budget_source="test", device=cpu,
                       cached_latents=True, auto_fit=False)
    assert plan.changes == ["batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2 (same effective batch 4)",
                            "batch_size 2 -> 1, gradient_accumulation_steps 2 -> 4 (same effective batch 4)",
                            "gradient_checkpointing on"]
    assert plan.fits and plan.settings.batch_size * plan.settings.gradient_accumulation_steps == 4

    tight = plan_memory(fake_model(400 * MIB), settings, budget=budget, budget_source="test", device=cpu,
                        cached_latents=True, auto_fit=False)
    assert not tight.fits and tight.settings.resolution == 512
    assert any("8-bit AdamW not available" in note for note in tight.notes)
    assert any("auto_fit: true" in note for note in tight.notes)
    fitted = plan_memory(fake_model(400 * MIB), settings, budget=budget, budget_source="test", device=cpu,
                         cached_latents=True, auto_fit=True)
    assert fitted.fits and fitted.changes[-3:] == ["gradient_checkpointing on", "resolution 512 -> 448 (auto_fit)",
                                                   "resolution 448 -> 384 (auto_fit)"]
    assert fitted.settings.resolution == 384


def test_trainer_prints_the_plan_and_trains_with_its_settings(make_tiny_backbone, shapes_dataset, tmp_path,
                                                               monkeypatch):
    original = memory_plan.plan_memory

    def one_byte_short(model, settings, *, budget, budget_source, **kwargs):
        """A device with one byte less than the estimate at the configured settings."""
        needed = memory_plan.estimate(model, settings, kwargs["cached_latents"]).total
        return original(model, settings, budget=int((needed - 1) / memory_plan.HEADROOM) + 1,
                        budget_source="of a pretend device", **kwargs)

    monkeypatch.setattr(memory_plan, "plan_memory", one_byte_short)
    messages: list[str] = []
    events = EventBus(lambda e: messages.append(e.text) if isinstance(e, MessageEvent) else None)
    cfg = tiny_config(shapes_dataset, tmp_path / "out", resolution=64, batch_size=4, max_steps=2)
    trainer = Trainer(cfg, make_tiny_backbone(), events=events)
    result = trainer.run()
    assert result.steps_done == 2 and result.lora_path is not None
    assert (trainer.cfg.batch_size, trainer.cfg.gradient_accumulation_steps) == (2, 2)
    assert any(m.startswith("memory plan: expected peak") for m in messages)
    assert "memory plan: batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2 (same effective batch 4)" in messages
    effective = (tmp_path / "out" / "plan.config.yaml").read_text()
    assert "batch_size: 2" in effective and "gradient_accumulation_steps: 2" in effective
