"""Data-parallel training: the launcher's environment, and two CPU processes (torchrun, gloo) that train the image
LoRA and the text LoRA one process trains with twice the batch, write nothing but from the main process, and stop
together with one resumable checkpoint; the text LoRA also with its base weights sharded (FSDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict
from lora_trainer.lora.export import read_lora_metadata
from lora_trainer.train import distributed
from lora_trainer.train.distributed import Distributed, DistributedError, read_launch
from lora_trainer.train.sharding import ShardingError
from lora_trainer.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# ---- the launcher's environment -------------------------------------------------------------------------------
def test_alone_without_a_launcher_or_with_one_process():
    assert read_launch({}) is None
    assert read_launch({**LAUNCH, "WORLD_SIZE": "1", "RANK": "0"}) is None


def test_launch_environment_is_read():
    launch = read_launch(LAUNCH)
    assert (launch.rank, launch.world_size, launch.local_rank) == (1, 2, 1)
    assert read_launch({**LAUNCH, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": ""}).local_rank == 3


@pytest.mark.parametrize(("environ", "words"), [
    ({**LAUNCH, "RANK": ""}, "RANK"),
    ({**LAUNCH, "RANK": "2"}, "RANK"),
    ({**LAUNCH, "MASTER_PORT": ""}, "MASTER_PORT"),
    ({**LAUNCH, "WORLD_SIZE": "two"}, "not a whole number"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "MPI launcher"),
])
def test_incomplete_launch_environment_is_one_clear_line(environ, words):
    with pytest.raises(DistributedError, match=words) as err:
        read_launch(environ)
    assert "\n" not in str(err.value)


def test_deepspeed_and_megatron_launches_are_refused_with_one_line(monkeypatch):
    for name, words in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed, which lora-trainer does not support"),
                        ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM, which lora-trainer does not support")):
        with monkeypatch.context() as patch:
            patch.setenv(name, "true")
            with pytest.raises(ShardingError, match=words) as err:
                distributed.start("cpu")
            assert "\n" not in str(err.value)


def test_fsdp_alone_runs_as_one_process(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.start("cpu") is distributed.SINGLE


def test_an_image_run_with_sharded_weights_is_refused(make_tiny_backbone, tmp_path):
    from lora_trainer.train.sharding import Sharding

    cfg = config_from_dict({"train_data_dir": str(tmp_path), "base_model": "given", "output_dir": str(tmp_path),
                            "device": "cpu"})
    with pytest.raises(DistributedError, match="image model fits one GPU") as err:
        Trainer(cfg, make_tiny_backbone(), dist=Distributed(0, 2, sharding=Sharding())).run()
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_alone_the_process_group_is_never_touched(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start("auto") is distributed.SINGLE
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_the_trainer_in_a_process_of_its_own_ignores_a_launcher(monkeypatch, make_tiny_backbone, shapes_dataset,
                                                                tmp_path):
    """The WebUI tab builds its Trainer without ``dist``: a launcher's environment in the WebUI's process changes
    nothing (no process group, the LoRA written as by any one process)."""
    for name, value in {**LAUNCH, "ACCELERATE_USE_FSDP": "true"}.items():
        monkeypatch.setenv(name, value)
    cfg = config_from_dict({"train_data_dir": str(shapes_dataset), "base_model": "given", "output_dir": str(tmp_path),
                            "resolution": 64, "max_steps": 1, "lora_rank": 4, "device": "cpu", "preview": False})
    result = Trainer(cfg, make_tiny_backbone()).run()
    assert result.lora_path is not None and result.lora_path.is_file()
    assert not torch.distributed.is_initialized()


def test_one_named_gpu_cannot_serve_several_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.process_device("cuda", 1) == torch.device("cuda", 1)
    assert distributed.process_device("auto", 0) == torch.device("cuda", 0)
    assert distributed.process_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(DistributedError, match="names one GPU"):
        distributed.process_device("cuda:0", 1)
    with pytest.raises(DistributedError, match="at most 2 processes"):
        distributed.process_device("cuda", 2)


def test_shares_of_a_global_batch():
    full = [Distributed(rank, 2).share(4) for rank in range(2)]
    assert full == [slice(0, 2), slice(2, 4)]  # rank r: positions r*b .. (r+1)*b - 1
    short = [list(range(3))[Distributed(rank, 2).share(3)] for rank in range(2)]
    assert short == [[0], [1, 2]]
    assert [list(range(1))[Distributed(rank, 2).share(1)] for rank in range(2)] == [[], [0]]


# ---- two processes --------------------------------------------------------------------------------------------
# One torchrun launch runs every two-process job (starting processes is what costs) and one test checks them all
# (tests of one module may run in different pytest-xdist workers, each of which would launch again).
# Image: 5 images, so the third batch is short (1 image). 128 px, not 64: at 64 px the tiny UNet's deepest blocks
# are 1x1 and their one-channel GroupNorm turns float rounding (a batch of 2 against two of 1) into gradient noise
# that AdamW's first steps blow up to the size of the learning rate.
IMAGE = {"resolution": 128, "lora_rank": 4, "lora_alpha": 4, "max_steps": 5, "learning_rate": 1e-4, "seed": 3,
         "device": "cpu", "preview": False, "flip_aug": True, "caption_dropout": 0.3, "noise_offset": 0.05,
         "min_snr_gamma": 5.0, "train_text_encoder": True, "output_name": "shapes"}
# Text: the examples' supervised tokens differ in number, so the token weighting of the processes' losses counts.
TEXT = {"task_type": "text-generation", "output_name": "facts", "lora_rank": 8, "lora_alpha": 16,
        "learning_rate": 1e-3, "max_steps": 4, "max_seq_length": 64, "seed": 0, "device": "cpu"}


def torchrun(spec: dict, workdir: Path, processes: int = 2) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the worker under torchrun with ``spec``; how it ended and each process's record."""
    spec = {**spec, "audit_dir": str(workdir)}
    (workdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", str(WORKER), str(workdir / "spec.json")],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    records = [json.loads(path.read_text(encoding="utf-8")) if (path := workdir / f"rank{rank}.json").is_file()
               else {} for rank in range(processes)]
    return done, records


#: FSDP as accelerate 1.x asks for it (fsdp_version 2) and as accelerate 0.21 does (SHARD_GRAD_OP, by number)
FSDP_V2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
           "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "FSDP_SYNC_MODULE_STATES": "true"}
FSDP_OLD = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "2", "FSDP_OFFLOAD_PARAMS": "false"}
#: the sharded run that stops: 5 training examples (1 held out) in global batches of 4, so process 0's share of
#: the second batch is empty; every process evaluates and answers the sample prompt, process 0 writes
TEXT_HELD_OUT = {"validation_split": 0.2, "eval_every": 2, "sample_prompts": ["What colour is a zorblat?"],
                 "sample_every": 2, "sample_max_new_tokens": 4}


def launch_two_processes(root: Path) -> SimpleNamespace:
    """Two processes under torchrun: the image and the text run from the command line (batch_size 1 and 2 per
    process), each again with process 1 asking to stop after step 2, an image run in which process 1 runs out of
    memory in update 3, an image run with validation whose alarm is planted at the third validation (early stop),
    the text run from the command line with its base weights sharded (FSDP), a sharded text run with a held-out
    example whose process 1 asks to stop after step 2, and last an image run whose process 1 dies after step 2
    (the group is broken after it)."""
    from lora_trainer.demo import make_demo_dataset
    from lora_trainer.llm.tiny import build_tokenizer, write_tiny_causal_lm
    from lora_trainer.models.tiny import write_tiny_checkpoint
    from tests.llm.helpers import CORPUS, FACTS, write_jsonl

    root.mkdir(parents=True)
    image = {**IMAGE, "train_data_dir": str(make_demo_dataset(root / "shapes", count=5, size=128)),
             "base_model": str(write_tiny_checkpoint(root / "model"))}
    facts = [{"instruction": question, "input": "", "output": answer} for question, answer in FACTS]
    text = {**TEXT, "train_data_dir": str(write_jsonl(root / "facts" / "facts.jsonl", facts).parent),
            "base_model": str(write_tiny_causal_lm(root / "llm", "llama", build_tokenizer(CORPUS), seed=0))}
    outputs = root / "runs"  # everything the processes write goes here; the records beside it
    jobs = []
    for name, base, batch in (("image", image, 1), ("text", text, 2)):
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**base, "batch_size": batch, "output_dir": str(outputs / name)}),
                          encoding="utf-8")
        jobs += [{"cli": ["train", "--config", str(config)]},
                 {"config": {**base, "batch_size": batch, "output_dir": str(outputs / f"{name}-stopped")},
                  "stop_rank": 1, "stop_after": 2}]
    jobs.append({"config": {**image, "batch_size": 1, "output_dir": str(outputs / "image-oom")}, "oom_rank": 1,
                 "oom_call": 3})
    jobs.append({"config": {**image, "batch_size": 1, "output_dir": str(outputs / "image-early"),
                            "validation_split": 0.2, "validate_every": 1, "early_stop": True, "save_every_n_epochs": 1},
                 "alarm_after": 3})
    sharded = root / "text-fsdp.yaml"
    sharded.write_text(yaml.safe_dump({**text, "batch_size": 2, "output_dir": str(outputs / "text-fsdp")}),
                       encoding="utf-8")
    jobs.append({"cli": ["train", "--config", str(sharded)], "env": FSDP_V2})
    jobs.append({"config": {**text, **TEXT_HELD_OUT, "batch_size": 2, "output_dir": str(outputs / "text-fsdp-stopped")},
                 "stop_rank": 1, "stop_after": 2, "env": FSDP_OLD})
    jobs.append({"config": {**image, "batch_size": 1, "output_dir": str(outputs / "image-lost")}, "stop_rank": 1,
                 "stop_after": 2, "die": True})
    done, records = torchrun({"watch": str(outputs), "jobs": jobs}, root)
    assert len(records[0].get("results", ())) == len(jobs), done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode != 0 and len(records[1]["results"]) == len(jobs) - 1  # process 1 died in the last
    return SimpleNamespace(outputs=outputs, image=image, text=text, done=done, records=records,
                           results=[[record["results"][index] for record in records if len(record["results"]) > index]
                                    for index in range(len(jobs))])


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """max |diff| <= 1e-4 of the largest weight (the alpha scalars are not weights)."""
    assert got.keys() == want.keys()
    largest = max(w.abs().max().item() for key, w in want.items() if not key.endswith(".alpha"))
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-4 * largest, (worst, largest)


def test_two_processes_train_the_loras_of_one_with_twice_the_batch(tmp_path):
    """torchrun, two CPU processes with gloo, for an image and a text LoRA: each LoRA equals the one of one process
    with twice the batch, nothing is written but by process 0 (one LoRA, one TensorBoard run), and a process that
    stops or dies leaves one resumable checkpoint."""
    launched = launch_two_processes(tmp_path / "launched")
    assert launched.records[1]["changes"] == [] and launched.records[0]["changes"]
    assert launched.results[0] == launched.results[2] == launched.results[6] == [0, 0]  # the command lines
    assert launched.done.stdout.count("LoRA saved:") == 1 and launched.done.stdout.count("Adapter saved:") == 2
    check_image(launched, tmp_path / "image")
    one_text = check_text(launched, tmp_path / "text")
    check_sharded_text(launched, one_text, tmp_path / "sharded")


def check_image(launched: SimpleNamespace, tmp_path: Path) -> None:
    """Processes of batch_size 1 == one process of batch_size 2; one LoRA file, one TensorBoard run. Process 1
    asks to stop after step 2: both stop at step 3 with one checkpoint; process 1 dies after step 2: process 0
    keeps step 2, the last one every process finished; one process (batch 2) resumes either to the same LoRA."""
    base, two = launched.image, launched.outputs / "image"
    one = Trainer(config_from_dict({**base, "batch_size": 2, "output_dir": str(tmp_path / "one")})).run()
    assert_same_weights(load_file(str(two / "shapes.safetensors")), load_file(str(one.lora_path)))
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "logs", "shapes.config.yaml",
                                                     "shapes.safetensors"]
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1

    stopped, lost = launched.outputs / "image-stopped", launched.outputs / "image-lost"
    first, second = launched.results[1]
    assert first["interrupted"] and second["interrupted"]
    assert first["steps_done"] == second["steps_done"] == 3 and first["checkpoint"] == second["checkpoint"]
    checkpoints = sorted((stopped / "checkpoints").glob("*/step-*"))
    assert [p.name for p in checkpoints] == ["step-000003"] and str(checkpoints[0]) == first["checkpoint"]
    assert not list(stopped.glob("*.safetensors"))
    assert first["losses"] == pytest.approx(one.losses[:3], rel=1e-5)
    [survivor] = launched.results[8]
    assert survivor["interrupted"] and survivor["steps_done"] == 2
    assert [p.name for p in (lost / "checkpoints").glob("*/step-*")] == ["step-000002"]

    # process 1 ran out of memory in update 3: both turned gradient checkpointing on and ran the update again
    # (the losses, not the weights: recomputed activations round differently on some diffusers releases, and
    # AdamW's first steps blow that up as they do the 64 px GroupNorm's)
    hit = launched.results[4]
    assert [result["steps_done"] for result in hit] == [5, 5] and hit[0]["losses"] == hit[1]["losses"]
    assert all("out of memory at step 3; gradient_checkpointing on; the step runs again" in result["warnings"]
               for result in hit)
    assert hit[0]["losses"] == pytest.approx(one.losses, rel=1e-5)
    assert (launched.outputs / "image-oom" / "shapes.safetensors").is_file()

    # validation on the main process, the alarm at the third: both stop after update 3, the main process keeps
    # the best step's LoRA and the epoch-1 snapshot (process 1 writes nothing: records[1]["changes"] is empty)
    early = launched.outputs / "image-early"
    main_result, other = launched.results[5]
    assert [main_result["steps_done"], other["steps_done"]] == [3, 3] and not other["interrupted"]
    assert not main_result["interrupted"] and main_result["best_step"] in (1, 2, 3) and other["best_step"] is None
    assert read_lora_metadata(early / "shapes.safetensors")["ss_steps"] == str(main_result["best_step"])
    assert (early / "snapshots" / "shapes-000001.safetensors").is_file()

    for folder in (stopped, lost):
        resumed = Trainer(config_from_dict({**base, "batch_size": 2, "output_dir": str(folder),
                                            "resume_from": "latest"})).run()
        assert resumed.steps_done == 5 and resumed.losses == pytest.approx(one.losses, rel=1e-5), folder
        assert_same_weights(load_file(str(resumed.lora_path)), load_file(str(one.lora_path)))


def check_text(launched: SimpleNamespace, tmp_path: Path) -> Path:
    """Processes of batch_size 2, losses weighted by their supervised tokens == one process of batch_size 4; one
    adapter, one TensorBoard run; process 1 asks to stop after step 2: one checkpoint, which one process resumes to
    the same adapter."""
    from lora_trainer.llm.trainer import TextTrainer

    base, two = launched.text, launched.outputs / "text"
    one = TextTrainer(config_from_dict({**base, "batch_size": 4, "output_dir": str(tmp_path / "one")})).run()
    adapter = "adapter_model.safetensors"
    assert_same_weights(load_file(str(two / "facts" / adapter)), load_file(str(one.lora_path / adapter)))
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "facts", "facts.config.yaml",
                                                     "facts.data_report.txt", "logs"]
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1

    stopped = launched.outputs / "text-stopped"
    first, second = launched.results[3]
    assert first["interrupted"] and first["steps_done"] == second["steps_done"] == 3
    assert [p.name for p in (stopped / "checkpoints").glob("*/step-*")] == ["step-000003"]
    assert first["losses"] == pytest.approx(one.losses[:3], rel=1e-5)
    resumed = TextTrainer(config_from_dict({**base, "batch_size": 4, "output_dir": str(stopped),
                                            "resume_from": "latest"})).run()
    assert resumed.losses == pytest.approx(one.losses, rel=1e-5)
    assert_same_weights(load_file(str(resumed.lora_path / adapter)), load_file(str(one.lora_path / adapter)))
    return one.lora_path


def check_sharded_text(launched: SimpleNamespace, one: Path, tmp_path: Path) -> None:
    """The base weights sharded over the two processes (FSDP2 on gloo): the adapter equals the one of one process
    with twice the batch, one adapter and one TensorBoard run are written (by process 0: records[1]["changes"] is
    empty); the run stopped after step 3 (with a process whose share of a batch is empty, evaluation and samples)
    leaves one checkpoint, which one process resumes to the losses of a one-process run."""
    from lora_trainer.llm.trainer import TextTrainer

    base, adapter = launched.text, "adapter_model.safetensors"
    sharded = launched.outputs / "text-fsdp"
    assert "sharding the base model's weights over 2 processes (FSDP)" in launched.done.stdout
    assert_same_weights(load_file(str(sharded / "facts" / adapter)), load_file(str(one / adapter)))
    assert sorted(p.name for p in sharded.iterdir()) == ["checkpoints", "facts", "facts.config.yaml",
                                                         "facts.data_report.txt", "logs"]
    assert len(list((sharded / "logs").glob("events.out.tfevents.*"))) == 1

    stopped, config = launched.outputs / "text-fsdp-stopped", {**base, **TEXT_HELD_OUT, "batch_size": 4}
    first, second = launched.results[7]
    assert first["interrupted"] and first["steps_done"] == second["steps_done"] == 3
    assert [p.name for p in (stopped / "checkpoints").glob("*/step-*")] == ["step-000003"]
    assert [p.name for p in (stopped / "samples" / "facts").iterdir()] == ["step-000002.md"]
    reference = TextTrainer(config_from_dict({**config, "output_dir": str(tmp_path / "one")})).run()
    assert first["losses"] == pytest.approx(reference.losses[:3], rel=1e-5)
    resumed = TextTrainer(config_from_dict({**config, "output_dir": str(stopped), "resume_from": "latest"})).run()
    assert resumed.steps_done == 4 and resumed.losses == pytest.approx(reference.losses, rel=1e-5)
    assert_same_weights(load_file(str(resumed.lora_path / adapter)), load_file(str(reference.lora_path / adapter)))
