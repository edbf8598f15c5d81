"""The config keys of text-generation: aliases users bring, all-linear, keys of the other task ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_trainer.config import ConfigError, config_from_dict, dump_config, ignored_keys, load_config

LLM = {"task_type": "text-generation", "train_data_dir": "data", "base_model": "models/qwen"}


def test_the_config_users_bring_from_llm_trainers_loads(tmp_path: Path) -> None:
    path = tmp_path / "qa.yaml"
    path.write_text("task_type: text-generation\nmodel_name_or_path: ./models/Qwen2.5-1.5B-Instruct\n"
                    "train_data_dir: ./data/support_qa\nmax_seq_length: 512\n"
                    "lora_target_modules: [q_proj, v_proj]\nlora_rank: 8\nlora_alpha: 16\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.task_type == "text-generation"
    assert cfg.base_model == str(tmp_path / "models" / "Qwen2.5-1.5B-Instruct")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert (cfg.max_seq_length, cfg.lora_rank, cfg.lora_alpha) == (512, 8, 16.0)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(again) == cfg


def test_text_generation_targets_all_linear_unless_told_otherwise() -> None:
    assert config_from_dict(LLM).target_modules == ["all-linear"]
    assert config_from_dict({**LLM, "target_modules": "all-linear"}).target_modules == ["all-linear"]
    assert config_from_dict({"train_data_dir": "d", "base_model": "m"}).target_modules[0] == "to_q"


def test_all_linear_is_one_choice_of_text_generation_alone() -> None:
    assert config_from_dict({**LLM, "lora_target_modules": ["ALL-LINEAR"]}).target_modules == ["all-linear"]
    with pytest.raises(ConfigError, match="target_modules: all-linear already means every linear layer; give it "
                                          "alone"):
        config_from_dict({**LLM, "target_modules": ["all-linear", "q_proj"]})
    for value in ("all-linear", ["all-linear"]):
        with pytest.raises(ConfigError, match="target_modules: all-linear is for task_type: text-generation; an "
                                              "image LoRA names UNet modules, e.g. to_q, to_k, to_v, to_out.0"):
            config_from_dict({"train_data_dir": "d", "base_model": "m", "target_modules": value})


def test_the_api_validator_is_the_same_one(tmp_path: Path) -> None:
    from lora_trainer.ui import api
    from lora_trainer.ui.host import BaseHost

    code, body = api.start_job_route(object(), BaseHost(tmp_path / "Lora"), {"train_data_dir": "d",
                                                                         "target_modules": "all-linear"})
    assert code == 422 and "all-linear is for task_type: text-generation" in body["error"]


def test_alias_and_its_key_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match="model_name_or_path is another name for base_model; give only one"):
        config_from_dict({**LLM, "model_name_or_path": "other"})


def test_required_keys_are_required_through_aliases_too() -> None:
    with pytest.raises(ConfigError, match="missing required key\\(s\\): base_model"):
        config_from_dict({"task_type": "text-generation", "train_data_dir": "data"})
    assert config_from_dict({"task_type": "text-generation", "train_data_dir": "d",
                             "model_name_or_path": "m"}).base_model == "m"


def test_a_misspelt_alias_names_the_alias() -> None:
    with pytest.raises(ConfigError, match="did you mean 'model_name_or_path'"):
        config_from_dict({**LLM, "model_name_or_pth": "x"})
    with pytest.raises(ConfigError, match="did you mean 'max_seq_length'"):
        config_from_dict({**LLM, "max_seq_len": 512})


def test_keys_of_the_other_task_are_listed_as_ignored() -> None:
    assert ignored_keys(config_from_dict({**LLM, "resolution": 768, "flip_aug": True, "lora_rank": 4})) == [
        "resolution", "flip_aug"]
    assert ignored_keys(config_from_dict({"train_data_dir": "d", "base_model": "m", "max_seq_length": 256})) == [
        "max_seq_length"]
    assert ignored_keys(config_from_dict(LLM)) == []


@pytest.mark.parametrize(("key", "value", "message"), [
    ("task_type", "text2text", "task_type: 'text2text' is not allowed; choose one of: text-to-image, "
                               "text-generation"),
    ("max_seq_length", 4, "max_seq_length: 4 is too small"),
    ("validation_split", 0.9, "validation_split: 0.9 is too large; allowed range is 0.0 .. 0.5"),
    ("trust_remote_code", "yes", "trust_remote_code: expected bool"),
    ("eval_every", 10, "eval_every is set but validation_split is 0"),
])
def test_bad_text_generation_values(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config_from_dict({**LLM, key: value})
def test_the_example_config_in_the_readme_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Language models (text-generation)", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = config_from_dict(yaml.safe_load(block), tmp_path)
    assert cfg.task_type == "text-generation" and cfg.validation_split > 0 and cfg.sample_prompts
