"""WebUI glue for lora-trainer: the "LoRA Train" tab, its settings section and the HTTP API routes.

Everything real lives in ``lora_trainer.ui``; this file only registers callbacks with the WebUI (A1111 or Forge).
"""

from __future__ import annotations

import html
import sys
import traceback
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
if str(EXTENSION_ROOT) not in sys.path:
    sys.path.insert(0, str(EXTENSION_ROOT))

from modules import script_callbacks, shared  # noqa: E402

# The WebUI takes the extension root off sys.path once this file is imported; the package imported now keeps
# its own __path__, so later ``lora_trainer.*`` imports inside callbacks still work.
import lora_trainer  # noqa: E402,F401

SECTION = ("lora_train", "LoRA Train")
TAB = ("LoRA Train", "lora_train")
_host = None


def get_host():
    """The one WebUIHost shared by the tab and the API (built on first use)."""
    global _host
    if _host is None:
        from lora_trainer.ui.webui_host import WebUIHost

        _host = WebUIHost()
    return _host


def error_tab(err: BaseException):
    """A tab that says why the real one could not be built, instead of breaking the WebUI's startup."""
    import gradio as gr

    text = html.escape(f"{type(err).__name__}: {err}")
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.HTML(f"<h3>LoRA Train could not start</h3><pre>{text}</pre><p>See the console for the traceback.</p>",
                elem_id="lora_train_startup_error")
    return blocks


def on_ui_tabs():
    try:
        from lora_trainer.ui.tab import build_tab

        blocks = build_tab(get_host())
    except Exception as err:  # noqa: BLE001 - show the error in the tab, keep the WebUI running
        traceback.print_exc()
        blocks = error_tab(err)
    return [(blocks, *TAB)]


def _option(*args, **kwargs):
    """A setting on our page, listed under the Settings' Training heading where the WebUI has categories."""
    try:
        return shared.OptionInfo(*args, category_id="training", **kwargs)
    except TypeError:  # WebUI versions before settings categories
        return shared.OptionInfo(*args, **kwargs)


def on_ui_settings():
    import gradio as gr

    try:
        from lora_trainer.ui.tab import PRESETS

        presets = ["", *PRESETS]
    except Exception:  # noqa: BLE001 - settings must not fail because of the package
        presets = [""]
    try:
        from lora_trainer.ui.webui_host import default_output_dir

        output_dir = default_output_dir()
    except Exception:  # noqa: BLE001 - settings must not fail because of the package
        output_dir = str(Path("outputs") / "lora_train")
    options = {
        "lora_train_output_dir": _option(
            output_dir, "Folder for training outputs (checkpoints, samples, configs); "
            "also the API's when a job names no output_dir", section=SECTION),
        "lora_train_sample_every": _option(
            0, "Render sample images every N steps (0: only at the end)", gr.Number, {"precision": 0},
            section=SECTION),
        "lora_train_default_preset": _option(
            "", "Preset selected when the tab opens", gr.Dropdown, {"choices": presets}, section=SECTION),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


def on_app_started(demo, app):
    try:
        from lora_trainer.ui.api import register_routes
        from lora_trainer.ui.job import current_job
        from lora_trainer.ui.webui_host import trusted_origins

        register_routes(app, current_job(), get_host,
                        api_auth=lambda: getattr(getattr(shared, "cmd_opts", None), "api_auth", None),
                        trusted_origins=lambda: trusted_origins(getattr(shared, "cmd_opts", None), demo))
    except Exception:  # noqa: BLE001 - the API is optional; the tab still works
        traceback.print_exc()


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
