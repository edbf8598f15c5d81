"""Training tiny Llama / Qwen2 / GPT-2 models: they learn invented facts, the adapter and merged model reload
exactly, resume equals a straight run, validation and samples are reported, nothing is overwritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from lora_trainer.config import config_from_dict
from lora_trainer.llm.dataset import load_text_dataset
from lora_trainer.llm.model import load_causal_lm, load_tokenizer
from lora_trainer.llm.prompting import PromptRenderer
from lora_trainer.llm.trainer import TextTrainer
from lora_trainer.train.events import CheckpointEvent, EvalEvent, EventBus, SampleEvent, StepEvent
from lora_trainer.train.runs import read_record
from tests.llm.helpers import FACTS, answer_accuracy, llm_config, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def trained(request, llm_folder, tmp_path_factory):
    """One memorising run per architecture: 40 updates on the six facts, samples, checkpoints, merged copy."""
    folder = llm_folder(request.param)
    tmp = tmp_path_factory.mktemp(f"run_{request.param}")
    data = write_jsonl(tmp / "data" / "facts.jsonl", [{"instruction": q, "output": a} for q, a in FACTS]).parent
    cfg = llm_config(tmp, folder, data, max_steps=40, batch_size=6, sample_prompts=[FACTS[0][0]],
                     sample_every=20, save_steps=20, save_merged=True)
    events: list = []
    trainer = TextTrainer(cfg, events=EventBus(events.append))
    result = trainer.run()
    return {"cfg": cfg, "result": result, "model": trainer.model, "events": events, "folder": folder}


def tokenized_facts(run):
    tokenizer = load_tokenizer(run["folder"])
    return load_text_dataset(run["cfg"].train_data_dir, tokenizer, PromptRenderer(tokenizer),
                             max_seq_length=64).examples


def logits(model, examples):
    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([e.input_ids])).logits for e in examples]


def test_a_tiny_model_learns_the_invented_facts(trained):
    result, examples = trained["result"], tokenized_facts(trained)
    base = answer_accuracy(load_causal_lm(trained["folder"], device=CPU), examples)
    learned = answer_accuracy(trained["model"], examples)
    print(f"teacher-forced answer accuracy: base {base:.2f}, trained {learned:.2f}")
    assert base < 0.2 and learned >= 0.9
    assert result.steps_done == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) < sum(result.losses[:5]) - 1.0


def test_the_adapter_folder_loads_with_peft_and_gives_the_same_logits(trained):
    from peft import PeftModel

    folder = trained["result"].lora_path
    assert folder == Path(trained["cfg"].output_dir) / "facts"
    assert sorted(p.name for p in folder.iterdir() if p.name != "README.md") == [
        "adapter_config.json", "adapter_model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.iterdir()):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    loaded = PeftModel.from_pretrained(load_causal_lm(trained["folder"], device=CPU), str(folder))
    examples = tokenized_facts(trained)
    for ours, theirs in zip(logits(trained["model"], examples), logits(loaded, examples), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_the_merged_model_equals_base_plus_adapter(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = trained["result"].merged_path
    assert merged_dir == Path(trained["cfg"].output_dir) / "facts-merged"
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), local_files_only=True)
    assert AutoTokenizer.from_pretrained(str(merged_dir), local_files_only=True)("zorblat")["input_ids"]
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapted = PeftModel.from_pretrained(load_causal_lm(trained["folder"], device=CPU),
                                        str(trained["result"].lora_path))
    examples = tokenized_facts(trained)
    for ours, theirs in zip(logits(adapted, examples), logits(merged, examples), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_samples_checkpoints_and_reports_are_written(trained):
    out, events = Path(trained["cfg"].output_dir), trained["events"]
    samples = [e for e in events if isinstance(e, SampleEvent)]
    assert [e.step for e in samples] == [20, 40]
    assert samples[-1].texts == [f"{FACTS[0][0]!r} -> {FACTS[0][1]!r}"]
    assert (out / "samples" / "facts" / "step-000040.md").read_text(encoding="utf-8") == \
        f"## {FACTS[0][0]}\n\n{FACTS[0][1]}\n\n"
    [checkpoint] = [e.path for e in events if isinstance(e, CheckpointEvent)]
    assert checkpoint.parent.parent == out / "checkpoints" and checkpoint.parent.name.startswith("facts-")
    assert checkpoint.name == "step-000020" and (checkpoint / "lora_state.safetensors").is_file()
    assert read_record(checkpoint.parent)["finished"] is True  # not offered for resuming any more
    assert [e.step for e in events if isinstance(e, StepEvent)] == list(range(1, 41))
    assert (out / "facts.data_report.txt").read_text(encoding="utf-8").startswith("6 training example(s)")
    assert "task_type: text-generation" in (out / "facts.config.yaml").read_text(encoding="utf-8")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_tensorboard_has_loss_lr_and_samples(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(Path(trained["cfg"].output_dir) / "logs"), size_guidance={"tensors": 0}).Reload()
    assert [s.step for s in logs.Scalars("loss")] == list(range(1, 41))
    assert len(logs.Scalars("lr")) == 40
    assert "sample/0/text_summary" in logs.Tags()["tensors"]


def test_a_finished_adapter_is_not_overwritten(trained):
    cfg, before = trained["cfg"], trained["result"].lora_path / "adapter_model.safetensors"
    stamp = before.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="facts exists; set overwrite: true"):
        TextTrainer(cfg).run()
    assert before.stat().st_mtime_ns == stamp


def test_resume_after_an_interrupt_equals_a_straight_run(llm_folder, facts_data, tmp_path):
    settings = {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "lora_dropout": 0.1,
                "learning_rate": 5e-3, "scheduler": "cosine", "warmup_steps": 2}
    folder = llm_folder("llama")
    straight = TextTrainer(llm_config(tmp_path / "a", folder, facts_data, **settings)).run()
    steps: list = []
    cfg = llm_config(tmp_path / "b", folder, facts_data, **settings)
    stopped = TextTrainer(cfg, events=EventBus(lambda e: isinstance(e, StepEvent) and steps.append(e)),
                          should_stop=lambda: len(steps) >= 3).run()
    assert stopped.interrupted and stopped.steps_done == 3 and stopped.lora_path is None
    assert stopped.checkpoint.name == "step-000003"
    resumed_cfg = config_from_dict({**cfg.to_dict(), "resume_from": "latest"})
    resumed_trainer = TextTrainer(resumed_cfg)
    resumed = resumed_trainer.run()
    assert resumed.losses == straight.losses
    assert len(set(straight.losses)) == 6
    from safetensors.torch import load_file

    assert all(torch.equal(a, b) for a, b in zip(
        load_file(str(straight.lora_path / "adapter_model.safetensors")).values(),
        load_file(str(resumed.lora_path / "adapter_model.safetensors")).values(), strict=True))


def test_validation_reports_eval_loss_and_perplexity(llm_folder, facts_data, tmp_path):
    events: list = []
    cfg = llm_config(tmp_path, llm_folder("llama"), facts_data, max_steps=4, batch_size=2, validation_split=0.34,
                     eval_every=2)
    trainer = TextTrainer(cfg, events=EventBus(events.append))
    result = trainer.run()
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert [e.step for e in evals] == [2, 4] and result.evals == evals
    assert result.report.examples == 6
    final = evals[-1]
    assert final.perplexity == pytest.approx(torch.tensor(final.loss).exp().item(), rel=1e-6)
    # the same figure computed independently: mean cross-entropy over every answer token of the held-out facts
    from lora_trainer.llm.batches import split_validation

    tokenizer = load_tokenizer(cfg.base_model)
    data = load_text_dataset(cfg.train_data_dir, tokenizer, PromptRenderer(tokenizer), max_seq_length=64)
    _, held_out = split_validation(data.examples, 0.34, cfg.seed)
    assert len(held_out) == 2
    losses = []
    for example, out in zip(held_out, logits(trainer.model, held_out), strict=True):
        targets = torch.tensor(example.labels[1:])
        keep = targets != -100
        losses.append(torch.nn.functional.cross_entropy(out[0, :-1][keep], targets[keep], reduction="none"))
    assert final.loss == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_losses(llm_folder, facts_data, tmp_path):
    folder = llm_folder("llama")
    plain = TextTrainer(llm_config(tmp_path / "a", folder, facts_data, max_steps=3)).run()
    checkpointed = TextTrainer(llm_config(tmp_path / "b", folder, facts_data, max_steps=3,
                                          gradient_checkpointing=True)).run()
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5)
