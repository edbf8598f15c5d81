"""A simulated out-of-memory error mid-run: the run steps down the ladder and continues without losing an update;
a sudden slowdown with nearly full memory is reported once."""

from __future__ import annotations

import torch

from lora_trainer.train.events import EventBus, MessageEvent, StepEvent
from lora_trainer.train.oom_guard import SpillWatch
from lora_trainer.train.trainer import Trainer
from tests.train.test_trainer import make_config

SETTINGS = {"max_steps": 5, "batch_size": 4, "lora_dropout": 0.1, "flip_aug": True}


def fail_once_at_update(backbone, update: int, micro_in_update: int = 0):
    """Make ``backbone.predict`` raise a CUDA out-of-memory error once, in the given update (0-based)."""
    calls = {"n": 0}
    predict = backbone.predict

    def flaky(noisy, *args, **kwargs):
        if noisy.device.type == "meta":  # the memory plan's dry run
            return predict(noisy, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == update + micro_in_update + 1:
            calls["n"] = -10**9  # only once
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return predict(noisy, *args, **kwargs)

    backbone.predict = flaky
    return backbone


def test_out_of_memory_mid_run_steps_down_and_loses_no_update(make_tiny_backbone, shapes_dataset, tmp_path):
    messages: list[str] = []
    steps: list[int] = []

    def sink(event):
        if isinstance(event, MessageEvent):
            messages.append(event.text)
        elif isinstance(event, StepEvent):
            steps.append(event.step)

    backbone = fail_once_at_update(make_tiny_backbone(), update=2)  # batch 4: one predict per update
    trainer = Trainer(make_config(shapes_dataset, tmp_path / "oom", **SETTINGS), backbone, events=EventBus(sink))
    hit = trainer.run()
    assert hit.steps_done == 5 and hit.lora_path is not None and steps == [1, 2, 3, 4, 5]
    assert "out of memory at step 3; batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2 (same effective " \
           "batch 4); the step runs again" in messages
    assert (trainer.cfg.batch_size, trainer.cfg.gradient_accumulation_steps) == (2, 2)

    # the reference: two updates with the first settings, then a run resumed there with the stepped-down ones
    done: list[int] = []
    bus = EventBus(lambda e: done.append(e.step) if isinstance(e, StepEvent) else None)
    first = Trainer(make_config(shapes_dataset, tmp_path / "ref", **SETTINGS), make_tiny_backbone(), events=bus,
                    should_stop=lambda: len(done) >= 2).run()
    assert first.interrupted and first.steps_done == 2
    stepped_down = {**SETTINGS, "batch_size": 2, "gradient_accumulation_steps": 2}
    rest = Trainer(make_config(shapes_dataset, tmp_path / "ref", resume_from="latest", **stepped_down),
                   make_tiny_backbone()).run()
    assert hit.losses == rest.losses  # bit for bit: updates 1-2 as before, 3-5 with the new settings


def test_out_of_memory_on_a_later_micro_batch_keeps_the_run_exact(make_tiny_backbone, shapes_dataset, tmp_path):
    settings = {**SETTINGS, "batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3}
    # update 1 makes predict calls 3 and 4: fail on the second one, after one backward pass was accumulated
    hit = Trainer(make_config(shapes_dataset, tmp_path / "oom", **settings),
                  fail_once_at_update(make_tiny_backbone(), update=2, micro_in_update=1)).run()
    done: list[int] = []
    bus = EventBus(lambda e: done.append(e.step) if isinstance(e, StepEvent) else None)
    Trainer(make_config(shapes_dataset, tmp_path / "ref", **settings), make_tiny_backbone(), events=bus,
            should_stop=lambda: len(done) >= 1).run()
    rest = Trainer(make_config(shapes_dataset, tmp_path / "ref", resume_from="latest",
                               **{**settings, "batch_size": 1, "gradient_accumulation_steps": 4}),
                   make_tiny_backbone()).run()
    assert hit.steps_done == 3 and hit.losses == rest.losses


def test_out_of_memory_at_the_bottom_of_the_ladder_is_raised(make_tiny_backbone, shapes_dataset, tmp_path):
    backbone = make_tiny_backbone()

    predict = backbone.predict

    def always(noisy, *args, **kwargs):
        if noisy.device.type == "meta":
            return predict(noisy, *args, **kwargs)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    backbone.predict = always
    cfg = make_config(shapes_dataset, tmp_path / "out", batch_size=2, max_steps=2)
    try:
        Trainer(cfg, backbone).run()
    except torch.cuda.OutOfMemoryError:
        pass
    else:
        raise AssertionError("the error was swallowed")


def test_spill_watch_reports_a_slow_step_with_full_memory_once():
    memory = {"fraction": 0.5}
    watch = SpillWatch(lambda: memory["fraction"])
    assert [watch.observe(1.0) for _ in range(6)] == [None] * 6  # the usual pace: 1 s per step
    assert watch.observe(9.0) is None  # slow, but memory is not full: not a spill
    memory["fraction"] = 0.97
    warning = watch.observe(9.0, steps=3)
    assert warning is not None and "9.00 s" in warning and "97% full" in warning and "1.00 s" in warning
    assert watch.observe(12.0) is None  # once


def test_spill_watch_is_silent_without_a_memory_figure():
    watch = SpillWatch(lambda: None)
    assert all(watch.observe(seconds) is None for seconds in (1.0, 1.0, 1.0, 1.0, 50.0, 50.0))
