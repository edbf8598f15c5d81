"""The epoch picker in the tab: a finished run's snapshots, its grid, and installing the chosen snapshot."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lora_trainer.lora.export import read_lora_metadata
from lora_trainer.ui import picker, tab
from lora_trainer.ui.job import TrainingJob
from tests.train.toy import COOL, TARGETS, WARM, ToyBackbone, flat_pictures
from tests.ui.test_tab import FakeHost, ui_values


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run through the tab on the toy backbone: 3 epochs, a snapshot after each, validation on."""
    tmp_path = tmp_path_factory.mktemp("picker")
    host = FakeHost(tmp_path / "Lora", ToyBackbone)
    job = TrainingJob()
    values = ui_values(train_data_dir=str(flat_pictures(tmp_path / "pictures", WARM + COOL)),
                       output_dir=str(tmp_path / "out"), output_name="toy style", trigger_word="zkx", resolution=64,
                       batch_size=2, epochs=3, save_every_n_epochs=1, validation_split=0.25, lora_rank=8,
                       lora_alpha=8, target_modules=TARGETS, device="cpu", sample_prompts=["zkx", "zkx, warm"],
                       sample_steps=2)
    assert "Started." in tab.start_training_ui(host, job, *values)
    assert job.wait(120)
    return host, job


def test_a_finished_run_offers_its_snapshots_and_grid(finished):
    host, job = finished
    snap = job.snapshot()
    assert snap["status"] == "done", snap["error"]
    assert picker.snapshot_choices(snap) == [s["label"] for s in snap["snapshots"]]
    assert [(s["kind"], s["step"]) for s in snap["snapshots"]][-1] == ("final", 6)
    assert {(s["kind"], s["epoch"]) for s in snap["snapshots"]} >= {("epoch", 1), ("epoch", 2)}
    assert all(s["validation_loss"] is not None for s in snap["snapshots"])  # validated at each epoch end
    note, grid, labels, chosen = picker.picker_view(snap)
    assert isinstance(grid, Image.Image) and "same seed" in note and chosen in labels
    assert snap["grid_weights"] == [0.4, 0.7, 1.0] and snap["grid_prompts"] == ["zkx", "zkx, warm"]
    polled = tab.poll_guided_ui(host, job, str(job.config.train_data_dir))
    prompt, ready = polled[7], polled[8]
    assert prompt == "zkx, <lora:toy style:0.8>" and ready
    assert 'data-step="5"' in polled[3]  # the step line reached "try it"


def test_installing_a_chosen_snapshot_registers_it_under_the_name(finished):
    host, job = finished
    snap = job.snapshot()
    first = next(s for s in snap["snapshots"] if s["kind"] == "epoch" and s["epoch"] == 1)
    refreshed = host.refreshed
    message = picker.install_snapshot_ui(host, job, first["label"])
    installed = host.lora_dir() / "toy style.safetensors"
    assert message.startswith(f"Installed {first['label']} as toy style.safetensors")
    assert "<lora:toy style:0.8>" in message
    with open(first["path"], "rb") as source:
        assert installed.read_bytes() == source.read()  # the snapshot's weights, under the LoRA's name
    assert read_lora_metadata(installed)["ss_steps"] == str(first["step"])
    sidecar = json.loads((host.lora_dir() / "toy style.json").read_text())
    assert sidecar["activation text"] == "zkx" and first["label"] in sidecar["notes"]
    preview = host.lora_dir() / "toy style.preview.png"  # the snapshot's own cell of the grid
    assert preview.is_file() and host.refreshed == refreshed + 1
    assert job.snapshot()["lora_file"] == str(installed)
    final = snap["snapshots"][-1]
    assert picker.install_snapshot_ui(host, job, final["label"]).startswith("Installed final")
    with open(final["path"], "rb") as source:
        assert installed.read_bytes() == source.read()


def test_install_refuses_what_the_run_does_not_list(finished, tmp_path):
    host, job = finished
    before = (host.lora_dir() / "toy style.safetensors").read_bytes()
    assert "no snapshot" in picker.install_snapshot_ui(host, job, str(tmp_path / "elsewhere.safetensors"))
    assert picker.install_snapshot_ui(host, job, "") == "Pick a snapshot first."
    assert "once the run has finished" in picker.install_snapshot_ui(host, TrainingJob(), "epoch 1 (step 2)")
    assert (host.lora_dir() / "toy style.safetensors").read_bytes() == before
