"""The tab's *Load YAML* reads files as the CLI does: an alias bomb or a non-UTF-8 file is a status line, at once."""

from __future__ import annotations

import time
from pathlib import Path

from lora_trainer.config import FIELDS
from lora_trainer.ui import tab


def test_load_yaml_refuses_an_alias_bomb_quickly(tmp_path: Path) -> None:
    levels = ['  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("anchors:\n" + "\n".join(levels) + "\nsample_prompts: *l8\n", encoding="utf-8")
    values = [tab.to_ui(name, getattr(tab.TrainConfig(), name)) for name in tab.CONFIG_KEYS]
    started = time.perf_counter()
    out = tab.load_yaml_ui(str(bomb), *values)
    assert time.perf_counter() - started < 2.0
    assert out[:-1] == values and "alias bomb" in out[-1] and len(out[-1]) < 400
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("trigger_word: café\n".encode("cp1252"))
    assert "latin.yaml is not UTF-8 text" in tab.load_yaml_ui(str(latin), *values)[-1]
    assert set(tab.CONFIG_KEYS) <= set(FIELDS)
