"""The epoch picker: the finished run's grid, its snapshots to choose from, and installing the chosen one.

Only snapshots the job itself lists can be installed (the choice is a label, never a path from the page), and
the chosen file is installed under the run's LoRA name, replacing what the run installed there.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError
from lora_trainer.train.snapshots import preview_path
from lora_trainer.ui.guide import lora_prompt
from lora_trainer.ui.host import Host
from lora_trainer.ui.job import TrainingJob
from lora_trainer.ui.registry import lora_target, register_lora


def snapshot_choices(snap: dict[str, Any]) -> list[str]:
    """The labels of the run's snapshots, in run order (the final LoRA last)."""
    return [s["label"] for s in snap.get("snapshots") or []]


def default_choice(snap: dict[str, Any]) -> str | None:
    """The snapshot to offer first: the best validation one when there is one, else the final LoRA."""
    snapshots = snap.get("snapshots") or []
    best = [s for s in snapshots if s["kind"] == "best"]
    best_step = snap.get("best_step")
    at_best = [s for s in snapshots if best_step is not None and s["step"] == best_step]
    pick = (best or at_best or snapshots[-1:] or [None])[0]
    return pick["label"] if pick else None


def picker_html(snap: dict[str, Any]) -> str:
    """What the grid shows and how to use it."""
    if snap.get("status") == "running":
        return "<div>The grid of snapshots is rendered when the run finishes.</div>"
    if not snap.get("grid_path"):
        if snap.get("snapshots") and len(snap["snapshots"]) > 1:
            return "<div>No grid for this run; its snapshots can still be installed below.</div>"
        return ("<div>To compare epochs, set <b>Save every n epochs</b> (1 or 2) before training: the run keeps "
                "a LoRA every few epochs and renders each at a few weights here.</div>")
    weights = ", ".join(f"{w:.1f}" for w in snap.get("grid_weights") or [])
    return (f"<div>Rows: the LoRA after each saved epoch (and the best validation step). Columns: each sample "
            f"prompt at LoRA weight {html.escape(weights)}, all with the same seed. Pick the row that looks best "
            f"and install it as <code>{html.escape(snap.get('output_name') or '')}</code>.</div>")


def _find(snap: dict[str, Any], label: str) -> dict[str, Any]:
    for snapshot in snap.get("snapshots") or []:
        if snapshot["label"] == label:
            return snapshot
    raise UserError(f"no snapshot {label!r} in this run; pick one from the list")


def install_snapshot(host: Host, job: TrainingJob, label: str) -> str:
    """Install the chosen snapshot under the run's LoRA name (preview, sidecar, Lora list refreshed).

    Replaces the LoRA this run installed; refuses to replace a file of that name the run did not write
    unless the run was started with overwrite.
    """
    snap = job.snapshot()
    if snap.get("status") not in ("done", "interrupted"):
        raise UserError("install a snapshot once the run has finished")
    chosen = _find(snap, label)
    cfg = job.config
    name = snap.get("output_name") or (cfg.output_name if cfg else "")
    target = lora_target(host.lora_dir(), name)
    ours = snap.get("lora_file") and Path(snap["lora_file"]).resolve() == target.resolve()
    if target.exists() and not ours and not (cfg and cfg.overwrite):
        raise UserError(f"a LoRA named {target.stem!r} that this run did not install exists in {target.parent}; "
                        f"not replacing it")
    preview = preview_path(Path(chosen["path"]))
    notes = f"Trained with lora-trainer; installed from {Path(chosen['path']).name} ({chosen['label']})."
    installed = register_lora(chosen["path"], host.lora_dir(), name, trigger_word=cfg.trigger_word if cfg else "",
                              sd_version=snap.get("model_version"), preview=preview if preview.is_file() else None,
                              notes=notes, overwrite=True)
    host.refresh_loras()
    job.installed(str(installed))
    return (f"Installed {chosen['label']} as {installed.name}: use "
            f"{lora_prompt(installed.stem, cfg.trigger_word if cfg else '')}")


def install_snapshot_ui(host: Host, job: TrainingJob, label: str | None) -> str:
    """The Install button: a status line, never an exception."""
    if not label:
        return "Pick a snapshot first."
    try:
        return install_snapshot(host, job, label)
    except (UserError, OSError) as err:
        return f"Not installed: {err}"


def picker_view(snap: dict[str, Any]) -> tuple[str, Any, list[str], str | None]:
    """(explanation, grid picture or None, snapshot labels, the one selected first) for the Try it tab."""
    grid = None
    if snap.get("grid_path") and Path(snap["grid_path"]).is_file():
        from PIL import Image

        with Image.open(snap["grid_path"]) as image:
            grid = image.convert("RGB")
    return picker_html(snap), grid, snapshot_choices(snap), default_choice(snap)
