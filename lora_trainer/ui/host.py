"""What the tab needs from the program around it (the WebUI, Forge, or a plain Python process)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.ui.job import TrainingJob
from lora_trainer.ui.registry import check_name_free, register_lora

T = TypeVar("T")


@runtime_checkable
class Host(Protocol):
    """The services a host offers the tab; :class:`BaseHost` gives the plain defaults."""

    def lora_dir(self) -> Path:
        """Folder where finished LoRAs are installed."""

    def defaults(self) -> dict[str, Any]:
        """TrainConfig values to pre-fill (e.g. output_dir, sample_every)."""

    def get_backbone(self) -> Any:
        """The model to train on (the loaded checkpoint), or None to load ``cfg.base_model``."""

    def base_model_path(self) -> str | None:
        """The file of the model :meth:`get_backbone` gives (recorded in the LoRA), or None when unknown."""

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` holding the host's GPU lock."""

    def progress(self, snapshot: dict[str, Any]) -> None:
        """Called with the job snapshot after every training event."""

    def interrupted(self) -> bool:
        """True when the host asked running work to stop (the WebUI's Interrupt)."""

    def refresh_loras(self) -> None:
        """Make the host list newly installed LoRAs."""

    def captioners(self) -> list[str]:
        """Names of captioners the host provides (e.g. "WebUI BLIP")."""

    def caption_with_host(self, name: str, images: list[Any]) -> list[str]:
        """Caption PIL images with one of :meth:`captioners`."""

    def checkpoint_label(self) -> str | None:
        """The name of the checkpoint a run will train (the loaded one), or None when cfg.base_model decides."""

    def bind_send_to_txt2img(self, button: Any, prompt: Any) -> bool:
        """Make ``button`` put the text of the ``prompt`` component into txt2img; False where there is none."""


class BaseHost:
    """No lock, no progress hook, no host captioners; subclasses override what they have."""

    def __init__(self, lora_dir: str | Path, defaults: dict[str, Any] | None = None) -> None:
        self._lora_dir = Path(lora_dir)
        self._defaults = dict(defaults or {})

    def lora_dir(self) -> Path:
        return self._lora_dir

    def defaults(self) -> dict[str, Any]:
        return dict(self._defaults)

    def get_backbone(self) -> Any:
        return None

    def base_model_path(self) -> str | None:
        return None

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        return fn()

    def progress(self, snapshot: dict[str, Any]) -> None:
        return None

    def interrupted(self) -> bool:
        return False

    def refresh_loras(self) -> None:
        return None

    def captioners(self) -> list[str]:
        return []

    def caption_with_host(self, name: str, images: list[Any]) -> list[str]:
        raise UserError(f"captioner {name!r} is not available here; choose a local model")

    def checkpoint_label(self) -> str | None:
        return None

    def bind_send_to_txt2img(self, button: Any, prompt: Any) -> bool:
        return False


class StandaloneHost(BaseHost):
    """Outside the WebUI: LoRAs go to ``lora_dir``; the model comes from ``base_model`` (or cfg.base_model)."""

    def __init__(self, lora_dir: str | Path, base_model: str | Path | None = None, *, device: str = "auto",
                 defaults: dict[str, Any] | None = None) -> None:
        super().__init__(lora_dir, defaults)
        self.base_model = base_model
        self.device = device

    def get_backbone(self) -> Any:
        if not self.base_model:
            return None  # the trainer loads cfg.base_model itself
        import torch

        from lora_trainer.models.loading import load_backbone
        from lora_trainer.train.trainer import resolve_device

        return load_backbone(self.base_model, device=resolve_device(self.device), dtype=torch.float32)

    def base_model_path(self) -> str | None:
        return str(self.base_model) if self.base_model else None

    def checkpoint_label(self) -> str | None:
        return Path(self.base_model).name if self.base_model else None


def job_config(host: Host, data: Any) -> TrainConfig:
    """A job from the tab or the API, validated; without ``output_dir`` it writes to the host's output folder
    (the WebUI's Settings -> LoRA Train), not to the process's working folder."""
    if isinstance(data, dict) and not data.get("output_dir"):
        folder = host.defaults().get("output_dir")
        if folder:
            data = {**data, "output_dir": str(folder)}
    return config_from_dict(data, require=False)


def install_result(host: Host, cfg: TrainConfig, result: Any, backbone: Any) -> str | None:
    """Copy a finished run's LoRA into the host's Lora folder (with preview and sidecar) and refresh the list."""
    if result.lora_path is None:
        return None
    preview = result.preview_path or (result.sample_paths[-1] if result.sample_paths else None)
    base = f" on {Path(cfg.base_model).name}" if cfg.base_model else ""
    notes = f"Trained with lora-trainer{base}: {result.steps_done} steps, rank {cfg.lora_rank}."
    installed = register_lora(result.lora_path, host.lora_dir(), cfg.output_name, trigger_word=cfg.trigger_word,
                              sd_version=getattr(backbone, "model_version", None), preview=preview,
                              notes=notes, overwrite=cfg.overwrite)
    host.refresh_loras()
    return str(installed)


class ModelMismatch(UserError):
    """A run is to be resumed on another checkpoint than the one it was trained on."""


def on_loaded_model(host: Host, cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``base_model`` set to the model the host trains on (its loaded checkpoint), so that the LoRA's
    metadata and the run's identity name the model actually used; unchanged when the host loads none.

    A resume (``resume_from`` set) of a run trained on another checkpoint is refused with the one it needs.
    """
    loaded = host.base_model_path()
    if not loaded:
        return cfg
    needed, have = Path(cfg.base_model or loaded).name, Path(loaded).name
    if cfg.resume_from and needed != have:
        raise ModelMismatch(f"the run {cfg.output_name!r} was trained on {needed}, but {have} is loaded: pick "
                            f"{needed} in the checkpoint menu at the top and resume again, or start a new run "
                            f"on {have}")
    return dataclasses.replace(cfg, base_model=loaded)


def launch_training(host: Host, job: TrainingJob, cfg: TrainConfig, *, background: bool = True) -> None:
    """Start ``cfg`` on ``job`` inside the host's lock, with its model, interrupt flag and progress hook.

    Refuses (:class:`~lora_trainer.ui.registry.NameTakenError`) before any work when the LoRA name is taken in
    the host's Lora folder and ``cfg.overwrite`` is off, so a run cannot end by failing to install its result;
    and (:class:`ModelMismatch`) a resume on another checkpoint than the run's (see :func:`on_loaded_model`).
    """
    if cfg.task_type != "text-to-image":
        raise UserError(f"task_type: {cfg.task_type} is not trained in the WebUI (the LoRA Train tab is for image "
                        "LoRAs); run it from the command line: python -m lora_trainer train --config <file>")
    check_name_free(host.lora_dir(), cfg.output_name, cfg.overwrite)
    cfg = on_loaded_model(host, cfg)
    job.start(cfg, host.get_backbone, background=background, wrap=host.run_exclusive,
              should_stop=host.interrupted, listener=host.progress,
              on_done=lambda result, backbone: install_result(host, cfg, result, backbone))
