"""The training loop on tiny random SD1.5-topology models: it learns, resumes exactly, and cleans up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_trainer.config import config_from_dict
from lora_trainer.train.events import CheckpointEvent, EventBus, MessageEvent, StepEvent
from lora_trainer.train.trainer import Trainer
from tests.train.helpers import fixed_eval_loss


def make_config(data: Path, out: Path, **overrides):
    settings = {
        "train_data_dir": str(data), "base_model": "unused-backbone-given", "output_dir": str(out),
        "output_name": "test_lora", "resolution": 64, "batch_size": 4, "learning_rate": 2e-3,
        "lora_rank": 4, "lora_alpha": 4, "max_steps": 6, "seed": 7, "device": "cpu",
        "sample_steps": 2,  # the end-of-run preview stays cheap
    }
    settings.update(overrides)
    return config_from_dict(settings)


def test_loss_falls_when_fitting_a_few_images(make_tiny_backbone, shapes_dataset, tmp_path):
    backbone = make_tiny_backbone()
    before = fixed_eval_loss(backbone, shapes_dataset)
    cfg = make_config(shapes_dataset, tmp_path / "out", max_steps=60, learning_rate=5e-3, lora_rank=8,
                      lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                    "ff.net.0.proj", "ff.net.2"])
    result = Trainer(cfg, backbone, restore_backbone=False).run()
    after = fixed_eval_loss(backbone, shapes_dataset)
    assert result.steps_done == 60 and result.lora_path is not None
    assert after < 0.8 * before, (before, after)


def test_resume_continues_the_same_run(make_tiny_backbone, shapes_dataset, tmp_path):
    overrides = {"max_steps": 6, "lora_dropout": 0.1, "caption_dropout": 0.2, "flip_aug": True,
                 "train_text_encoder": True, "scheduler": "cosine", "warmup_steps": 2, "noise_offset": 0.05,
                 "min_snr_gamma": 5.0, "gradient_accumulation_steps": 2, "batch_size": 3}
    straight = Trainer(make_config(shapes_dataset, tmp_path / "a", **overrides), make_tiny_backbone()).run()
    assert len(straight.losses) == 6 and not straight.interrupted

    steps: list[int] = []
    bus = EventBus(lambda e: steps.append(e.step) if isinstance(e, StepEvent) else None)
    first = Trainer(make_config(shapes_dataset, tmp_path / "b", **overrides), make_tiny_backbone(),
                    events=bus, should_stop=lambda: len(steps) >= 3).run()
    assert first.interrupted and first.steps_done == 3 and first.lora_path is None
    assert first.checkpoint is not None and first.checkpoint.name == "step-000003"
    assert not (tmp_path / "b" / "test_lora.safetensors").exists()

    resumed = Trainer(make_config(shapes_dataset, tmp_path / "b", resume_from="latest", **overrides),
                      make_tiny_backbone()).run()
    assert resumed.steps_done == 6 and resumed.lora_path is not None
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)


def test_run_writes_kohya_lora_config_and_checkpoints(make_tiny_backbone, shapes_dataset, tmp_path):
    events: list = []
    cfg = make_config(shapes_dataset, tmp_path / "out", max_steps=4, save_steps=2, train_text_encoder=True,
                      sample_prompts=["a red circle"], sample_every=2, sample_steps=2)
    result = Trainer(cfg, make_tiny_backbone(), events=EventBus(events.append)).run()
    out = tmp_path / "out"
    assert result.lora_path == out / "test_lora.safetensors"
    with safe_open(str(result.lora_path), "pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert metadata["ss_network_dim"] == "4" and metadata["ss_output_name"] == "test_lora"
    assert (out / "test_lora.config.yaml").is_file()
    assert [e.step for e in events if isinstance(e, CheckpointEvent)] == [2]
    [run_dir] = list((out / "checkpoints").iterdir())
    assert run_dir.name.startswith("test_lora-") and (run_dir / "step-000002" / "lora_state.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples" / "test_lora").iterdir()) == ["step-000002-0.png",
                                                                                 "step-000004-0.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_backbone_is_restored_after_training(make_tiny_backbone, shapes_dataset, tmp_path):
    backbone = make_tiny_backbone()
    modules = [backbone.unet, backbone.text_encoder]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    types_before = [[type(x) for x in m.modules()] for m in modules]
    grads_before = [[p.requires_grad for p in m.parameters()] for m in modules]
    Trainer(make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True, max_steps=2), backbone).run()
    for module, state, types, grads in zip(modules, before, types_before, grads_before, strict=True):
        after = module.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], state[k]) for k in state)
        assert [type(x) for x in module.modules()] == types
        assert [p.requires_grad for p in module.parameters()] == grads


def test_existing_lora_is_not_overwritten(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "test_lora.safetensors").write_bytes(b"user's file")
    with pytest.raises(FileExistsError, match="overwrite: true"):
        Trainer(make_config(shapes_dataset, out), make_tiny_backbone()).run()
    assert (out / "test_lora.safetensors").read_bytes() == b"user's file"


def test_broken_image_is_skipped_and_reported(make_tiny_backbone, shapes_dataset, tmp_path):
    (shapes_dataset / "broken.png").write_bytes(b"not a png at all")
    (shapes_dataset / "empty.jpg").write_bytes(b"")
    messages: list[str] = []
    bus = EventBus(lambda e: messages.append(e.text) if isinstance(e, MessageEvent) else None)
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", max_steps=1), make_tiny_backbone(),
                     events=bus).run()
    assert result.lora_path is not None
    warning = next(m for m in messages if "broken.png" in m)
    assert "empty.jpg" in warning
