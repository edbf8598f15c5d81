"""TrainingJob: a finished, an interrupted and a failed run as the tab and API see them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.ui.job import JobBusyError, TrainingJob, downsample, oom_message


def make_config(data: Path, out: Path, **overrides):
    settings = {"train_data_dir": str(data), "base_model": "unused", "output_dir": str(out),
                "output_name": "job_lora", "resolution": 64, "batch_size": 4, "max_steps": 2, "lora_rank": 4,
                "lora_alpha": 4, "device": "cpu", "sample_steps": 2}  # 2: the end-of-run preview stays cheap
    settings.update(overrides)
    return config_from_dict(settings)


def test_finished_run_records_progress_and_result(make_tiny_backbone, shapes_dataset, tmp_path):
    job = TrainingJob()
    seen: list[dict] = []
    done_calls = []

    def on_done(result, backbone):
        done_calls.append((result.steps_done, backbone.model_version))
        return str(tmp_path / "installed.safetensors")

    cfg = make_config(shapes_dataset, tmp_path / "out")
    job.start(cfg, make_tiny_backbone, background=False, listener=seen.append, on_done=on_done)
    snap = job.snapshot()
    assert snap["status"] == "done" and snap["error"] is None
    assert snap["step"] == 2 and snap["total_steps"] == 2 and len(snap["losses"]) == 2
    assert Path(snap["result_path"]).is_file() and snap["result_path"].endswith("job_lora.safetensors")
    assert snap["lora_file"].endswith("installed.safetensors")
    assert done_calls == [(2, "sd_v1")] and snap["model_version"] == "sd_v1"
    assert snap["eta_seconds"] is None and snap["seconds_per_step"] > 0
    assert [s["step"] for s in seen if s["status"] == "running"][-1] == 2
    json.dumps(snap)  # JSON-able for the HTTP API


def test_background_run_with_wrapper(make_tiny_backbone, shapes_dataset, tmp_path):
    job = TrainingJob()
    wrapped = []

    def wrap(fn):
        wrapped.append(True)
        return fn()

    job.start(make_config(shapes_dataset, tmp_path / "out"), make_tiny_backbone, wrap=wrap)
    with pytest.raises(JobBusyError):
        job.start(make_config(shapes_dataset, tmp_path / "out2"), make_tiny_backbone)
    assert job.wait(60)
    assert job.snapshot()["status"] == "done" and wrapped == [True]


def test_cancel_interrupts_and_saves_a_checkpoint(make_tiny_backbone, shapes_dataset, tmp_path):
    job = TrainingJob()
    assert job.cancel() is False  # idle

    def listener(snap):
        if snap["step"] >= 1:
            job.cancel()

    job.start(make_config(shapes_dataset, tmp_path / "out", max_steps=5), make_tiny_backbone,
              background=False, listener=listener, on_done=lambda r, b: pytest.fail("on_done after interrupt"))
    snap = job.snapshot()
    assert snap["status"] == "interrupted" and snap["step"] == 1
    assert snap["result_path"] is None and snap["checkpoint"] and Path(snap["checkpoint"]).exists()
    assert any("interrupt" in m for m in snap["messages"])


def test_host_interrupt_flag_stops_the_run(make_tiny_backbone, shapes_dataset, tmp_path):
    job = TrainingJob()
    job.start(make_config(shapes_dataset, tmp_path / "out"), make_tiny_backbone, background=False,
              should_stop=lambda: True)
    assert job.snapshot()["status"] == "interrupted" and job.snapshot()["step"] == 0


def test_out_of_memory_names_the_settings_to_lower(make_tiny_backbone, shapes_dataset, tmp_path):
    def factory():
        backbone = make_tiny_backbone()

        def predict(*args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        backbone.predict = predict
        return backbone

    job = TrainingJob()
    cfg = make_config(shapes_dataset, tmp_path / "out", train_text_encoder=True)
    job.start(cfg, factory, background=False)
    snap = job.snapshot()
    assert snap["status"] == "failed"
    for setting in ("batch_size (now 4)", "resolution (now 64)", "gradient_checkpointing on",
                    "train_text_encoder off", "lora_rank (now 4)"):
        assert setting in snap["error"]
    assert "Traceback" not in snap["error"]
    # the job can run again afterwards
    job.start(make_config(shapes_dataset, tmp_path / "out3"), make_tiny_backbone, background=False)
    assert job.snapshot()["status"] == "done"


def test_user_error_fails_with_its_message(shapes_dataset, tmp_path):
    def factory():
        raise UserError("model file broken.safetensors is truncated")

    job = TrainingJob()
    job.start(make_config(shapes_dataset, tmp_path / "out"), factory, background=False)
    snap = job.snapshot()
    assert snap["status"] == "failed" and snap["error"] == "model file broken.safetensors is truncated"


def test_missing_base_model_is_a_clear_error(shapes_dataset, tmp_path):
    cfg = config_from_dict({"train_data_dir": str(shapes_dataset), "output_dir": str(tmp_path)}, require=False)
    job = TrainingJob()
    job.start(cfg, lambda: None, background=False)
    assert "base_model is not set" in job.snapshot()["error"]


def test_oom_message_omits_settings_already_minimal(shapes_dataset, tmp_path):
    cfg = make_config(shapes_dataset, tmp_path, gradient_checkpointing=True)
    text = oom_message(cfg)
    assert "gradient_checkpointing" not in text and "train_text_encoder" not in text


def test_downsample_keeps_shape():
    values = [float(i) for i in range(1000)]
    out = downsample(values, 10)
    assert len(out) == 10 and out[0] == pytest.approx(49.5) and out[-1] == pytest.approx(949.5)
    assert downsample([1.0, 2.0], 10) == [1.0, 2.0]


def test_eta_averages_recent_steps_and_samples_keep_history(monkeypatch):
    from lora_trainer.train.events import SampleEvent, StepEvent
    from lora_trainer.ui import job as job_module

    job = TrainingJob()
    job.status, job.total_steps = "running", 100
    clock = iter([0.0, 1.0, 2.0, 32.0, 33.0])  # step 3 took 30 s (a sample render), the others 1 s
    monkeypatch.setattr(job_module.time, "time", lambda: next(clock))
    for step in range(1, 5):
        job.on_event(StepEvent(step=step, total_steps=100, epoch=0, loss=0.5, lr=1e-4, seconds_per_step=1.0))
    snap = job.snapshot()
    assert snap["avg_seconds_per_step"] == pytest.approx(32.0 / 3)  # the slow step counts, not only the last
    assert snap["eta_seconds"] == pytest.approx(96 * 32.0 / 3)
    monkeypatch.setattr(job_module.time, "time", lambda: 40.0)
    for step in (10, 20):
        job.on_event(SampleEvent(step=step, paths=[f"s{step}-0.png", f"s{step}-1.png"], images=[]))
    snap = job.snapshot()
    assert snap["sample_paths"] == ["s20-0.png", "s20-1.png"]
    assert snap["sample_history"] == ["s20-1.png", "s20-0.png", "s10-1.png", "s10-0.png"]
