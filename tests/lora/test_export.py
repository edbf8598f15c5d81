"""LoRA files: safetensors with string metadata, atomic, never silently overwritten."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer.lora.export import load_lora_file, read_lora_metadata, save_lora


def sample_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"lora_unet_x.lora_down.weight": torch.randn(4, 8, generator=gen),
            "lora_unet_x.lora_up.weight": torch.randn(8, 4, generator=gen),
            "lora_unet_x.alpha": torch.tensor(4.0)}


def test_save_and_read_back(tmp_path):
    state = sample_state()
    path = save_lora(tmp_path / "sub" / "a.safetensors", state, {"ss_network_dim": "4"})
    assert path == tmp_path / "sub" / "a.safetensors"
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    again = load_lora_file(path)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    meta = read_lora_metadata(path)
    assert meta["ss_network_dim"] == "4"
    data = path.read_bytes()  # the WebUI's addnet hash: sha256 of everything after the header
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_half_precision_export(tmp_path):
    path = save_lora(tmp_path / "h.safetensors", sample_state(), {}, dtype=torch.float16)
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}


def test_existing_file_is_never_overwritten_unless_asked(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="a.safetensors"):
        save_lora(path, sample_state(), {})
    assert path.read_bytes() == b"user data"
    save_lora(path, sample_state(), {}, overwrite=True)
    assert read_lora_metadata(path)["sshs_model_hash"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    real = Path.write_bytes

    def broken(self, data):
        real(self, data[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", broken)
    with pytest.raises(OSError, match=r"cannot write .*a\.safetensors: the disk is full"):
        save_lora(tmp_path / "a.safetensors", sample_state(), {})
    assert os.listdir(tmp_path) == []


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(TypeError, match="ss_network_dim"):
        save_lora(tmp_path / "a.safetensors", sample_state(), {"ss_network_dim": 4})
    with pytest.raises(ValueError, match="empty"):
        save_lora(tmp_path / "a.safetensors", {}, {})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_lora_metadata(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="junk.safetensors"):
        read_lora_metadata(tmp_path / "junk.safetensors")
