"""One process of a data-parallel test run, started by torchrun: ``torchrun ... dist_worker.py spec.json``.

The spec lists jobs run one after another in the same process group: ``{"cli": [args...]}`` runs the command line
(``python -m lora_trainer ...`` as a user starts it), ``{"config": {...}, "stop_rank": r, "stop_after": k}`` a
Trainer whose process ``r`` asks to stop once it has seen ``k`` steps (``"die": true``: process ``r`` dies there
instead, as a crash would end it); ``"oom_rank": r, "oom_call": n``: the n-th denoiser call of process ``r``
raises a (simulated) CUDA out-of-memory error; ``"alarm_after": k``: a planted overfit, the overfitting alarm
fires at the k-th validation (which the main process runs); ``"env": {...}``: the job runs with these
environment variables set (``ACCELERATE_USE_FSDP``...: sharded weights, as accelerate launch asks for them).
Every file-system change a process makes under ``spec["watch"]`` is recorded with an audit hook; after each job,
the changes and results so far are written to ``<spec["audit_dir"]>/rank<N>.json``. Ctrl-C and SIGTERM are
handled as the command line handles them.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.symlink",
           "os.link", "os.truncate", "os.chmod", "os.utime"}


def audit_changes(root: Path, found: list) -> None:
    """Record every event that writes, creates, renames or removes a path under ``root``."""
    root_text = str(root.resolve())

    def inside(value) -> str | None:
        if isinstance(value, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(value))
            return path if path.startswith(root_text) else None
        return None

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args:
            mode, flags = (args + (None, None))[1:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writes and (path := inside(args[0])):
                found.append([event, path])
        elif event in CHANGES:
            for value in args[:2]:
                if path := inside(value):
                    found.append([event, path])

    sys.addaudithook(hook)


def main() -> int:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    changes: list = []
    audit_changes(Path(spec["watch"]), changes)

    from lora_trainer.cli import main as cli_main
    from lora_trainer.train import distributed
    from lora_trainer.train.sharding import read_sharding

    group = distributed.start("cpu")
    record = Path(spec["audit_dir"]) / f"rank{group.rank}.json"
    results: list = []
    try:
        for job in spec["jobs"]:
            with environment(job.get("env", {})):
                if "cli" in job:
                    results.append(cli_main(job["cli"]))
                else:
                    results.append(run_job(job, replace(group, sharding=read_sharding(os.environ))))
            record.write_text(json.dumps({"changes": changes, "results": results}), encoding="utf-8")
    finally:
        group.close()
    return 0


def run_job(job: dict, group) -> dict:
    from lora_trainer.cli import StopFlag
    from lora_trainer.config import config_from_dict
    from lora_trainer.train.events import EventBus, MessageEvent, StepEvent
    from lora_trainer.train.trainer import Trainer

    stop = StopFlag()
    stop.install(launched=True, quiet=True)
    steps: list[int] = []
    warnings: list[str] = []

    def sink(event) -> None:
        if isinstance(event, StepEvent):
            steps.append(event.step)
        elif isinstance(event, MessageEvent) and event.level == "warning":
            warnings.append(event.text)

    bus = EventBus(sink)

    def should_stop() -> bool:
        if group.rank == job.get("stop_rank") and len(steps) >= job["stop_after"]:
            if job.get("die"):
                os._exit(1)
            return True
        return stop()

    cfg = config_from_dict(job["config"])
    if cfg.task_type == "text-generation":
        from lora_trainer.llm.trainer import TextTrainer

        result = TextTrainer(cfg, events=bus, dist=group, should_stop=should_stop).run()
    else:
        backbone = None
        if group.rank == job.get("oom_rank"):
            from lora_trainer.models.loading import load_backbone

            backbone = out_of_memory_once(load_backbone(cfg.base_model, device=torch.device("cpu")), job["oom_call"])
        with planted_alarm(job.get("alarm_after")):
            result = Trainer(cfg, backbone, events=bus, dist=group, should_stop=should_stop).run()
    quality = getattr(result, "quality", None)
    return {"steps_done": result.steps_done, "interrupted": result.interrupted, "checkpoint": str(result.checkpoint),
            "lora_path": str(result.lora_path), "losses": result.losses, "warnings": warnings,
            "best_step": quality.best_step if quality else None}


@contextmanager
def environment(values: dict):
    """``values`` set in ``os.environ`` for the block."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def planted_alarm(after: int | None):
    """The overfitting alarm fires at the ``after``-th validation (None: as the losses say)."""
    from lora_trainer.train.overfit import OverfitMonitor

    real = OverfitMonitor.overfitting
    if after is not None:
        OverfitMonitor.overfitting = lambda monitor: len(monitor.history) >= after
    try:
        yield
    finally:
        OverfitMonitor.overfitting = real


def out_of_memory_once(backbone, call: int):
    """Make the ``call``-th training call of ``backbone.predict`` raise a CUDA out-of-memory error."""
    calls = {"n": 0}
    predict = backbone.predict

    def flaky(noisy, *args, **kwargs):
        if noisy.device.type != "meta":  # the memory plan's dry run does not count
            calls["n"] += 1
            if calls["n"] == call:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return predict(noisy, *args, **kwargs)

    backbone.predict = flaky
    return backbone


if __name__ == "__main__":
    raise SystemExit(main())
