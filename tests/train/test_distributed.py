"""Data-parallel training: the launcher's environment, and two CPU processes (torchrun, gloo) that train the LoRA
one process trains with twice the batch, write nothing but from the main process, and stop together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_trainer.config import config_from_dict
from lora_trainer.train import distributed
from lora_trainer.train.distributed import Distributed, DistributedError, read_launch, requested_sharding
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


def test_sharding_asked_of_a_data_parallel_trainer_is_refused(monkeypatch):
    assert requested_sharding({"ACCELERATE_USE_FSDP": "true"}) == "FSDP"
    assert requested_sharding({"ACCELERATE_USE_DEEPSPEED": "false"}) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(DistributedError, match="FSDP"):
        distributed.start("cpu")


def test_alone_the_process_group_is_never_touched(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.start("auto") is distributed.SINGLE
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


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
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from lora_trainer.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("dist_model"))


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


def lora_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_lora(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """max |diff| <= 1e-4 of the largest weight (the alpha scalars are not weights)."""
    assert got.keys() == want.keys()
    largest = max(w.abs().max().item() for key, w in want.items() if not key.endswith(".alpha"))
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst <= 1e-4 * largest, (worst, largest)


def test_two_processes_train_the_lora_of_one_with_twice_the_batch(tiny_model, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch_size 1 each == one process with batch_size 2: the LoRA, one LoRA
    file, one TensorBoard run, nothing written by process 1. Then process 1 asks to stop after step 2: every
    process stops at the same step, one resumable checkpoint is written, and one process (batch 2) resumes it to
    the same LoRA. Last, process 1 dies after step 2: process 0 saves the last complete step, which resumes too."""
    from lora_trainer.demo import make_demo_dataset

    # 5 images: the third batch is short (1 image). 128 px, not 64: at 64 px the tiny UNet's deepest blocks are
    # 1x1 and their one-channel GroupNorm turns float rounding (batch of 2 vs two of 1) into gradient noise that
    # AdamW's first steps blow up to the size of the learning rate
    data = make_demo_dataset(tmp_path / "data", count=5, size=128)
    base = {"train_data_dir": str(data), "base_model": str(tiny_model), "resolution": 128, "lora_rank": 4,
            "lora_alpha": 4, "max_steps": 5, "learning_rate": 1e-4, "seed": 3, "device": "cpu", "preview": False,
            "flip_aug": True, "caption_dropout": 0.3, "noise_offset": 0.05, "min_snr_gamma": 5.0,
            "train_text_encoder": True, "output_name": "shapes"}
    outputs = tmp_path / "runs"  # everything the processes write goes here, the records beside it
    two, stopped, lost = outputs / "two", outputs / "stopped", outputs / "lost"
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({**base, "batch_size": 1, "output_dir": str(two)}), encoding="utf-8")
    done, runs = torchrun({"watch": str(outputs), "jobs": [
        {"cli": ["train", "--config", str(config)]},
        {"config": {**base, "batch_size": 1, "output_dir": str(stopped)}, "stop_rank": 1, "stop_after": 2},
        {"config": {**base, "batch_size": 1, "output_dir": str(lost)}, "stop_rank": 1, "stop_after": 2,
         "die": True}]}, tmp_path)
    assert len(runs[0].get("results", ())) == 3, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode != 0 and len(runs[1]["results"]) == 2  # process 1 died in the last job

    # one process, batch 2: the reference
    one = Trainer(config_from_dict({**base, "batch_size": 2, "output_dir": str(tmp_path / "one")})).run()
    assert_same_lora(lora_weights(two / "shapes.safetensors"), lora_weights(one.lora_path))

    # only the main process wrote, and printed; exactly one LoRA file and one TensorBoard run
    assert runs[1]["changes"] == [] and runs[0]["changes"]
    assert runs[0]["results"][0] == runs[1]["results"][0] == 0
    assert done.stdout.count("LoRA saved:") == 1
    assert sorted(p.name for p in two.glob("*.safetensors")) == ["shapes.safetensors"]
    assert len(list((two / "logs").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in two.iterdir()) == ["checkpoints", "logs", "shapes.config.yaml",
                                                     "shapes.safetensors"]

    # process 1 stopped after step 2: both stop at step 3 (the update it asked during), one checkpoint
    first, second = runs[0]["results"][1], runs[1]["results"][1]
    assert first["interrupted"] and second["interrupted"]
    assert first["steps_done"] == second["steps_done"] == 3 and first["checkpoint"] == second["checkpoint"]
    checkpoints = sorted((stopped / "checkpoints").glob("*/step-*"))
    assert [p.name for p in checkpoints] == ["step-000003"] and str(checkpoints[0]) == first["checkpoint"]
    assert not list(stopped.glob("*.safetensors"))
    assert first["losses"] == pytest.approx(one.losses[:3], rel=1e-5)

    # process 1 died during update 3: process 0 kept step 2, the last one every process finished
    survivor = runs[0]["results"][2]
    assert survivor["interrupted"] and survivor["steps_done"] == 2
    assert [p.name for p in (lost / "checkpoints").glob("*/step-*")] == ["step-000002"]

    # each checkpoint resumes under one process with the same effective batch, to the same LoRA
    for folder, at in ((stopped, 3), (lost, 2)):
        resumed = Trainer(config_from_dict({**base, "batch_size": 2, "output_dir": str(folder),
                                            "resume_from": "latest"})).run()
        assert resumed.steps_done == 5 and resumed.losses == pytest.approx(one.losses, rel=1e-5), at
        assert_same_lora(lora_weights(resumed.lora_path), lora_weights(one.lora_path))
