"""The command line: the demo runs end to end; bad input is a one-line error, not a traceback."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from lora_trainer.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


WITHOUT_OPEN_CLIP = ("import importlib.util, sys\nfind = importlib.util.find_spec\n"
                     "importlib.util.find_spec = lambda name, *a: None if name == 'open_clip' else find(name, *a)\n"
                     "sys.modules['open_clip'] = None\nfrom lora_trainer.cli import main\n"
                     "raise SystemExit(main(sys.argv[1:]))\n")


def test_demo_runs_end_to_end_with_nothing_but_the_package(tmp_path):
    """As after ``pip install -e .`` alone: no open_clip, no cached tokenizer, no Hugging Face cache."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_TRAINER_CACHE": str(tmp_path / "empty-cache"),
           "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster, and immune to a busy machine
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPEN_CLIP, "demo", "--workdir", str(tmp_path / "demo"),
                           "--steps", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
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


# ---- ordinary failures are one line, exit 2, before any work ----------------------------------------------------
def write_config(tmp_path: Path, **settings) -> Path:
    import yaml

    data = {"train_data_dir": "data", "base_model": "model.safetensors", "output_dir": "out",
            "output_name": "mine", "resolution": 64, "batch_size": 4, "max_steps": 2, "lora_rank": 4,
            "lora_alpha": 4, "device": "cpu", **settings}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def one_error_line(capsys) -> str:
    """The one ``error:`` line on stderr (after any progress bar), with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


@pytest.fixture
def cli_job(tmp_path, shapes_dataset, make_tiny_backbone, monkeypatch):
    """A folder with data/, a stand-in model.safetensors and a trainer that uses the tiny backbone."""
    import torch
    from safetensors.torch import save_file

    from lora_trainer.train.trainer import Trainer

    shutil.copytree(shapes_dataset, tmp_path / "data")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(Trainer, "_load_backbone", lambda self, device, dtype: setattr(
        self, "backbone", make_tiny_backbone()) or self.backbone)
    return tmp_path


@pytest.mark.parametrize("name", ["../../../elsewhere/pwned", "../escaped", "/tmp/pwned_abs", "", ".", "..",
                                  ".hidden", "CON", "nul.txt", "a/b"])
def test_unsafe_output_names_are_refused_and_nothing_is_written(tmp_path, capsys, name):
    config = write_config(tmp_path, output_name=name)
    before = tree(tmp_path)
    assert main(["train", "--config", str(config)]) == 2
    assert one_error_line(capsys).startswith("error: output_name: ")
    assert tree(tmp_path) == before
    assert not Path("/tmp/pwned_abs.safetensors").exists()


def test_help_and_config_errors_do_not_import_torch(tmp_path):
    config = write_config(tmp_path, lora_rank=100000)
    code = ("import sys\nfrom lora_trainer.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"assert main(['train', '--config', {str(config)!r}]) == 2\n"
            "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lora_rank: 100000 is too large" in done.stderr


def test_cuda_on_a_machine_without_cuda_is_one_line(cli_job, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", "--config", str(write_config(cli_job, device="cuda:1"))]) == 2
    assert "device: cuda:1 is asked for, but" in one_error_line(capsys)
    assert not (cli_job / "out").exists()


def test_output_folder_that_cannot_be_created_or_written(cli_job, capsys, monkeypatch):
    (cli_job / "a_file").write_text("x", encoding="utf-8")
    assert main(["train", "--config", str(write_config(cli_job, output_dir="a_file/out"))]) == 2
    assert "cannot write" in one_error_line(capsys)

    from lora_trainer.train import preflight

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(cli_job / "out"))

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", read_only)
    assert main(["train", "--config", str(write_config(cli_job))]) == 2
    assert "the file system is read-only; choose another output_dir" in one_error_line(capsys)


def test_disk_full_while_saving_is_one_line_and_leaves_no_temporary(cli_job, capsys, monkeypatch):
    real = Path.write_bytes

    def full(self, data):
        if self.name.endswith(".tmp") and self.name.startswith(".mine.safetensors"):
            real(self, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    assert main(["train", "--config", str(write_config(cli_job))]) == 2
    line = one_error_line(capsys)
    assert "mine.safetensors: the disk is full; free some space" in line
    assert not list((cli_job / "out").glob(".mine*")) and not (cli_job / "out" / "mine.safetensors").exists()


def test_non_finite_loss_exits_2_on_the_cli(cli_job, capsys, monkeypatch):
    from lora_trainer.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "_micro_loss", lambda self, *a, **k: torch_nan())
    assert main(["train", "--config", str(write_config(cli_job))]) == 2
    assert "the loss became nan at step 1/2" in one_error_line(capsys)


def torch_nan():
    import torch

    return torch.tensor(float("nan"), requires_grad=True)


def test_resume_without_a_checkpoint_is_an_error(cli_job, capsys):
    assert main(["train", "--config", str(write_config(cli_job)), "--resume"]) == 2
    assert "there is no checkpoint of 'mine'" in one_error_line(capsys)


def test_the_guard_turns_os_and_decoding_errors_into_one_line(monkeypatch, capsys, tmp_path):
    import lora_trainer.cli as cli

    for error, expected in ((OSError(errno.ENOSPC, "No space left on device", "/data/x.bin"),
                             "cannot write /data/x.bin: the disk is full"),
                            (PermissionError(errno.EACCES, "Permission denied", "/root/y"),
                             "cannot use /root/y: permission denied"),
                            (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte"),
                             "a file is not UTF-8 text")):
        def boom(args, error=error):
            raise error

        monkeypatch.setattr(cli, "cmd_train", boom)
        assert cli.main(["train", "--config", "x.yaml"]) == 2
        assert expected in one_error_line(capsys)


def test_garbage_base_model_is_reported_before_the_model_loads(tmp_path, shapes_dataset, capsys):
    shutil.copytree(shapes_dataset, tmp_path / "data")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["train", "--config", str(write_config(tmp_path))]) == 2
    assert "model.safetensors is not a readable .safetensors file" in one_error_line(capsys)
