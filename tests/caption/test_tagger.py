"""The WD14 tagger on a tiny ONNX model built here, with a selected_tags.csv whose scores the test controls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.caption.base import CaptionModelMissing
from lora_trainer.caption.tagger import (
    Tag,
    display_name,
    parse_exclude,
    prepare_image,
    read_selected_tags,
    resolve_tagger_files,
    select_tags,
)


@pytest.fixture
def make_tagger(tagger_dir: Path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    from lora_trainer.caption.tagger import WD14Tagger

    return lambda **kw: WD14Tagger(tagger_dir, device="cpu", **kw)


BLACK = Image.new("RGB", (24, 24), (0, 0, 0))
RED = Image.new("RGB", (20, 20), (255, 0, 0))
BLUE = Image.new("RGB", (20, 20), (0, 0, 255))


def test_threshold_order_ratings_and_underscores(make_tagger) -> None:
    tagger = make_tagger(threshold=0.35)
    assert tagger.size == 16
    assert tagger.caption([BLACK]) == ["hatsune miku, 1girl, long hair, ^_^"]
    assert make_tagger(threshold=0.55).caption([BLACK]) == ["hatsune miku, 1girl, long hair"]
    assert make_tagger(threshold=0.1, character_threshold=0.6).caption([BLACK]) == [
        "hatsune miku, 1girl, other character, long hair, ^_^, blue sky"]


def test_input_is_bgr_and_batched(make_tagger) -> None:
    tagger = make_tagger(threshold=0.7, character_threshold=0.95)
    assert tagger.caption([RED, BLUE, BLACK]) == ["red theme, 1girl", "blue theme, 1girl", "1girl"]
    scores = tagger.scores([RED, BLUE])
    assert scores.shape == (2, 9)
    assert scores[0, 7] > 0.99 and scores[1, 7] < 0.01
    assert tagger.caption([]) == []


def test_exclude_accepts_spaces_or_underscores(make_tagger) -> None:
    tagger = make_tagger(exclude="long hair, Hatsune_Miku ,^_^")
    assert tagger.caption([BLACK]) == ["1girl"]


def test_missing_files_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(CaptionModelMissing) as info:
        resolve_tagger_files(tmp_path / "wd14")
    message = str(info.value)
    assert str(tmp_path / "wd14") in message and "model.onnx" in message and "selected_tags.csv" in message
    with pytest.raises(CaptionModelMissing, match="no model folder given"):
        resolve_tagger_files(None)


def test_onnx_file_path_is_accepted(tagger_dir: Path) -> None:
    onnx_path, tags_path = resolve_tagger_files(tagger_dir / "model.onnx")
    assert onnx_path == tagger_dir / "model.onnx" and tags_path == tagger_dir / "selected_tags.csv"
    assert read_selected_tags(tags_path)[0] == Tag("general", 9)


def test_missing_onnxruntime_says_pip_install(tagger_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lora_trainer.caption.base import CaptionDependencyMissing
    from lora_trainer.caption.tagger import WD14Tagger

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(CaptionDependencyMissing, match="pip install onnxruntime"):
        WD14Tagger(tagger_dir)


def test_selection_rules_without_a_model() -> None:
    tags = [Tag("short_hair", 0), Tag("o_o", 0), Tag("rating_x", 9), Tag("char", 4), Tag("c", 0), Tag("low", 0)]
    picked = select_tags([0.5, 0.9, 1.0, 0.86, 0.5, 0.35], tags, threshold=0.35, exclude=parse_exclude(["c"]))
    assert picked == [("o_o", 0.9), ("char", 0.86), ("short hair", 0.5)]
    assert display_name(">_<") == ">_<" and display_name("looking_at_viewer") == "looking at viewer"


def test_prepare_image_pads_on_white_and_flips_to_bgr() -> None:
    wide = Image.new("RGB", (8, 4), (255, 0, 0))
    array = prepare_image(wide, 8)
    assert array.shape == (8, 8, 3) and array.dtype == np.float32
    assert array[0, 0].tolist() == [255.0, 255.0, 255.0]  # padding row
    assert array[4, 4].tolist() == [0.0, 0.0, 255.0]  # red in BGR order
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert prepare_image(transparent, 4).min() == 255.0


def test_garbage_onnx_model_names_the_file(tmp_path: Path, tagger_dir: Path) -> None:
    import shutil

    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    from lora_trainer.caption.base import CaptionModelBroken
    from lora_trainer.caption.tagger import WD14Tagger

    broken = shutil.copytree(tagger_dir, tmp_path / "tagger")
    (broken / "model.onnx").write_bytes(b"definitely not a protobuf" * 10)
    with pytest.raises(CaptionModelBroken, match=r"tagger model file .*model\.onnx cannot be read \(not a valid ONNX"):
        WD14Tagger(broken, device="cpu")


def test_non_utf8_tags_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "selected_tags.csv"
    path.write_bytes("tag_id,name,category,count\n1,café,0,1\n".encode("cp1252"))
    with pytest.raises(Exception, match=r"selected_tags\.csv is not UTF-8 text \(byte 0xe9 on line 2"):
        read_selected_tags(path)
