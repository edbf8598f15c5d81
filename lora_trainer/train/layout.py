"""Where a run writes: every path is under ``output_dir`` and proven to resolve there (validation.inside)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_trainer.config import TrainConfig
from lora_trainer.validation import UnsafePathError, inside

CHECKPOINT_DIR = "checkpoints"
SAMPLE_DIR = "samples"
LOG_DIR = "logs"
SNAPSHOT_DIR = "snapshots"


@dataclass(frozen=True)
class RunLayout:
    """The files and folders of one run named ``output_name`` in ``output_dir``."""

    output_dir: Path
    output_name: str
    log_setting: str | None = None

    @classmethod
    def of(cls, cfg: TrainConfig) -> RunLayout:
        return cls(Path(cfg.output_dir), cfg.output_name, cfg.log_dir)

    @property
    def lora_file(self) -> Path:
        return inside(self.output_dir, f"{self.output_name}.safetensors")

    @property
    def config_file(self) -> Path:
        """``<name>.config.yaml`` beside the LoRA: written when the run has succeeded."""
        return inside(self.output_dir, f"{self.output_name}.config.yaml")

    @property
    def preview_file(self) -> Path:
        """``<name>.preview.png`` beside the LoRA (the picture of its card in the WebUI)."""
        return inside(self.output_dir, f"{self.output_name}.preview.png")

    @property
    def checkpoints_root(self) -> Path:
        return inside(self.output_dir, CHECKPOINT_DIR)

    def run_dir(self, run_id: str) -> Path:
        """The folder of one run's record and checkpoints: ``checkpoints/<name>-<run id>``."""
        return inside(self.output_dir, CHECKPOINT_DIR, f"{self.output_name}-{run_id}")

    def checkpoint_dir(self, run_id: str, step: int) -> Path:
        return inside(self.output_dir, CHECKPOINT_DIR, f"{self.output_name}-{run_id}", f"step-{step:06d}")

    @property
    def samples_dir(self) -> Path:
        return inside(self.output_dir, SAMPLE_DIR, self.output_name)

    def sample_file(self, step: int, index: int) -> Path:
        return inside(self.output_dir, SAMPLE_DIR, self.output_name, f"step-{step:06d}-{index}.png")

    @property
    def snapshots_dir(self) -> Path:
        return inside(self.output_dir, SNAPSHOT_DIR)

    def snapshot_file(self, tag: str) -> Path:
        """``snapshots/<name>-<tag>.safetensors``: ``tag`` is the epoch (``000003``) or ``best``."""
        return inside(self.output_dir, SNAPSHOT_DIR, f"{self.output_name}-{tag}.safetensors")

    @property
    def grid_file(self) -> Path:
        """``<name>.grid.png``: the epoch picker's grid of snapshots x weights x prompts."""
        return inside(self.output_dir, f"{self.output_name}.grid.png")

    @property
    def log_dir(self) -> Path:
        """TensorBoard's folder: ``log_dir`` (validated to lie inside output_dir) or ``<output_dir>/logs``."""
        if not self.log_setting:
            return inside(self.output_dir, LOG_DIR)
        try:
            relative = Path(self.log_setting).resolve().relative_to(self.output_dir.resolve())
        except ValueError:
            raise UnsafePathError(f"log_dir {self.log_setting} is outside output_dir {self.output_dir}") from None
        return inside(self.output_dir, str(relative))

    def output_names(self) -> tuple[str, ...]:
        """Names of the finished outputs in ``output_dir``; ``.<name>.*.tmp`` is a half-written one."""
        return self.lora_file.name, self.config_file.name

    def written_paths(self, run_id: str, step: int = 1) -> list[Path]:
        """Every path a run of this layout writes (files, or folders it writes into)."""
        return [self.output_dir, self.lora_file, self.config_file, self.preview_file, self.checkpoints_root,
                self.run_dir(run_id), self.checkpoint_dir(run_id, step), self.samples_dir, self.sample_file(step, 0),
                self.log_dir, self.snapshots_dir, self.snapshot_file(f"{step:06d}"), self.snapshot_file("best"),
                self.grid_file]
