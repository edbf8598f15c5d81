"""Epoch snapshots and the picker's grid: snapshots x weights x prompts, LoRA scale restored exactly."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from lora_trainer.lora.inject import inject_lora, lora_state_dict
from lora_trainer.train import grid
from lora_trainer.train.events import EventBus, GridEvent, SnapshotEvent
from lora_trainer.train.layout import RunLayout
from lora_trainer.train.snapshots import Snapshot, list_snapshots, weights_of
from lora_trainer.train.trainer import Trainer
from tests.lora.helpers import randomize_lora
from tests.train.test_trainer import make_config

PROMPTS = ["a red circle", "a blue square"]


def test_lora_weight_scales_the_update_and_restores_it_exactly():
    torch.manual_seed(0)
    root = nn.Sequential()
    root.add_module("to_q", nn.Linear(6, 5))
    base = nn.Linear(6, 5)
    base.load_state_dict(root.to_q.state_dict())
    randomize_lora(inject_lora({"lora_unet": root}, rank=2, alpha=1.0, dropout=0.0, unet_targets=["to_q"],
                               te_targets=[]), scale=0.5)
    x = torch.randn(3, 6)
    with torch.no_grad():
        full, plain = root(x), base(x)
        scale_before = root.to_q.scaling["default"]
        for weight in (0.0, 0.4, 1.0):
            with grid.lora_weight({"lora_unet": root}, weight):
                assert torch.allclose(root(x), plain + weight * (full - plain), atol=1e-6)
        assert root.to_q.scaling["default"] is scale_before and torch.equal(root(x), full)
        try:
            with grid.lora_weight({"lora_unet": root}, 0.0):
                raise RuntimeError("a render failed")
        except RuntimeError:
            pass
        assert torch.equal(root(x), full)


def test_pick_rows_spreads_epochs_and_keeps_best_and_final(tmp_path):
    epochs = [Snapshot(tmp_path / f"e{i}", "epoch", i * 10, i) for i in range(1, 21)]
    best, final = Snapshot(tmp_path / "b", "best", 95), Snapshot(tmp_path / "f", "final", 210)
    rows = grid.pick_rows([*epochs[:9], best, *epochs[9:], final], limit=6)
    assert [s.epoch or s.kind for s in rows] == [1, 7, "best", 14, 20, "final"]  # in run order
    assert grid.pick_rows([final]) == [final]


def test_run_keeps_epoch_snapshots_and_renders_the_grid(make_tiny_backbone, shapes_dataset, tmp_path):
    """8 images, batch 4: 2 updates an epoch; 3 epochs with a snapshot after each but the last (the final
    LoRA): 3 LoRAs x 3 weights x 2 prompts = 18 cells, same seed."""
    events: list = []
    backbone = make_tiny_backbone()
    cfg = make_config(shapes_dataset, tmp_path / "out", max_steps=None, epochs=3, save_every_n_epochs=1,
                      sample_prompts=PROMPTS, sample_steps=2, learning_rate=5e-3, preview=False)
    result = Trainer(cfg, backbone, events=EventBus(events.append), restore_backbone=False).run()
    out = tmp_path / "out"
    saved = [e for e in events if isinstance(e, SnapshotEvent)]
    assert [(e.step, e.epoch, e.path.name) for e in saved] == [(2, 1, "test_lora-000001.safetensors"),
                                                              (4, 2, "test_lora-000002.safetensors")]
    quality = result.quality
    assert [(s.kind, s.step) for s in quality.snapshots] == [("epoch", 2), ("epoch", 4), ("final", 6)]
    assert quality.grid_cells == 3 * 3 * 2 and quality.grid_path == out / "test_lora.grid.png"
    shown = next(e for e in events if isinstance(e, GridEvent))
    assert [row["label"] for row in shown.snapshots] == ["epoch 1 (step 2)", "epoch 2 (step 4)", "final (step 6)"]
    assert shown.weights == list(grid.GRID_WEIGHTS) and shown.prompts == PROMPTS
    with Image.open(quality.grid_path) as picture:  # one image: a row per LoRA, a column per prompt and weight
        assert picture.size == (grid.LABEL_WIDTH + 6 * grid.CELL, grid.HEADER + 3 * grid.CELL)

    # the cells themselves: weight 1 of the final LoRA is the end-of-run sample; weight 0 is no LoRA at all
    roots = backbone.lora_roots(False)
    trained = lora_state_dict(roots)
    first_and_final = [quality.snapshots[0], quality.snapshots[-1]]
    cells = grid.render_cells(backbone, roots, first_and_final, [0.0, 1.0], PROMPTS[:1], seed=cfg.seed,
                              steps=2, size=64)
    pixels = {(c.snapshot.kind, c.snapshot.step, c.weight): np.asarray(c.image) for c in cells}
    with Image.open(RunLayout.of(cfg).sample_file(6, 0)) as sample:
        assert np.array_equal(pixels[("final", 6, 1.0)], np.asarray(sample))
    assert all(np.array_equal(pixels[(kind, step, 0.0)], pixels[("final", 6, 0.0)])
               for kind, step, _ in pixels)
    assert not np.array_equal(pixels[("final", 6, 1.0)], pixels[("final", 6, 0.0)])
    after = lora_state_dict(roots)  # the trained weights are back in the layers
    assert after.keys() == trained.keys() and all(torch.equal(after[k], trained[k]) for k in after)
    assert [s.step for s in list_snapshots(out, "test_lora")] == [2, 4]
    with weights_of(roots, quality.snapshots[0].path):
        first = lora_state_dict(roots)
    assert any(not torch.equal(first[k], trained[k]) for k in first)
