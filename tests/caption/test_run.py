"""caption_folder and the ``caption`` command: triggers, kept captions, csv round trips, idempotence, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption.run import caption_folder, starts_with_trigger
from lora_trainer.data.captions import read_metadata_csv, read_txt_caption


class FakeCaptioner:
    """Returns the caption stored for each image's colour; records the batch sizes it was given."""

    name = "fake"

    def __init__(self, by_colour: dict[tuple[int, int, int], str] | None = None, default: str = "a photo") -> None:
        self.by_colour = by_colour or {}
        self.default = default
        self.batches: list[int] = []

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.batches.append(len(images))
        return [self.by_colour.get(image.convert("RGB").getpixel((0, 0)), self.default) for image in images]


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def make_folder(folder: Path, colours: dict[str, tuple[int, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(folder / name)
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_trigger_first_exactly_once(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {"a.png": RED, "b.png": GREEN, "sub/c.png": BLUE})
    fake = FakeCaptioner({RED: "sks, a dog", GREEN: "a cat, sks", BLUE: "a bird"})
    report = caption_folder(folder, fake, trigger="sks", fmt="both")
    assert sorted(report.written) == ["a.png", "b.png", "sub/c.png"] and not report.kept and not report.failed
    expected = {"a.png": "sks, a dog", "b.png": "sks, a cat", "sub/c.png": "sks, a bird"}
    assert read_metadata_csv(folder / "metadata.csv") == expected
    assert {n: read_txt_caption(folder / n) for n in expected} == expected


def test_existing_captions_kept_unless_overwrite(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {"a.png": RED, "b.png": GREEN})
    (folder / "a.txt").write_text("my own words", encoding="utf-8")
    fake = FakeCaptioner(default="generated")
    report = caption_folder(folder, fake, trigger="sks")
    assert report.kept == ["a.png"] and report.written == ["b.png"] and fake.batches == [1]
    assert read_metadata_csv(folder / "metadata.csv") == {"a.png": "my own words", "b.png": "sks, generated"}
    assert any("trigger" in note for note in report.notes)
    report = caption_folder(folder, fake, trigger="sks", fmt="both", overwrite=True)
    assert sorted(report.written) == ["a.png", "b.png"] and not report.kept
    assert read_txt_caption(folder / "a.png") == "sks, generated"
    assert read_metadata_csv(folder / "metadata.csv") == {"a.png": "sks, generated", "b.png": "sks, generated"}


def test_kept_csv_captions_fill_txt_format(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {"a.png": RED, "b.png": GREEN})
    (folder / "metadata.csv").write_text('filename,prompt\na.png,"from csv, kept"\n', encoding="utf-8")
    report = caption_folder(folder, FakeCaptioner(default="new"), fmt="txt")
    assert report.kept == ["a.png"] and report.written == ["b.png"]
    assert read_txt_caption(folder / "a.png") == "from csv, kept" and read_txt_caption(folder / "b.png") == "new"


@pytest.mark.parametrize("text", ['a "quoted" word, a comma', "two\nlines, and \"both\"", "semi;colon\ttab, 'single'"])
def test_csv_round_trips_commas_quotes_newlines(tmp_path: Path, text: str) -> None:
    folder = make_folder(tmp_path / "d", {"a.png": RED})
    caption_folder(folder, FakeCaptioner(default=text))
    assert read_metadata_csv(folder / "metadata.csv") == {"a.png": text}
    caption_folder(folder, FakeCaptioner(default=text), trigger="sks", overwrite=True)
    assert read_metadata_csv(folder / "metadata.csv") == {"a.png": "sks, " + text}


def test_idempotent(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {"a.png": RED, "b.png": GREEN, "c.png": BLUE})
    fake = FakeCaptioner({RED: "red", GREEN: "green, grass"})
    caption_folder(folder, fake, trigger="sks", fmt="both")
    first = snapshot(folder)
    report = caption_folder(folder, fake, trigger="sks", fmt="both")
    assert snapshot(folder) == first
    assert sorted(report.kept) == ["a.png", "b.png", "c.png"] and not report.written and len(fake.batches) == 1


def test_batches_progress_and_broken_images(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {f"{i}.png": (i * 40, 0, 0) for i in range(5)})
    (folder / "broken.png").write_bytes(b"not a png at all")
    fake = FakeCaptioner()
    calls: list[tuple[int, int]] = []
    report = caption_folder(folder, fake, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert sum(fake.batches) == 5 and max(fake.batches) <= 2
    assert calls[-1] == (6, 6) and [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert list(report.failed) == ["broken.png"] and report.failed["broken.png"]
    assert "broken.png" not in read_metadata_csv(folder / "metadata.csv") and len(report.written) == 5


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        caption_folder(tmp_path, FakeCaptioner(), fmt="json")
    with pytest.raises(FileNotFoundError, match="nope"):
        caption_folder(tmp_path / "nope", FakeCaptioner())


def test_starts_with_trigger() -> None:
    assert starts_with_trigger("sks, a dog", "sks") and starts_with_trigger("sks dog, grass", "sks")
    assert not starts_with_trigger("a dog, sks", "sks") and not starts_with_trigger("sksx, a", "sks")


def test_cli_tagger_end_to_end(tmp_path: Path, tagger_dir: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    from lora_trainer.cli import main

    folder = make_folder(tmp_path / "d", {"red.png": RED, "blue.png": BLUE})
    argv = ["caption", "--input", str(folder), "--captioner", "tagger", "--model", str(tagger_dir),
            "--trigger", "sks", "--threshold", "0.7", "--character-threshold", "0.95", "--exclude", "1girl",
            "--device", "cpu", "--format", "both"]
    assert main(argv) == 0
    assert read_metadata_csv(folder / "metadata.csv") == {"red.png": "sks, red theme", "blue.png": "sks, blue theme"}
    assert read_txt_caption(folder / "red.png") == "sks, red theme"
    assert "captioned 2" in capsys.readouterr().out


def test_cli_missing_model_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lora_trainer.cli import main

    folder = make_folder(tmp_path / "d", {"a.png": RED})
    missing = tmp_path / "models" / "wd14"
    assert main(["caption", "--input", str(folder), "--captioner", "tagger", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "model.onnx" in err and "selected_tags.csv" in err
    assert not (folder / "metadata.csv").exists()


def test_importable_without_model_packages() -> None:
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['transformers'] = None; "
            "from lora_trainer.caption.run import add_caption_arguments, run_caption; "
            "import argparse; p = argparse.ArgumentParser(); add_caption_arguments(p); "
            "print(p.parse_args(['--input', 'x']).captioner)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "blip"


def test_cli_blip_end_to_end(tmp_path: Path, blip_dir: Path) -> None:
    from lora_trainer.cli import main

    folder = make_folder(tmp_path / "d", {"a.png": RED})
    argv = ["caption", "--input", str(folder), "--model", str(blip_dir), "--trigger", "sks", "--device", "cpu",
            "--num-beams", "2", "--max-new-tokens", "4"]
    assert main(argv) == 0
    caption = read_metadata_csv(folder / "metadata.csv")["a.png"]
    assert caption == "sks, dog dog dog dog"


def test_interrupt_stops_captioning_between_batches_and_keeps_what_is_done(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "d", {f"{i}.png": RED for i in range(6)})
    fake = FakeCaptioner(default="a red square")
    report = caption_folder(folder, fake, batch_size=2, should_stop=lambda: len(fake.batches) >= 2)
    assert report.interrupted and fake.batches == [2, 2] and len(report.written) == 4
    assert "interrupted after 4 of 6 image(s)" in report.summary()
    assert len(read_metadata_csv(folder / "metadata.csv")) == 4


def test_cp1252_metadata_csv_is_one_line_on_the_cli(tmp_path: Path, tagger_dir: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
    from lora_trainer.cli import main

    folder = make_folder(tmp_path / "d", {"a.png": RED})
    (folder / "metadata.csv").write_bytes("filename,prompt\na.png,café\n".encode("cp1252"))
    assert main(["caption", "--input", str(folder), "--captioner", "tagger", "--model", str(tagger_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metadata.csv is not UTF-8 text" in err
