"""The command line for text-generation: train, Ctrl-C, --resume, generate; one-line errors; the tab refuses it."""

from __future__ import annotations

import os
import signal

import pytest
import yaml

from lora_trainer.cli import main
from lora_trainer.config import config_from_dict
from lora_trainer.errors import UserError
from lora_trainer.train.events import StepEvent
from lora_trainer.train.progress_bar import ProgressBar
from lora_trainer.ui import api
from lora_trainer.ui.host import BaseHost, launch_training
from tests.llm.helpers import FACTS


def write_config(tmp_path, **settings):
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


@pytest.fixture
def restore_sigint():
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_train_ctrl_c_resume_then_generate_answers(tmp_path, facts_data, llm_folder, capsys, monkeypatch,
                                                   restore_sigint):
    config = write_config(tmp_path, task_type="text-generation", model_name_or_path=str(llm_folder("llama")),
                          train_data_dir="data", output_dir="out", output_name="qa", lora_target_modules="all-linear",
                          max_seq_length=64, lora_rank=8, lora_alpha=16, learning_rate=1e-2, batch_size=6,
                          max_steps=40, seed=0, device="cpu", resolution=768)
    show = ProgressBar.__call__

    def press_ctrl_c_at_step_20(self, event):
        show(self, event)
        if isinstance(event, StepEvent) and event.step == 20:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the CLI's handler asks the loop to stop

    monkeypatch.setattr(ProgressBar, "__call__", press_ctrl_c_at_step_20)
    assert main(["train", "--config", str(config)]) == 130
    out = capsys.readouterr().out
    assert "warning: task_type text-generation ignores resolution" in out
    [run_dir] = (tmp_path / "out" / "checkpoints").iterdir()
    assert run_dir.name.startswith("qa-")
    assert f"Interrupted at step 20/40; checkpoint: {run_dir / 'step-000020'}" in out
    assert not (tmp_path / "out" / "qa").exists()

    monkeypatch.setattr(ProgressBar, "__call__", show)
    assert main(["train", "--config", str(config), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-000020 at step 20/40" in out
    assert f"Adapter saved: {tmp_path / 'out' / 'qa'}" in out

    assert main(["generate", "--config", str(config), "--prompt", FACTS[0][0]]) == 0
    assert capsys.readouterr().out.strip() == FACTS[0][1]
    assert main(["generate", "--config", str(config), "--prompt", FACTS[1][0], "--prompt", FACTS[3][0]]) == 0
    assert capsys.readouterr().out == f"> {FACTS[1][0]}\n{FACTS[1][1]}\n\n> {FACTS[3][0]}\n{FACTS[3][1]}\n\n"


@pytest.mark.parametrize(("settings", "message"), [
    ({"load_in_4bit": True}, "error: load_in_4bit: 4-bit base weights (QLoRA) need a CUDA GPU"),
    ({"train_data_dir": "nowhere"}, "error: train_data_dir: "),
])
def test_training_errors_are_one_line(tmp_path, facts_data, llm_folder, capsys, restore_sigint, settings, message):
    config = write_config(tmp_path, **{"task_type": "text-generation", "base_model": str(llm_folder("gpt2")),
                                       "train_data_dir": "data", "output_dir": "out", "device": "cpu", **settings})
    capsys.readouterr()  # building the model folder may print
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_generate_without_a_trained_adapter_or_for_an_image_config_is_one_line(tmp_path, llm_folder, capsys):
    config = write_config(tmp_path, task_type="text-generation", base_model=str(llm_folder("gpt2")),
                          train_data_dir="data", output_dir="out", output_name="qa")
    capsys.readouterr()
    assert main(["generate", "--config", str(config), "--prompt", "hi"]) == 2
    assert f"error: no trained adapter in {tmp_path / 'out' / 'qa'}" in capsys.readouterr().err
    image = write_config(tmp_path, train_data_dir="pictures", base_model="model.safetensors")
    assert main(["generate", "--config", str(image), "--prompt", "hi"]) == 2
    assert "generate needs a config with task_type: text-generation" in capsys.readouterr().err


def test_the_webui_tab_and_api_refuse_text_generation(tmp_path):
    host = BaseHost(tmp_path / "Lora")
    cfg = config_from_dict({"task_type": "text-generation", "train_data_dir": str(tmp_path)}, require=False)
    with pytest.raises(UserError, match="task_type: text-generation is not trained in the WebUI .* python -m "
                                        "lora_trainer train --config <file>"):
        launch_training(host, object(), cfg)
    code, body = api.start_job_route(object(), host, {"task_type": "text-generation", "train_data_dir": str(tmp_path)})
    assert code == 422 and "not trained in the WebUI" in body["error"]
