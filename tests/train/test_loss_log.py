"""Losses are read back from the device in batches, with the same values the per-step reads gave."""

from __future__ import annotations

import torch

from lora_trainer.train.events import EventBus, StepEvent
from lora_trainer.train.loss_log import LossLog
from lora_trainer.train.trainer import Trainer
from tests.train.test_trainer import make_config


def test_loss_log_reads_once_per_window_with_the_old_arithmetic():
    now = {"t": 0.0}
    log = LossLog(every_seconds=1.0, clock=lambda: now["t"])
    micro = [torch.tensor(0.3, dtype=torch.float32), torch.tensor(0.7, dtype=torch.float32)]
    for step in (1, 2, 3):
        now["t"] += 0.25
        log.add(step, 0, 1e-4, micro)
        assert not log.due() and log.reads == 0
    now["t"] += 0.25
    log.add(4, 0, 1e-4, micro)
    assert log.due()
    logged = log.flush()
    assert log.reads == 1 and [e.step for e in logged] == [1, 2, 3, 4]
    expected = 0.0
    for value in micro:  # what `step_loss += loss.item() / accumulation` gave
        expected += value.item() / 2
    assert all(e.loss == expected and e.seconds == 0.25 for e in logged)
    assert log.flush() == [] and log.reads == 1


def test_trainer_reads_losses_in_batches_and_logs_the_same_values(make_tiny_backbone, shapes_dataset, tmp_path,
                                                                  monkeypatch):
    settings = {"max_steps": 4, "batch_size": 2, "gradient_accumulation_steps": 2, "save_steps": 3}

    def run(folder: str) -> tuple[list[tuple], list]:
        events: list = []
        result = Trainer(make_config(shapes_dataset, tmp_path / folder, **settings), make_tiny_backbone(),
                         events=EventBus(lambda e: events.append(e) if isinstance(e, StepEvent) else None)).run()
        return [(e.step, e.loss, e.lr, e.epoch) for e in events], result.losses

    logs: list[LossLog] = []
    window = {"seconds": 0.0}

    class Recorded(LossLog):
        def __init__(self, every_seconds: float) -> None:
            assert every_seconds == 0.0  # a CPU run reads every step; the window under test replaces that
            super().__init__(every_seconds=window["seconds"])
            logs.append(self)

    monkeypatch.setattr("lora_trainer.train.trainer.LossLog", Recorded)
    every_step, losses = run("every")  # a zero window: one read per step, as `loss.item()` did
    window["seconds"] = float("inf")
    batched, batched_losses = run("batched")
    assert batched == every_step and batched_losses == losses
    assert logs[0].reads == 4
    assert logs[1].reads == 2  # before the checkpoint at step 3, and at the end: not once per step


def test_a_cpu_reads_every_step_and_an_accelerator_in_batches():
    assert LossLog.interval_for(torch.device("cpu")) == 0.0  # synchronous: progress and Interrupt at each step
    assert LossLog.interval_for(torch.device("cuda")) > 0.0
