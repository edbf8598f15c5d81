"""The caption gallery: pages of pictures with their captions, tag chips, search/replace, trigger word for all."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_trainer.data.captions import read_metadata_csv, write_metadata_csv
from lora_trainer.ui import gallery


def _folder(tmp_path, count, captions=None, sidecars=False):
    folder = tmp_path / "pictures"
    folder.mkdir(parents=True)
    names = [f"{i:03d}.png" for i in range(count)]
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (i * 9 % 255, 20, 200)).save(folder / name)
    captions = captions or {}
    if sidecars:
        for name, caption in captions.items():
            (folder / name).with_suffix(".txt").write_text(caption)
    elif captions:
        write_metadata_csv(folder / "metadata.csv", captions)
    return folder, names


def test_booru_tags_are_told_from_sentences():
    assert gallery.is_tag_caption("zkx, 1girl, long hair, looking at viewer, smile")
    assert not gallery.is_tag_caption("zkx, a woman with long hair sitting on a park bench")
    assert gallery.booru_style(["1girl, solo, smile", "1boy, hat, outdoors", "a photo of a cat", ""])
    assert not gallery.booru_style(["a photo of a cat", "a dog on a sofa", "1girl, solo, smile"])
    assert gallery.tags_of(" a, b,, a ,c ") == ["a", "b", "c"] and gallery.join_tags(["a", " b ", ""]) == "a, b"
    assert gallery.tags_to_caption(["x", "y"], "old", True) == "x, y"
    assert gallery.tags_to_caption([], "a sentence", False) == "a sentence"  # hidden chips leave it alone


def test_pages_of_pictures_with_their_captions(tmp_path):
    folder, names = _folder(tmp_path, 27, {"000.png": "zkx, 1girl, smile", "001.png": "zkx, 1girl, hat"})
    view = gallery.page_view(str(folder), 0)
    assert view.names == names[:12] and view.captions[:3] == ["zkx, 1girl, smile", "zkx, 1girl, hat", ""]
    assert (view.pages, view.total) == (3, 27) and view.label == "Page 1 of 3: pictures 1-12 of 27"
    assert view.status == "27 picture(s), 25 without a caption." and view.booru
    assert view.all_tags[:2] == ["zkx", "1girl"]
    last = gallery.page_view(str(folder), 99)  # clamped to the last page
    assert last.page == 2 and last.names == names[24:] and last.label.endswith("25-27 of 27")
    assert "does not exist" in gallery.page_view(str(tmp_path / "nope")).status


def test_edits_are_saved_where_the_captions_live(tmp_path):
    folder, names = _folder(tmp_path / "csv", 3, {"000.png": "a cat"})
    assert gallery.save_page(str(folder), names, "a black cat", "", "a dog ") == "Saved 2 changed caption(s)."
    assert read_metadata_csv(folder / "metadata.csv") == {"000.png": "a black cat", "001.png": "",
                                                          "002.png": "a dog"}
    assert gallery.save_page(str(folder), names, "a black cat", "", "a dog") == "No caption changed."
    assert "ghost.png is not a picture" in gallery.save_page(str(folder), ["ghost.png"], "x")

    folder, names = _folder(tmp_path / "txt", 2, {"000.png": "old", "001.png": "kept"}, sidecars=True)
    assert gallery.save_page(str(folder), names, "new", "kept") == "Saved 1 changed caption(s)."
    assert (folder / "000.txt").read_text() == "new" and not (folder / "metadata.csv").exists()


def test_replace_and_trigger_word_for_every_caption(tmp_path):
    folder, names = _folder(tmp_path, 14, {f"{i:03d}.png": f"a photo of a red cat, {i}" for i in range(13)})
    assert gallery.replace_in_captions(str(folder), "red cat", "blue dog") == \
        "Replaced 'red cat' with 'blue dog' in 13 caption(s)."
    assert gallery.replace_in_captions(str(folder), "", "x") == "Type the text to find first."
    assert gallery.add_trigger_to_all(str(folder), "zkx") == "Added 'zkx' to 14 caption(s)."
    captions = read_metadata_csv(folder / "metadata.csv")
    assert captions["012.png"] == "zkx, a photo of a blue dog, 12" and captions["013.png"] == "zkx"
    assert "already starts with it" in gallery.add_trigger_to_all(str(folder), "zkx")


def test_gallery_components_and_their_updates(tmp_path):
    gr = pytest.importorskip("gradio")
    folder, names = _folder(tmp_path, 3, {"000.png": "zkx, 1girl, smile", "001.png": "zkx, 1boy, hat, red"})
    with gr.Blocks() as blocks:
        box = gr.Textbox(value=str(folder))
        load = gr.Button()
        trigger = gr.Textbox()
        shown = gallery.CaptionGallery()
        shown.wire(box, [load.click], trigger_field=trigger)
    assert isinstance(blocks, gr.Blocks)
    updates = shown.load(str(folder), 0, "Captioned 3.")
    assert len(updates) == len(shown.outputs())
    names_value, page, booru, all_tags, label, status = updates[:6]
    assert names_value == names and page == 0 and booru and label.startswith("Page 1 of 1")
    assert "Captioned 3. 3 picture(s), 1 without a caption." in status
    assert "&lt;b&gt;" in shown.load(str(tmp_path / "<b>"))[5]  # messages are text, never markup
    cards = updates[6:6 + gallery.PAGE_SIZE]
    assert [c["visible"] for c in cards[:4]] == [True, True, True, False]
    images = updates[6 + gallery.PAGE_SIZE:6 + 2 * gallery.PAGE_SIZE]
    assert images[0].size == (40, 30) and images[3] is None
    texts = updates[6 + 2 * gallery.PAGE_SIZE:6 + 3 * gallery.PAGE_SIZE]
    assert texts[1]["value"] == "zkx, 1boy, hat, red" and texts[1]["label"] == "001.png"
    chips = updates[6 + 3 * gallery.PAGE_SIZE:-1]
    assert updates[-1]["visible"]  # the gallery shows once there are pictures
    assert not shown.load(str(tmp_path / "nope"))[-1]["visible"]
    assert chips[0]["value"] == ["zkx", "1girl", "smile"] and chips[0]["visible"]
    assert set(chips[0]["choices"]) == set(all_tags) and not chips[5]["visible"]
    typed = gallery.chips_update("zkx, brand new tag", all_tags)
    assert typed["value"] == ["zkx", "brand new tag"] and "brand new tag" in typed["choices"]
