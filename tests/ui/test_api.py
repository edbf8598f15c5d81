"""HTTP API: --api-auth style Basic auth, and the route functions against a fake job."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json

import pytest

from lora_trainer.ui import api
from lora_trainer.ui.host import BaseHost
from lora_trainer.ui.job import JobBusyError


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class FakeJob:
    """Records calls; ``busy`` makes start refuse like a running TrainingJob."""

    config = None  # no run yet: refresh_resumable looks in the host's output folder only

    def __init__(self, busy: bool = False, running: bool = False) -> None:
        self.busy, self.running, self.started, self.cancelled = busy, running, [], 0

    def offer_resumable(self, entry, cfg) -> None:
        assert entry is None and cfg is None, "these tests have no interrupted run on disk"

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
    bad_json = client.post("/lora-train/v1/jobs", content=b"{", headers={**ok, "Content-Type": "application/json"})
    assert bad_json.status_code == 400
    assert client.post("/lora-train/v1/jobs/current/cancel", headers=ok).status_code == 409
    assert client.post("/lora-train/v1/jobs/current/cancel").status_code == 401
    assert client.post("/lora-train/v1/jobs/resume", json={}).status_code == 401


# ---- the routes as a browser or an attacker reaches them -------------------------------------------------------------
needs_fastapi = pytest.mark.skipif(
    importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("httpx") is None,
    reason="fastapi/httpx are not installed")
JOBS = "/lora-train/v1/jobs"


def make_client(tmp_path, job=None, **kwargs):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    api.register_routes(app, job if job is not None else FakeJob(), lambda: BaseHost(tmp_path), **kwargs)
    return TestClient(app)


@needs_fastapi
def test_a_text_plain_post_is_refused_before_any_work(tmp_path):
    job = FakeJob()
    client = make_client(tmp_path, job)
    body = json.dumps({"train_data_dir": str(tmp_path)})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = client.post(JOBS, content=body, headers={"Content-Type": content_type})
        assert response.status_code == 415 and "application/json" in response.json()["error"]
        response = client.post(f"{JOBS}/resume", content=b"{}", headers={"Content-Type": content_type})
        assert response.status_code == 415
    assert client.post(f"{JOBS}/resume").status_code == 415  # no body still needs the JSON type: no form post
    assert not job.started
    response = client.post(JOBS, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 202 and len(job.started) == 1
    response = client.post(f"{JOBS}/resume", headers={"Content-Type": "application/json"})  # {}: nothing here
    assert response.status_code == 404 and "no interrupted run to resume" in response.json()["error"]


@needs_fastapi
def test_a_foreign_origin_is_refused_on_every_route(tmp_path):
    job = FakeJob(running=True)
    client = make_client(tmp_path, job)
    payload = {"train_data_dir": str(tmp_path)}
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/attack.html"},
                    {"Origin": "null"}):
        assert client.post(JOBS, json=payload, headers=headers).status_code == 403
        assert client.get(f"{JOBS}/current", headers=headers).status_code == 403
        assert client.post(f"{JOBS}/current/cancel", headers=headers).status_code == 403
        assert client.post(f"{JOBS}/resume", json={}, headers=headers).status_code == 403
    assert not job.started and job.cancelled == 0
    own = {"Origin": "http://testserver", "Referer": "http://testserver/"}  # the TestClient's Host
    assert client.post(f"{JOBS}/current/cancel", headers=own).status_code == 200
    assert client.post(JOBS, json=payload, headers=own).status_code == 202
    assert client.post(JOBS, json=payload).status_code == 202  # no Origin, no Referer: a script


@needs_fastapi
def test_the_share_link_and_cors_origins_are_trusted(tmp_path):
    job = FakeJob()
    client = make_client(tmp_path, job, trusted_origins=lambda: (["https://abc.gradio.live"], r"https://.*\.lan"))
    payload = {"train_data_dir": str(tmp_path)}
    assert client.post(JOBS, json=payload, headers={"Origin": "https://abc.gradio.live"}).status_code == 202
    assert client.post(JOBS, json=payload, headers={"Origin": "https://box.lan"}).status_code == 202
    assert client.post(JOBS, json=payload, headers={"Origin": "https://xyz.gradio.live"}).status_code == 403
    assert len(job.started) == 2


@needs_fastapi
def test_auth_is_still_required_from_the_own_origin(tmp_path):
    client = make_client(tmp_path, api_auth=lambda: "u:p")
    own = {"Origin": "http://testserver"}
    assert client.get(f"{JOBS}/current", headers=own).status_code == 401
    assert client.get(f"{JOBS}/current", headers={**own, "Authorization": basic("u", "p")}).status_code == 200


@needs_fastapi
def test_oversized_and_deeply_nested_bodies_are_refused(tmp_path):
    job = FakeJob()
    client = make_client(tmp_path, job)
    huge = json.dumps({"train_data_dir": str(tmp_path), "trigger_word": "x" * (5 << 20)})
    response = client.post(JOBS, content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "KiB" in response.json()["error"]
    response = client.post(f"{JOBS}/resume", content=huge, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    deep = '{"sample_prompts": ' + "[" * 10_000 + "]" * 10_000 + "}"  # 20 KB: under the size limit
    response = client.post(JOBS, content=deep, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "nests deeper" in response.json()["error"]
    assert not job.started


@needs_fastapi
def test_a_chunked_body_is_read_only_up_to_the_limit(tmp_path):
    """Without Content-Length the body arrives in chunks: reading stops once the limit is passed."""
    from fastapi import FastAPI

    from lora_trainer.ui.request_guard import MAX_BODY_BYTES

    app = FastAPI()
    job = FakeJob()
    api.register_routes(app, job, lambda: BaseHost(tmp_path))
    chunk, pulled, sent = b" " * 4096, [], []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": JOBS, "raw_path": JOBS.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}

    async def receive():
        pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": len(pulled) < 10_000}  # 40 MB on offer

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413 and not job.started
    assert sum(pulled) <= MAX_BODY_BYTES + 2 * len(chunk)


def test_a_job_without_output_dir_writes_to_the_settings_folder(tmp_path):
    """Not to the WebUI's working folder: the host's output folder (Settings -> LoRA Train) is the default."""
    settings_folder = tmp_path / "settings-out"
    host = BaseHost(tmp_path / "Lora", {"output_dir": str(settings_folder)})
    job = FakeJob()
    assert api.start_job_route(job, host, {"train_data_dir": str(tmp_path)})[0] == 202
    assert api.start_job_route(FakeJob(), host, {"train_data_dir": str(tmp_path), "output_dir": ""})[0] == 202
    assert job.started[0][0].output_dir == str(settings_folder)
    chosen = FakeJob()
    api.start_job_route(chosen, host, {"train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "mine")})
    assert chosen.started[0][0].output_dir == str(tmp_path / "mine")
