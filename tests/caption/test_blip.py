"""BLIP captioning on a tiny random model saved here with an offline-built processor."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption.base import CaptionModelMissing
from lora_trainer.caption.blip import BLIP_BASE, BlipCaptioner, clean_caption, resolve_blip_source


def test_blip_captions_a_batch(blip_dir: Path) -> None:
    captioner = BlipCaptioner(blip_dir, device="cpu", num_beams=2, max_new_tokens=3)
    assert captioner.name == "blip"
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("L", (20, 20), 128)]
    assert captioner.caption(images) == ["dog dog dog", "dog dog dog"]
    assert captioner.caption([]) == []
    assert not captioner.model.training


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "blip"
    with pytest.raises(CaptionModelMissing) as info:
        BlipCaptioner(str(missing), device="cpu")
    assert str(missing) in str(info.value) and "model.safetensors" in str(info.value)


def test_hub_id_not_in_cache_names_the_cache_folder(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelMissing) as info:
        BlipCaptioner("base", device="cpu", cache_dir=tmp_path)
    expected = str(tmp_path / "models--Salesforce--blip-image-captioning-base")
    assert expected in str(info.value) and "config.json" in str(info.value)


def test_folder_without_config_is_missing(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelMissing, match="config.json"):
        resolve_blip_source(tmp_path)
    assert resolve_blip_source(None, tmp_path)[0] == BLIP_BASE


def test_clean_caption() -> None:
    assert clean_caption("arafed man  riding\na horse ") == "man riding a horse"
