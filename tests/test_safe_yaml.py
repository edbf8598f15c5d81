"""Reading YAML from anyone: alias bombs, oversized and non-UTF-8 files are refused quickly in one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lora_trainer.cli import main
from lora_trainer.config import ConfigError, load_config
from lora_trainer.safe_yaml import MAX_YAML_BYTES, parse_yaml


def bomb_config(tmp_path: Path) -> Path:
    """The "billion laughs": nine levels of nine aliases each (9**9 strings once expanded) in sample_prompts."""
    levels = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("train_data_dir: data\nbase_model: m.safetensors\nanchors:\n" + "\n".join(levels)
                    + "\nsample_prompts: *l8\n", encoding="utf-8")
    return path


def test_alias_bomb_in_sample_prompts_is_refused_fast(tmp_path: Path, capsys) -> None:
    path = bomb_config(tmp_path)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand to more than 100000 values") as info:
        load_config(path)
    assert time.perf_counter() - started < 2.0
    assert len(str(info.value)) < 400
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "alias bomb" in err and "Traceback" not in err


def test_a_few_aliases_are_fine() -> None:
    data = parse_yaml("base: &b [a, b]\nprompts: *b\nmore: [*b, *b]\n", "t.yaml")
    assert data["prompts"] == ["a", "b"] and data["more"] == [["a", "b"], ["a", "b"]]


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(Exception, match="recursive alias"):
        parse_yaml("a: &a [1, *a]\n", "t.yaml")


def test_non_utf8_config_is_one_line_naming_the_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes("train_data_dir: data\nbase_model: m.safetensors\ntrigger_word: café\n".encode("cp1252"))
    with pytest.raises(ConfigError, match=r"latin\.yaml is not UTF-8 text \(byte 0xe9 on line 3; it looks like "
                       r"Windows-1252 / "
                       r"Latin-1\); save it as UTF-8 \(iconv -f cp1252 -t utf-8 latin.yaml"):
        load_config(path)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latin.yaml" in err


def test_oversized_config_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("trigger_word: " + "x" * (MAX_YAML_BYTES + 1) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"big\.yaml is {MAX_YAML_BYTES + 16} bytes; a config is at most"):
        load_config(path)


def test_huge_integer_literal_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "int.yaml"
    path.write_text("train_data_dir: data\nbase_model: m\nmax_steps: " + "9" * 50_000 + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="int.yaml is not valid YAML") as info:
        load_config(path)
    assert len(str(info.value)) < 600
