"""One training run at a time, observable by polling: the state the tab and the HTTP API show."""

from __future__ import annotations

import gc
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_trainer.config import TrainConfig
from lora_trainer.errors import UserError
from lora_trainer.train.events import CheckpointEvent, EventBus, MessageEvent, SampleEvent, StepEvent
from lora_trainer.ui.quality_state import QualityState

STATUSES = ("idle", "running", "done", "interrupted", "failed")
MAX_MESSAGES = 200
LOSS_POINTS = 400  # at most this many points of the loss curve in a snapshot
MAX_SAMPLES = 12  # sample images kept in the snapshot's history (newest first)
RATE_WINDOW = 20  # steps over which the speed (and so the ETA) is averaged; spans sample renders too

BackboneFactory = Callable[[], Any]  # returns a Backbone, or None to let the trainer load cfg.base_model
Wrapper = Callable[[Callable[[], Any]], Any]


class JobBusyError(UserError):
    """A job is already running."""


def oom_message(cfg: TrainConfig) -> str:
    """What to lower after a CUDA out-of-memory error, naming the settings and their current values."""
    hints = [f"batch_size (now {cfg.batch_size})", f"resolution (now {cfg.resolution})"]
    if not cfg.gradient_checkpointing:
        hints.append("turn gradient_checkpointing on")
    if cfg.train_text_encoder:
        hints.append("turn train_text_encoder off")
    hints.append(f"lora_rank (now {cfg.lora_rank})")
    return "CUDA out of memory while training. Lower " + ", ".join(hints) + ", then start again."


def downsample(values: list[float], points: int = LOSS_POINTS) -> list[float]:
    """At most ``points`` values: means of equal consecutive chunks (the curve keeps its shape)."""
    if len(values) <= points:
        return list(values)
    chunk = len(values) / points
    out = []
    for i in range(points):
        part = values[int(i * chunk):max(int((i + 1) * chunk), int(i * chunk) + 1)]
        out.append(sum(part) / len(part))
    return out


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrainingJob:
    """Runs :class:`~lora_trainer.train.trainer.Trainer` once at a time and records its progress.

    Every public method is thread-safe; :meth:`snapshot` returns a JSON-able dict.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._reset("idle")

    # ---- state -----------------------------------------------------------------------------------
    def _reset(self, status: str) -> None:
        self.status = status
        self.step = 0
        self.total_steps = 0
        self.epoch = 0
        self.losses: list[float] = []
        self.lr = 0.0
        self.seconds_per_step = 0.0
        self.sample_paths: list[str] = []
        self.sample_history: list[str] = []
        self._step_times: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW + 1)
        self.messages: list[str] = []
        self.error: str | None = None
        self.result_path: str | None = None
        self.lora_file: str | None = None
        self.checkpoint: str | None = None
        self.model_version: str | None = None
        self.output_name: str | None = None
        self.config: TrainConfig | None = None  # the settings of this run, shown by a page opened during or after it
        # An interrupted run on disk that can be resumed ({"output_name", "run_id", "step", "total_steps",
        # "checkpoint", ...}), set by :meth:`offer_resumable` while nothing runs; the tab and the API show it.
        self.resumable: dict[str, Any] | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.quality = QualityState()  # validation, alarm, snapshots and grid, for the tab

    @property
    def running(self) -> bool:
        with self._lock:
            return self.status == "running"

    def _message(self, text: str, level: str = "info") -> None:
        with self._lock:
            self.messages.append(text if level == "info" else f"{level}: {text}")
            del self.messages[:-MAX_MESSAGES]

    def on_event(self, event: Any) -> None:
        """The trainer's event sink."""
        with self._lock:
            if isinstance(event, StepEvent):
                self.step, self.total_steps, self.epoch = event.step, event.total_steps, event.epoch
                self.losses.append(float(event.loss))
                self.lr = float(event.lr)
                self.seconds_per_step = float(event.seconds_per_step)
                self._step_times.append((time.time(), int(event.step)))
            elif isinstance(event, SampleEvent):
                self._add_samples(event.paths)
            elif isinstance(event, CheckpointEvent):
                self.checkpoint = str(event.path)
            elif isinstance(event, MessageEvent):
                self._message(event.text, event.level)
            else:
                self.quality.on_event(event)
        if self._listener is not None:
            self._listener(self.snapshot())

    def _add_samples(self, paths: Any) -> None:
        self.sample_paths = [str(p) for p in paths]
        fresh = [p for p in self.sample_paths if p not in self.sample_history]
        self.sample_history = (fresh[::-1] + self.sample_history)[:MAX_SAMPLES]

    def _average_seconds_per_step(self) -> float:
        """Seconds per step over the last :data:`RATE_WINDOW` steps (sample renders included), else the last one."""
        if len(self._step_times) >= 2:
            (t0, s0), (t1, s1) = self._step_times[0], self._step_times[-1]
            if s1 > s0:
                return (t1 - t0) / (s1 - s0)
        return self.seconds_per_step

    def snapshot(self, loss_points: int = LOSS_POINTS) -> dict[str, Any]:
        """Status, progress, ETA, (downsampled) losses, last samples, messages, error and result paths."""
        with self._lock:
            remaining = max(self.total_steps - self.step, 0)
            rate = self._average_seconds_per_step()
            eta = remaining * rate if self.status == "running" and rate else None
            end = self.finished_at or time.time()
            recent = self.losses[-20:]
            return {
                "status": self.status,
                "step": self.step,
                "total_steps": self.total_steps,
                "epoch": self.epoch,
                "progress": (self.step / self.total_steps) if self.total_steps else 0.0,
                "loss": self.losses[-1] if self.losses else None,
                "loss_avg": sum(recent) / len(recent) if recent else None,
                "losses": downsample(self.losses, loss_points),
                "lr": self.lr,
                "seconds_per_step": self.seconds_per_step,
                "avg_seconds_per_step": rate,
                "eta_seconds": eta,
                "elapsed_seconds": (end - self.started_at) if self.started_at else None,
                "sample_paths": list(self.sample_paths),
                "sample_history": list(self.sample_history),
                "messages": list(self.messages),
                "error": self.error,
                "result_path": self.result_path,
                "lora_file": self.lora_file,
                "checkpoint": self.checkpoint,
                "model_version": self.model_version,
                "output_name": self.output_name,
                "resumable": dict(self.resumable) if self.resumable else None,
                "trigger_word": self.config.trigger_word if self.config else "",
                **self.quality.snapshot(),
            }

    def installed(self, path: str) -> None:
        """Record that ``path`` is now the run's installed LoRA (another snapshot was picked)."""
        with self._lock:
            self.lora_file = path

    def offer_resumable(self, entry: dict[str, Any] | None, cfg: TrainConfig | None) -> None:
        """Show ``entry`` (an interrupted run on disk, or None) as resumable unless a run is in progress.

        While no run has been started in this process (status idle, e.g. after a restart), ``cfg`` (that run's
        settings) also becomes the job's config, so a page opened now shows them in its form.
        """
        with self._lock:
            if self.status == "running":
                return
            self.resumable = dict(entry) if entry else None
            if self.status == "idle":
                self.config = cfg

    def all_losses(self) -> list[float]:
        with self._lock:
            return list(self.losses)

    # ---- control ---------------------------------------------------------------------------------
    def cancel(self) -> bool:
        """Ask the running trainer to stop at the next micro-batch (it saves a checkpoint); False when idle."""
        with self._lock:
            if self.status != "running":
                return False
            self._cancel.set()
            self._message("interrupt requested; stopping after the current step")
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a background run ends; True when nothing is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def start(self, cfg: TrainConfig, backbone_factory: BackboneFactory, *, background: bool = True,
              wrap: Wrapper | None = None, should_stop: Callable[[], bool] | None = None,
              on_done: Callable[[Any, Any], str | None] | None = None,
              listener: Callable[[dict], None] | None = None) -> None:
        """Start a run of ``cfg``; raises :class:`JobBusyError` while one is running.

        ``backbone_factory()`` gives the model (None: the trainer loads ``cfg.base_model``); it is called inside
        ``wrap`` (the host's GPU lock), as is the whole run. ``should_stop`` is polled besides :meth:`cancel`.
        ``on_done(result, backbone)`` runs after a finished run and may return the path of the installed LoRA.
        ``listener(snapshot)`` is told about every event. With ``background=False`` the run happens in this thread.
        """
        with self._lock:
            if self.status == "running":
                raise JobBusyError("a training run is already in progress; interrupt it or wait for it to finish")
            self._reset("running")
            self.config = cfg
            self.output_name = cfg.output_name
            self.total_steps = cfg.max_steps or 0
            self.started_at = time.time()
            self._cancel.clear()
            self._listener = listener

        def body() -> None:
            (wrap or (lambda fn: fn()))(lambda: self._run(cfg, backbone_factory, should_stop, on_done))

        if background:
            self._thread = threading.Thread(target=body, name="lora-train-job", daemon=True)
            self._thread.start()
        else:
            self._thread = None
            body()

    _listener: Callable[[dict], None] | None = None

    def _finish(self, status: str, error: str | None = None) -> None:
        with self._lock:
            self.status = status
            self.error = error
            self.finished_at = time.time()
            if error:
                self._message(error, "error")
        if self._listener is not None:
            try:
                self._listener(self.snapshot())
            except Exception as err:  # noqa: BLE001 - a display problem must not hide the result
                print(f"[lora_trainer] progress listener failed: {err}")

    def _run(self, cfg: TrainConfig, backbone_factory: BackboneFactory,
             should_stop: Callable[[], bool] | None, on_done: Callable[[Any, Any], str | None] | None) -> None:
        import torch

        from lora_trainer.train.runs import InterruptedRunExists
        from lora_trainer.train.trainer import Trainer

        def stop() -> bool:
            return self._cancel.is_set() or bool(should_stop and should_stop())

        try:
            backbone = backbone_factory()
            if backbone is None and not cfg.base_model:
                raise UserError("base_model is not set and no model is loaded; set base_model to a checkpoint")
            trainer = Trainer(cfg, backbone, events=EventBus(self.on_event), should_stop=stop)
            result = trainer.run()
            backbone = trainer.backbone
            with self._lock:
                self.model_version = getattr(backbone, "model_version", None)
                self.result_path = str(result.lora_path) if result.lora_path else None
                self.checkpoint = str(result.checkpoint) if result.checkpoint else self.checkpoint
                if result.sample_paths:
                    self._add_samples(result.sample_paths)
                if result.quality is not None:
                    self.quality.finished(result.quality)
            if result.interrupted or result.lora_path is None:
                self._finish("interrupted")
                return
            if on_done is not None:
                installed = on_done(result, backbone)
                with self._lock:
                    self.lora_file = str(installed) if installed else None
            self._finish("done")
        except torch.cuda.OutOfMemoryError:
            _free_memory()
            self._finish("failed", oom_message(cfg))
        except InterruptedRunExists as err:
            from lora_trainer.ui.resume import interrupted_run_note

            self._finish("failed", interrupted_run_note(err))
        except (UserError, FileExistsError, FileNotFoundError) as err:
            self._finish("failed", str(err))
        except Exception as err:  # noqa: BLE001 - a bug: keep the traceback on the console, show the message
            traceback.print_exc()
            self._finish("failed", f"{type(err).__name__}: {err}")
        finally:
            _free_memory()


_CURRENT: TrainingJob | None = None
_CURRENT_LOCK = threading.Lock()


def current_job() -> TrainingJob:
    """The process-wide job shared by the tab and the HTTP API."""
    global _CURRENT
    with _CURRENT_LOCK:
        if _CURRENT is None:
            _CURRENT = TrainingJob()
        return _CURRENT


def result_file(snapshot: dict[str, Any]) -> Path | None:
    """The installed LoRA, else the trained file, of a finished snapshot."""
    path = snapshot.get("lora_file") or snapshot.get("result_path")
    return Path(path) if path else None
