"""Every path a text-generation run writes resolves inside output_dir, whatever the name."""

from __future__ import annotations

import pytest

from lora_trainer.config import ConfigError
from lora_trainer.llm.layout import TextRunLayout
from lora_trainer.validation import UnsafePathError
from tests.llm.helpers import llm_config


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "  ", "/abs/path", ".hidden"])
def test_names_that_would_leave_the_output_folder_are_refused_before_anything_is_written(tmp_path, name):
    with pytest.raises(ConfigError, match="output_name: "):
        llm_config(tmp_path, tmp_path / "model", tmp_path / "data", output_name=name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["facts", "my lora.v2", "キャラ_v1"])
def test_every_written_path_is_inside_output_dir(tmp_path, name):
    layout = TextRunLayout(tmp_path / "out", name)
    assert layout.adapter_dir == tmp_path / "out" / name
    assert layout.merged_dir == tmp_path / "out" / f"{name}-merged"
    assert layout.text_sample_file(7) == tmp_path / "out" / "samples" / name / "step-000007.md"
    root = (tmp_path / "out").resolve()
    for path in layout.written_paths("abc123"):
        assert path.resolve() == root or root in path.resolve().parents, path


def test_a_name_past_the_validator_or_a_link_out_of_output_dir_is_still_refused(tmp_path):
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        _ = TextRunLayout(tmp_path / "out", "../escape").adapter_dir
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "facts-merged").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePathError, match="outside the output folder"):
        _ = TextRunLayout(tmp_path / "out", "facts").merged_dir
