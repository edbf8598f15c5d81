"""Resuming an interrupted run after a WebUI restart: the API route, the tab's Resume button, the model check."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from lora_trainer.train import checkpoint as ckpt
from lora_trainer.ui import api, tab
from lora_trainer.ui.job import TrainingJob
from lora_trainer.ui.resume import find_resumable, refresh_resumable, resume_run
from tests.ui.test_tab import FakeHost, ui_values

needs_fastapi = pytest.mark.skipif(
    importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("httpx") is None,
    reason="fastapi/httpx are not installed")
STOP_AT, TOTAL = 3, 6


class InterruptingHost(FakeHost):
    """The tab's host whose Interrupt (the WebUI's) is pressed once the job reaches ``stop_at``."""

    def __init__(self, lora_dir: Path, backbone_factory, job: TrainingJob, stop_at: int, **defaults) -> None:
        super().__init__(lora_dir, backbone_factory, **defaults)
        self.job, self.stop_at = job, stop_at

    def interrupted(self):
        return self.job.snapshot()["step"] >= self.stop_at


def run_values(data: Path, **overrides) -> list:
    """The form's values of a short run; its output folder field is left empty: the Settings folder is used."""
    settings = {"train_data_dir": str(data), "output_name": "resumed lora", "trigger_word": "zkx", "resolution": 64,
                "batch_size": 4, "max_steps": TOTAL, "lora_rank": 2, "device": "cpu", "save_steps": 2,
                "sample_steps": 2, "preview": False}
    values = ui_values(**{**settings, **overrides})
    values[tab.CONFIG_KEYS.index("output_dir")] = ""
    return values


def interrupt_in_the_webui(make_tiny_backbone, data: Path, tmp_path: Path) -> Path:
    """Start a run from the tab (output folder: the Settings one), interrupt it at step 3, then leave what a kill
    during the next save would leave; returns the run's checkpoint folder. The process then 'restarts'."""
    job = TrainingJob()
    host = InterruptingHost(tmp_path / "Lora", make_tiny_backbone, job, STOP_AT, output_dir=str(tmp_path / "out"))
    assert "Started." in tab.start_training_ui(host, job, *run_values(data))
    assert job.wait(300) and job.snapshot()["status"] == "interrupted", job.snapshot()
    [run_dir] = (tmp_path / "out" / "checkpoints").iterdir()
    assert ckpt.list_checkpoints(run_dir)[-1].name == f"step-{STOP_AT:06d}"
    (run_dir / ".step-000004.tmp").mkdir()  # a kill mid-save leaves this; the next start removes it
    return run_dir


@pytest.fixture(scope="module")
def _interrupted_once(tmp_path_factory: pytest.TempPathFactory, _tiny_components: dict) -> tuple[Path, Path]:
    """One interrupted run for the module: (data set, the output folder holding it); tests copy the folder."""
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.models.diffusers_backbone import DiffusersBackbone

    def make():
        c = {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in _tiny_components.items()}
        return DiffusersBackbone(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])

    root = tmp_path_factory.mktemp("interrupted")
    data = make_demo_dataset(root / "shapes", count=8, size=64)
    interrupt_in_the_webui(make, data, root)
    return data, root / "out"


@pytest.fixture
def interrupted(_interrupted_once: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """(data set, run folder) of an interrupted run in ``tmp_path / "out"``, as a WebUI restart finds it."""
    data, out = _interrupted_once
    shutil.copytree(out, tmp_path / "out")  # modification times kept: the newest checkpoint stays the newest
    [run_dir] = (tmp_path / "out" / "checkpoints").iterdir()
    return data, run_dir


def restarted_host(tmp_path: Path, make_tiny_backbone) -> FakeHost:
    """A fresh WebUI process: same Settings output folder and Lora folder, nothing in memory."""
    return FakeHost(tmp_path / "Lora", make_tiny_backbone, output_dir=str(tmp_path / "out"))


def assert_finished_from_the_checkpoint(job: TrainingJob, tmp_path: Path, run_dir: Path) -> None:
    assert job.wait(300)
    snap = job.snapshot()
    assert snap["status"] == "done", snap
    assert (snap["step"], snap["total_steps"]) == (TOTAL, TOTAL)
    assert any(m.startswith("resumed from ") and m.endswith(f"step-{STOP_AT:06d} at step {STOP_AT}/{TOTAL}")
               for m in snap["messages"]), snap["messages"]
    assert len(job.all_losses()) == TOTAL - STOP_AT  # steps 4..6 only: it continued, it did not start over
    installed = tmp_path / "Lora" / "resumed lora.safetensors"
    assert snap["lora_file"] == str(installed) and installed.is_file()
    with safe_open(str(installed), "pt") as lora:
        assert lora.metadata()["ss_sd_model_name"] == "base-v15.safetensors"
    assert not (run_dir / ".step-000004.tmp").exists()
    assert json.loads((run_dir / "run.json").read_text())["finished"] is True
    assert snap["resumable"] is None


def test_restart_then_resume_through_the_api(make_tiny_backbone, interrupted, tmp_path):
    shapes_dataset, run_dir = interrupted
    job, host = TrainingJob(), restarted_host(tmp_path, make_tiny_backbone)
    code, snap = api.current_job_route(job, host)
    assert code == 200 and snap["status"] == "idle"
    offered = snap["resumable"]
    assert (offered["output_name"], offered["step"], offered["total_steps"]) == ("resumed lora", STOP_AT, TOTAL)
    assert offered["checkpoint"] == str(run_dir / f"step-{STOP_AT:06d}") and offered["others"] == 0
    assert offered["base_model"] == "base-v15.safetensors" and offered["run_id"] in run_dir.name
    code, snap = api.resume_job_route(job, host, {})
    assert code == 202 and snap["status"] == "running", snap
    assert_finished_from_the_checkpoint(job, tmp_path, run_dir)
    assert api.current_job_route(job, host)[1]["resumable"] is None  # nothing left to resume
    assert api.resume_job_route(job, host, {})[0] == 404


@needs_fastapi
def test_restart_then_resume_over_http(make_tiny_backbone, interrupted, tmp_path):
    """The same through the registered routes, by run_id, under the request guard."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    shapes_dataset, run_dir = interrupted
    job, host = TrainingJob(), restarted_host(tmp_path, make_tiny_backbone)
    app = FastAPI()
    api.register_routes(app, job, lambda: host)
    client = TestClient(app)
    offered = client.get("/lora-train/v1/jobs/current").json()["resumable"]
    assert offered["step"] == STOP_AT
    resume = "/lora-train/v1/jobs/resume"
    assert client.post(resume, content=json.dumps({}), headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.post(resume, json={}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post(resume, json={"run_id": "0" * 12}).status_code == 404
    assert client.post(resume, json={"run_id": ["x"]}).status_code == 422
    assert client.post(resume, json={"run_id": offered["run_id"], "output_dir": "/"}).status_code == 422
    assert job.snapshot()["status"] == "idle"
    response = client.post(resume, json={"run_id": offered["run_id"]}, headers={"Origin": "http://testserver"})
    assert response.status_code == 202, response.json()
    assert_finished_from_the_checkpoint(job, tmp_path, run_dir)


def test_the_resume_button_after_a_restart(make_tiny_backbone, interrupted, tmp_path):
    shapes_dataset, run_dir = interrupted
    job, host = TrainingJob(), restarted_host(tmp_path, make_tiny_backbone)
    defaults = ui_values()
    form = tab.job_form_ui(job, *defaults, host=host)  # a page opened after the restart
    cfg = tab.values_to_config(form)
    assert (cfg.output_name, cfg.max_steps, cfg.lora_rank, cfg.resume_from) == ("resumed lora", TOTAL, 2, None)
    status, _, _ = tab.poll_ui(job, host)
    assert "Resumable: resumed lora stopped at step 3/6" in status and "Press Resume" in status
    assert tab.can_resume(job)
    *form, status = tab.resume_training_ui(host, job, *defaults)
    assert "Resumed &#x27;resumed lora&#x27; from step 3/6." in status, status
    assert tab.values_to_config(form).output_name == "resumed lora" and not tab.can_resume(job)
    assert_finished_from_the_checkpoint(job, tmp_path, run_dir)
    assert host.locked == 1 and host.refreshed == 1
    _, plot, _ = tab.poll_ui(job, host)  # the loss plot is labelled from step 4, not step 1
    assert np.array_equal(np.asarray(plot), np.asarray(tab.render_loss_plot(job.all_losses(), first_step=STOP_AT + 1)))
    assert not np.array_equal(np.asarray(plot), np.asarray(tab.render_loss_plot(job.all_losses())))
    *_, status = tab.resume_training_ui(host, job, *defaults)
    assert "Not resumed: there is no interrupted run to resume" in status


def test_resume_is_refused_when_another_checkpoint_is_loaded(make_tiny_backbone, interrupted, tmp_path):
    shapes_dataset, run_dir = interrupted
    host = restarted_host(tmp_path, make_tiny_backbone)
    host.base_model_path = lambda: "/models/Stable-diffusion/other-model.safetensors"
    job = TrainingJob()
    code, body = api.resume_job_route(job, host, {})
    assert code == 409, body
    assert body["error"] == ("the run 'resumed lora' was trained on base-v15.safetensors, but other-model.safetensors "
                             "is loaded: pick base-v15.safetensors in the checkpoint menu at the top and resume "
                             "again, or start a new run on other-model.safetensors")
    *_, status = tab.resume_training_ui(host, job, *ui_values())
    assert "Not resumed: the run &#x27;resumed lora&#x27; was trained on base-v15.safetensors" in status
    assert job.snapshot()["status"] == "idle" and host.locked == 0
    assert ckpt.list_checkpoints(run_dir)[-1].name == f"step-{STOP_AT:06d}"
    # a resume_from: latest job sent to POST /jobs: refused at once when it names the run's model, else by the
    # trainer's identity check, which compares the model actually loaded
    payload = {**tab.values_to_dict(run_values(shapes_dataset)), "resume_from": "latest"}
    code, body = api.start_job_route(job, host, {**payload, "base_model": "/elsewhere/base-v15.safetensors"})
    assert code == 409 and "was trained on base-v15.safetensors" in body["error"]
    assert api.start_job_route(job, host, payload)[0] == 202
    assert job.wait(300) and job.snapshot()["status"] == "failed"
    assert "base_model 'base-v15.safetensors' -> 'other-model.safetensors'" in job.snapshot()["error"]
    assert ckpt.list_checkpoints(run_dir)[-1].name == f"step-{STOP_AT:06d}"
    assert not (tmp_path / "Lora" / "resumed lora.safetensors").exists()


def test_train_after_interrupt_points_at_resume_and_how_to_start_afresh(make_tiny_backbone, shapes_dataset,
                                                                          tmp_path):
    job = TrainingJob()
    host = InterruptingHost(tmp_path / "Lora", make_tiny_backbone, job, STOP_AT, output_dir=str(tmp_path / "out"))
    values = run_values(shapes_dataset)
    assert "Started." in tab.start_training_ui(host, job, *values)
    assert job.wait(300) and job.snapshot()["status"] == "interrupted"
    assert "Press Resume" in tab.poll_ui(job, host)[0] and tab.can_resume(job)  # offered at once, no restart
    assert "Started." in tab.start_training_ui(host, job, *values)  # Start again, the same settings
    assert job.wait(300)
    snap = job.snapshot()
    assert snap["status"] == "failed" and snap["step"] == 0
    assert snap["error"].startswith("Not started: an interrupted run of 'resumed lora' with these data and settings "
                                    "exists (step 3/6, ")
    assert ("To continue it, press Resume (or POST /lora-train/v1/jobs/resume); to start afresh, turn on overwrite"
            in snap["error"]) and "or choose another output name." in snap["error"]
    status = tab.poll_ui(job, host)[0]
    assert "Resumable: resumed lora stopped at step 3/6" in status and tab.can_resume(job)


def test_several_interrupted_runs_offer_the_newest_and_count_the_others(make_tiny_backbone, shapes_dataset,
                                                                         tmp_path):
    interrupt_in_the_webui(make_tiny_backbone, shapes_dataset, tmp_path)
    host = restarted_host(tmp_path, make_tiny_backbone)
    first = TrainingJob()
    refresh_resumable(first, host)
    older = first.snapshot()["resumable"]
    stopper = TrainingJob()
    other = InterruptingHost(tmp_path / "Lora", make_tiny_backbone, stopper, 1, output_dir=str(tmp_path / "out"))
    assert "Started." in tab.start_training_ui(other, stopper, *run_values(shapes_dataset, output_name="second"))
    assert stopper.wait(300) and stopper.snapshot()["status"] == "interrupted"
    job = TrainingJob()
    refresh_resumable(job, host)
    offered = job.snapshot()["resumable"]
    assert (offered["output_name"], offered["others"]) == ("second", 1)
    assert "(1 other interrupted run(s) in the output folder" in tab.status_html(job.snapshot())
    assert [run.output_name for run, _ in find_resumable(host, job)] == ["second", "resumed lora"]
    gate = TrainingJob()
    gate.start = lambda cfg, *args, **kwargs: setattr(gate, "started_cfg", cfg)  # record what would start
    assert resume_run(host, gate, older["run_id"]).output_name == "resumed lora"
    assert gate.started_cfg.resume_from == "latest" and gate.started_cfg.output_name == "resumed lora"
    assert gate.started_cfg.base_model == "/models/Stable-diffusion/base-v15.safetensors"


def test_a_tampered_run_record_is_not_offered(make_tiny_backbone, interrupted, tmp_path):
    shapes_dataset, run_dir = interrupted
    record = json.loads((run_dir / "run.json").read_text())
    record["config"]["output_name"] = "../../escaped"
    (run_dir / "run.json").write_text(json.dumps(record))
    job, host = TrainingJob(), restarted_host(tmp_path, make_tiny_backbone)
    assert api.current_job_route(job, host)[1]["resumable"] is None
    assert api.resume_job_route(job, host, {})[0] == 404


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio is not installed")
def test_the_tab_built_after_a_restart_shows_the_resume_button(make_tiny_backbone, interrupted, tmp_path):
    def resume_button(host):
        blocks = tab.build_tab(host, TrainingJob())
        [button] = [b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lora_train_resume"]
        return button

    assert resume_button(restarted_host(tmp_path, make_tiny_backbone)).visible is True
    assert resume_button(FakeHost(tmp_path / "Lora", output_dir=str(tmp_path / "empty"))).visible is False


def test_resume_while_a_run_is_in_progress_is_refused(make_tiny_backbone, interrupted, tmp_path):
    shapes_dataset, run_dir = interrupted
    job, host = TrainingJob(), restarted_host(tmp_path, make_tiny_backbone)
    refresh_resumable(job, host)
    with job._lock:
        job.status = "running"  # as while another run trains
    try:
        code, body = api.resume_job_route(job, host, {})
        assert code == 409 and "already in progress" in body["error"]
        assert job.snapshot()["resumable"] is not None and not tab.can_resume(job)  # the button hides meanwhile
    finally:
        with job._lock:
            job.status = "idle"
