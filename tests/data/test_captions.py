"""Caption files round-trip exactly; the trigger word goes first, once."""

from __future__ import annotations

import pytest

from lora_trainer.data.captions import (
    CaptionFileError,
    apply_trigger,
    load_captions,
    read_metadata_csv,
    read_txt_caption,
    write_metadata_csv,
    write_txt_caption,
)

TRICKY = {
    "a.png": 'a cat, sitting on a "mat", 1girl',
    "sub/b.jpg": "first line\nsecond line, with comma",
    "c d.webp": "plain",
    "e.png": "",
}


def test_metadata_csv_round_trips_commas_quotes_and_newlines(tmp_path):
    path = write_metadata_csv(tmp_path / "metadata.csv", TRICKY)
    assert read_metadata_csv(path) == TRICKY
    assert path.read_text(encoding="utf-8").splitlines()[0] == "filename,prompt"
    write_metadata_csv(path, read_metadata_csv(path))
    assert read_metadata_csv(path) == TRICKY


def test_metadata_csv_accepts_common_header_names_and_bom(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("\ufefffile_name,caption\nx.png,hello\n\n", encoding="utf-8")
    assert read_metadata_csv(path) == {"x.png": "hello"}


def test_metadata_csv_without_filename_column_names_the_file(tmp_path):
    path = tmp_path / "metadata.csv"
    path.write_text("name,words\nx.png,hello\n", encoding="utf-8")
    with pytest.raises(CaptionFileError, match="metadata.csv.*'filename'"):
        read_metadata_csv(path)


def test_metadata_csv_refuses_overwrite_when_asked(tmp_path):
    path = write_metadata_csv(tmp_path / "metadata.csv", {"a.png": "one"})
    with pytest.raises(FileExistsError):
        write_metadata_csv(path, {"a.png": "two"}, overwrite=False)
    assert read_metadata_csv(path) == {"a.png": "one"}


def test_txt_sidecar_is_kept_unless_overwrite(tmp_path):
    image = tmp_path / "img.png"
    assert read_txt_caption(image) is None
    assert write_txt_caption(image, "first, caption")
    assert not write_txt_caption(image, "second")
    assert read_txt_caption(image) == "first, caption"
    assert write_txt_caption(image, "second", overwrite=True)
    assert read_txt_caption(image) == "second"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a cat", "sks, a cat"),
        ("", "sks"),
        ("a cat, sks, outdoors", "sks, a cat, outdoors"),
        ("sks, a cat", "sks, a cat"),
        ("sks dog on grass", "sks dog on grass"),
    ],
)
def test_apply_trigger_puts_it_first_once(caption, expected):
    assert apply_trigger(caption, "sks") == expected
    assert apply_trigger(expected, "sks") == expected


def test_apply_trigger_without_trigger_keeps_caption():
    assert apply_trigger("  a cat ", "") == "a cat"


def test_load_captions_reads_txt_and_csv_wins(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.png", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    write_txt_caption(tmp_path / "a.png", "from txt a")
    write_txt_caption(tmp_path / "sub/c.jpg", "from txt c")
    write_metadata_csv(tmp_path / "metadata.csv", {"a.png": "from csv a", "b.png": "from csv b"})
    assert load_captions(tmp_path) == {"a.png": "from csv a", "b.png": "from csv b", "sub/c.jpg": "from txt c"}


def test_load_captions_missing_metadata_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_captions(tmp_path, tmp_path / "nope.csv")
