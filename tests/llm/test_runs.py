"""Text-generation runs on the run machinery of image LoRAs: identity with the data files, resumable interrupted
runs, pruning within the run, cleanup of half-written folders, no overwrite, the non-finite loss guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lora_trainer.cli import main
from lora_trainer.config import config_from_dict
from lora_trainer.llm import trainer as llm_trainer
from lora_trainer.llm.trainer import TextTrainer
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train.events import EventBus, MessageEvent, StepEvent
from lora_trainer.train.runs import InterruptedRunExists, ResumeRefused, list_resumable_runs, read_record
from lora_trainer.ui import api
from lora_trainer.ui.host import BaseHost
from lora_trainer.ui.job import TrainingJob
from lora_trainer.ui.resume import find_resumable
from tests.llm.helpers import llm_config
from tests.test_cli import one_error_line

RUN = {"max_steps": 6, "batch_size": 2, "save_steps": 2}


def stop_after(steps: int, events: list | None = None) -> dict:
    """``TextTrainer`` keywords that interrupt the run once ``steps`` updates are reported."""
    seen: list = []

    def sink(event) -> None:
        if events is not None:
            events.append(event)
        if isinstance(event, StepEvent):
            seen.append(event.step)

    return {"events": EventBus(sink), "should_stop": lambda: len(seen) >= steps}


@pytest.fixture
def interrupted(llm_folder, facts_data, tmp_path):
    """(config, run folder) of a run interrupted after 3 of 6 updates."""
    cfg = llm_config(tmp_path, llm_folder("gpt2"), facts_data, **RUN)
    result = TextTrainer(cfg, **stop_after(3)).run()
    assert result.interrupted and result.checkpoint.name == "step-000003"
    run_dir = result.checkpoint.parent
    assert run_dir.parent == tmp_path / "out" / "checkpoints" and run_dir.name.startswith("facts-")
    return cfg, run_dir


def test_latest_resumes_only_the_same_run_whose_identity_includes_the_text_data(interrupted):
    cfg, run_dir = interrupted
    again = {**cfg.to_dict(), "resume_from": "latest"}
    with pytest.raises(ResumeRefused, match=r"belong to another run \(max_seq_length 64 -> 48\)"):
        TextTrainer(config_from_dict({**again, "max_seq_length": 48})).run()
    with pytest.raises(ResumeRefused, match="no checkpoint of 'other'"):
        TextTrainer(config_from_dict({**again, "output_name": "other"})).run()
    with pytest.raises(InterruptedRunExists, match=r"an interrupted run of 'facts' .*\(step 3/6, "):
        TextTrainer(cfg).run()  # a fresh start would throw the interrupted run away
    data = Path(cfg.train_data_dir) / "facts.jsonl"
    original = data.read_text(encoding="utf-8")
    data.write_text(original + json.dumps({"instruction": "New?", "output": "Yes."}) + "\n", encoding="utf-8")
    with pytest.raises(ResumeRefused, match=r"training data: 1 changed \(facts.jsonl\)"):
        TextTrainer(config_from_dict(again)).run()
    data.write_text(original, encoding="utf-8")  # the same content again: the same run (a copy would be too)
    events: list = []
    # an image-only key is ignored by text-generation: still the same run
    result = TextTrainer(config_from_dict({**again, "resolution": 768}), events=EventBus(events.append)).run()
    assert result.steps_done == 6 and len(result.losses) == 6 and result.lora_path == Path(cfg.output_dir) / "facts"
    assert any(isinstance(e, MessageEvent) and e.text.startswith("resumed from ") and
               e.text.endswith("step-000003 at step 3/6") for e in events)
    assert read_record(run_dir)["finished"] is True


def test_an_interrupted_run_is_listed_as_resumable_from_its_record_but_not_offered_by_the_tab(interrupted, tmp_path):
    cfg, run_dir = interrupted
    [run] = list_resumable_runs(cfg.output_dir)
    assert (run.output_name, run.step, run.total_steps, run.run_dir) == ("facts", 3, 6, run_dir)
    assert run.config["task_type"] == "text-generation" and run.config["resume_from"] == "latest"
    host, job = BaseHost(tmp_path / "Lora", {"output_dir": cfg.output_dir}), TrainingJob()
    assert find_resumable(host, job) == []  # the tab trains images; this run resumes from the command line
    assert api.resume_job_route(job, host, {})[0] == 404
    result = TextTrainer(config_from_dict(run.config)).run()
    assert result.steps_done == 6 and result.lora_path.is_dir()
    assert list_resumable_runs(cfg.output_dir) == []


def test_pruning_stays_within_the_run_and_half_written_outputs_are_removed(interrupted, llm_folder, facts_data,
                                                                          tmp_path):
    other_cfg, other_run = interrupted  # another run (output_name 'facts') in the same output folder
    out = tmp_path / "out"
    leftovers = [out / ".qa.k2j4a9x1.tmp", out / ".qa-merged.p0o9i8u7.tmp", out / ".qa.data_report.txt.abc.tmp"]
    for path in leftovers[:2]:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"half")
    leftovers[2].write_text("half", encoding="utf-8")
    theirs = out / ".facts.z9y8x7w6.tmp"
    theirs.mkdir()
    events: list = []
    cfg = llm_config(tmp_path, llm_folder("gpt2"), facts_data, output_name="qa", max_steps=6, batch_size=2,
                     save_steps=1)
    result = TextTrainer(cfg, events=EventBus(events.append)).run()
    assert result.lora_path == out / "qa"
    [run_dir] = [d for d in (out / "checkpoints").iterdir() if d.name.startswith("qa-")]
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == [f"step-00000{n}" for n in (3, 4, 5)]  # last 3
    assert [p.name for p in ckpt.list_checkpoints(other_run)] == ["step-000002", "step-000003"]
    assert not any(path.exists() for path in leftovers) and theirs.exists()
    assert sum("left unfinished by an interrupted run" in e.text for e in events if isinstance(e, MessageEvent)) == 3


def test_an_existing_adapter_or_merged_model_is_not_replaced_without_overwrite(llm_folder, facts_data, tmp_path):
    merged = tmp_path / "out" / "facts-merged"
    merged.mkdir(parents=True)
    (merged / "config.json").write_text("{}", encoding="utf-8")
    cfg = llm_config(tmp_path, llm_folder("gpt2"), facts_data, save_merged=True)
    with pytest.raises(FileExistsError, match="facts-merged exists; set overwrite: true"):
        TextTrainer(cfg).run()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["facts-merged"]  # nothing else was written
    assert (merged / "config.json").read_text(encoding="utf-8") == "{}"


def test_a_nan_loss_stops_the_run_with_one_line_and_nothing_after_it_is_saved(llm_folder, facts_data, tmp_path,
                                                                            capsys, monkeypatch):
    real_add_lora = llm_trainer.add_lora
    calls = {"n": 0}

    def poison_the_third_update(output_module, args, output):
        if output_module.training:
            calls["n"] += 1
            if calls["n"] == 3:
                output.loss = output.loss * float("nan")
        return output

    def add_lora(model, cfg):
        peft_model = real_add_lora(model, cfg)
        peft_model.register_forward_hook(poison_the_third_update)
        return peft_model

    monkeypatch.setattr(llm_trainer, "add_lora", add_lora)
    config = tmp_path / "qa.yaml"
    settings = {"task_type": "text-generation", "base_model": str(llm_folder("gpt2")), "train_data_dir": "data",
                "output_dir": "out", "output_name": "qa", "device": "cpu", "max_seq_length": 64, **RUN}
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: the loss became nan at step 3/6; training stopped")
    assert "the last good checkpoint" in err and "step-000002 is kept" in err
    [run_dir] = (tmp_path / "out" / "checkpoints").iterdir()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000002"]
    kept = ckpt.load_checkpoint(run_dir / "step-000002")
    assert all(torch.isfinite(v).all() for v in kept.lora_state.values())
    assert not (tmp_path / "out" / "qa").exists() and not (tmp_path / "out" / "qa.config.yaml").exists()
    assert read_record(run_dir)["finished"] is False  # resumable from step 2
