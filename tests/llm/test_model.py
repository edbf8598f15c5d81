"""Loading causal LMs offline: remote code refused unless trusted, QLoRA's needs stated, targets checked."""

from __future__ import annotations

import json

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.llm.adapter import add_lora, linear_layer_names
from lora_trainer.llm.model import ModelLoadError, check_model_folder, check_quantization, load_causal_lm
from lora_trainer.llm.trainer import TextTrainer
from tests.llm.helpers import llm_config

CPU = torch.device("cpu")


def remote_code_folder(tmp_path):
    """A ChatGLM-style folder: a model type transformers lacks, code in the folder that must not run."""
    folder = tmp_path / "chatglm"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}}), encoding="utf-8")
    for name in ("configuration_chatglm.py", "modeling_chatglm.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n", encoding="utf-8")
    return folder, marker


def test_remote_code_is_refused_with_the_reason_and_nothing_runs(tmp_path):
    folder, marker = remote_code_folder(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_causal_lm(folder, device=CPU)
    message = str(caught.value)
    assert "model_type 'chatglm'" in message and "is not built into transformers" in message
    assert "configuration_chatglm.py, modeling_chatglm.py" in message and "trust_remote_code: true" in message
    assert not marker.exists()
    assert check_model_folder(folder, trust_remote_code=True)["model_type"] == "chatglm"  # allowed when trusted


def test_a_training_run_refuses_remote_code_before_reading_anything(tmp_path, facts_data):
    folder, marker = remote_code_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="trust_remote_code: true"):
        TextTrainer(llm_config(tmp_path, folder, facts_data)).run()
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "t5"}, "is a 't5' model, not a causal language model"),
    ({"model_type": "no-such-model"}, "does not know model_type 'no-such-model'"),
    (None, "has no config.json"),
])
def test_folders_that_are_not_causal_lms_are_explained(tmp_path, config, message):
    folder = tmp_path / "model"
    folder.mkdir()
    if config:
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=message):
        check_model_folder(folder, trust_remote_code=False)
    with pytest.raises(ModelLoadError, match="needs a local Hugging Face model folder"):
        check_model_folder(tmp_path / "model.safetensors", trust_remote_code=False)


def test_qlora_without_cuda_is_a_clear_message(tmp_path, facts_data, llm_folder):
    cfg = llm_config(tmp_path, llm_folder("llama"), facts_data, load_in_4bit=True)
    with pytest.raises(ModelLoadError, match="load_in_4bit: 4-bit base weights \\(QLoRA\\) need a CUDA GPU and "
                                             "this run is on cpu; remove load_in_4bit"):
        TextTrainer(cfg).run()
    assert not (tmp_path / "out").exists()


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ModelLoadError, match="need bitsandbytes: pip install bitsandbytes"):
        check_quantization(True, torch.device("cuda", 0))
    check_quantization(False, CPU)


@pytest.mark.parametrize(("arch", "expected"), [
    ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
    ("gemma", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("phi", ["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"]),
    ("mistral", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_all_linear_adapts_every_linear_layer_but_the_head(arch, expected, llm_folder, tmp_path, facts_data):
    folder = llm_folder(arch)
    model = load_causal_lm(folder, device=CPU)
    assert linear_layer_names(model) == expected
    peft_model = add_lora(model, llm_config(tmp_path, folder, facts_data))
    trained = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert {name.split(".")[-3] for name in trained} == {"lora_A", "lora_B"}
    assert sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained}) == expected
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)


def test_unknown_target_modules_name_the_layers_there_are(llm_folder, tmp_path, facts_data):
    folder = llm_folder("llama")
    cfg = config_from_dict({**llm_config(tmp_path, folder, facts_data).to_dict(),
                            "target_modules": ["q_proj", "to_q"]})
    with pytest.raises(UserError, match="target_modules: 'to_q' match no layer of this LlamaForCausalLM; its "
                                               "linear layers are: down_proj, gate_proj, k_proj"):
        add_lora(load_causal_lm(folder, device=CPU), cfg)
    picked = add_lora(load_causal_lm(folder, device=CPU), config_from_dict(
        {**cfg.to_dict(), "target_modules": ["q_proj", "v_proj"]}))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in picked.named_parameters() if p.requires_grad} == {
        "q_proj", "v_proj"}


def test_every_llm_module_imports_on_this_stack():
    """The WebUI's pinned stack (transformers 4.30) lacks newer model classes; importing the package still works."""
    import importlib
    import pkgutil

    import lora_trainer.llm

    names = [info.name for info in pkgutil.iter_modules(lora_trainer.llm.__path__)]
    assert {"adapter", "dataset", "formats", "generate", "model", "prompting", "records", "trainer"} <= set(names)
    for name in names:
        importlib.import_module(f"lora_trainer.llm.{name}")
