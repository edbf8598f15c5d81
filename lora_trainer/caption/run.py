"""Caption a folder of images: ``python -m lora_trainer caption --input CLEAN --captioner blip|tagger``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer.caption.base import Captioner
from lora_trainer.data.captions import (
    METADATA_FILE,
    apply_trigger,
    format_metadata_csv,
    load_captions,
    read_metadata_csv,
    write_metadata_csv,
    write_txt_caption,
)
from lora_trainer.data.images import ImageLoadError, list_image_files, load_image
from lora_trainer.errors import UserError
from lora_trainer.fsutil import read_utf8

FORMATS = ("csv", "txt", "both")
Progress = Callable[[int, int], None]


@dataclass
class CaptionReport:
    """What ``caption_folder`` did, by image path relative to the folder (posix)."""

    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False

    def summary(self) -> str:
        lines = [f"captioned {len(self.written)}, kept {len(self.kept)} existing, failed {len(self.failed)}"]
        lines += [f"  failed: {name}: {reason}" for name, reason in sorted(self.failed.items())]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def starts_with_trigger(caption: str, trigger: str) -> bool:
    """True when the caption's first comma-separated part is the trigger (or starts with it and a space)."""
    first, trigger = caption.split(",")[0].strip(), trigger.strip()
    return first == trigger or first.startswith(trigger + " ")


def _relative(folder: Path, path: Path) -> tuple[Path, str]:
    path = path if path.is_absolute() else folder / path
    return path, path.relative_to(folder).as_posix()


def caption_folder(
    folder: str | Path,
    captioner: Captioner,
    *,
    trigger: str = "",
    fmt: str = "csv",
    overwrite: bool = False,
    batch_size: int = 8,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Caption every image under ``folder`` that has no caption yet (all of them with ``overwrite``).

    Captions go to ``folder/metadata.csv`` (``fmt='csv'``), ``.txt`` sidecars (``'txt'``) or both; the
    trigger word is put first exactly once. Existing non-empty captions are kept as they are and copied into
    the requested format. ``progress(done, total)`` is called after each batch; ``should_stop()`` is polled
    before each batch (an interrupt keeps the captions written so far and sets ``report.interrupted``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    csv_path = folder / METADATA_FILE
    old_csv_text = read_utf8(csv_path) if csv_path.is_file() else None
    rows = read_metadata_csv(csv_path) if old_csv_text is not None else {}
    existing = {} if overwrite else {k: v for k, v in load_captions(folder).items() if v.strip()}
    report = CaptionReport()
    todo: list[tuple[Path, str]] = []
    for path, rel in (_relative(folder, p) for p in list_image_files(folder)):
        if rel in existing:
            report.kept.append(rel)
            if fmt in ("csv", "both"):
                rows[rel] = existing[rel]
            if fmt in ("txt", "both"):
                write_txt_caption(path, existing[rel], overwrite=False)
        else:
            todo.append((path, rel))
    if fmt == "txt" and old_csv_text is not None and any(rel in rows for _, rel in todo):
        report.notes.append(f"{csv_path} also has captions for some of these images and takes precedence over .txt "
                            "files; use --format both to update it too")
    try:
        _caption_batches(todo, captioner, trigger, fmt, batch_size, rows, report, progress, should_stop)
    finally:
        if fmt in ("csv", "both") and rows and format_metadata_csv(rows) != old_csv_text:
            write_metadata_csv(csv_path, rows)
    if trigger.strip():
        lacking = [rel for rel in report.kept if not starts_with_trigger(existing[rel], trigger)]
        if lacking:
            report.notes.append(f"{len(lacking)} kept caption(s) do not start with the trigger {trigger.strip()!r}")
    return report


def _caption_batches(
    todo: list[tuple[Path, str]],
    captioner: Captioner,
    trigger: str,
    fmt: str,
    batch_size: int,
    rows: dict[str, str],
    report: CaptionReport,
    progress: Progress | None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Load, caption and record ``todo`` one batch at a time (rows/report are filled in place)."""
    done = 0
    for start in range(0, len(todo), batch_size):
        if should_stop is not None and should_stop():
            report.interrupted = True
            report.notes.append(f"interrupted after {start} of {len(todo)} image(s); run again to caption the rest")
            return
        loaded = []
        for path, rel in todo[start:start + batch_size]:
            try:
                loaded.append((path, rel, load_image(path)))
            except ImageLoadError as err:
                report.failed[rel] = err.reason
        texts = captioner.caption([image for _, _, image in loaded]) if loaded else []
        if len(texts) != len(loaded):
            raise RuntimeError(f"captioner {captioner.name!r} returned {len(texts)} captions for {len(loaded)} images")
        for (path, rel, image), text in zip(loaded, texts, strict=True):
            image.close()
            caption = apply_trigger(text, trigger)
            if fmt in ("txt", "both"):
                write_txt_caption(path, caption, overwrite=True)
            if fmt in ("csv", "both"):
                rows[rel] = caption
            report.written.append(rel)
        done = min(start + batch_size, len(todo))
        if progress is not None:
            progress(done, len(todo))


def add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``caption`` subcommand's options."""
    parser.add_argument("--input", required=True, help="folder of images (captions are written beside them)")
    parser.add_argument("--captioner", choices=("blip", "tagger"), default="blip",
                        help="blip: sentences; tagger: WD14 booru tags (default: blip)")
    parser.add_argument("--model", default=None,
                        help="local model folder (blip: save_pretrained folder, or 'base'/'large' from the local "
                             "Hugging Face cache; tagger: folder with model.onnx and selected_tags.csv)")
    parser.add_argument("--trigger", default="", help="word put first in every new caption, e.g. 'sks'")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="csv",
                        help="metadata.csv, .txt sidecars, or both (default: csv)")
    parser.add_argument("--overwrite", action="store_true", help="recaption images that already have a caption")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    parser.add_argument("--threshold", type=float, default=0.35, help="tagger: general tag threshold")
    parser.add_argument("--character-threshold", type=float, default=0.85, help="tagger: character tag threshold")
    parser.add_argument("--exclude", default="", help="tagger: comma-separated tags never written")
    parser.add_argument("--num-beams", type=int, default=3, help="blip: beam-search width (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="blip: longest caption in tokens (default: 40)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")


class _Bar:
    """A tqdm bar opened on the first progress call (the total is known only then)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="img", desc="caption")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_caption(args: argparse.Namespace) -> int:
    """Run the ``caption`` subcommand: 0 all done, 1 some images failed to load, 2 bad input or missing model."""
    from lora_trainer.caption.factory import make_captioner

    bar = _Bar()
    try:
        if not Path(args.input).is_dir():
            raise FileNotFoundError(f"--input {args.input} is not a folder")
        captioner = make_captioner(args.captioner, args.model, device=args.device, threshold=args.threshold,
                                   character_threshold=args.character_threshold, exclude=args.exclude,
                                   num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        report = caption_folder(args.input, captioner, trigger=args.trigger, fmt=args.fmt,
                                overwrite=args.overwrite, batch_size=args.batch_size, progress=bar)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(report.summary())
    if not report.written and not report.kept and not report.failed:
        print(f"error: no images found in {args.input}", file=sys.stderr)
        return 2
    return 1 if report.failed else 0
