"""Scanning a training folder and batching it per epoch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lora_trainer.data.captions import write_metadata_csv
from lora_trainer.data.dataset import DatasetError, TrainItem, epoch_batches, load_pixels, scan_dataset
from lora_trainer.data.images import center_crop_resize, load_image, to_tensor
from lora_trainer.errors import UserError


@pytest.fixture
def folder(tmp_path, kit) -> Path:
    """Three good images (one captioned by .txt, one by metadata.csv, one without) and the broken set."""
    root = tmp_path / "train"
    kit.save(kit.noise(96, 64, seed=1), root / "a.png")
    (root / "a.txt").write_text("a red fox, sitting\n")
    kit.save(kit.noise(64, 128, seed=2), root / "sub" / "b.jpg")
    kit.save(kit.noise(64, 64, seed=3), root / "c.webp")
    write_metadata_csv(root / "metadata.csv", {"sub/b.jpg": "sks, a tall tower"})
    kit.broken_set(root / "bad")
    return root


def test_scan_items_captions_and_skips(folder):
    scan = scan_dataset(folder, trigger_word="sks", resolution=64)
    names = [item.path.relative_to(folder).as_posix() for item in scan.items]
    assert names == ["a.png", "c.webp", "sub/b.jpg"]
    captions = {item.path.name: item.caption for item in scan.items}
    assert captions == {"a.png": "sks, a red fox, sitting", "b.jpg": "sks, a tall tower", "c.webp": "sks"}
    sizes = {item.path.name: (item.width, item.height, item.target) for item in scan.items}
    assert sizes["b.jpg"] == (64, 128, (64, 64))
    assert scan.uncaptioned == [folder / "c.webp"]
    skipped = {path.name: reason for path, reason in scan.skipped}
    assert skipped == {"empty.png": "empty file (0 bytes)", "cut.jpg": "truncated or corrupt image data",
                       "cut.png": "truncated or corrupt image data",
                       "text.png": "not an image (cannot identify format)"}
    skipped_line, uncaptioned_line = scan.warnings()
    for name in ("bad/empty.png", "bad/cut.jpg", "bad/cut.png", "bad/text.png", "empty file (0 bytes)"):
        assert name in skipped_line
    assert "c.webp" in uncaptioned_line and "'sks'" in uncaptioned_line and "trigger word" in uncaptioned_line


def test_scan_without_trigger_word(folder):
    scan = scan_dataset(folder, resolution=64)
    captions = {item.path.name: item.caption for item in scan.items}
    assert captions["c.webp"] == "" and captions["a.png"] == "a red fox, sitting"
    assert "empty caption" in scan.warnings()[1]


def test_clean_folder_has_no_warnings(tmp_path, kit):
    kit.save(kit.noise(), tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("x")
    assert scan_dataset(tmp_path, resolution=64).warnings() == []


def test_scan_with_buckets(folder):
    scan = scan_dataset(folder, resolution=64, bucket=True)
    targets = {item.path.name: item.target for item in scan.items}
    assert targets == {"a.png": (80, 48), "b.jpg": (48, 80), "c.webp": (64, 64)}


def test_exif_rotated_size_is_the_shown_size(tmp_path, kit):
    kit.exif_rotated_jpeg(tmp_path / "r.jpg", 96, 48)
    (item,) = scan_dataset(tmp_path, resolution=64, bucket=True).items
    assert (item.width, item.height) == (48, 96)
    assert item.target[0] < item.target[1]


def test_external_metadata_path(folder, tmp_path):
    csv_path = write_metadata_csv(tmp_path / "elsewhere.csv", {"c.webp": "from elsewhere"})
    scan = scan_dataset(folder, metadata_path=csv_path, resolution=64)
    assert {item.path.name: item.caption for item in scan.items}["c.webp"] == "from elsewhere"


def test_dataset_errors_name_the_folder(tmp_path, kit):
    with pytest.raises(DatasetError, match="does not exist") as info:
        scan_dataset(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(info.value)
    assert isinstance(info.value, UserError)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"no images \(.*png.*\) in training folder .*empty"):
        scan_dataset(tmp_path / "empty")
    kit.broken_set(tmp_path / "broken")
    with pytest.raises(DatasetError, match="every image in .*broken failed to load") as info:
        scan_dataset(tmp_path / "broken")
    assert "empty.png (empty file (0 bytes))" in str(info.value)
    file_path = kit.save(kit.noise(8, 8), tmp_path / "single.png")
    with pytest.raises(DatasetError, match="is not a folder"):
        scan_dataset(file_path)


def test_load_pixels_shape_and_flip(tmp_path, kit):
    path = kit.save(kit.noise(96, 64), tmp_path / "a.png")
    item = TrainItem(path, "x", 96, 64, (48, 32))
    pixels = load_pixels(item)
    assert pixels.shape == (3, 32, 48) and pixels.dtype == torch.float32
    assert torch.equal(pixels, to_tensor(center_crop_resize(load_image(path), 48, 32)))
    assert torch.equal(load_pixels(item, flip=True), pixels.flip(-1))


def items_with_targets(targets: list[tuple[int, int]]) -> list[TrainItem]:
    return [TrainItem(Path(f"{i}.png"), "", 1, 1, target) for i, target in enumerate(targets)]


def test_epoch_batches_groups_and_covers():
    items = items_with_targets([(64, 64)] * 7 + [(48, 80)] * 5 + [(80, 48)] * 1)
    batches = epoch_batches(items, batch_size=3, seed=1, epoch=0, repeats=2)
    assert Counter(i for batch in batches for i in batch) == {i: 2 for i in range(13)}
    short = Counter()
    for batch in batches:
        assert len({items[i].target for i in batch}) == 1
        assert 1 <= len(batch) <= 3
        if len(batch) < 3:
            short[items[batch[0]].target] += 1
    assert all(count <= 1 for count in short.values())
    # 14 square -> 5 batches, 10 portrait -> 4, 2 landscape -> 1
    assert len(batches) == 10


def test_epoch_batches_deterministic_and_varied():
    items = items_with_targets([(64, 64)] * 20)
    first = epoch_batches(items, 4, seed=7, epoch=3)
    assert first == epoch_batches(items, 4, seed=7, epoch=3)
    assert first != epoch_batches(items, 4, seed=7, epoch=4)
    assert first != epoch_batches(items, 4, seed=8, epoch=3)
    assert sorted(i for batch in first for i in batch) == list(range(20))
    assert all(len(batch) == 4 for batch in first)


def test_epoch_batches_order_of_batches_is_shuffled():
    items = items_with_targets([(64, 64)] * 10 + [(48, 80)] * 10)
    orders = {tuple(items[b[0]].target for b in epoch_batches(items, 5, seed=0, epoch=e)) for e in range(20)}
    assert len(orders) > 1  # size groups are interleaved differently across epochs, not always A then B


def test_epoch_batches_bad_arguments():
    assert epoch_batches([], 2, seed=0, epoch=0) == []
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches(items_with_targets([(8, 8)]), 0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="repeats"):
        epoch_batches(items_with_targets([(8, 8)]), 1, seed=0, epoch=0, repeats=0)


def test_metadata_rows_naming_missing_files_are_reported_with_their_lines(tmp_path, kit):
    kit.save(kit.noise(), tmp_path / "x.png")
    kit.save(kit.noise(seed=2), tmp_path / "y.png")
    (tmp_path / "metadata.csv").write_text("filename,prompt\nx.png,an x\ngone.png,a gone file\ny.png,a y\n"
                                           "sub/lost.jpg,lost\n", encoding="utf-8")
    scan = scan_dataset(tmp_path, resolution=64)
    assert [(row.line, row.filename) for row in scan.unmatched] == [(3, "gone.png"), (5, "sub/lost.jpg")]
    [line] = scan.warnings()
    assert line == (f"{tmp_path / 'metadata.csv'} names 2 file(s) that are not images in the folder (their captions "
                    "are unused): line 3 'gone.png', line 5 'sub/lost.jpg'")
    assert [item.caption for item in scan.items] == ["an x", "a y"]


def test_an_unclosed_quote_stops_the_scan_with_its_line(tmp_path, kit):
    for name in ("a.png", "b.png", "c.png"):
        kit.save(kit.noise(), tmp_path / name)
    (tmp_path / "metadata.csv").write_text('filename,prompt\na.png,"one\nb.png,two\nc.png,three\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"metadata.csv, line 2: a quote opened here is never closed"):
        scan_dataset(tmp_path, resolution=64)
