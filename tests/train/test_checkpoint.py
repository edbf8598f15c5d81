"""Checkpoint folders: exact round trip of optimizer, schedule and RNG state, with nothing pickled."""

from __future__ import annotations

import random

import pytest
import torch

from lora_trainer.train import checkpoint as ckpt


def _optimizer_and_schedule():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        sum(p.square().sum() for p in params).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return params, optimizer, scheduler


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_optimizer_schedule_and_rng_come_back_exactly_without_pickles(tmp_path):
    params, optimizer, scheduler = _optimizer_and_schedule()
    random.seed(5)
    progress = ckpt.Progress(global_step=3, micro_step=3, losses=[0.5, 0.25, 0.125])
    folder = ckpt.save_checkpoint(tmp_path, progress, {"w": params[0].detach()}, optimizer, scheduler)
    expected_python = random.random()

    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]
    loaded = ckpt.load_checkpoint(folder)
    assert loaded.progress == progress
    assert _equal(loaded.optimizer, optimizer.state_dict())  # int keys, tuples and 0-dim step tensors kept
    assert _equal(loaded.scheduler, scheduler.state_dict())
    ckpt.restore_rng_state(loaded.rng)
    assert random.random() == expected_python

    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = torch.optim.AdamW(fresh_params, lr=1e-3)
    fresh_schedule = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 1 / (step + 1))
    fresh.load_state_dict(loaded.optimizer)
    fresh_schedule.load_state_dict(loaded.scheduler)
    for group_params in (params, fresh_params):
        sum(p.square().sum() for p in group_params).backward()
    optimizer.step()
    fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh_params, strict=True))  # the same next update


def test_a_folder_without_the_training_state_is_refused_clearly(tmp_path):
    folder = tmp_path / "step-000002"
    folder.mkdir()
    (folder / "progress.json").write_text('{"global_step": 2}')
    (folder / "training_state.pt").write_bytes(b"old pickle")
    with pytest.raises(ckpt.CheckpointError, match="training_state.json"):
        ckpt.load_checkpoint(folder)


def test_restoring_a_checkpoint_that_does_not_fit_is_one_checkpoint_error(tmp_path):
    params, optimizer, scheduler = _optimizer_and_schedule()
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])  # another run's single parameter
    loaded = ckpt.LoadedCheckpoint(tmp_path / "step-000003", ckpt.Progress(3, 3), {}, other.state_dict(),
                                   scheduler.state_dict(), ckpt.rng_state())
    with pytest.raises(ckpt.CheckpointError, match=r"step-000003 does not fit this run's adapter \(.*\); start a new "
                                                   "run without resume_from"):
        ckpt.restore_training_state(loaded, lambda state: None, optimizer, scheduler, "adapter")
    weights = {}
    fitting = ckpt.LoadedCheckpoint(tmp_path / "step-000003", ckpt.Progress(3, 3, [1.0, 0.5, 0.25]), {"w": params[1]},
                                    optimizer.state_dict(), scheduler.state_dict(), ckpt.rng_state())
    assert ckpt.restore_training_state(fitting, weights.update, optimizer, scheduler, "adapter").losses[-1] == 0.25
    assert weights == {"w": params[1]}
