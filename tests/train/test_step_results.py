"""The training step's results do not change: loss sequences equal those recorded on main (loss_reference.py)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_trainer.models.diffusers_backbone import DiffusersBackbone
from lora_trainer.train.trainer import Trainer
from tests.train.loss_reference import CASES, REFERENCE_FILE, case_config, stack_key


def _backbone(parts: dict) -> DiffusersBackbone:
    c = {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in parts.items()}
    return DiffusersBackbone(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_sequence_equals_the_one_recorded_on_main(case, _tiny_components, shapes_dataset, tmp_path):
    recorded = json.loads(REFERENCE_FILE.read_text()).get(stack_key())
    if recorded is None:
        pytest.skip(f"no loss sequence recorded on main for this stack ({stack_key()})")
    torch.manual_seed(0)  # uncached latents are sampled from the global generator
    losses = Trainer(case_config(case, shapes_dataset, tmp_path / case), _backbone(_tiny_components)).run().losses
    # equal up to float rounding differences between CPUs' kernels (identical on the machine that recorded them)
    assert losses == pytest.approx(recorded[case], rel=1e-6, abs=1e-7)
