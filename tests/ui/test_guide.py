"""The guided flow: step line, advice from the data, the checkpoint line, the "try it" prompt, the alarm note."""

from __future__ import annotations

import json

from PIL import Image

from lora_trainer.data.captions import write_metadata_csv
from lora_trainer.ui import guide
from lora_trainer.ui.job import TrainingJob
from tests.ui.test_tab import FakeHost


def _pictures(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (i * 3 % 255, 90, 40)).save(folder / f"{i:03d}.png")
    return folder


def test_the_step_follows_the_user_from_pictures_to_try_it(tmp_path):
    folder = tmp_path / "pictures"
    assert guide.current_step(guide.dataset_facts("")) == 1
    assert guide.current_step(guide.dataset_facts(str(folder))) == 1  # not there yet
    _pictures(folder, 4)
    facts = guide.dataset_facts(str(folder))
    assert (facts.images, facts.captioned, facts.cleaned) == (4, 0, False)
    assert guide.current_step(facts) == 2  # pictures, not cleaned, no captions: clean (optional) next
    (folder / guide.CLEAN_REPORT).write_text(json.dumps({}))
    assert guide.current_step(guide.dataset_facts(str(folder))) == 3
    write_metadata_csv(folder / "metadata.csv", {f"{i:03d}.png": "zkx, a picture" for i in range(4)})
    facts = guide.dataset_facts(str(folder))
    assert facts.uncaptioned == 0 and guide.current_step(facts) == 4
    assert guide.current_step(facts, "running") == 4
    assert guide.current_step(facts, "done", lora_ready=True) == 5

    line = guide.step_line_html(3, guide.dataset_facts(str(tmp_path / "none")))
    assert line.count("lora_train_step_done") == 1 and "lora_train_step_skipped" in line  # clean was skipped
    assert 'data-step="3"' in line and "Caption the pictures" in line
    assert [name in line for name in guide.STEPS] == [True] * 5


def test_advice_comes_from_the_data(tmp_path):
    facts = guide.DatasetFacts(str(tmp_path), True, 62, 62)
    assert guide.advice_line(facts).startswith("62 pictures: 10\u201315 epochs, rank 8\u201316 are typical.")
    assert "validation split 0.1" in guide.advice_line(facts)
    assert guide.advice_line(guide.DatasetFacts(str(tmp_path), True, 12, 10)) == \
        "12 pictures, 2 without a caption: 20\u201330 epochs, rank 4\u20138 are typical."
    assert "too few" in guide.advice_line(guide.DatasetFacts(str(tmp_path), True, 3, 3))
    assert "does not exist" in guide.advice_line(guide.DatasetFacts("/nowhere"))
    assert guide.advice_line(guide.DatasetFacts("")) == ""


def test_checkpoint_line_names_the_model_that_will_be_trained(tmp_path):
    folder = _pictures(tmp_path / "pictures", 3)
    facts = guide.dataset_facts(str(folder))
    line = guide.checkpoint_html("v1-5-pruned-emaonly.safetensors [6ce0161689]", facts)
    assert "loaded in the WebUI: <b>v1-5-pruned-emaonly.safetensors [6ce0161689]</b>" in line
    assert f"<b>{folder}</b> (3)" in line
    assert "base model set under Advanced" in guide.checkpoint_html(None, guide.dataset_facts(""))

    class WebUI(FakeHost):
        def checkpoint_label(self):
            return "anything-v5 <b>.safetensors"

    step, advice, checkpoint = guide.guide_view(WebUI(tmp_path / "Lora"), TrainingJob(), str(folder))
    assert "&lt;b&gt;" in checkpoint and 'data-step="2"' in step and "3 pictures" in advice


def test_try_it_prompt_and_sending_it_to_a_prompt():
    assert guide.lora_prompt("my style", "zkx") == "zkx, <lora:my style:0.8>"
    assert guide.lora_prompt("x") == "<lora:x:0.8>"
    assert guide.add_to_prompt("zkx, <lora:x:0.8>", "") == "zkx, <lora:x:0.8>"
    assert guide.add_to_prompt("<lora:x:0.8>", "a cat, <lora:x:0.5>, night") == "a cat, night, <lora:x:0.8>"
    assert guide.add_to_prompt("<lora:x:0.8>", "a cat <lora:other:1>") == "a cat <lora:other:1>, <lora:x:0.8>"
    done = {"status": "done", "lora_file": "/webui/models/Lora/my style.safetensors", "trigger_word": "zkx"}
    assert guide.try_it_prompt(done) == "zkx, <lora:my style:0.8>"
    assert guide.try_it_prompt({**done, "status": "running"}) is None


def test_validation_note_and_alarm_name_the_best_step():
    assert guide.validation_html({}) == ""
    calm = guide.validation_html({"best_step": 40, "best_loss": 0.1234, "validation": [[20, 0.2, 0.2]] * 2})
    assert "best step <b>40</b>" in calm and "no sign of overfitting" in calm
    alarm = guide.validation_html({"overfit": {"step": 60, "best_step": 45, "best_loss": 0.4418, "stopped": False}})
    assert "Overfitting from step 60" in alarm and "Best step: <b>45</b>" in alarm and "Try it" in alarm
    later = guide.validation_html({"overfit": {"step": 60, "best_step": 45, "best_loss": 0.4418, "stopped": False},
                                   "best_step": 90, "best_loss": 0.43})  # a new best after the alarm
    assert "Overfitting from step 60" in later and "Best step: <b>90</b> (validation loss 0.4300)" in later
    stopped = guide.validation_html({"overfit": {"step": 60, "best_step": 45, "best_loss": 0.44, "stopped": True}})
    assert "stopped early; the LoRA holds step 45" in stopped
