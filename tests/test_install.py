"""install.py installs only what is missing and never moves an installed (pinned) distribution."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "install.py"
spec = importlib.util.spec_from_file_location("lora_trainer_install", INSTALL)
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)

A1111_PINS = {"transformers": "4.30.2", "accelerate": "0.21.0", "safetensors": "0.4.2", "pillow": "9.5.0",
              "numpy": "1.26.2", "gradio": "3.41.2", "protobuf": "3.20.0", "torch": "2.1.2",
              "open-clip-torch": "2.20.0", "pyyaml": "6.0.1", "tqdm": "4.66.1"}


def test_on_the_a1111_stack_only_missing_packages_in_compatible_versions():
    plan = install.plan_install(A1111_PINS)
    assert plan == ["diffusers==0.31.0", "peft==0.13.2", "imagehash>=4.3", "tensorboard==2.20.0"]


def test_on_a_current_stack_versions_are_not_held_back():
    current = {**A1111_PINS, "transformers": "5.2.0", "protobuf": "6.33.0"}
    assert install.plan_install(current) == ["diffusers>=0.31.0", "peft>=0.13.2", "imagehash>=4.3",
                                             "tensorboard>=2.20.0"]


def test_installed_packages_are_never_planned_even_when_old():
    old = {**A1111_PINS, "diffusers": "0.20.0", "peft": "0.5.0", "imagehash": "4.3.1", "tensorboard": "2.10.0"}
    assert install.plan_install(old) == []
    assert any(line.startswith("diffusers 0.20.0") for line in install.too_old(old))


def test_constraints_pin_everything_installed():
    text = install.constraints_text({"numpy": "1.26.2", "torch": "2.13.0+cpu"})
    assert text == "numpy==1.26.2\ntorch==2.13.0+cpu\n"


def test_names_are_normalized():
    assert install.normalize("PyYAML") == "pyyaml"
    assert install.normalize("open_clip_torch") == "open-clip-torch"
    assert install.version_tuple("2.13.0+cpu") == (2, 13, 0)


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=300)


def _freeze(python: Path) -> set[str]:
    return set(_pip(python, "freeze", "--all").stdout.split())


def test_pinned_environment_is_unchanged_and_second_run_installs_nothing(tmp_path):
    """A real venv with an old pin that a missing package depends on: the pin holds, nothing else moves."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    if _pip(python, "install", "-q", "six==1.15.0").returncode != 0:
        pytest.skip("the package index is not reachable")
    before = _freeze(python)
    env = {**os.environ, "LORA_TRAINER_REQUIREMENTS": "six,python-dateutil"}
    first = subprocess.run([str(python), str(INSTALL)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    after = _freeze(python)
    assert "six==1.15.0" in after  # python-dateutil would take a newer six if it could
    assert before <= after
    assert "python-dateutil" in {line.split("==")[0] for line in after - before}  # plus its new dependencies

    started = time.perf_counter()
    second = subprocess.run([str(python), str(INSTALL)], env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - started
    assert second.returncode == 0 and second.stdout == ""
    assert _freeze(python) == after
    print(f"second run: {elapsed:.2f} s including interpreter start")


def test_second_run_starts_no_pip(monkeypatch):
    calls = []
    monkeypatch.setattr(install, "pip_install", lambda *a, **k: calls.append(a))
    monkeypatch.setenv("LORA_TRAINER_REQUIREMENTS", "pytest")
    assert install.install_missing() == []
    assert calls == []
    assert sys.modules.get("launch") is None
