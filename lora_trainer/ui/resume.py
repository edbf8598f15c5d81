"""Resuming an interrupted run from the tab and the HTTP API, also after the WebUI was restarted.

The runs come from :func:`lora_trainer.train.runs.list_resumable_runs` over the host's output folder (Settings ->
LoRA Train) and the folder of the job's last run. :func:`refresh_resumable` puts the one to offer into the job's
snapshot (``resumable``); :func:`resume_run` starts it, on the host's loaded model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.ui.host import Host, launch_training
from lora_trainer.ui.job import TrainingJob

if TYPE_CHECKING:
    from lora_trainer.train.runs import InterruptedRunExists, ResumableRun

RESUME_ROUTE = "POST /lora-train/v1/jobs/resume"
AFRESH = ("to start afresh, turn on overwrite (the tab's \"Overwrite a LoRA of the same name\", overwrite: true: "
          "its checkpoints are deleted and training starts at step 0) or choose another output name")


class NothingToResume(UserError):
    """No interrupted run (or none with the asked run id) is there to resume."""


def output_folders(host: Host, job: TrainingJob) -> list[Path]:
    """Where interrupted runs are looked for: the job's last output folder, then the host's (Settings)."""
    folders: list[Path] = []
    for folder in (job.config.output_dir if job.config else None, host.defaults().get("output_dir")):
        if folder and Path(folder).is_dir() and Path(folder).resolve() not in [f.resolve() for f in folders]:
            folders.append(Path(folder))
    return folders


def run_config(run: ResumableRun) -> TrainConfig:
    """The run's recorded settings, validated again (the record is a file anyone could edit), resuming it."""
    output_dir = run.run_dir.parent.parent  # <output_dir>/checkpoints/<name>-<run id>
    return config_from_dict({**run.config, "output_dir": str(output_dir), "resume_from": "latest"}, require=False)


def find_resumable(host: Host, job: TrainingJob) -> list[tuple[ResumableRun, TrainConfig]]:
    """Every interrupted run with valid settings in :func:`output_folders`, newest first."""
    from lora_trainer.train.runs import list_resumable_runs

    found = []
    for folder in output_folders(host, job):
        try:
            runs = list_resumable_runs(folder)
        except (UserError, OSError) as err:
            print(f"[lora_trainer] cannot look for interrupted runs in {folder}: {err}")
            continue
        for run in runs:
            try:
                cfg = run_config(run)
            except UserError as err:
                print(f"[lora_trainer] not offering {run.run_dir} for resuming: {err}")
                continue
            if cfg.task_type == "text-to-image":  # a text-generation run resumes from the command line
                found.append((run, cfg))
    return sorted(found, key=lambda pair: pair[0].saved_at, reverse=True)


def _offered(found: list[tuple[ResumableRun, TrainConfig]], job: TrainingJob) -> tuple[ResumableRun, TrainConfig]:
    """The newest run of the job's output name when there is one (the run just refused or interrupted), else
    the newest run."""
    name = job.config.output_name if job.config else None
    return next((pair for pair in found if pair[0].output_name == name), found[0])


def resumable_entry(run: ResumableRun, cfg: TrainConfig, others: int) -> dict[str, Any]:
    """What the job snapshot says about a resumable run (JSON-able)."""
    return {"output_name": run.output_name, "run_id": run.run_id, "step": run.step, "total_steps": run.total_steps,
            "checkpoint": str(run.checkpoint), "saved_at": run.saved_at,
            "saved": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.saved_at)),
            "base_model": Path(cfg.base_model).name if cfg.base_model else None, "others": others}


def refresh_resumable(job: TrainingJob, host: Host) -> None:
    """Unless a run is in progress, put the interrupted run to offer (or None) into the job's snapshot; after a
    restart (nothing run yet) its settings also fill the form (``resume_from`` cleared: Resume continues it)."""
    if job.running:
        return
    found = find_resumable(host, job)
    if not found:
        job.offer_resumable(None, None)
        return
    run, cfg = _offered(found, job)
    job.offer_resumable(resumable_entry(run, cfg, len(found) - 1), dataclasses.replace(cfg, resume_from=None))


def resume_run(host: Host, job: TrainingJob, run_id: str | None = None, *, background: bool = True) -> ResumableRun:
    """Resume the run ``run_id`` (None: the one the snapshot offers) on the host's loaded model.

    Raises :class:`NothingToResume` (none, or no such run id), ``JobBusyError`` (a run is in progress),
    ``ModelMismatch`` (the run was trained on another checkpoint) or ``NameTakenError``; the run's own identity
    check follows in the trainer.
    """
    found = find_resumable(host, job)
    where = " or ".join(str(folder) for folder in output_folders(host, job)) or "the output folder"
    if not found:
        raise NothingToResume(f"there is no interrupted run to resume in {where}")
    if run_id is None:
        run, cfg = _offered(found, job)
    else:
        match = [pair for pair in found if pair[0].run_id == run_id]
        if not match:
            listed = ", ".join(f"{run.output_name!r} (run_id {run.run_id})" for run, _ in found[:5])
            raise NothingToResume(f"no interrupted run with run_id {run_id!r} in {where}; resumable: {listed}")
        run, cfg = match[0]
    launch_training(host, job, cfg, background=background)
    return run


def interrupted_run_note(err: InterruptedRunExists) -> str:
    """The tab's and API's wording of a fresh start refused because the run was interrupted before."""
    return (f"Not started: an interrupted run of {err.output_name!r} with these data and settings exists "
            f"({err.status}, {err.run_dir}). To continue it, press Resume (or {RESUME_ROUTE}); {AFRESH}.")
