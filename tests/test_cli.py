"""The command line: the demo runs end to end; bad input is a one-line error, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

from lora_trainer.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_demo_runs_end_to_end(tmp_path):
    done = run_cli("demo", "--workdir", str(tmp_path / "demo"), "--steps", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = tmp_path / "demo" / "output" / "demo_lora.safetensors"
    assert f"LoRA saved: {saved}" in done.stdout
    with safe_open(str(saved), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te_") for k in keys)
    assert (tmp_path / "demo" / "model" / "tiny-sd15.yaml").is_file()


def test_config_typo_names_the_closest_key(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("train_data_dir: data\nbase_model: model.safetensors\nlora_rnak: 8\n", encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lora_rnak" in err and "lora_rank" in err
    assert "Traceback" not in err


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "my.yaml"
    config.write_text("train_data_dir: nowhere\nbase_model: model.safetensors\n", encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    assert "nowhere" in capsys.readouterr().err
