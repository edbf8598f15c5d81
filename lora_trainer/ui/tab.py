"""The "LoRA Train" tab: dataset cleaning and captioning, settings, and a live view of the training job.

Written once for gradio 3.41 (A1111) and 4.x (Forge): only components and arguments both have. Every callback is
a plain module-level function of plain values, so tests call them without a browser; ``build_tab`` only wires them.
"""

from __future__ import annotations

import functools
import html
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from lora_trainer.config import FIELDS, TEXT_GENERATION_KEYS, ConfigError, TrainConfig, config_from_dict, dump_config
from lora_trainer.errors import UserError
from lora_trainer.fsutil import atomic_write_text
from lora_trainer.safe_yaml import read_yaml_mapping
from lora_trainer.ui import guide, picker
from lora_trainer.ui.caption_stop import CAPTION_STOP, CaptionStop
from lora_trainer.ui.gallery import CaptionGallery
from lora_trainer.ui.host import Host, job_config, launch_training
from lora_trainer.ui.job import JobBusyError, TrainingJob, current_job
from lora_trainer.ui.plot import PLOT_SIZE, render_loss_plot  # noqa: F401 - PLOT_SIZE: the plot's size, as before
from lora_trainer.ui.resume import refresh_resumable, resume_run

BASIC_ROWS = (("output_name", "trigger_word", "overwrite"), ("lora_rank", "learning_rate", "batch_size"),
              ("max_steps", "epochs", "resolution"),
              ("validation_split", "save_every_n_epochs", "early_stop"))  # the settings in view, three per row
BASIC_KEYS = tuple(name for row in BASIC_ROWS for name in row)
# the tab trains images only: text-generation settings stay out of the form (ignored in an image run, as on the CLI)
ADVANCED_KEYS = tuple(k for k in FIELDS
                      if k not in BASIC_KEYS and k != "train_data_dir" and k not in TEXT_GENERATION_KEYS)
CONFIG_KEYS = ("train_data_dir", *BASIC_KEYS, *ADVANCED_KEYS)  # order of the *values every config callback takes
ZERO_IS_UNSET = frozenset({"max_steps"})  # Number fields where 0 means "not set"
LOCAL_CAPTIONERS = {"BLIP (local model)": "blip", "WD14 tagger (local model)": "tagger"}
DEDUP_CHOICES = ("phash", "clip", "off")
_DROPPED_IMAGE_KINDS = ("too_small", "exact_duplicate", "near_duplicate")
_EXTENDED_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
PRESETS: dict[str, dict[str, Any]] = {
    "Style (SD1.5)": {"lora_rank": 32, "lora_alpha": 16.0, "learning_rate": 1e-4, "resolution": 512, "batch_size": 2,
                      "max_steps": 2000, "flip_aug": True, "target_modules": _EXTENDED_TARGETS,
                      "train_text_encoder": False, "scheduler": "cosine", "warmup_steps": 100},
    "Character (SD1.5)": {"lora_rank": 16, "lora_alpha": 8.0, "learning_rate": 1e-4, "resolution": 512,
                          "batch_size": 2, "max_steps": 1500, "flip_aug": False,
                          "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "train_text_encoder": True,
                          "scheduler": "constant", "warmup_steps": 0},
    "Low VRAM": {"lora_rank": 8, "lora_alpha": 8.0, "batch_size": 1, "resolution": 512,
                 "gradient_checkpointing": True, "train_text_encoder": False, "cache_latents": True,
                 "mixed_precision": "auto", "optimizer": "adamw8bit"},
}
LABELS = {"max_steps": "Max steps (0: use epochs)", "lora_rank": "LoRA rank", "lora_alpha": "LoRA alpha",
          "lora_dropout": "LoRA dropout", "overwrite": "Overwrite a LoRA of the same name"}
GALLERY_HEIGHT = 260  # px of the gallery grids: fixed so polling never moves the page
GRID_HEIGHT = 640  # px of the epoch grid in the Try it tab (the full picture: its download button)
PLOT_HEIGHT = GALLERY_HEIGHT + 40  # the image widget's height includes its label; the gallery's does not
MAX_THUMBNAILS = 60
CLEAN_HEADERS = ["file", "status", "kind", "reason"]
CAPTION_BATCH = 4  # images per captioner call: Interrupt is polled between calls, so it acts within seconds
CAPTION_STOPPING = "Interrupt requested: captioning stops after the current batch and keeps what is written."


# ---- config <-> UI values ------------------------------------------------------------------------------------------
def field_kind(name: str) -> str:
    """bool, choice, number, optional_number, list, text or optional_text: which widget edits a TrainConfig key."""
    f = FIELDS[name]
    annotation = str(f.type)
    if annotation.startswith("bool"):
        return "bool"
    if f.metadata.get("choices"):
        return "choice"
    if annotation.startswith(("int", "float")):
        return "number" if "None" not in annotation or name in ZERO_IS_UNSET else "optional_number"
    if annotation.startswith("list"):
        return "list"
    return "optional_text" if "None" in annotation else "text"


def to_ui(name: str, value: Any) -> Any:
    """A config value as its widget shows it."""
    kind = field_kind(name)
    if kind == "list":
        return "\n".join(value or [])
    if kind in ("optional_text", "optional_number", "text"):
        return "" if value is None else str(value)
    if kind == "number" and value is None:
        return 0
    return value


def from_ui(name: str, raw: Any) -> Any:
    """A widget value back to what ``config_from_dict`` takes; errors name the key."""
    kind = field_kind(name)
    if kind == "bool":
        return bool(raw)
    if kind == "list":
        return [line.strip() for line in str(raw or "").splitlines() if line.strip()]
    if kind == "number":
        if name in ZERO_IS_UNSET and raw in (None, "", 0):
            return None
        return raw
    if kind == "optional_number":
        text = str(raw if raw is not None else "").strip()
        if not text:
            return None
        try:
            number = float(text)
        except ValueError as err:
            raise ConfigError(f"{name}: expected a number or nothing, got {text!r}") from err
        return int(number) if str(FIELDS[name].type).startswith("int") and number.is_integer() else number
    if kind == "optional_text":
        text = str(raw if raw is not None else "").strip()
        return text or None
    return "" if raw is None else raw


def values_to_dict(values: Sequence[Any]) -> dict[str, Any]:
    """UI values in :data:`CONFIG_KEYS` order -> a config mapping (not yet validated)."""
    if len(values) != len(CONFIG_KEYS):
        raise ValueError(f"expected {len(CONFIG_KEYS)} config values, got {len(values)}")
    data = {name: from_ui(name, raw) for name, raw in zip(CONFIG_KEYS, values, strict=True)}
    if data.get("sample_every") and not data.get("sample_prompts"):
        data["sample_prompts"] = [data.get("trigger_word") or data.get("output_name") or "a picture"]
    return data


def values_to_config(values: Sequence[Any]) -> TrainConfig:
    """UI values -> a validated TrainConfig (base_model may stay unset: the host gives the model)."""
    return config_from_dict(values_to_dict(values), require=False)


def config_to_values(cfg: TrainConfig) -> list[Any]:
    """A TrainConfig as UI values in :data:`CONFIG_KEYS` order."""
    return [to_ui(name, getattr(cfg, name)) for name in CONFIG_KEYS]


def initial_config(host: Host) -> tuple[TrainConfig, str | None]:
    """TrainConfig defaults, the host's default preset, then the host's own defaults."""
    defaults = dict(host.defaults())
    preset = defaults.pop("preset", None)
    data = dict(PRESETS.get(preset, {}))
    data.update({k: v for k, v in defaults.items() if k in FIELDS})
    sample_every = data.pop("sample_every", 0) if not data.get("sample_prompts") else None
    try:
        cfg = config_from_dict(data, require=False)
        if sample_every:  # shown as set; Start fills the prompts from the trigger word (values_to_dict)
            cfg.sample_every = int(sample_every)
        return cfg, preset if preset in PRESETS else None
    except (ConfigError, TypeError, ValueError) as err:
        print(f"[lora_trainer] ignoring the tab defaults: {err}")
        return TrainConfig(), None


# ---- dataset callbacks ------------------------------------------------------------------------------------------
def _thumbnail(path: Path, size: int = 192) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            return image.convert("RGB")
    except (OSError, ValueError):
        return None


def clean_dataset_ui(folder: str, output: str, min_size: float, dedup: str,
                     overwrite: bool = False) -> tuple[str, list[list[str]], list, str]:
    """Run the cleaner; returns (summary, [file, status, kind, reason] rows, dropped thumbnails, new image folder).

    ``overwrite`` lets it replace what an earlier clean wrote to the output folder.
    """
    from lora_trainer.data.clean import clean_dataset

    folder = (folder or "").strip()
    if not folder:
        return "Set the image folder first.", [], [], folder
    output = (output or "").strip() or str(Path(folder).with_name(Path(folder).name + "_clean"))
    try:
        report = clean_dataset(folder, output, min_size=int(min_size or 0), dedup=dedup or "phash",
                               overwrite=bool(overwrite))
    except (UserError, OSError, ValueError) as err:
        return f"Clean failed: {err}", [], [], folder
    entries = sorted(report.entries, key=lambda e: (e.status != "dropped", e.file))
    rows = [[e.file, e.status, e.kind, e.reason or ""] for e in entries]
    thumbs = []
    for entry in report.dropped:
        if entry.kind in _DROPPED_IMAGE_KINDS and len(thumbs) < MAX_THUMBNAILS:
            image = _thumbnail(Path(folder) / entry.file)
            if image is not None:
                thumbs.append((image, f"{entry.file}: {entry.reason}"))
    summary = report.summary() + f"\nThe image folder is now the cleaned copy: {output}"
    return summary, rows, thumbs, str(output)


class HostCaptioner:
    """A host-provided captioner (WebUI BLIP / DeepBooru) behind the Captioner interface."""

    def __init__(self, host: Host, name: str) -> None:
        self.host, self.name = host, name

    def caption(self, images: list[Image.Image]) -> list[str]:
        return list(self.host.caption_with_host(self.name, images))


def captioner_choices(host: Host) -> list[str]:
    return [*host.captioners(), *LOCAL_CAPTIONERS]


def make_ui_captioner(host: Host, choice: str, model_path: str) -> Any:
    if choice in LOCAL_CAPTIONERS:
        from lora_trainer.caption.factory import make_captioner

        return make_captioner(LOCAL_CAPTIONERS[choice], (model_path or "").strip() or None)
    if choice in host.captioners():
        return HostCaptioner(host, choice)
    raise UserError(f"unknown captioner {choice!r}; choose one of: {', '.join(captioner_choices(host))}")


def unreadable_note(folder: Path, broken: list[tuple[Path, str]], shown: int = 10) -> str:
    """``", 3 unreadable: a.png (empty file (0 bytes)), ..."``; nothing when every image reads."""
    if not broken:
        return ""
    names = [f"{p.relative_to(folder).as_posix()} ({reason})" for p, reason in broken[:shown]]
    more = f" and {len(broken) - shown} more" if len(broken) > shown else ""
    return f", {len(broken)} unreadable: {', '.join(names)}{more}"


def load_caption_rows(folder: str) -> tuple[list[list[str]], str]:
    """Every usable image under ``folder`` with its caption (metadata.csv, else .txt), for the editable table.

    Files that do not decode are left out of the table and named in the status line with the reason.
    """
    from lora_trainer.data.captions import load_captions
    from lora_trainer.data.images import list_image_files, split_readable

    path = Path((folder or "").strip())
    if not str(folder or "").strip() or not path.is_dir():
        return [], f"Image folder {str(folder or '')!r} does not exist."
    try:
        captions = load_captions(path)
    except (UserError, OSError, ValueError) as err:
        return [], f"Cannot read captions: {err}"
    readable, broken = split_readable(list_image_files(path))
    names = [p.relative_to(path).as_posix() for p in readable]
    rows = [[name, captions.get(name, "")] for name in names]
    missing = sum(1 for _, caption in rows if not caption.strip())
    return rows, f"{len(rows)} image(s){unreadable_note(path, broken)}; {missing} without a caption."


def as_frame(rows: list[list[Any]], headers: list[str]) -> Any:
    """Rows as a pandas DataFrame (gradio's own dependency): an empty table keeps its column names in 3.41 and 4.x."""
    import pandas as pd

    return pd.DataFrame(rows, columns=headers) if rows else pd.DataFrame(columns=headers)


def caption_dataset_ui(host: Host, folder: str, choice: str, model_path: str, trigger: str,
                       overwrite: bool, *, stop: CaptionStop = CAPTION_STOP) -> tuple[str, list[list[str]]]:
    """Caption the folder (metadata.csv) with the chosen captioner under the host's GPU lock.

    The tab's Interrupt (``stop``) and the host's (the WebUI's Interrupt) stop it after the current batch of
    :data:`CAPTION_BATCH` images; the captions written so far are kept.
    """
    from lora_trainer.caption.run import caption_folder

    folder = (folder or "").strip()
    if not folder or not Path(folder).is_dir():
        return f"Image folder {folder!r} does not exist.", []

    def caption() -> Any:
        with stop.running():
            return caption_folder(folder, captioner, trigger=trigger or "", fmt="csv", overwrite=bool(overwrite),
                                  batch_size=CAPTION_BATCH, should_stop=lambda: stop() or host.interrupted())

    try:
        captioner = make_ui_captioner(host, choice, model_path)
        report = host.run_exclusive(caption)
    except (UserError, OSError, ValueError) as err:
        return f"Captioning failed: {err}", load_caption_rows(folder)[0]
    return ("Interrupted: " if report.interrupted else "") + report.summary(), load_caption_rows(folder)[0]


def interrupt_caption_ui(stop: CaptionStop = CAPTION_STOP) -> str:
    """The Caption section's Interrupt: stop captioning after the current batch."""
    return CAPTION_STOPPING if stop.request() else "Captioning is not running."


# ---- settings callbacks -----------------------------------------------------------------------------------------
def apply_preset(name: str, *values: Any) -> list[Any]:
    """The current values with the preset's keys replaced."""
    current = list(values)
    for key, value in PRESETS.get(name, {}).items():
        current[CONFIG_KEYS.index(key)] = to_ui(key, value)
    return current


def _file_path(file: Any) -> Path | None:
    """An upload from gr.File: a path string (gradio 4) or a tempfile wrapper with ``.name`` (gradio 3)."""
    if file is None:
        return None
    if isinstance(file, (list, tuple)):
        file = file[0] if file else None
    name = getattr(file, "name", file)
    return Path(name) if name else None


def load_yaml_ui(file: Any, *values: Any) -> list[Any]:
    """Values from an uploaded YAML config (the CLI's format), plus a status line; unchanged on error."""
    path = _file_path(file)
    if path is None:
        return [*values, "Choose a YAML file first."]
    try:
        data = read_yaml_mapping(path)  # bounded size, UTF-8, no alias bombs: as the CLI reads it
        cfg = config_from_dict(data, require=False)
    except (OSError, yaml.YAMLError, UserError) as err:
        return [*values, f"Cannot load {path.name}: {err}"]
    return [*config_to_values(cfg), f"Loaded {path.name}."]


def save_yaml_ui(*values: Any, host: Host | None = None) -> tuple[str | None, str]:
    """Write the settings as YAML to ``<output_dir>/<output_name>.train.yaml``; returns (file to offer, status).

    An empty output folder is the ``host``'s (the WebUI's Settings)."""
    try:
        cfg = job_config(host, values_to_dict(values)) if host is not None else values_to_config(values)
    except UserError as err:
        return None, f"Not saved: {err}"
    text = dump_config(cfg)
    target = Path(cfg.output_dir) / f"{cfg.output_name}.train.yaml"
    try:
        atomic_write_text(target, text)
    except OSError as err:
        return None, f"Not saved: cannot write {target}: {err}"
    offered = Path(tempfile.mkdtemp(prefix="lora_train_")) / target.name  # gradio serves temp files in any version
    offered.write_text(text, encoding="utf-8")
    return str(offered), f"Saved {target}."


# ---- training callbacks -----------------------------------------------------------------------------------------
def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def message_html(text: str) -> str:
    """A short message (YAML loaded, captions saved...) as HTML; nothing at all while there is none."""
    if not text:
        return ""
    return f'<div class="lora_train_message">{html.escape(text).replace(chr(10), "<br>")}</div>'


def with_message_html(fn: Callable[..., Any], position: int | None = None) -> Callable[..., Any]:
    """``fn`` with its message (the whole result, or the item at ``position``) turned into :func:`message_html`."""

    @functools.wraps(fn)
    def wrapped(*args: Any) -> Any:
        result = fn(*args)
        if position is None:
            return message_html(result)
        result = list(result)
        result[position] = message_html(result[position])
        return result

    return wrapped


def resumable_line(resumable: dict[str, Any]) -> str:
    """The status panel's line about an interrupted run that the Resume button continues."""
    get = resumable.get
    line = (f"Resumable: {get('output_name')} stopped at step {get('step')}/{get('total_steps')} "
            f"(checkpoint {get('checkpoint')})")
    if get("saved"):
        line += f", saved {get('saved')}"
    if get("base_model"):
        line += f", trained on {get('base_model')}"
    line += ". Press Resume to continue it."
    if get("others"):
        line += f" ({get('others')} other interrupted run(s) in the output folder: POST /lora-train/v1/jobs/resume " \
                "with their run_id)"
    return line


def status_html(snap: dict[str, Any], note: str = "") -> str:
    """The status panel; ``data-status`` tells lora_train.js whether to keep polling."""
    esc = html.escape
    status = snap.get("status", "idle")
    parts = [f'<div class="lora_train_status_box" data-status="{esc(status)}">']
    line = f"<b>{esc(status)}</b>"
    if snap.get("total_steps"):
        line += f" &mdash; step {snap['step']}/{snap['total_steps']}"
    if snap.get("loss") is not None:
        line += f" &mdash; loss {snap['loss']:.4f} (avg {snap['loss_avg']:.4f})"
    rate = snap.get("avg_seconds_per_step") or snap.get("seconds_per_step")
    if rate:
        line += f" &mdash; {rate:.2f} s/step"
    if status == "running":
        line += f" &mdash; ETA {_duration(snap.get('eta_seconds'))}"
    if snap.get("elapsed_seconds") is not None:
        line += f" &mdash; elapsed {_duration(snap['elapsed_seconds'])}"
    parts.append(f"<div>{line}</div>")
    percent = 100.0 * float(snap.get("progress") or 0.0)
    parts.append(f'<div class="lora_train_bar"><div style="width:{percent:.1f}%"></div></div>')
    if snap.get("error"):
        parts.append(f'<div class="lora_train_error">{esc(snap["error"])}</div>')
    if snap.get("lora_file"):
        parts.append(f"<div>Installed: {esc(snap['lora_file'])}</div>")
    elif snap.get("result_path"):
        parts.append(f"<div>Saved: {esc(snap['result_path'])}</div>")
    resumable = snap.get("resumable")
    if resumable:
        parts.append(f'<div class="lora_train_resumable">{esc(resumable_line(resumable))}</div>')
    if snap.get("checkpoint") and status != "done":
        parts.append(f"<div>Checkpoint: {esc(snap['checkpoint'])} (resume_from: latest)</div>")
    if note:
        parts.append(f'<div class="lora_train_note">{esc(note)}</div>')
    messages = snap.get("messages") or []
    if messages:
        parts.append('<pre class="lora_train_log">' + esc("\n".join(messages[-6:])) + "</pre>")
    parts.append("</div>")
    return "".join(parts)


@functools.lru_cache(maxsize=8)
def _sample_images(paths: tuple[str, ...]) -> list[tuple[Image.Image, str]]:
    out = []
    for path in paths:
        image = _thumbnail(Path(path), 512)
        if image is not None:
            out.append((image, Path(path).name))
    return out


def poll_ui(job: TrainingJob, host: Host | None = None) -> tuple[str, Image.Image, list]:
    """(status HTML, loss plot with the validation loss, sample images newest first) of the job now; with
    ``host``, while nothing runs, the status names an interrupted run in its output folder that Resume continues."""
    if host is not None:
        refresh_resumable(job, host)
    snap = job.snapshot()
    paths = snap.get("sample_history") or snap["sample_paths"]
    losses = job.all_losses()
    first_step = max(int(snap["step"]) - len(losses) + 1, 1)  # after a resume, the steps since its checkpoint
    overfit = snap.get("overfit") or {}
    plot = render_loss_plot(losses, first_step=first_step, validation=[v[:2] for v in snap.get("validation") or []],
                            best_step=snap.get("best_step"), alarm_step=overfit.get("step"))
    return status_html(snap), plot, _sample_images(tuple(paths))


def poll_guided_ui(host: Host, job: TrainingJob, folder: str, picked: str | None = None) -> tuple[Any, ...]:
    """:func:`poll_ui` plus the guide, the validation note, the "try it" line and the epoch picker (``picked``
    stays selected while the run lists it)."""
    status, plot, samples = poll_ui(job, host)
    snap = job.snapshot()
    prompt = guide.try_it_prompt(snap)
    note, grid, choices, choice = picker.picker_view(snap)
    choice = picked if picked in choices else choice
    return (status, plot, samples, *guide.guide_view(host, job, folder), guide.validation_html(snap), prompt or "",
            prompt is not None, note, grid, choices, choice)


def job_form_ui(job: TrainingJob, *values: Any, host: Host | None = None) -> list[Any]:
    """The settings of the job that runs or ran last (finished, interrupted or failed), else ``values``.

    A freshly opened page (a reload, a second browser tab) asks once, so its form matches the status below it
    instead of showing the defaults; a page already open keeps what the user typed. With ``host`` and no run
    yet (after a restart), an interrupted run's settings are shown (see ``refresh_resumable``).
    """
    if host is not None:
        refresh_resumable(job, host)
    cfg = job.config
    return config_to_values(cfg) if cfg is not None else list(values)


def can_resume(job: TrainingJob) -> bool:
    """Whether the Resume button is offered: a resumable run is known and nothing runs."""
    return bool(job.snapshot().get("resumable")) and not job.running


def resume_training_ui(host: Host, job: TrainingJob, *values: Any) -> list[Any]:
    """The Resume button: continue the run the status offers on the loaded model; returns the form (that run's
    settings once resumed, else ``values``) and the status HTML."""
    offered = job.snapshot().get("resumable") or {}
    try:
        run = resume_run(host, job, offered.get("run_id"))
    except (UserError, JobBusyError) as err:
        return [*values, status_html(job.snapshot(), note=f"Not resumed: {err}")]
    note = f"Resumed {run.output_name!r} from step {run.step}/{run.total_steps}."
    return [*config_to_values(job.config), status_html(job.snapshot(), note=note)]


def start_training_ui(host: Host, job: TrainingJob, *values: Any) -> str:
    """Validate the settings and start the job in the background; returns the status HTML."""
    try:
        cfg = job_config(host, values_to_dict(values))
        if not cfg.train_data_dir or not Path(cfg.train_data_dir).is_dir():
            raise ConfigError(f"train_data_dir: image folder {cfg.train_data_dir!r} does not exist")
        launch_training(host, job, cfg, background=True)
    except (UserError, JobBusyError) as err:
        return status_html(job.snapshot(), note=f"Not started: {err}")
    return status_html(job.snapshot(), note="Started.")


def interrupt_ui(job: TrainingJob, stop: CaptionStop = CAPTION_STOP) -> str:
    """The Train section's Interrupt: stops the training run, and captioning if that is what runs."""
    notes = []
    if job.cancel():
        notes.append("Interrupt requested: the run stops after this step and saves a checkpoint.")
    if stop.request():
        notes.append(CAPTION_STOPPING)
    return status_html(job.snapshot(), note=" ".join(notes) or "Nothing is running.")


# ---- layout -----------------------------------------------------------------------------------------------------
def _label(name: str) -> str:
    return LABELS.get(name) or name.replace("_", " ").capitalize()


def make_field(name: str, value: Any, visible: bool = True) -> Any:
    """The widget for one TrainConfig key, from its metadata."""
    import gradio as gr

    f = FIELDS[name]
    kind = field_kind(name)
    common = {"label": _label(name), "info": f.metadata.get("doc") or None, "elem_id": f"lora_train_cfg_{name}",
              "visible": visible}
    ui_value = to_ui(name, value)
    if kind == "bool":
        return gr.Checkbox(value=bool(ui_value), **common)
    if kind == "choice":
        return gr.Dropdown(choices=list(f.metadata["choices"]), value=ui_value, **common)
    if kind == "number":
        integer = str(f.type).startswith("int")
        return gr.Number(value=ui_value, precision=0 if integer else None, **common)
    if kind == "list":
        return gr.Textbox(value=ui_value, lines=3, placeholder="one per line", **common)
    return gr.Textbox(value=ui_value, lines=1, placeholder="empty: default" if kind.startswith("optional") else "",
                      **common)


def build_tab(host: Host, job: TrainingJob | None = None, *, poll_every: float | None = None) -> Any:
    """The tab as a gr.Blocks; ``poll_every`` adds a timed refresh (needs the queue) besides the JS poller."""
    import gradio as gr

    job = job or current_job()
    refresh_resumable(job, host)  # after a restart, the first page already offers the interrupted run
    cfg, preset = initial_config(host)
    fields: dict[str, Any] = {}
    style = Path(__file__).resolve().parents[2] / "style.css"
    css = style.read_text(encoding="utf-8") if style.is_file() else None
    first_view = guide.guide_view(host, job, cfg.train_data_dir or "")
    with gr.Blocks(analytics_enabled=False, css=css) as blocks:
        step_line = gr.HTML(first_view[0], elem_id="lora_train_step_line")
        with gr.Row(equal_height=True, elem_id="lora_train_folder_row"):
            fields["train_data_dir"] = gr.Textbox(label="Image folder", value=to_ui("train_data_dir",
                                                  cfg.train_data_dir), elem_id="lora_train_cfg_train_data_dir",
                                                  placeholder="the folder that holds your pictures", scale=5)
            load_pictures = gr.Button("Load pictures", variant="primary", scale=1, elem_id="lora_train_load_pictures")
        advice = gr.HTML(first_view[1], elem_id="lora_train_advice", elem_classes=["lora_train_messages"])
        with gr.Tabs(elem_id="lora_train_tabs"):
            with gr.Tab("Dataset", elem_id="lora_train_dataset_tab"):
                with gr.Accordion("Clean (optional): drop broken, too small and duplicate pictures", open=False,
                                  elem_id="lora_train_clean"):
                    with gr.Row():
                        clean_output = gr.Textbox(label="Output folder", placeholder="empty: <image folder>_clean",
                                                  elem_id="lora_train_clean_output")
                        clean_min = gr.Number(label="Minimum size (px)", value=512, precision=0,
                                              elem_id="lora_train_clean_min_size")
                        clean_dedup = gr.Dropdown(label="Duplicates", choices=list(DEDUP_CHOICES), value="phash",
                                                  elem_id="lora_train_clean_dedup")
                    with gr.Row():
                        clean_overwrite = gr.Checkbox(label="Replace an earlier clean in the output folder",
                                                      value=False, elem_id="lora_train_clean_overwrite")
                        clean_button = gr.Button("Clean", elem_id="lora_train_clean_button")
                    clean_summary = gr.Textbox(label="Result", lines=3, interactive=False,
                                               elem_id="lora_train_clean_summary")
                    clean_table = gr.Dataframe(headers=CLEAN_HEADERS, type="array",
                                               datatype=["str", "str", "str", "str"], col_count=(4, "fixed"),
                                               interactive=False, wrap=True, elem_id="lora_train_clean_table")
                    clean_gallery = gr.Gallery(label="Dropped images", columns=6, height=GALLERY_HEIGHT,
                                               object_fit="contain", elem_id="lora_train_dropped_gallery",
                                               elem_classes=["lora_train_gallery"])
                with gr.Accordion("Caption automatically", open=False, elem_id="lora_train_caption"):
                    choices = captioner_choices(host)
                    with gr.Row():
                        cap_choice = gr.Dropdown(label="Captioner", choices=choices, value=choices[0],
                                                 elem_id="lora_train_captioner")
                        cap_model = gr.Textbox(label="Model path (local models)", placeholder="empty: default folder",
                                               elem_id="lora_train_caption_model")
                        cap_trigger = gr.Textbox(label="Caption trigger word", value=cfg.trigger_word,
                                                 elem_id="lora_train_caption_trigger")
                        cap_overwrite = gr.Checkbox(label="Overwrite existing captions", value=False,
                                                    elem_id="lora_train_caption_overwrite")
                    with gr.Row():
                        cap_button = gr.Button("Caption", elem_id="lora_train_caption_button")
                        cap_stop = gr.Button("Interrupt", elem_id="lora_train_caption_interrupt")
                gallery = CaptionGallery()
            with gr.Tab("Train", elem_id="lora_train_train_tab") as train_tab:
                checkpoint = gr.HTML(first_view[2], elem_id="lora_train_checkpoint")
                with gr.Row(equal_height=True):
                    preset_box = gr.Dropdown(label="Preset", choices=list(PRESETS), value=preset, scale=2,
                                             elem_id="lora_train_preset")
                    yaml_in = gr.UploadButton("Load YAML", file_types=[".yaml", ".yml"], scale=1,
                                              elem_id="lora_train_yaml_in")
                    save_yaml = gr.Button("Save YAML", scale=1, elem_id="lora_train_save_yaml")
                with gr.Row(equal_height=True):
                    settings_status = gr.HTML(elem_id="lora_train_settings_status",
                                              elem_classes=["lora_train_messages"])
                    yaml_out = gr.File(label="Saved YAML", interactive=False, visible=False, scale=2,
                                       elem_id="lora_train_yaml_out")  # shown once there is a file to offer
                for row in BASIC_ROWS:
                    with gr.Row():
                        for name in row:
                            fields[name] = make_field(name, getattr(cfg, name))
                host_model = host.checkpoint_label() is not None  # then base_model is the loaded checkpoint
                with gr.Accordion("Advanced", open=False, elem_id="lora_train_advanced"):
                    for start in range(0, len(ADVANCED_KEYS), 3):
                        with gr.Row():
                            for name in ADVANCED_KEYS[start:start + 3]:
                                fields[name] = make_field(name, getattr(cfg, name),
                                                          visible=not (host_model and name == "base_model"))
                with gr.Row():
                    start_button = gr.Button("Start training", variant="primary", elem_id="lora_train_start")
                    resume_button = gr.Button("Resume", variant="primary", visible=can_resume(job),
                                              elem_id="lora_train_resume")
                    stop_button = gr.Button("Interrupt", elem_id="lora_train_interrupt")
                    refresh = gr.Button("Refresh", visible=False, elem_id="lora_train_refresh")
                    show_job = gr.Button("Show the last job's settings", visible=False,
                                         elem_id="lora_train_show_job")
                status = gr.HTML(status_html(job.snapshot()), elem_id="lora_train_status")
                with gr.Row(visible=False, equal_height=True, elem_id="lora_train_try_it") as try_row:
                    try_prompt = gr.Textbox(label="Your LoRA is ready: use it in a prompt", interactive=False,
                                            show_copy_button=True, scale=4, elem_id="lora_train_try_prompt")
                    send = gr.Button("Send to txt2img", variant="primary", scale=1, elem_id="lora_train_send")
                validation = gr.HTML(elem_id="lora_train_validation")
                with gr.Row():
                    plot = gr.Image(value=render_loss_plot(job.all_losses()), label="Loss", type="pil",
                                    interactive=False, height=PLOT_HEIGHT, elem_id="lora_train_loss_plot")
                    samples = gr.Gallery(label="Samples", columns=3, height=GALLERY_HEIGHT, object_fit="contain",
                                         elem_id="lora_train_samples", elem_classes=["lora_train_gallery"])
            with gr.Tab("Try it", elem_id="lora_train_try_tab"):
                picker_note = gr.HTML(picker.picker_html(job.snapshot()), elem_id="lora_train_picker_note")
                with gr.Row(equal_height=True):
                    choice = gr.Radio(label="Snapshot", choices=[], scale=4, elem_id="lora_train_snapshot")
                    install = gr.Button("Install this snapshot", scale=1, elem_id="lora_train_install_snapshot")
                install_status = gr.HTML(elem_id="lora_train_install_status", elem_classes=["lora_train_messages"])
                grid = gr.Image(label="Snapshots x weights x prompts", type="pil", interactive=False,
                                height=GRID_HEIGHT, elem_id="lora_train_grid")

        inputs = [fields[name] for name in CONFIG_KEYS]
        folder = fields["train_data_dir"]
        guide_outputs = [step_line, advice, checkpoint]
        show_guide = functools.partial(guide.guide_view, host, job)

        def clean(*args: Any) -> tuple[Any, ...]:
            summary, rows, thumbs, folder = clean_dataset_ui(*args)
            return summary, as_frame(rows, CLEAN_HEADERS), thumbs, folder

        def caption(folder_value: str, *args: Any) -> list[Any]:
            note, _ = caption_dataset_ui(host, folder_value, *args)
            return gallery.load(folder_value, 0, note)

        clean_button.click(clean, inputs=[folder, clean_output, clean_min, clean_dedup, clean_overwrite],
                           outputs=[clean_summary, clean_table, clean_gallery, folder]
                           ).then(gallery.load, inputs=[folder], outputs=gallery.outputs()
                                  ).then(show_guide, inputs=[folder], outputs=guide_outputs)
        cap_button.click(caption, inputs=[folder, cap_choice, cap_model, cap_trigger, cap_overwrite],
                         outputs=gallery.outputs()).then(show_guide, inputs=[folder], outputs=guide_outputs)
        cap_stop.click(with_message_html(interrupt_caption_ui), outputs=[gallery.status], show_progress="hidden")
        writes = gallery.wire(folder, [load_pictures.click, folder.submit], trigger_field=fields["trigger_word"])
        for event in (load_pictures.click, folder.submit, folder.blur, train_tab.select, *(w.then for w in writes)):
            event(show_guide, inputs=[folder], outputs=guide_outputs, show_progress="hidden")
        preset_box.change(apply_preset, inputs=[preset_box, *inputs], outputs=inputs)
        yaml_in.upload(with_message_html(load_yaml_ui, -1), inputs=[yaml_in, *inputs],
                       outputs=[*inputs, settings_status])
        def save_and_offer(*values: Any) -> tuple[Any, str]:
            file, note = save_yaml_ui(*values, host=host)
            return gr.update(value=file, visible=file is not None), note

        save_yaml.click(with_message_html(save_and_offer, 1), inputs=inputs, outputs=[yaml_out, settings_status])
        def resume_visible() -> Any:
            return gr.update(visible=can_resume(job))

        def start(*values: Any) -> tuple[str, Any]:
            return start_training_ui(host, job, *values), resume_visible()

        def resume(*values: Any) -> list[Any]:
            return [*resume_training_ui(host, job, *values), resume_visible()]

        start_button.click(start, inputs=inputs, outputs=[status, resume_button])
        resume_button.click(resume, inputs=inputs, outputs=[*inputs, status, resume_button])
        stop_button.click(functools.partial(interrupt_ui, job), outputs=[status])

        def poll(folder_value: str, picked: str | None) -> list[Any]:
            (status_value, plot_value, sample_values, step_value, advice_value, checkpoint_value, validation_value,
             prompt, ready, note, grid_value, labels, label) = poll_guided_ui(host, job, folder_value, picked)
            return [status_value, plot_value, sample_values, step_value, advice_value, checkpoint_value,
                    validation_value, prompt, gr.update(visible=ready), note, grid_value,
                    gr.update(choices=labels, value=label), resume_visible()]

        poll_outputs = [status, plot, samples, *guide_outputs, validation, try_prompt, try_row, picker_note, grid,
                        choice, resume_button]
        refresh.click(poll, inputs=[folder, choice], outputs=poll_outputs, show_progress="hidden")
        show_job.click(functools.partial(job_form_ui, job, host=host), inputs=inputs, outputs=inputs,
                       show_progress="hidden")

        def install_chosen(label: str | None) -> str:
            return message_html(picker.install_snapshot_ui(host, job, label))

        install.click(install_chosen, inputs=[choice], outputs=[install_status]
                      ).then(poll, inputs=[folder, choice], outputs=poll_outputs)
        if not host.bind_send_to_txt2img(send, try_prompt):
            send.visible = False  # no txt2img here (read when the page config is built, in gradio 3 and 4)
        if poll_every:
            blocks.load(poll, inputs=[folder, choice], outputs=poll_outputs, every=poll_every)
    return blocks
