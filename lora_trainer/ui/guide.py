"""The tab as a guided flow: where the user stands (1 pictures -> 2 clean -> 3 captions -> 4 train -> 5 try
it), what to do next, advice from the data, and the line to paste into a prompt once the LoRA exists."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEPS = ("Pictures", "Clean", "Captions", "Train", "Try it")
CLEAN_REPORT = "clean_report.json"  # what the cleaner leaves in the folder it writes
NEXT = {
    1: "Start here: type the folder that holds your pictures and press Load pictures.",
    2: "Optional: Clean (Dataset tab) drops broken, too small and duplicate pictures into a new folder. "
       "Then caption them.",
    3: "Caption the pictures (Dataset tab: Caption writes them; edit any caption beside its picture), or add "
       "the trigger word to all.",
    4: "Train: check the name and trigger word on the Train tab and press Start training.",
    5: "Try it: copy the prompt line on the Train tab or press Send to txt2img; compare epochs in Try it.",
}
# (fewest images, epochs, rank): the usual ranges for 512-1024 px LoRAs of a style or a character
ADVICE = ((200, "3\u20136", "16\u201332"), (100, "6\u201310", "16\u201332"), (40, "10\u201315", "8\u201316"),
          (20, "15\u201320", "8"), (5, "20\u201330", "4\u20138"))


@dataclass
class DatasetFacts:
    """What the guide needs to know about the image folder."""

    folder: str
    exists: bool = False
    images: int = 0
    captioned: int = 0
    cleaned: bool = False

    @property
    def uncaptioned(self) -> int:
        return self.images - self.captioned


def dataset_facts(folder: str) -> DatasetFacts:
    """Count the pictures in ``folder`` and those with a caption; notice a cleaned folder."""
    from lora_trainer.data.captions import load_captions
    from lora_trainer.data.images import list_image_files
    from lora_trainer.errors import UserError

    text = (folder or "").strip()
    path = Path(text)
    if not text or not path.is_dir():
        return DatasetFacts(text)
    names = [p.relative_to(path).as_posix() for p in list_image_files(path)]
    try:
        captions = load_captions(path)
    except (UserError, OSError, ValueError):
        captions = {}
    captioned = sum(1 for name in names if captions.get(name, "").strip())
    return DatasetFacts(text, True, len(names), captioned, (path / CLEAN_REPORT).is_file())


def current_step(facts: DatasetFacts, status: str = "idle", lora_ready: bool = False) -> int:
    """The step the user is at: 1 until there are pictures, 5 once a LoRA is installed."""
    if status == "running":
        return 4
    if status == "done" and lora_ready:
        return 5
    if not facts.images:
        return 1
    if facts.uncaptioned:
        return 3 if facts.cleaned or facts.captioned else 2
    return 4


def step_line_html(step: int, facts: DatasetFacts) -> str:
    """The step line, the current step highlighted, done ones ticked; and what to do now."""
    items = []
    for number, name in enumerate(STEPS, start=1):
        state = "done" if number < step else ("current" if number == step else "todo")
        mark = "&#10003;" if state == "done" else str(number)
        if number == 2 and state == "done" and not facts.cleaned:
            state, mark = "skipped", "&ndash;"
        items.append(f'<li class="lora_train_step lora_train_step_{state}"><span>{mark}</span> {name}</li>')
    return (f'<ol class="lora_train_steps" data-step="{step}">{"".join(items)}</ol>'
            f'<div class="lora_train_next">{html.escape(NEXT[step])}</div>')


def advice_line(facts: DatasetFacts) -> str:
    """A short hint from the data, e.g. ``62 pictures: 10-15 epochs, rank 8-16 are typical.`` (en dashes)."""
    if not facts.exists:
        return f"Folder {facts.folder!r} does not exist." if facts.folder else ""
    count = facts.images
    if count == 0:
        return "No pictures (png, jpg, webp...) in this folder."
    parts = [f"{count} picture{'s' if count != 1 else ''}"]
    if facts.uncaptioned:
        parts.append(f"{facts.uncaptioned} without a caption")
    line = ", ".join(parts) + ": "
    if count < ADVICE[-1][0]:
        return line + "too few for a reliable LoRA; 15\u201350 varied pictures work best."
    epochs, rank = next((e, r) for low, e, r in ADVICE if count >= low)
    line += f"{epochs} epochs, rank {rank} are typical."
    if count >= 20:
        line += " Hold out 10% (validation split 0.1) to see when it is done."
    return line


def checkpoint_html(label: str | None, facts: DatasetFacts) -> str:
    """The Train tab's first line: the checkpoint that will be trained, and the pictures it learns from."""
    if label:
        model = (f"Trains the checkpoint loaded in the WebUI: <b>{html.escape(label)}</b> "
                 f"(pick another in the checkpoint menu at the top of the page).")
    else:
        model = "Trains the base model set under Advanced (base_model)."
    if facts.exists and facts.images:
        pictures = f"Pictures: <b>{html.escape(facts.folder)}</b> ({facts.images})."
    else:
        pictures = "Pictures: none yet &mdash; set the image folder above."
    return f'<div class="lora_train_checkpoint">{model}<br>{pictures}</div>'


def lora_prompt(name: str, trigger_word: str = "", weight: float = 0.8) -> str:
    """``<lora:name:0.8>``, after the trigger word when there is one."""
    tag = f"<lora:{name}:{weight:g}>"
    return f"{trigger_word.strip()}, {tag}" if trigger_word.strip() else tag


def add_to_prompt(addition: str, prompt: str) -> str:
    """``prompt`` with ``addition`` appended; an earlier ``<lora:same name:...>`` tag in it is replaced."""
    addition, prompt = (addition or "").strip(), (prompt or "").strip()
    match = re.search(r"<lora:([^:>]+)", addition)
    if match:
        prompt = re.sub(r"\s*,?\s*<lora:" + re.escape(match[1]) + r"(:[^>]*)?>", "", prompt).strip(" ,")
    return f"{prompt}, {addition}" if prompt else addition


def try_it_prompt(snap: dict[str, Any]) -> str | None:
    """The prompt line for the LoRA a finished run installed, or None."""
    from lora_trainer.ui.job import result_file

    if snap.get("status") != "done":
        return None
    path = result_file(snap)
    return lora_prompt(path.stem, snap.get("trigger_word") or "") if path else None


def guide_view(host: Any, job: Any, folder: str) -> tuple[str, str, str]:
    """(step line, advice line, the Train tab's checkpoint line) for the folder and the job now."""
    facts = dataset_facts(folder)
    snap = job.snapshot()
    step = current_step(facts, snap.get("status", "idle"), bool(snap.get("lora_file") or snap.get("result_path")))
    advice = advice_line(facts)
    advice_html = f'<div class="lora_train_advice">{html.escape(advice)}</div>' if advice else ""
    return step_line_html(step, facts), advice_html, checkpoint_html(host.checkpoint_label(), facts)


def validation_html(snap: dict[str, Any]) -> str:
    """The validation summary beside the plot; the overfitting alarm in red, naming the best step (the best so
    far: a run that goes on after the alarm may still find a lower validation loss, which the plot marks)."""
    overfit = snap.get("overfit")
    if overfit:
        best_step, best_loss = overfit["best_step"], overfit["best_loss"]
        if snap.get("best_step") is not None and not overfit.get("stopped"):
            best_step, best_loss = snap["best_step"], snap["best_loss"]
        kept = (f"Training stopped early; the LoRA holds step {best_step}." if overfit.get("stopped")
                else f"The LoRA of step {best_step} is kept as a snapshot: install it from Try it, "
                     f"or turn on early stop next time.")
        return (f'<div class="lora_train_alarm"><b>Overfitting from step {overfit["step"]}:</b> the validation '
                f"loss stopped improving while the training loss fell, so later steps copy the training pictures "
                f"more and generalise less. Best step: <b>{best_step}</b> (validation loss {best_loss:.4f}). "
                f"{html.escape(kept)}</div>")
    if snap.get("best_step") is not None:
        count = len(snap.get("validation") or [])
        return (f'<div class="lora_train_validation_note">Validation: best step <b>{snap["best_step"]}</b> '
                f"(loss {snap['best_loss']:.4f}) after {count} evaluation(s); no sign of overfitting.</div>")
    return ""
