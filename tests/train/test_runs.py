"""Run identity: resume only the same run, scoped pruning, cleanup of half-written files, resumable-run listing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train.events import EventBus, MessageEvent, StepEvent
from lora_trainer.train.layout import RunLayout
from lora_trainer.train.runs import ResumeRefused, list_resumable_runs, remove_stale_temporaries
from lora_trainer.train.trainer import Trainer


def make_config(data: Path, out: Path, **overrides):
    settings = {
        "train_data_dir": str(data), "base_model": "tiny.safetensors", "output_dir": str(out),
        "output_name": "run_a", "resolution": 64, "batch_size": 4, "learning_rate": 2e-3,
        "lora_rank": 4, "lora_alpha": 4, "max_steps": 5, "seed": 7, "device": "cpu", "save_steps": 1,
        "preview": False,  # the card picture is tested in test_preview
    }
    settings.update(overrides)
    return config_from_dict(settings)


def interrupted_run(make_backbone, data: Path, out: Path, stop_after: int = 3, **overrides) -> Path:
    """Train until ``stop_after`` steps, then interrupt; returns the run's folder."""
    steps: list[int] = []
    bus = EventBus(lambda e: steps.append(e.step) if isinstance(e, StepEvent) else None)
    result = Trainer(make_config(data, out, **overrides), make_backbone(), events=bus,
                     should_stop=lambda: len(steps) >= stop_after).run()
    assert result.interrupted and result.checkpoint is not None
    return result.checkpoint.parent


def messages_of(events: list) -> list[str]:
    return [e.text for e in events if isinstance(e, MessageEvent)]


def test_latest_resumes_only_the_same_run(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    interrupted_run(make_tiny_backbone, shapes_dataset, out)
    # another name: its own run has no checkpoint, so there is nothing to resume (not run_a's weights)
    with pytest.raises(ResumeRefused, match="no checkpoint of 'run_b'"):
        Trainer(make_config(shapes_dataset, out, output_name="run_b", resume_from="latest"),
                make_tiny_backbone()).run()
    # the same name with another rank, or other data: refused with what differs
    with pytest.raises(ResumeRefused, match=r"belong to another run \(lora_rank 4 -> 8\)"):
        Trainer(make_config(shapes_dataset, out, lora_rank=8, resume_from="latest"), make_tiny_backbone()).run()
    shutil.copy(shapes_dataset / "000_red_circle.png", shapes_dataset / "extra.png")
    with pytest.raises(ResumeRefused, match=r"training data: 1 added \(extra.png\)"):
        Trainer(make_config(shapes_dataset, out, resume_from="latest"), make_tiny_backbone()).run()
    assert not (out / "run_a.safetensors").exists() and not (out / "run_b.safetensors").exists()


def test_resuming_another_runs_checkpoint_folder_is_refused(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    run_dir = interrupted_run(make_tiny_backbone, shapes_dataset, out)
    folder = ckpt.list_checkpoints(run_dir)[-1]
    with pytest.raises(ResumeRefused, match=r"belongs to another run \(output_name 'run_a' -> 'run_b'"):
        Trainer(make_config(shapes_dataset, out, output_name="run_b", resume_from=str(folder)),
                make_tiny_backbone()).run()
    legacy = out / "checkpoints" / "old" / "step-000002"
    shutil.copytree(folder, legacy)
    with pytest.raises(ResumeRefused, match="has no run record"):
        Trainer(make_config(shapes_dataset, out, resume_from=str(legacy)), make_tiny_backbone()).run()


def test_resume_without_any_checkpoint_is_an_error_not_a_fresh_start(make_tiny_backbone, shapes_dataset, tmp_path):
    with pytest.raises(ResumeRefused, match="there is no checkpoint of 'run_a'.*start without --resume"):
        Trainer(make_config(shapes_dataset, tmp_path / "out", resume_from="latest"), make_tiny_backbone()).run()
    assert not (tmp_path / "out" / "run_a.safetensors").exists()


def test_a_fresh_start_does_not_discard_an_interrupted_run_unless_asked(make_tiny_backbone, shapes_dataset,
                                                                          tmp_path):
    out = tmp_path / "out"
    run_dir = interrupted_run(make_tiny_backbone, shapes_dataset, out)
    with pytest.raises(ResumeRefused, match=r"an interrupted run of 'run_a' .* \(step 3/5"):
        Trainer(make_config(shapes_dataset, out), make_tiny_backbone()).run()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000001", "step-000002", "step-000003"]
    result = Trainer(make_config(shapes_dataset, out, overwrite=True), make_tiny_backbone()).run()
    assert result.steps_done == 5 and result.lora_path is not None


def test_pruning_touches_only_its_own_run(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    run_a = interrupted_run(make_tiny_backbone, shapes_dataset, out, stop_after=2)
    before = sorted(p.name for p in ckpt.list_checkpoints(run_a))
    result = Trainer(make_config(shapes_dataset, out, output_name="run_b", max_steps=6), make_tiny_backbone()).run()
    assert result.lora_path is not None
    assert sorted(p.name for p in ckpt.list_checkpoints(run_a)) == before == ["step-000001", "step-000002"]
    [run_b] = [d for d in (out / "checkpoints").iterdir() if d.name.startswith("run_b-")]
    assert [p.name for p in ckpt.list_checkpoints(run_b)] == ["step-000003", "step-000004", "step-000005"]


def test_half_written_files_are_removed_at_the_next_start(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    run_dir = interrupted_run(make_tiny_backbone, shapes_dataset, out)
    leftovers = [run_dir / ".step-000004.tmp", out / "checkpoints" / ".step-000030.tmp"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "lora_state.safetensors").write_bytes(b"")
    leftovers += [out / ".run_a.safetensors.x1y2.tmp", out / ".run_a.config.yaml.k3j4.tmp", run_dir / ".run.json.a.tmp"]
    for path in leftovers[2:]:
        path.write_bytes(b"")
    other = out / ".someone_else.safetensors.zzz.tmp"
    other.write_bytes(b"")
    events: list = []
    result = Trainer(make_config(shapes_dataset, out, resume_from="latest"), make_tiny_backbone(),
                     events=EventBus(events.append)).run()
    assert result.lora_path is not None
    assert not any(path.exists() for path in leftovers)
    assert other.exists(), "another run's temporary files are left to that run"
    assert any("left unfinished by an interrupted run" in m for m in messages_of(events))


def test_remove_stale_temporaries_only_matches_its_own_name(tmp_path):
    layout = RunLayout(tmp_path, "a")
    mine, theirs = tmp_path / ".a.safetensors.123.tmp", tmp_path / ".ab.safetensors.123.tmp"
    for path in (mine, theirs):
        path.write_bytes(b"")
    assert remove_stale_temporaries(layout) == [mine]
    assert theirs.exists()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    run_dir = interrupted_run(make_tiny_backbone, shapes_dataset, out)
    newest = ckpt.list_checkpoints(run_dir)[-1]
    state = newest / "lora_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    events: list = []
    result = Trainer(make_config(shapes_dataset, out, resume_from="latest"), make_tiny_backbone(),
                     events=EventBus(events.append)).run()
    text = "\n".join(messages_of(events))
    assert "step-000003 is unreadable: lora_state.safetensors" in text
    assert "falling back to the previous checkpoint step-000002" in text
    assert "at step 2/5" in text
    assert result.steps_done == 5 and result.lora_path is not None


def test_every_checkpoint_unreadable_is_a_clear_error(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    run_dir = interrupted_run(make_tiny_backbone, shapes_dataset, out, stop_after=1)
    (ckpt.list_checkpoints(run_dir)[0] / "training_state.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ResumeRefused, match="no checkpoint of this run .* can be read"):
        Trainer(make_config(shapes_dataset, out, resume_from="latest"), make_tiny_backbone()).run()


def test_list_resumable_runs_offers_interrupted_runs_with_their_config(make_tiny_backbone, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    assert list_resumable_runs(out) == []
    interrupted_run(make_tiny_backbone, shapes_dataset, out)
    Trainer(make_config(shapes_dataset, out, output_name="done_run", max_steps=3), make_tiny_backbone()).run()
    [run] = list_resumable_runs(out)
    assert (run.output_name, run.step, run.total_steps) == ("run_a", 3, 5)
    assert run.checkpoint.name == "step-000003" and run.saved_at > 0
    assert run.config["resume_from"] == "latest" and run.config["lora_rank"] == 4
    result = Trainer(config_from_dict(run.config), make_tiny_backbone()).run()
    assert result.steps_done == 5 and result.lora_path == out / "run_a.safetensors"
    assert list_resumable_runs(out) == []


def test_config_yaml_is_written_only_when_the_run_succeeds(make_tiny_backbone, shapes_dataset, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_a.safetensors").write_bytes(b"the user's LoRA")
    (out / "run_a.config.yaml").write_text("the user's config\n", encoding="utf-8")

    def boom(*args, **kwargs):
        raise RuntimeError("the backbone failed")

    backbone = make_tiny_backbone()
    monkeypatch.setattr(backbone, "predict", boom)
    with pytest.raises(RuntimeError, match="the backbone failed"):
        Trainer(make_config(shapes_dataset, out, overwrite=True, save_steps=0), backbone).run()
    assert (out / "run_a.config.yaml").read_text(encoding="utf-8") == "the user's config\n"
    assert (out / "run_a.safetensors").read_bytes() == b"the user's LoRA"
    monkeypatch.undo()
    Trainer(make_config(shapes_dataset, out, overwrite=True, save_steps=0), make_tiny_backbone()).run()
    assert "output_name: run_a" in (out / "run_a.config.yaml").read_text(encoding="utf-8")


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(make_tiny_backbone, shapes_dataset,
                                                                          tmp_path, monkeypatch):
    from lora_trainer.train import trainer as trainer_module

    calls = {"n": 0}
    real = trainer_module.Trainer._micro_loss

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer_module.Trainer, "_micro_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(trainer_module.NonFiniteLossError,
                       match=r"the loss became nan at step 3/5; .* the last good checkpoint .*step-000002 is kept"):
        Trainer(make_config(shapes_dataset, out), make_tiny_backbone()).run()
    [run_dir] = list((out / "checkpoints").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000001", "step-000002"]
    kept = ckpt.load_checkpoint(run_dir / "step-000002")
    assert all(torch.isfinite(v).all() for v in kept.lora_state.values())
    assert not (out / "run_a.safetensors").exists() and not (out / "run_a.config.yaml").exists()


@pytest.mark.parametrize(("cache_latents", "stage"), [(True, "caching latents"), (False, "caching text embeddings")])
def test_interrupt_takes_effect_during_latent_and_text_caching(make_tiny_backbone, shapes_dataset, tmp_path,
                                                               cache_latents, stage):
    encoded: list[int] = []
    backbone = make_tiny_backbone()
    backbone.prompts_per_call = 1  # one caption per call, so the second call is a second poll
    real_images, real_prompts = backbone.encode_images, backbone.encode_prompts
    backbone.encode_images = lambda pixels: (encoded.append(1), real_images(pixels))[1]
    backbone.encode_prompts = lambda prompts: (encoded.append(1), real_prompts(prompts))[1]
    events: list = []
    result = Trainer(make_config(shapes_dataset, tmp_path / "out", cache_latents=cache_latents), backbone,
                     events=EventBus(events.append), should_stop=lambda: len(encoded) >= 2).run()
    assert result.interrupted and result.steps_done == 0 and result.lora_path is None
    assert len(encoded) == 2, "the cache loop polls the stop flag before every encoder call"
    assert any(f"interrupted while {stage}" in m for m in messages_of(events))


def test_the_run_prints_its_plan_and_a_rough_duration_before_the_model_loads(make_tiny_backbone, shapes_dataset,
                                                                              tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "stand-in.safetensors"))
    events: list = []
    cfg = make_config(shapes_dataset, tmp_path / "out", max_steps=None, epochs=3, save_steps=0,
                      base_model=str(tmp_path / "stand-in.safetensors"))
    trainer = Trainer(cfg, None, events=EventBus(events.append))

    def load(device, dtype):
        events.append("model loads")
        trainer.backbone = make_tiny_backbone()
        return trainer.backbone

    trainer._load_backbone = load
    trainer.run()
    plan = next(i for i, e in enumerate(events) if isinstance(e, MessageEvent) and e.text.startswith("plan: "))
    assert plan < events.index("model loads")
    assert events[plan].text.startswith("plan: 6 steps (3 epochs of 2 steps; 8 images x 1 repeats, batch 4 x 1, "
                                        "64 px); rough duration ")
