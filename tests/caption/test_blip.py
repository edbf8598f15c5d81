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


def test_a_missing_model_is_reported_before_transformers_is_imported(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; sys.modules['torch'] = None\n"
            "from lora_trainer.caption.base import CaptionModelMissing\n"
            "from lora_trainer.caption.blip import BlipCaptioner\n"
            "for model in (sys.argv[1], 'base'):\n"
            "    try:\n        BlipCaptioner(model, cache_dir=sys.argv[2])\n"
            "    except CaptionModelMissing as err:\n        print('missing:', err)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope"), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("missing:") == 2 and "models--Salesforce--blip-image-captioning-base" in done.stdout


def test_garbage_config_or_weights_name_the_file(tmp_path: Path, blip_dir: Path) -> None:
    import shutil

    from lora_trainer.caption.base import CaptionModelBroken

    broken = shutil.copytree(blip_dir, tmp_path / "blip")
    (broken / "config.json").write_text("{this is not json", encoding="utf-8")
    with pytest.raises(CaptionModelBroken, match=r"BLIP model file .*config\.json cannot be read \(not a JSON config"):
        BlipCaptioner(broken, device="cpu")
    shutil.copy(blip_dir / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(CaptionModelBroken, match=r"BLIP model file .*model\.safetensors cannot be read"):
        BlipCaptioner(broken, device="cpu")
