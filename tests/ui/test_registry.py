"""Installing a trained LoRA into the Lora folder: the validated name, preview, user-metadata sidecar."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.ui.registry import NameTakenError, check_name_free, register_lora, webui_sd_version
from lora_trainer.validation import ConfigError


@pytest.mark.parametrize("name", ["キャラ_v1", "café-style", "my style", "v1.5-char_01", "日本語のスタイル (v2)"])
def test_the_installed_name_is_the_output_name(tmp_path, name):
    """Unicode letters and digits are kept: ``<lora:name:0.8>`` matches the name the user gave."""
    assert config_from_dict({"output_name": name}, require=False).output_name == name
    trained = tmp_path / "trained.safetensors"
    trained.write_bytes(b"lora-bytes")
    installed = register_lora(trained, tmp_path / "Lora", name)
    assert installed == tmp_path / "Lora" / f"{name}.safetensors" and installed.stem == name
    assert sorted(p.name for p in installed.parent.iterdir()) == sorted([f"{name}.json", f"{name}.safetensors"])


@pytest.mark.parametrize("name", ["", "   ", "...", "x" * 101, "CON", "nul.txt", "com1", "LPT9", "../../etc/passwd",
                                  "a\\b", "a/b", ".hidden", "name.safetensors", "what?", "a:b", "rtl\u202egnp.exe",
                                  "zero\u200bwidth", "line\u2028break", "tab\tname"])
def test_names_the_validator_refuses_are_not_installed(tmp_path, name):
    """One rule: whatever ``config_from_dict`` refuses, the registry refuses, and writes nothing."""
    with pytest.raises(ConfigError, match="^output_name: "):
        config_from_dict({"output_name": name}, require=False)
    trained = tmp_path / "trained.safetensors"
    trained.write_bytes(b"lora-bytes")
    with pytest.raises(ConfigError, match="^output_name: "):
        register_lora(trained, tmp_path / "Lora", name)
    with pytest.raises(ConfigError, match="^output_name: "):
        check_name_free(tmp_path / "Lora", name)
    assert not (tmp_path / "Lora").exists()


def test_webui_sd_version():
    assert [webui_sd_version(v) for v in ("sd_v1", "sd_v2", "sdxl", "SDXL", None, "flux")] == \
        ["SD1", "SD2", "SDXL", "SDXL", "Unknown", "Unknown"]


def test_register_writes_lora_preview_and_sidecar(tmp_path):
    trained = tmp_path / "out" / "trained.safetensors"
    trained.parent.mkdir()
    trained.write_bytes(b"lora-bytes")
    sample = tmp_path / "sample.jpg"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(sample)
    lora_dir = tmp_path / "models" / "Lora"

    path = register_lora(trained, lora_dir, "my_char", trigger_word=" zkchar ", sd_version="sd_v1",
                         preview=sample, description="a test")
    assert path == lora_dir / "my_char.safetensors" and path.read_bytes() == b"lora-bytes"
    with Image.open(lora_dir / "my_char.preview.png") as preview:
        assert preview.format == "PNG" and preview.size == (16, 16)
    meta = json.loads((lora_dir / "my_char.json").read_text(encoding="utf-8"))
    assert meta["description"] == "a test" and meta["sd version"] == "SD1"
    assert meta["activation text"] == "zkchar" and meta["preferred weight"] == 0.8 and "notes" in meta
    assert not [p for p in lora_dir.iterdir() if p.name.endswith(".tmp")]


def test_register_refuses_to_overwrite_unless_asked(tmp_path):
    trained = tmp_path / "t.safetensors"
    trained.write_bytes(b"new")
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "x.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        register_lora(trained, tmp_path / "Lora", "x", trigger_word="t", sd_version="sdxl")
    assert (tmp_path / "Lora" / "x.safetensors").read_bytes() == b"old"
    register_lora(trained, tmp_path / "Lora", "x", trigger_word="t", sd_version="sdxl", overwrite=True)
    assert (tmp_path / "Lora" / "x.safetensors").read_bytes() == b"new"
    assert json.loads((tmp_path / "Lora" / "x.json").read_text())["sd version"] == "SDXL"


def test_register_in_place_and_missing_source(tmp_path):
    trained = tmp_path / "same.safetensors"
    trained.write_bytes(b"data")
    assert register_lora(trained, tmp_path, "same") == trained and trained.read_bytes() == b"data"
    with pytest.raises(UserError, match="does not exist"):
        register_lora(tmp_path / "missing.safetensors", tmp_path, "m")


def test_check_name_free_before_training(tmp_path):
    assert check_name_free(tmp_path, "キャラ_v1") == tmp_path / "キャラ_v1.safetensors"
    (tmp_path / "キャラ_v1.safetensors").write_bytes(b"old")
    with pytest.raises(NameTakenError, match="'キャラ_v1' already exists.*overwrite"):
        check_name_free(tmp_path, "キャラ_v1")
    assert check_name_free(tmp_path, "キャラ_v1", overwrite=True) == tmp_path / "キャラ_v1.safetensors"
