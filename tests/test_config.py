"""TrainConfig: defaults, YAML round trip, and the message for each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_trainer.config import (
    FIELDS,
    ConfigError,
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
    reference_table,
)

BASE = {"train_data_dir": "data", "base_model": "model.safetensors"}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_defaults_and_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {**BASE, "output_dir": "out"}))
    assert cfg.train_data_dir == str(tmp_path / "data")
    assert cfg.base_model == str(tmp_path / "model.safetensors")
    assert cfg.output_dir == str(tmp_path / "out")
    assert cfg.lora_rank == 16 and cfg.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert cfg.resolved_log_dir() == tmp_path / "out" / "logs"
    assert cfg.resolved_text_encoder_lr() == pytest.approx(cfg.learning_rate / 2)


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, {**BASE, "train_data_dir": "/srv/pictures"}))
    assert cfg.train_data_dir == "/srv/pictures"


def test_unknown_key_names_the_closest_valid_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'lora_rnak'; did you mean 'lora_rank'\?"):
        load_config(write(tmp_path, {**BASE, "lora_rnak": 8}))
    with pytest.raises(ConfigError, match=r"unknown config key 'zzz'$"):
        config_from_dict({**BASE, "zzz": 1})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lora_rank", "eight", r"lora_rank: expected int, got 'eight' \(str\)"),
    ("lora_rank", 0, r"lora_rank: 0 is too small; allowed range is 1 .. 512"),
    ("learning_rate", 5.0, r"learning_rate: 5.0 is too large; allowed range is 0.0 .. 1.0"),
    ("optimizer", "sgd", r"optimizer: 'sgd' is not allowed; choose one of: adamw, adamw8bit"),
    ("scheduler", "cosine_restarts", r"scheduler: 'cosine_restarts' is not allowed"),
    ("train_text_encoder", "yes", r"train_text_encoder: expected bool, got 'yes' \(str\)"),
    ("batch_size", 2.5, r"batch_size: expected int, got 2.5 \(float\)"),
    ("sample_prompts", [1, 2], r"sample_prompts: expected list of strings"),
    ("resolution", 500, r"resolution: 500 must be a multiple of 64 \(e.g. 448 or 512\)"),
    ("resolution", 72, r"resolution: 72 must be a multiple of 64"),
    ("caption_dropout", -0.1, r"caption_dropout: -0.1 is too small"),
])
def test_bad_values_name_key_value_and_what_is_allowed(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, key: value})


def test_missing_required_keys_are_listed() -> None:
    with pytest.raises(ConfigError, match="missing required key\\(s\\): train_data_dir, base_model"):
        config_from_dict({})


def test_yaml_scientific_notation_string_is_read_as_a_number() -> None:
    assert config_from_dict({**BASE, "learning_rate": "1e-4"}).learning_rate == pytest.approx(1e-4)


def test_sample_every_without_prompts_is_an_error() -> None:
    with pytest.raises(ConfigError, match="sample_every is set but sample_prompts is empty"):
        config_from_dict({**BASE, "sample_every": 10})


def test_invalid_yaml_and_missing_file_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rank: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)


def test_dump_and_reload_gives_the_same_config(tmp_path: Path) -> None:
    cfg = config_from_dict({**BASE, "lora_rank": 4, "sample_prompts": ["a, \"quoted\" prompt"]}, tmp_path)
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg
    assert isinstance(cfg, TrainConfig)


def test_every_key_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    table = reference_table()
    for name in FIELDS:
        assert f"`{name}`" in table
        assert f"| `{name}` |" in readme, f"README lacks the config key {name}"
