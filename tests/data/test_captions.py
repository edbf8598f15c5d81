"""Caption files round-trip exactly; the trigger word goes first, once."""

from __future__ import annotations

import pytest

from lora_trainer.data.captions import (
    CaptionFileError,
    CaptionRow,
    apply_trigger,
    load_captions,
    read_metadata_csv,
    read_metadata_rows,
    read_txt_caption,
    write_metadata_csv,
    write_txt_caption,
)
from lora_trainer.fsutil import TextEncodingError

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


# ---- strict CSV: structure problems are errors with the file and line --------------------------------------------
def _csv(tmp_path, text: str, encoding: str = "utf-8"):
    path = tmp_path / "metadata.csv"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(("text", "message"), [
    ('filename,prompt\na.png,a red circle\nb.png,"a blue square\nc.png,a green circle\nd.png,a dot\n'
     'e.png,x\nf.png,y\n', r"metadata.csv, line 3: a quote opened here is never closed"),
    ('filename,prompt\na.png,"one\nb.png,two\nc.png,three"\n',
     r"metadata.csv, line 2: the quoted caption runs to line 4 and swallows 2 row\(s\) such as 'b.png,two'"),
    ('filename,prompt\na.png,"quoted" tail\n', r'metadata.csv, line 2: text follows a closing quote'),
    ("filename,prompt\na.png,a red, circle\n", r"metadata.csv, line 2: 3 field\(s\), expected 2 \(filename,prompt\); "
                                              r"put a caption that contains commas in double quotes"),
    ("filename,prompt\na.png\n", r"metadata.csv, line 2: 1 field\(s\), expected 2"),
    ("filename,prompt\n  ,a caption\n", r"metadata.csv, line 2: the file name is empty"),
    ("filename,prompt\na.png," + "w" * 2001 + "\n", r"metadata.csv, line 2: the caption is 2001 characters long"),
])
def test_metadata_csv_structure_problems_name_the_line(tmp_path, text, message):
    with pytest.raises(CaptionFileError, match=message):
        read_metadata_csv(_csv(tmp_path, text))


def test_multi_line_quoted_captions_are_still_fine(tmp_path):
    path = _csv(tmp_path, 'filename,prompt\na.png,"first line\nsecond, with comma"\nb.png,plain\n')
    assert read_metadata_rows(path) == [CaptionRow(2, "a.png", "first line\nsecond, with comma"),
                                        CaptionRow(4, "b.png", "plain")]


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_windows_encoded_metadata_csv_is_one_clear_line(tmp_path, encoding):
    path = _csv(tmp_path, "filename,prompt\na.png,café au lait\n", encoding)
    with pytest.raises(TextEncodingError) as info:
        read_metadata_csv(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "is not UTF-8 text (byte 0xe9 on line 2; it looks like Windows-1252 / Latin-1); save it as UTF-8" in message
    assert "Excel: 'CSV UTF-8'" in message


def test_windows_encoded_txt_caption_names_the_file(tmp_path):
    (tmp_path / "img.txt").write_bytes("naïve".encode("cp1252"))
    with pytest.raises(TextEncodingError, match=r"img\.txt is not UTF-8 text \(byte 0xef on line 1"):
        read_txt_caption(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("w" * 3000, encoding="utf-8")
    with pytest.raises(CaptionFileError, match=r"img\.txt: the caption is 3000 characters long"):
        read_txt_caption(tmp_path / "img.png")


def test_huge_caption_files_are_refused_before_reading(tmp_path, monkeypatch):
    from lora_trainer.data import captions

    (tmp_path / "img.txt").write_bytes(b"w" * 9000)
    with pytest.raises(CaptionFileError, match=r"img\.txt: the caption is 9000 bytes long"):
        read_txt_caption(tmp_path / "img.png")
    monkeypatch.setattr(captions, "MAX_CSV_BYTES", 1 << 20)
    path = _csv(tmp_path, "filename,prompt\n" + "a.png,x\n" * 200_000)
    with pytest.raises(CaptionFileError, match=r"metadata\.csv is 1 MiB; a caption file is at most 1 MiB"):
        read_metadata_csv(path)
