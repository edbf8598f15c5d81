"""POST /jobs goes through the same job validator as YAML and tab: unsafe names and values are a 422, no work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lora_trainer.ui import api
from lora_trainer.ui.host import BaseHost


class RecordingJob:
    def __init__(self) -> None:
        self.started: list = []

    def start(self, cfg, factory, **kwargs) -> None:
        self.started.append(cfg)

    def snapshot(self) -> dict:
        return {"status": "running" if self.started else "idle"}


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["../../../elsewhere/pwned", "/tmp/pwned_by_api", "..\\..\\pwned", "", ".", "..",
                                  ".hidden", "CON", "nul.txt", "a/b", "x" * 101])
def test_unsafe_output_names_get_422_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    data = tmp_path / "site" / "data"
    data.mkdir(parents=True)
    before = files_under(tmp_path)
    job = RecordingJob()
    payload = {"train_data_dir": str(data), "output_dir": str(tmp_path / "site" / "out"), "output_name": name}
    code, body = api.start_job_route(job, BaseHost(tmp_path / "site" / "loras"), payload)
    assert code == 422 and body["error"].startswith("output_name: ") and not job.started
    assert files_under(tmp_path) == before
    assert not Path("/tmp/pwned_by_api.safetensors").exists()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("trigger_word", "w" * (5 << 20), "trigger_word: 5242880 characters is too long"),
    ("max_steps", 1_000_000_000_000, "max_steps: 1000000000000 is too large"),
    ("learning_rate", float("nan"), "learning_rate: nan is not a finite number"),
    ("lora_alpha", float("inf"), "lora_alpha: inf is not a finite number"),
    ("sample_prompts", ["p" * 2000], r"sample_prompts[0]: 2000 characters is too long"),
    ("resolution", 72, "resolution: 72 must be a multiple of 64"),
    ("log_dir", "/etc", "log_dir: '/etc' is outside output_dir"),
])
def test_oversized_and_non_finite_values_get_422_before_any_work(tmp_path: Path, key: str, value: object,
                                                                  message: str) -> None:
    job = RecordingJob()
    started = time.perf_counter()
    payload = {"train_data_dir": str(tmp_path), "output_dir": str(tmp_path / "out"), key: value}
    code, body = api.start_job_route(job, BaseHost(tmp_path), payload)
    assert code == 422 and message in body["error"] and not job.started
    assert len(body["error"]) < 300 and time.perf_counter() - started < 1.0
