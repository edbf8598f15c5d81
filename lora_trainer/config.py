"""TrainConfig: the one YAML file that drives a run, with defaults and precise validation messages."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lora_trainer import validation as rules
from lora_trainer.safe_yaml import read_yaml_mapping
from lora_trainer.validation import ConfigError, short_repr

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "dump_config", "load_config", "reference_table"]


def _opt(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, path: bool = False, factory: Any = None, max_len: int = rules.MAX_TEXT_CHARS,
         max_items: int | None = None, why: str = "", check: Callable[[str, Any], Any] | None = None) -> Any:
    """A config field: its doc line, allowed values, bounds (text length, list size) and any extra check."""
    if path:
        max_len = rules.MAX_PATH_CHARS
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "path": path, "max_len": max_len,
            "max_items": max_items, "why": why, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults suit 50-200 images on a 12-24 GB card."""

    # data
    train_data_dir: str | None = _opt(
        None, "Folder of training images (required); for text-generation a folder or one file of "
        ".jsonl/.json/.csv/.txt examples.", path=True)
    metadata_path: str | None = _opt(
        None, "CSV with columns filename,prompt. Default: <train_data_dir>/metadata.csv if present, "
        "else per-image .txt captions.", path=True)
    trigger_word: str = _opt("", "Word put first in every caption; used alone when an image has no caption.",
                             max_len=200, why="a trigger word is a word or a short phrase")
    resolution: int = _opt(512, "Training resolution in pixels (multiple of 64).", low=64, high=2048,
                           check=lambda key, value: rules.check_resolution(value))
    bucket: bool = _opt(False, "Aspect-ratio buckets instead of a center crop to a square.")
    repeats: int = _opt(1, "How many times each image is seen per epoch.", low=1, high=1000)
    flip_aug: bool = _opt(False, "Random horizontal flips (keep off for asymmetric subjects or text).")
    caption_dropout: float = _opt(0.0, "Probability of training a step with an empty caption.", low=0.0, high=1.0)
    cache_latents: bool = _opt(True, "Encode every image with the VAE once and keep the latents.")
    # model
    base_model: str | None = _opt(
        None, "Base checkpoint: a single-file .safetensors (.ckpt loaded weights-only), with a same-named "
        ".yaml beside it when present, or a diffusers folder (required); for text-generation a local Hugging Face "
        "model folder (alias: model_name_or_path).", path=True)
    task_type: str = _opt("text-to-image", "What is trained: an image LoRA, or a language-model adapter "
                          "(text-generation).", choices=("text-to-image", "text-generation"))
    v_parameterization: bool = _opt(
        False, "Train v-prediction (kohya's v_parameterization), for SD2.x 768-v and v-prediction SDXL models whose "
        "file does not say so. Off: the model's own (its .yaml, a v_pred marker or its scheduler config).")
    zero_terminal_snr: bool = _opt(
        False, "Rescale the noise schedule's betas to zero terminal SNR (kohya's zero_terminal_snr), as "
        "v-prediction models trained that way need; the file's ztsnr marker turns it on too.")
    # lora
    lora_rank: int = _opt(16, "LoRA rank (network dim).", low=1, high=512)
    lora_alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", low=0.0, high=4096.0)
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA path.", low=0.0, high=1.0)
    target_modules: list[str] = _opt(
        None, "UNet modules that get LoRA layers: attention projections by default; add 'proj_in', "
        "'proj_out', 'ff.net.0.proj', 'ff.net.2' for more capacity. text-generation: module names such as "
        "q_proj, v_proj, or all-linear (its default) (alias: lora_target_modules).",
        factory=lambda: list(DEFAULT_TARGET_MODULES), max_len=200, max_items=64, check=rules.check_module_names)
    train_text_encoder: bool = _opt(False, "Also train LoRA layers on the text encoder.")
    # optimisation
    batch_size: int = _opt(1, "Images (text-generation: examples) per step, per process when several train "
                           "data-parallel (torchrun, accelerate launch).", low=1, high=256)
    gradient_accumulation_steps: int = _opt(1, "Steps whose gradients are summed before an update.", low=1,
                                            high=256)
    epochs: int = _opt(10, "Passes over the data set (ignored when max_steps is set).", low=1, high=10_000)
    max_steps: int | None = _opt(None, "Total optimizer updates; overrides epochs.", low=1,
                                 high=rules.MAX_TOTAL_STEPS)
    learning_rate: float = _opt(1e-4, "UNet (text-generation: adapter) LoRA learning rate.", low=0.0, high=1.0)
    text_encoder_lr: float | None = _opt(None, "Text-encoder LoRA learning rate (default: learning_rate / 2).",
                                         low=0.0, high=1.0)
    optimizer: str = _opt("adamw", "adamw, or adamw8bit (bitsandbytes on CUDA; falls back to adamw).",
                          choices=("adamw", "adamw8bit"))
    weight_decay: float = _opt(1e-2, "AdamW weight decay.", low=0.0, high=10.0)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 disables).", low=0.0, high=10_000.0)
    scheduler: str = _opt("constant", "Learning-rate schedule.", choices=("constant", "cosine", "linear"))
    warmup_steps: int = _opt(0, "Linear warm-up updates before the schedule.", low=0, high=rules.MAX_TOTAL_STEPS)
    mixed_precision: str = _opt("auto", "auto (bf16 or fp16 on CUDA, fp32 on CPU), no, fp16 or bf16.",
                                choices=("auto", "no", "fp16", "bf16"))
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward: less memory, ~30% slower.")
    auto_fit: bool = _opt(False, "When the memory plan finds the run too big for the device even after smaller "
                          "batches, checkpointing and 8-bit AdamW, also lower the resolution (64 px at a time).")
    channels_last: bool = _opt(False, "Channels-last memory format for the UNet's convolutions (a GPU speed-up "
                               "on some cards; measure it with benchmarks/gpu.py).")
    torch_compile: bool = _opt(False, "Compile the UNet with torch.compile (slow first steps; a speed-up on some "
                               "GPUs; measure it with benchmarks/gpu.py).")
    min_snr_gamma: float | None = _opt(None, "Min-SNR loss weighting gamma (5 is typical); off when unset.", low=0.0,
                                       high=1000.0)
    noise_offset: float = _opt(0.0, "Noise offset (0.05-0.1 helps very dark / bright images).", low=0.0, high=1.0)
    seed: int = _opt(42, "Random seed: the same seed and data give the same run.", low=0, high=rules.MAX_SEED)
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N.", max_len=16,
                       check=lambda key, value: rules.check_device(value))
    # outputs
    output_dir: str = _opt("outputs", "Folder for the LoRA, checkpoints, samples and the effective config.",
                           path=True)
    output_name: str = _opt("my_lora", "File name of the LoRA (without .safetensors): a plain file name, no folders, "
                            "not hidden, at most 100 characters.", check=rules.check_file_name)
    overwrite: bool = _opt(False, "Allow replacing an existing LoRA file of the same name.")
    save_steps: int = _opt(0, "Write a resumable checkpoint every N updates (0: only at the end / on Ctrl-C).",
                           low=0, high=rules.MAX_TOTAL_STEPS)
    resume_from: str | None = _opt(
        None, "Resume an interrupted run: 'latest' (its newest checkpoint) or one of its checkpoint folders. "
        "Only the same run resumes (same output_name, data and weight-shaping settings).",
        max_len=rules.MAX_PATH_CHARS)
    log_dir: str | None = _opt(None, "TensorBoard log folder inside output_dir (default: <output_dir>/logs).",
                               path=True)
    sample_prompts: list[str] = _opt(None, "Prompts rendered as sample images during training (text-generation: "
                                     "answered by the model).", factory=list,
                                     max_len=1000, max_items=32, why="each prompt costs a sample render")
    sample_every: int = _opt(0, "Render samples every N updates (0: only at the end when prompts are set).",
                             low=0, high=rules.MAX_TOTAL_STEPS)
    sample_steps: int = _opt(20, "Denoising steps per sample image.", low=1, high=150)
    # preview: the picture of the LoRA's card
    preview: bool = _opt(True, "Render one picture with the trigger word (and the first sample prompt) at the end "
                         "of a finished run: <output_name>.preview.png, installed with the LoRA in the WebUI.")
    # knowing when it is done: validation, overfitting alarm, epoch snapshots and their grid
    validation_split: float = _opt(0.0, "Share of the training data held out to compute a validation loss "
                                   "(text-generation: eval loss and perplexity); 0: none, 0.1 is typical.",
                                   low=0.0, high=0.5)
    validation_dir: str | None = _opt(None, "Folder of held-out validation images with captions (instead of "
                                      "validation_split).", path=True)
    validate_every: int = _opt(0, "Compute the validation loss every N updates (0: at the end of every epoch).",
                               low=0, high=rules.MAX_TOTAL_STEPS)
    overfit_patience: int = _opt(3, "Evaluations without a new best validation loss (the latest 1% above the "
                                 "best, the training loss lower) before the overfitting alarm.", low=2, high=100)
    early_stop: bool = _opt(False, "When the overfitting alarm fires, stop and keep the LoRA of the best "
                            "validation step.")
    save_every_n_epochs: int = _opt(0, "Keep a LoRA snapshot every N epochs; at the end a grid of snapshots x "
                                    "weights x sample prompts is rendered to pick one from (0: off).", low=0,
                                    high=10_000)
    # text-generation (task_type: text-generation) only; image runs ignore these
    max_seq_length: int = _opt(512, "text-generation: tokens per example; longer ones are truncated (counted in "
                               "the data report).", low=16, high=1_048_576)
    train_on_prompt: bool = _opt(False, "text-generation: also compute the loss on prompt tokens (default: on the "
                                 "answer tokens only).")
    trust_remote_code: bool = _opt(False, "text-generation: allow a model folder that ships its own Python code "
                                   "(e.g. ChatGLM); that code runs on this machine.")
    load_in_4bit: bool = _opt(False, "text-generation: 4-bit base weights (QLoRA); needs CUDA and bitsandbytes.")
    eval_every: int = _opt(0, "text-generation: evaluate every N updates (0: only at the end; needs "
                           "validation_split).", low=0)
    save_merged: bool = _opt(False, "text-generation: also write <output_name>-merged, the base model with the "
                             "adapter merged in (loads without peft).")
    sample_max_new_tokens: int = _opt(64, "text-generation: tokens generated per sample prompt.", low=1, high=4096)

    # ---- derived helpers -------------------------------------------------------------------------
    def resolved_log_dir(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(self.output_dir) / "logs"

    def resolved_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.learning_rate / 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
REQUIRED = ("train_data_dir", "base_model")


# ---- keys per task ---------------------------------------------------------------------------------------------
# Keys of the other task are accepted and ignored (a run lists the ones set), so one file can switch task_type.
KEY_ALIASES = {"model_name_or_path": "base_model", "lora_target_modules": "target_modules"}
TEXT_GENERATION_KEYS = ("max_seq_length", "train_on_prompt", "trust_remote_code", "load_in_4bit", "eval_every",
                        "save_merged", "sample_max_new_tokens")
IMAGE_KEYS = ("metadata_path", "trigger_word", "resolution", "bucket", "flip_aug", "caption_dropout", "cache_latents",
              "v_parameterization", "zero_terminal_snr", "train_text_encoder", "text_encoder_lr", "auto_fit",
              "channels_last", "torch_compile", "min_snr_gamma", "noise_offset", "sample_steps", "preview",
              "validation_dir", "validate_every", "overfit_patience", "early_stop", "save_every_n_epochs")


def apply_key_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """Rename the keys users bring from LLM trainers to ours; text-generation targets all-linear by default."""
    out = dict(data)
    for alias, name in KEY_ALIASES.items():
        if alias in out:
            if name in out:
                raise ConfigError(f"{alias} is another name for {name}; give only one of them")
            out[name] = out.pop(alias)
    if out.get("task_type") == "text-generation" and "target_modules" not in out:
        out["target_modules"] = [rules.ALL_LINEAR]
    return out


def check_task_keys(cfg: TrainConfig) -> None:
    """Settings of the task that only make sense together."""
    if cfg.task_type == "text-to-image" and cfg.target_modules == [rules.ALL_LINEAR]:
        raise ConfigError(f"target_modules: {rules.ALL_LINEAR} is for task_type: text-generation; an image LoRA "
                          f"names UNet modules, e.g. {', '.join(DEFAULT_TARGET_MODULES)} (the default)")
    if cfg.task_type == "text-to-image" and cfg.validation_split and cfg.validation_dir:
        raise ConfigError("validation_split and validation_dir are both set; hold out a share of the images or "
                          "give a folder, not both")
    if cfg.task_type == "text-to-image" and cfg.early_stop and not (cfg.validation_split or cfg.validation_dir):
        raise ConfigError("early_stop needs validation images: set validation_split (0.1 is typical) or "
                          "validation_dir")
    if cfg.task_type == "text-generation" and cfg.eval_every and not cfg.validation_split:
        raise ConfigError("eval_every is set but validation_split is 0; hold out some examples (e.g. "
                          "validation_split: 0.1) to evaluate on")


def ignored_keys(cfg: TrainConfig) -> list[str]:
    """Keys set to something other than their default that ``cfg.task_type`` does not use."""
    unused = IMAGE_KEYS if cfg.task_type == "text-generation" else TEXT_GENERATION_KEYS
    defaults = TrainConfig()
    return [name for name in unused if getattr(cfg, name) != getattr(defaults, name)]


def closest_key(name: str) -> str | None:
    """The valid key that most resembles a misspelt one."""
    if len(name) > 100:
        return None
    match = difflib.get_close_matches(name, [*FIELDS, *KEY_ALIASES], n=1, cutoff=0.6)
    return match[0] if match else None


def _type_name(annotation: str) -> str:
    return annotation.replace(" | None", "").replace("list[str]", "list of strings")


def _as_type(name: str, annotation: str, value: Any) -> Any:
    """``value`` as the field's type (ints from whole floats, floats from YAML's "1e-4" strings), else ConfigError."""
    wrong = ConfigError(f"{name}: expected {_type_name(annotation)}, got {short_repr(value)} ({type(value).__name__})")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise wrong
    elif annotation.startswith("int"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not number or not isinstance(value, int):
            raise wrong
    elif annotation.startswith("float"):
        if isinstance(value, str) and len(value) <= 100:
            try:  # YAML 1.1 reads "1e-4" as a string
                value, number = float(value), True
            except ValueError:
                pass
        if not number:
            raise wrong
        try:
            value = rules.check_finite(name, float(value))
        except OverflowError as err:
            raise ConfigError(f"{name}: {short_repr(value)} is too large") from err
    elif annotation.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value[:10_000]):
            raise wrong
    elif annotation.startswith("str"):
        if number and abs(value) < 1e18:
            value = str(value)
        if not isinstance(value, str):
            raise wrong
    return value


def _check_value(name: str, value: Any) -> Any:
    f = FIELDS[name]
    annotation = str(f.type)
    meta = f.metadata
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{name}: a value is required ({_type_name(annotation)}), got null")
    value = _as_type(name, annotation, value)
    if isinstance(value, list):
        if meta["max_items"] is not None and len(value) > meta["max_items"]:
            why = f" ({meta['why']})" if meta["why"] else ""
            raise ConfigError(f"{name}: {len(value)} entries is too many; at most {meta['max_items']} are allowed{why}")
        for index, item in enumerate(value):
            rules.check_text(f"{name}[{index}]", item, meta["max_len"], meta["why"])
    elif isinstance(value, str):
        rules.check_text(name, value, meta["max_len"], meta["why"])
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{name}: {short_repr(value)} is not allowed; choose one of: {', '.join(choices)}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value < low:
        raise ConfigError(f"{name}: {short_repr(value)} is too small; allowed range is {_range(low, high)}")
    if high is not None and value > high:
        raise ConfigError(f"{name}: {short_repr(value)} is too large; allowed range is {_range(low, high)}")
    if meta["check"] is not None:
        value = meta["check"](name, value)
    return value


def _range(low: float | None, high: float | None) -> str:
    return f"{low if low is not None else '-inf'} .. {high if high is not None else 'inf'}"


def _resolve_path(value: str, base_dir: Path) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def config_from_dict(data: dict[str, Any], base_dir: Path | None = None, *, require: bool = True) -> TrainConfig:
    """Validate a mapping of settings; relative paths resolve against ``base_dir``.

    The one validator of every entry point (YAML file, tab, HTTP API): types, bounds, finite numbers, a plain
    ``output_name`` and a ``log_dir`` inside ``output_dir``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of key: value, got {type(data).__name__}")
    data = apply_key_aliases(data)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in FIELDS:
            hint = closest_key(str(key)) if isinstance(key, str) else None
            raise ConfigError(f"unknown config key {short_repr(key)}" + (f"; did you mean {hint!r}?" if hint else ""))
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
    if cfg.log_dir:
        rules.check_inside("log_dir", cfg.log_dir, cfg.output_dir)
    if cfg.sample_every and not cfg.sample_prompts:
        raise ConfigError("sample_every is set but sample_prompts is empty; add at least one prompt")
    check_task_keys(cfg)
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config file; relative paths in it resolve against the file's folder."""
    path = Path(path)
    data = read_yaml_mapping(path, what="config file", error=ConfigError)
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
