"""HTTP API: --api-auth style Basic auth, and the route functions against a fake job."""

from __future__ import annotations

import base64
import importlib.util

import pytest

from lora_trainer.ui import api
from lora_trainer.ui.host import BaseHost
from lora_trainer.ui.job import JobBusyError


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class FakeJob:
    """Records calls; ``busy`` makes start refuse like a running TrainingJob."""

    def __init__(self, busy: bool = False, running: bool = False) -> None:
        self.busy, self.running, self.started, self.cancelled = busy, running, [], 0

    def start(self, cfg, factory, **kwargs):
        if self.busy:
            raise JobBusyError("a training run is already in progress")
        self.started.append((cfg, kwargs))

    def cancel(self) -> bool:
        self.cancelled += 1
        return self.running

    def snapshot(self) -> dict:
        return {"status": "running" if (self.running or self.started) else "idle", "step": 0}


def test_parse_api_auth():
    assert api.parse_api_auth("a:1, b:p:w ,bad,") == {"a": "1", "b": "p:w"}
    assert api.parse_api_auth(None) == {}


@pytest.mark.parametrize(("header", "ok"), [
    (basic("alice", "s3cret"), True),
    (basic("bob", "pw:with:colons"), True),
    ("basic " + base64.b64encode(b"alice:s3cret").decode(), True),
    (basic("alice", "wrong"), False),
    (basic("mallory", "s3cret"), False),
    ("Bearer abc", False),
    ("Basic !!!notbase64", False),
    ("Basic " + base64.b64encode(b"no-colon").decode(), False),
    (None, False),
    ("", False),
])
def test_check_api_auth(header, ok):
    assert api.check_api_auth(header, "alice:s3cret,bob:pw:with:colons") is ok


def test_no_setting_allows_everyone():
    assert api.check_api_auth(None, None) and api.check_api_auth("junk", "  ")


def test_start_route(tmp_path):
    job = FakeJob()
    code, body = api.start_job_route(job, BaseHost(tmp_path), {"train_data_dir": str(tmp_path), "lora_rank": 8})
    assert code == 202 and body["status"] == "running"
    cfg, kwargs = job.started[0]
    assert cfg.lora_rank == 8 and cfg.train_data_dir == str(tmp_path) and kwargs["background"] is True


@pytest.mark.parametrize(("payload", "message"), [
    ({"train_data_dir": "/no/such/folder"}, "does not exist"),
    ({"lora_rnak": 4}, "did you mean 'lora_rank'"),
    (["not", "a", "mapping"], "mapping"),
    ({"train_data_dir": ".", "resolution": 10}, "resolution"),
])
def test_start_route_rejects_bad_configs(payload, message):
    job = FakeJob()
    code, body = api.start_job_route(job, BaseHost("."), payload)
    assert code == 422 and message in body["error"] and not job.started


def test_start_route_busy(tmp_path):
    code, body = api.start_job_route(FakeJob(busy=True), BaseHost(tmp_path), {"train_data_dir": str(tmp_path)})
    assert code == 409 and "already in progress" in body["error"]


def test_start_route_refuses_a_taken_name(tmp_path):
    (tmp_path / "taken.safetensors").write_bytes(b"old")
    job = FakeJob()
    payload = {"train_data_dir": str(tmp_path), "output_name": "taken"}
    code, body = api.start_job_route(job, BaseHost(tmp_path), payload)
    assert code == 409 and "already exists" in body["error"] and not job.started
    code, _ = api.start_job_route(job, BaseHost(tmp_path), {**payload, "overwrite": True})
    assert code == 202 and len(job.started) == 1


def test_current_and_cancel_routes():
    assert api.current_job_route(FakeJob()) == (200, {"status": "idle", "step": 0})
    running = FakeJob(running=True)
    assert api.cancel_job_route(running)[0] == 200 and running.cancelled == 1
    code, body = api.cancel_job_route(FakeJob())
    assert code == 409 and "no training run" in body["error"]


@pytest.mark.skipif(importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("httpx") is None,
                    reason="fastapi/httpx are not installed")
def test_registered_routes_enforce_auth(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    job = FakeJob()
    api.register_routes(app, job, lambda: BaseHost(tmp_path), api_auth=lambda: "u:p")
    client = TestClient(app)
    assert client.get("/lora-train/v1/jobs/current").status_code == 401
    ok = {"Authorization": basic("u", "p")}
    assert client.get("/lora-train/v1/jobs/current", headers=ok).json()["status"] == "idle"
    response = client.post("/lora-train/v1/jobs", json={"train_data_dir": str(tmp_path)}, headers=ok)
    assert response.status_code == 202 and len(job.started) == 1
    assert client.post("/lora-train/v1/jobs", content=b"{", headers=ok).status_code == 400
    assert client.post("/lora-train/v1/jobs/current/cancel", headers=ok).status_code == 409
    assert client.post("/lora-train/v1/jobs/current/cancel").status_code == 401
