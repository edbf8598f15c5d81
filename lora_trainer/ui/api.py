"""HTTP API for the training job: start with a JSON config, poll the snapshot, cancel, resume an interrupted run.

The route logic is plain functions returning ``(status_code, body)``; :func:`register_routes` wraps them for
FastAPI (the WebUI's ``app``). Routes added from ``on_app_started`` do not get the WebUI's ``--api-auth``, so
they check it themselves with :func:`check_api_auth`; every request first passes the checks of
:mod:`lora_trainer.ui.request_guard` (own origin, JSON only, bounded body).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError
from lora_trainer.ui.host import Host, ModelMismatch, job_config, launch_training
from lora_trainer.ui.job import JobBusyError, TrainingJob
from lora_trainer.ui.registry import NameTakenError
from lora_trainer.ui.request_guard import (
    RequestRefused,
    check_content_length,
    check_json_content_type,
    check_origin,
    parse_json_body,
    read_bounded,
)
from lora_trainer.ui.resume import NothingToResume, refresh_resumable, resume_run

PREFIX = "/lora-train/v1"
MAX_RUN_ID_CHARS = 64
Response = tuple[int, dict[str, Any]]


def parse_api_auth(setting: str | None) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` (the WebUI's ``--api-auth`` format) -> {user: password}."""
    users: dict[str, str] = {}
    for item in (setting or "").split(","):
        user, sep, password = item.strip().partition(":")
        if sep and user:
            users[user] = password
    return users


def check_api_auth(authorization: str | None, api_auth: str | None) -> bool:
    """True when no credentials are configured, or the HTTP Basic ``Authorization`` header matches one."""
    if not (api_auth or "").strip():
        return True
    users = parse_api_auth(api_auth)
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    user, sep, password = decoded.partition(":")
    expected = users.get(user)
    if not sep or expected is None:
        return False
    return secrets.compare_digest(password.encode("utf-8"), expected.encode("utf-8"))


def start_job_route(job: TrainingJob, host: Host, payload: Any) -> Response:
    """POST /jobs: validate the JSON config and start it (202); 409 while busy, when the LoRA name is taken
    (unless ``overwrite``) or when a resume needs another checkpoint than the loaded one, 422 for a bad config."""
    try:
        cfg = job_config(host, payload)
        if not cfg.train_data_dir or not Path(cfg.train_data_dir).is_dir():
            raise UserError(f"train_data_dir: image folder {cfg.train_data_dir!r} does not exist")
        launch_training(host, job, cfg, background=True)
    except (JobBusyError, NameTakenError, ModelMismatch) as err:
        return 409, {"error": str(err), "job": job.snapshot()}
    except UserError as err:
        return 422, {"error": str(err)}
    return 202, job.snapshot()


def current_job_route(job: TrainingJob, host: Host | None = None) -> Response:
    """GET /jobs/current: the job snapshot; while nothing runs, ``resumable`` names an interrupted run in the
    host's output folder (also after a WebUI restart)."""
    if host is not None:
        refresh_resumable(job, host)
    return 200, job.snapshot()


def resume_job_route(job: TrainingJob, host: Host, payload: Any) -> Response:
    """POST /jobs/resume: ``{}`` (the run ``resumable`` names) or ``{"run_id": "..."}``: resume that interrupted
    run on the loaded model (202); 404 when there is no such run, 409 while busy, when the run needs another
    checkpoint or its LoRA name is taken, 422 for a bad body."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict) or set(payload) - {"run_id"}:
        return 422, {"error": 'the body must be {} (resume the run GET /jobs/current names as resumable) or '
                              '{"run_id": "<run_id>"}'}
    run_id = payload.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID_CHARS):
        return 422, {"error": f"run_id: expected the run_id of a resumable run (a string of at most "
                              f"{MAX_RUN_ID_CHARS} characters)"}
    try:
        resume_run(host, job, run_id, background=True)
    except NothingToResume as err:
        return 404, {"error": str(err), "job": job.snapshot()}
    except (JobBusyError, NameTakenError, ModelMismatch) as err:
        return 409, {"error": str(err), "job": job.snapshot()}
    except UserError as err:
        return 422, {"error": str(err)}
    return 202, job.snapshot()


def cancel_job_route(job: TrainingJob) -> Response:
    """POST /jobs/current/cancel: ask a running job to stop (409 when nothing runs)."""
    if job.cancel():
        return 200, job.snapshot()
    return 409, {"error": "no training run is in progress", "job": job.snapshot()}


TrustedOrigins = Callable[[], tuple[list[str], str | None]]


def register_routes(app: Any, job: TrainingJob, host: Callable[[], Host],
                    api_auth: Callable[[], str | None] = lambda: None,
                    trusted_origins: TrustedOrigins = lambda: ([], None)) -> None:
    """Add the routes to a FastAPI ``app``; ``host()``, ``api_auth()`` and ``trusted_origins()`` (origin URLs
    and a regex allowed besides the WebUI's own address) are read per request."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def reply(response: Response) -> JSONResponse:
        code, body = response
        return JSONResponse(body, status_code=code)

    def refused(err: RequestRefused) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    def denied(request: Request) -> JSONResponse | None:
        headers = request.headers
        urls, regex = trusted_origins()
        try:
            check_origin(headers.get("origin"), headers.get("referer"), headers.get("host"), request.url.scheme,
                         urls, regex)
        except RequestRefused as err:
            return refused(err)
        if check_api_auth(headers.get("authorization"), api_auth()):
            return None
        return JSONResponse({"error": "authentication required"}, status_code=401,
                            headers={"WWW-Authenticate": "Basic"})

    async def json_body(request: Request, allow_empty: bool = False) -> Any:
        """The request's JSON body after the checks (RequestRefused); with ``allow_empty``, no body is ``{}``."""
        check_json_content_type(request.headers.get("content-type"))
        check_content_length(request.headers.get("content-length"))
        body = await read_bounded(request.stream())
        return {} if allow_empty and not body.strip() else parse_json_body(body)

    async def start(request: Request) -> JSONResponse:
        refusal = denied(request)
        if refusal is not None:
            return refusal
        try:
            payload = await json_body(request)
        except RequestRefused as err:
            return refused(err)
        return reply(start_job_route(job, host(), payload))

    async def resume(request: Request) -> JSONResponse:
        refusal = denied(request)
        if refusal is not None:
            return refusal
        try:
            payload = await json_body(request, allow_empty=True)
        except RequestRefused as err:
            return refused(err)
        return reply(resume_job_route(job, host(), payload))

    async def current(request: Request) -> JSONResponse:
        return denied(request) or reply(current_job_route(job, host()))

    async def cancel(request: Request) -> JSONResponse:
        return denied(request) or reply(cancel_job_route(job))

    for handler in (start, resume, current, cancel):  # postponed annotations would hide Request from FastAPI
        handler.__annotations__ = {"request": Request, "return": JSONResponse}
    app.add_api_route(f"{PREFIX}/jobs", start, methods=["POST"])
    app.add_api_route(f"{PREFIX}/jobs/resume", resume, methods=["POST"])
    app.add_api_route(f"{PREFIX}/jobs/current", current, methods=["GET"])
    app.add_api_route(f"{PREFIX}/jobs/current/cancel", cancel, methods=["POST"])
