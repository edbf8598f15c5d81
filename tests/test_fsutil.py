"""Atomic writes: whole file or nothing, never a clobbered original, ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer.fsutil import atomic_write, atomic_write_dir, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_a_safetensors_file_gets_the_usual_permissions(tmp_path):
    """safetensors 0.8 writes 0600 files; a LoRA in a shared Lora folder must be readable like any other file."""
    target = tmp_path / "style.safetensors"
    atomic_write(target, lambda tmp: save_file({"w": torch.ones(2)}, str(tmp)))
    assert _mode(target) == _expected_mode()
    assert torch.equal(load_file(str(target))["w"], torch.ones(2))


def test_a_text_file_gets_the_usual_permissions(tmp_path):
    target = atomic_write_text(tmp_path / "style.json", "{}")
    assert _mode(target) == _expected_mode()


def test_a_failed_write_keeps_the_original_and_leaves_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "notes.txt", "original")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_false_refuses_an_existing_file_before_writing(tmp_path):
    target = atomic_write_text(tmp_path / "notes.txt", "original")
    calls = []
    with pytest.raises(FileExistsError, match="notes.txt exists"):
        atomic_write(target, calls.append, overwrite=False)
    assert calls == []
    assert target.read_text() == "original"


def _write_adapter(tmp):
    save_file({"w": torch.ones(2)}, str(tmp / "adapter_model.safetensors"))  # 0600 from safetensors 0.8
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "config.json").write_text("{}")


def test_a_folder_appears_whole_with_the_usual_permissions(tmp_path):
    target = atomic_write_dir(tmp_path / "adapter", _write_adapter)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "adapter_model.safetensors", "sub", "sub/config.json"]
    assert _mode(target / "adapter_model.safetensors") == _expected_mode()
    assert _mode(target) == _mode(target / "sub") == _expected_mode() | (0o111 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_failed_folder_write_keeps_the_original_and_leaves_no_temporary(tmp_path):
    target = atomic_write_dir(tmp_path / "adapter", lambda tmp: (tmp / "v1.txt").write_text("one"))

    def fail(tmp):
        (tmp / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_dir(target, fail)
    assert sorted(p.name for p in target.iterdir()) == ["v1.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_folder_is_replaced_only_when_asked(tmp_path):
    target = atomic_write_dir(tmp_path / "adapter", lambda tmp: (tmp / "v1.txt").write_text("one"))
    calls = []
    with pytest.raises(FileExistsError, match="adapter exists"):
        atomic_write_dir(target, calls.append, overwrite=False)
    assert calls == [] and sorted(p.name for p in target.iterdir()) == ["v1.txt"]
    atomic_write_dir(target, lambda tmp: (tmp / "v2.txt").write_text("two"))
    assert sorted(p.name for p in target.iterdir()) == ["v2.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
