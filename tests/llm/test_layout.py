"""Output folders stay inside output_dir whatever the name."""

from __future__ import annotations

import pytest

from lora_trainer.errors import UserError
from lora_trainer.llm.export import output_folder
from lora_trainer.llm.trainer import TextTrainer
from tests.llm.helpers import llm_config


@pytest.mark.parametrize("name", ["../escape", "a/b", ".", "", "  ", "/abs/path"])
def test_names_that_leave_the_output_folder_are_refused(tmp_path, name):
    with pytest.raises(UserError, match="must be a plain name"):
        output_folder(tmp_path / "out", name)


def test_plain_names_give_folders_inside_output_dir(tmp_path):
    assert output_folder(tmp_path, "my lora.v2") == tmp_path / "my lora.v2"
    assert output_folder(tmp_path, "qa", "-merged") == tmp_path / "qa-merged"


def test_a_run_with_an_escaping_name_writes_nothing(tmp_path, facts_data, llm_folder):
    cfg = llm_config(tmp_path, llm_folder("gpt2"), facts_data, output_name="../../escape")
    with pytest.raises(UserError, match="output_name: '../../escape' must be a plain name"):
        TextTrainer(cfg).run()
    assert not (tmp_path / "out").exists()
