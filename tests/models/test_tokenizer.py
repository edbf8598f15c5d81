"""Tokenizers built offline: the demo's needs nothing installed; the real one is found or the install line given."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from lora_trainer.models import tokenizer as tok


def test_demo_tokenizer_has_clips_size_and_special_ids(tmp_path: Path) -> None:
    folder = tok.write_demo_tokenizer_files(tmp_path / "a")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == tok.VOCAB_SIZE and sorted(vocab.values()) == list(range(tok.VOCAB_SIZE))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and ",</w>" in vocab
    tokenizer = tok.load_demo_tokenizer(folder)
    ids = tokenizer("sks, a red circle", padding="max_length", max_length=77).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 77 and max(ids) < tok.VOCAB_SIZE
    assert tokenizer.convert_ids_to_tokens(tokenizer("red").input_ids[1:-1]) == ["red</w>"]
    again = tok.write_demo_tokenizer_files(tmp_path / "b")
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (again / name).read_bytes()


def test_tiny_checkpoint_needs_no_clip_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable():
        raise tok.TokenizerUnavailable("not installed")

    monkeypatch.setattr(tok, "find_open_clip_vocab", unavailable)
    monkeypatch.setattr(tok, "find_hub_clip_tokenizer", lambda hub_cache=None: None)
    monkeypatch.setattr(tok, "default_cache_dir", lambda: tmp_path / "empty-cache")
    from lora_trainer.models.loading import load_backbone
    from lora_trainer.models.tiny import write_tiny_checkpoint

    backbone = load_backbone(write_tiny_checkpoint(tmp_path / "model"))
    assert backbone.tokenizer("a cat").input_ids[0] == 49406


def test_without_any_vocabulary_the_error_gives_the_install_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tok.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(tok, "default_cache_dir", lambda: tmp_path / "empty-cache")
    monkeypatch.setattr(tok, "_hub_cache", lambda: tmp_path / "empty-hub")
    with pytest.raises(tok.TokenizerUnavailable) as info:
        tok.load_clip_tokenizer()
    message = str(info.value)
    assert "pip install --no-deps open_clip_torch" in message and "diffusers folder" in message
    assert str(tmp_path / "empty-cache") in message


def test_a_clip_tokenizer_in_the_hugging_face_cache_is_used(tmp_path: Path, monkeypatch) -> None:
    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    tok.write_demo_tokenizer_files(snapshot)
    (snapshot / "tokenizer_config.json").unlink()
    assert tok.find_hub_clip_tokenizer(tmp_path / "hub") == snapshot
    monkeypatch.setattr(tok.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(tok, "default_cache_dir", lambda: tmp_path / "empty-cache")
    monkeypatch.setattr(tok, "_hub_cache", lambda: tmp_path / "hub")
    assert tok.clip_tokenizer_folder() == snapshot
    assert tok.load_clip_tokenizer()("a").input_ids[0] == 49406


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip_torch is not installed")
def test_the_real_vocabulary_comes_from_open_clip(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tok, "default_cache_dir", lambda: tmp_path / "cache")
    tokenizer = tok.load_clip_tokenizer()
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]  # CLIP's own ids for "a" and "cat"
    assert (tmp_path / "cache" / "vocab.json").is_file()
    shutil.rmtree(tmp_path / "cache")
