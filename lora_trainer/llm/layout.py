"""Where a text-generation run writes: the run layout of image LoRAs, with folders instead of a LoRA file.

Every path is under ``output_dir`` and proven to resolve there (validation.inside), whatever ``output_name`` is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_trainer.train.layout import SAMPLE_DIR, RunLayout
from lora_trainer.validation import inside

MERGED_SUFFIX = "-merged"


@dataclass(frozen=True)
class TextRunLayout(RunLayout):
    """The files and folders of one text-generation run named ``output_name`` in ``output_dir``."""

    @property
    def adapter_dir(self) -> Path:
        """``<name>/``: the peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        return inside(self.output_dir, self.output_name)

    @property
    def merged_dir(self) -> Path:
        """``<name>-merged/``: the base model with the adapter merged in (``save_merged``)."""
        return inside(self.output_dir, f"{self.output_name}{MERGED_SUFFIX}")

    @property
    def data_report_file(self) -> Path:
        """``<name>.data_report.txt``: every skipped, truncated or dropped example with its file and line."""
        return inside(self.output_dir, f"{self.output_name}.data_report.txt")

    def text_sample_file(self, step: int) -> Path:
        """The answers to ``sample_prompts`` after ``step`` updates, as Markdown."""
        return inside(self.output_dir, SAMPLE_DIR, self.output_name, f"step-{step:06d}.md")

    def output_names(self) -> tuple[str, ...]:
        return (self.adapter_dir.name, self.merged_dir.name, self.data_report_file.name, self.config_file.name)

    def written_paths(self, run_id: str, step: int = 1) -> list[Path]:
        return [self.output_dir, self.adapter_dir, self.merged_dir, self.data_report_file, self.config_file,
                self.checkpoints_root, self.run_dir(run_id), self.checkpoint_dir(run_id, step), self.samples_dir,
                self.text_sample_file(step), self.log_dir]
