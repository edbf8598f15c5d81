"""The caption gallery: every picture with its caption editable beside it, a page at a time.

Booru-style captions (``1girl, long_hair, smile``) also show as tag chips to remove or add. Search/replace
and "add the trigger word to all" work on every caption of the folder. Captions are written back the way
they were stored: ``metadata.csv`` when the folder has one (or has no captions yet), else ``.txt`` sidecars.
The callbacks take and return plain values; :class:`CaptionGallery` only builds and wires the components.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError

PAGE_SIZE = 12
COLUMNS = 2  # cards side by side
THUMB = 256  # px, the thumbnail's longest side
MAX_TAG_WORDS = 3  # a booru tag is one to three words ("long hair", "looking at viewer")


def tags_of(caption: str) -> list[str]:
    """The comma-separated tags of a caption, stripped, empty ones dropped, order kept, duplicates once."""
    return list(dict.fromkeys(t.strip() for t in (caption or "").split(",") if t.strip()))


def join_tags(tags: list[str] | None) -> str:
    return ", ".join(t.strip() for t in (tags or []) if t and t.strip())


def is_tag_caption(caption: str) -> bool:
    """At least three comma-separated parts of at most :data:`MAX_TAG_WORDS` words each."""
    tags = tags_of(caption)
    return len(tags) >= 3 and all(len(tag.split()) <= MAX_TAG_WORDS for tag in tags)


def booru_style(captions: list[str]) -> bool:
    """Most captions are tag lists (as DeepBooru and WD14 taggers write them)."""
    written = [c for c in captions if c.strip()]
    return bool(written) and sum(map(is_tag_caption, written)) >= 0.6 * len(written)


def _folder(folder: str) -> Path:
    text = (folder or "").strip()
    if not text or not Path(text).is_dir():
        raise UserError(f"Image folder {text!r} does not exist.")
    return Path(text)


def read_captions(folder: str) -> tuple[list[str], dict[str, str]]:
    """The pictures of ``folder`` (relative posix names, sorted) and their captions."""
    from lora_trainer.data.captions import load_captions
    from lora_trainer.data.images import list_image_files

    path = _folder(folder)
    names = [p.relative_to(path).as_posix() for p in list_image_files(path)]
    return names, load_captions(path)


def write_captions(folder: str, updates: dict[str, str]) -> int:
    """Store changed captions (only files that are pictures of the folder); returns how many changed."""
    from lora_trainer.data.captions import METADATA_FILE, txt_path, write_metadata_csv, write_txt_caption

    path = _folder(folder)
    names, captions = read_captions(folder)
    unknown = sorted(set(updates) - set(names))
    if unknown:
        raise UserError(f"Not saved: {unknown[0]} is not a picture in {path}.")
    changed = {n: c.strip() for n, c in updates.items() if c.strip() != captions.get(n, "").strip()}
    if not changed:
        return 0
    sidecars = any(txt_path(path / n).is_file() for n in names)
    if (path / METADATA_FILE).is_file() or not sidecars:
        write_metadata_csv(path / METADATA_FILE, {**{n: captions.get(n, "") for n in names}, **changed})
    else:
        for name, caption in changed.items():
            write_txt_caption(path / name, caption, overwrite=True)
    return len(changed)


def replace_in_captions(folder: str, find: str, replace: str) -> str:
    """Replace ``find`` (plain text) by ``replace`` in every caption; a status line."""
    if not find:
        return "Type the text to find first."
    names, captions = read_captions(folder)
    updates = {n: captions.get(n, "").replace(find, replace) for n in names if find in captions.get(n, "")}
    count = write_captions(folder, updates)
    return f"Replaced {find!r} with {replace!r} in {count} caption(s)."


def add_trigger_to_all(folder: str, trigger: str) -> str:
    """Put the trigger word first in every caption (once; pictures without a caption get it alone)."""
    from lora_trainer.data.captions import apply_trigger

    trigger = (trigger or "").strip()
    if not trigger:
        return "Type the trigger word first."
    names, captions = read_captions(folder)
    count = write_captions(folder, {n: apply_trigger(captions.get(n, ""), trigger) for n in names})
    return f"Added {trigger!r} to {count} caption(s)" + (" (every caption already starts with it)."
                                                         if not count else ".")


@dataclass
class PageView:
    """One page of the gallery as plain data."""

    names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    page: int = 0
    pages: int = 1
    total: int = 0
    booru: bool = False
    all_tags: list[str] = field(default_factory=list)  # every tag of the folder, most frequent first
    status: str = ""

    @property
    def label(self) -> str:
        if not self.total:
            return "No pictures."
        first = self.page * PAGE_SIZE + 1
        return (f"Page {self.page + 1} of {self.pages}: pictures {first}-{first + len(self.names) - 1} of "
                f"{self.total}")


def page_view(folder: str, page: int = 0) -> PageView:
    """Page ``page`` (clamped) of the folder's pictures with their captions."""
    try:
        names, captions = read_captions(folder)
    except (UserError, OSError, ValueError) as err:
        return PageView(status=str(err))
    pages = max(1, math.ceil(len(names) / PAGE_SIZE))
    page = min(max(int(page or 0), 0), pages - 1)
    chosen = names[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
    every = [captions.get(n, "") for n in names]
    counts = Counter(tag for caption in every for tag in tags_of(caption))
    missing = sum(1 for c in every if not c.strip())
    status = f"{len(names)} picture(s), {missing} without a caption." if names else "No pictures in this folder."
    return PageView(chosen, [captions.get(n, "") for n in chosen], page, pages, len(names), booru_style(every),
                    [tag for tag, _ in counts.most_common()], status)


def save_page(folder: str, names: list[str], *captions: str, quiet: bool = False) -> str:
    """Store the captions edited on the page (``names`` are the page's pictures, in card order); ``quiet``:
    say nothing when none changed (saving on the way to another page or tool)."""
    try:
        count = write_captions(folder, dict(zip(names or [], captions, strict=False)))
    except (UserError, OSError) as err:
        return str(err)
    return f"Saved {count} changed caption(s)." if count else ("" if quiet else "No caption changed.")


def thumbnail(folder: str, name: str) -> Any:
    """A small RGB copy of a picture for its card, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(Path(folder) / name) as image:
            image.thumbnail((THUMB, THUMB))
            return image.convert("RGB")
    except (OSError, ValueError):
        return None


def tags_to_caption(tags: list[str] | None, caption: str, booru: bool) -> str:
    """A card's chips changed: its caption follows (only in tag mode, where the chips are shown)."""
    return join_tags(tags) if booru else caption


def chips_update(caption: str, all_tags: list[str], visible: bool | None = None) -> dict[str, Any]:
    """A card's chips for ``caption``: its tags, with every tag of the folder to pick from."""
    import gradio as gr

    tags = tags_of(caption)
    shown = {} if visible is None else {"visible": visible}
    return gr.update(value=tags, choices=list(dict.fromkeys([*tags, *(all_tags or [])])), **shown)


class CaptionGallery:
    """The gallery's components (built inside the caller's Blocks) and their events."""

    def __init__(self) -> None:
        import gradio as gr

        self.gr = gr
        self.custom_tags = int(gr.__version__.split(".")[0]) >= 4  # gradio 3 refuses new values in chips
        self.names = gr.State([])
        self.page = gr.State(0)
        self.booru = gr.State(False)
        self.all_tags = gr.State([])
        self.status = gr.HTML(elem_id="lora_train_caption_status", elem_classes=["lora_train_messages"])
        with gr.Column(visible=False, elem_id="lora_train_gallery") as self.box:  # shown once there are pictures
            with gr.Row(equal_height=True, elem_id="lora_train_caption_tools"):
                self.trigger = gr.Textbox(label="Trigger word", scale=2, elem_id="lora_train_gallery_trigger")
                self.add_trigger = gr.Button("Add it to all captions", scale=1, elem_id="lora_train_add_trigger")
                self.find = gr.Textbox(label="Find", scale=2, elem_id="lora_train_find")
                self.replace = gr.Textbox(label="Replace with", scale=2, elem_id="lora_train_replace")
                self.replace_button = gr.Button("Replace in all captions", scale=1, elem_id="lora_train_replace_all")
            with gr.Row(equal_height=True):
                self.previous = gr.Button("< Previous page", elem_id="lora_train_gallery_previous")
                self.label = gr.HTML(elem_id="lora_train_gallery_page", elem_classes=["lora_train_messages"])
                self.next = gr.Button("Next page >", elem_id="lora_train_gallery_next")
                self.save = gr.Button("Save captions", variant="primary", elem_id="lora_train_save_captions")
            self.cards, self.images, self.texts, self.chips = [], [], [], []
            for start in range(0, PAGE_SIZE, COLUMNS):
                with gr.Row(elem_classes=["lora_train_card_row"]):
                    for index in range(start, start + COLUMNS):
                        with gr.Column(visible=False, min_width=320, elem_id=f"lora_train_card_{index}",
                                       elem_classes=["lora_train_card"]) as card, gr.Row():
                            self.images.append(gr.Image(type="pil", interactive=False, show_label=False,
                                                        height=160, scale=1, min_width=120,
                                                        elem_id=f"lora_train_card_image_{index}"))
                            with gr.Column(scale=2, min_width=180):
                                self.texts.append(gr.Textbox(lines=3, max_lines=6, label="caption",
                                                             elem_id=f"lora_train_card_caption_{index}"))
                                chips = {"allow_custom_value": True} if self.custom_tags else {}
                                self.chips.append(gr.Dropdown(choices=[], value=[], multiselect=True, label="tags",
                                                              visible=False, elem_id=f"lora_train_card_tags_{index}",
                                                              **chips))
                        self.cards.append(card)

    # ---- updates -----------------------------------------------------------------------------------------------
    def outputs(self) -> list[Any]:
        """The components a page load updates, in :meth:`updates` order."""
        return [self.names, self.page, self.booru, self.all_tags, self.label, self.status, *self.cards,
                *self.images, *self.texts, *self.chips, self.box]

    def updates(self, folder: str, view: PageView, note: str = "") -> list[Any]:
        update = self.gr.update
        shown = len(view.names)
        cards = [update(visible=i < shown) for i in range(PAGE_SIZE)]
        images = [thumbnail(folder, view.names[i]) if i < shown else None for i in range(PAGE_SIZE)]
        texts = [update(value=view.captions[i], label=view.names[i] + ("" if images[i] else " (cannot be read)"))
                 if i < shown else update(value="") for i in range(PAGE_SIZE)]
        chips = [chips_update(view.captions[i] if i < shown else "", view.all_tags, visible=view.booru and i < shown)
                 for i in range(PAGE_SIZE)]
        status = " ".join(part for part in (note, view.status) if part)
        status = f'<div class="lora_train_message">{html.escape(status)}</div>' if status else ""
        return [list(view.names), view.page, view.booru, list(view.all_tags), view.label, status, *cards, *images,
                *texts, *chips, update(visible=view.total > 0)]

    def load(self, folder: str, page: Any = 0, note: str = "") -> list[Any]:
        return self.updates(folder, page_view(folder, int(page or 0)), note)

    # ---- events ------------------------------------------------------------------------------------------------
    def wire(self, folder: Any, triggers: list[Any], trigger_field: Any | None = None) -> list[Any]:
        """Load page 1 after each event in ``triggers``; paging, saving and the tools on the folder.

        Returns the events that write captions, for the caller to chain (``.then``) what follows a change.
        """
        page_inputs = [folder, self.names, self.page, *self.texts]

        def turn(delta: int):
            def handler(folder_value: str, names: list[str], page: int, *captions: str) -> list[Any]:
                note = save_page(folder_value, names, *captions, quiet=delta != 0) if names else ""
                return self.load(folder_value, int(page or 0) + delta, note)
            return handler

        for trigger in triggers:
            trigger(lambda folder_value: self.load(folder_value, 0), inputs=[folder], outputs=self.outputs())
        self.previous.click(turn(-1), inputs=page_inputs, outputs=self.outputs())
        self.next.click(turn(+1), inputs=page_inputs, outputs=self.outputs())
        writes = [self.save.click(turn(0), inputs=page_inputs, outputs=self.outputs())]

        def tool(action):
            def handler(folder_value: str, names: list[str], page: int, first: str, second: str,
                        *captions: str) -> list[Any]:
                saved = save_page(folder_value, names, *captions, quiet=True) if names else ""
                try:
                    note = action(folder_value, first, second)
                except (UserError, OSError) as err:
                    note = str(err)
                return self.load(folder_value, page, " ".join(p for p in (saved, note) if p))
            return handler

        tool_inputs = [folder, self.names, self.page]
        writes.append(self.add_trigger.click(tool(lambda f, trigger, _: add_trigger_to_all(f, trigger)),
                                             inputs=[*tool_inputs, self.trigger, self.trigger, *self.texts],
                                             outputs=self.outputs()))
        if trigger_field is not None:  # the trigger word added to the captions is also the one trained
            self.add_trigger.click(lambda word, current: word.strip() or current,
                                   inputs=[self.trigger, trigger_field], outputs=[trigger_field])
        writes.append(self.replace_button.click(tool(replace_in_captions),
                                                inputs=[*tool_inputs, self.find, self.replace, *self.texts],
                                                outputs=self.outputs()))
        for text, chips in zip(self.texts, self.chips, strict=True):
            chips.change(tags_to_caption, inputs=[chips, text, self.booru], outputs=[text])
            text.blur(chips_update, inputs=[text, self.all_tags], outputs=[chips])
        return writes
