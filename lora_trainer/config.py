"""TrainConfig: the one YAML file that drives a run, with defaults and precise validation messages."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_trainer.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value or key is wrong; the message names the key and what is allowed."""


def _opt(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, path: bool = False, factory: Any = None) -> Any:
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults suit 50-200 images on a 12-24 GB card."""

    # data
    train_data_dir: str | None = _opt(None, "Folder of training images (required).", path=True)
    metadata_path: str | None = _opt(
        None, "CSV with columns filename,prompt. Default: <train_data_dir>/metadata.csv if present, "
        "else per-image .txt captions.", path=True)
    trigger_word: str = _opt("", "Word put first in every caption; used alone when an image has no caption.")
    resolution: int = _opt(512, "Training resolution in pixels (multiple of 64).", low=64, high=4096)
    bucket: bool = _opt(False, "Aspect-ratio buckets instead of a center crop to a square.")
    repeats: int = _opt(1, "How many times each image is seen per epoch.", low=1, high=1000)
    flip_aug: bool = _opt(False, "Random horizontal flips (keep off for asymmetric subjects or text).")
    caption_dropout: float = _opt(0.0, "Probability of training a step with an empty caption.", low=0.0, high=1.0)
    cache_latents: bool = _opt(True, "Encode every image with the VAE once and keep the latents.")
    # model
    base_model: str | None = _opt(
        None, "Base checkpoint: a single-file .safetensors (.ckpt loaded weights-only), with a same-named "
        ".yaml beside it when present, or a diffusers folder (required).", path=True)
    task_type: str = _opt("text-to-image", "What is trained.", choices=("text-to-image",))
    # lora
    lora_rank: int = _opt(16, "LoRA rank (network dim).", low=1, high=1024)
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", low=0.0)
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA path.", low=0.0, high=1.0)
    target_modules: list[str] = _opt(
        None, "UNet modules that get LoRA layers: attention projections by default; add 'proj_in', "
        "'proj_out', 'ff.net.0.proj', 'ff.net.2' for more capacity.", factory=lambda: list(DEFAULT_TARGET_MODULES))
    train_text_encoder: bool = _opt(False, "Also train LoRA layers on the text encoder.")
    # optimisation
    batch_size: int = _opt(1, "Images per step.", low=1, high=1024)
    gradient_accumulation_steps: int = _opt(1, "Steps whose gradients are summed before an update.", low=1)
    epochs: int = _opt(10, "Passes over the data set (ignored when max_steps is set).", low=1)
    max_steps: int | None = _opt(None, "Total optimizer updates; overrides epochs.", low=1)
    learning_rate: float = _opt(1e-4, "UNet LoRA learning rate.", low=0.0, high=1.0)
    text_encoder_lr: float | None = _opt(None, "Text-encoder LoRA learning rate (default: learning_rate / 2).",
                                         low=0.0, high=1.0)
    optimizer: str = _opt("adamw", "adamw, or adamw8bit (bitsandbytes on CUDA; falls back to adamw).",
                          choices=("adamw", "adamw8bit"))
    weight_decay: float = _opt(1e-2, "AdamW weight decay.", low=0.0)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).", low=0.0)
    scheduler: str = _opt("constant", "Learning-rate schedule.", choices=("constant", "cosine", "linear"))
    warmup_steps: int = _opt(0, "Linear warm-up updates before the schedule.", low=0)
    mixed_precision: str = _opt("auto", "auto (bf16 or fp16 on CUDA, fp32 on CPU), no, fp16 or bf16.",
                                choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward: less memory, ~30% slower.")
    min_snr_gamma: float | None = _opt(None, "Min-SNR loss weighting gamma (5 is typical); off when unset.", low=0.0)
    noise_offset: float = _opt(0.0, "Noise offset (0.05-0.1 helps very dark / bright images).", low=0.0, high=1.0)
    seed: int = _opt(42, "Random seed: the same seed and data give the same run.", low=0)
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.")
    # outputs
    output_dir: str = _opt("outputs", "Folder for the LoRA, checkpoints, samples and the effective config.",
                           path=True)
    output_name: str = _opt("my_lora", "File name of the LoRA (without .safetensors).")
    overwrite: bool = _opt(False, "Allow replacing an existing LoRA file of the same name.")
    save_steps: int = _opt(0, "Write a resumable checkpoint every N updates (0: only at the end / on Ctrl-C).",
                           low=0)
    resume_from: str | None = _opt(None, "Checkpoint folder to resume, or 'latest' (newest in output_dir).")
    log_dir: str | None = _opt(None, "TensorBoard log folder (default: <output_dir>/logs).", path=True)
    sample_prompts: list[str] = _opt(None, "Prompts rendered as sample images during training.", factory=list)
    sample_every: int = _opt(0, "Render samples every N updates (0: only at the end when prompts are set).",
                             low=0)
    sample_steps: int = _opt(20, "Denoising steps per sample image.", low=1, high=1000)
    # knowing when it is done: validation, overfitting alarm, epoch snapshots and their grid
    validation_split: float = _opt(0.0, "Share of the images held out to compute a validation loss (0: none; "
                                   "0.1 is typical).", low=0.0, high=0.5)
    validation_dir: str | None = _opt(None, "Folder of held-out validation images with captions (instead of "
                                      "validation_split).", path=True)
    validate_every: int = _opt(0, "Compute the validation loss every N updates (0: at the end of every epoch).",
                               low=0)
    overfit_patience: int = _opt(3, "Evaluations in a row the validation loss must rise, while the training loss "
                                 "falls, before the overfitting alarm.", low=2, high=100)
    early_stop: bool = _opt(False, "When the overfitting alarm fires, stop and keep the LoRA of the best "
                            "validation step.")
    save_every_n_epochs: int = _opt(0, "Keep a LoRA snapshot every N epochs; at the end a grid of snapshots x "
                                    "weights x sample prompts is rendered to pick one from (0: off).", low=0)

    # ---- derived helpers -------------------------------------------------------------------------
    def resolved_log_dir(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(self.output_dir) / "logs"

    def resolved_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate / 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
REQUIRED = ("train_data_dir", "base_model")


def closest_key(name: str) -> str | None:
    """The valid key that most resembles a misspelt one."""
    match = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.6)
    return match[0] if match else None


def _type_name(annotation: str) -> str:
    return annotation.replace(" | None", "").replace("list[str]", "list of strings")


def _check_value(name: str, value: Any) -> Any:
    f = FIELDS[name]
    annotation = str(f.type)
    meta = f.metadata
    nullable = "None" in annotation
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{name}: a value is required ({_type_name(annotation)}), got null")
    wrong = f"{name}: expected {_type_name(annotation)}, got {value!r} ({type(value).__name__})"
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(wrong)
    elif annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(wrong)
    elif annotation.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:  # YAML 1.1 reads "1e-4" as a string
                    value = float(value)
                except ValueError as err:
                    raise ConfigError(wrong) from err
            else:
                raise ConfigError(wrong)
        value = float(value)
    elif annotation.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(wrong)
    elif annotation.startswith("str"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(wrong)
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of: {', '.join(choices)}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value < low:
        raise ConfigError(f"{name}: {value!r} is too small; allowed range is {_range(low, high)}")
    if high is not None and value > high:
        raise ConfigError(f"{name}: {value!r} is too large; allowed range is {_range(low, high)}")
    return value


def _range(low: float | None, high: float | None) -> str:
    return f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"


def _resolve_path(value: str, base_dir: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None, *, require: bool = True) -> TrainConfig:
    """Validate a mapping of settings; relative paths resolve against ``base_dir``."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of key: value, got {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in FIELDS:
            hint = closest_key(str(key))
            raise ConfigError(f"unknown config key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
        values[key] = _check_value(key, value)
    if require:
        missing = [k for k in REQUIRED if values.get(k) is None]
        if missing:
            raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    cfg = TrainConfig(**values)
    if base_dir is not None:
        for name, f in FIELDS.items():
            value = getattr(cfg, name)
            if f.metadata.get("path") and isinstance(value, str):
                setattr(cfg, name, _resolve_path(value, base_dir))
    if cfg.resolution % 8:
        raise ConfigError(f"resolution: {cfg.resolution} must be a multiple of 8 (64 recommended)")
    if cfg.sample_every and not cfg.sample_prompts:
        raise ConfigError("sample_every is set but sample_prompts is empty; add at least one prompt")
    _check_validation(cfg)
    return cfg


def _check_validation(cfg: TrainConfig) -> None:
    """The validation keys work together: one source of held-out images, and early_stop needs one."""
    if cfg.validation_split and cfg.validation_dir:
        raise ConfigError("validation_split and validation_dir are both set; hold out a share of the images or "
                          "give a folder, not both")
    if cfg.early_stop and not (cfg.validation_split or cfg.validation_dir):
        raise ConfigError("early_stop needs validation images: set validation_split (0.1 is typical) or "
                          "validation_dir")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config file; relative paths in it resolve against the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if overrides:
        data = {**data, **overrides}
    return config_from_dict(data, base_dir=path.resolve().parent)


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML text, keys in declaration order."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def reference_table() -> str:
    """A Markdown table of every key, its default and its meaning (the README embeds it)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        default = getattr(defaults, name)
        shown = "required" if name in REQUIRED else ("" if default is None else yaml.safe_dump(
            default, default_flow_style=True).strip().removesuffix("...").strip())
        doc = f.metadata["doc"]
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(f.metadata['choices'])}."
        rows.append(f"| `{name}` | `{shown}` | {doc} |" if shown else f"| `{name}` |  | {doc} |")
    return "\n".join(rows)
