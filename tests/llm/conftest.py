"""Tiny random causal LMs (Llama, Qwen2, GPT-2 ...) with a BPE tokenizer trained offline on the test facts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lora_trainer.llm.tiny import architecture_available, build_tokenizer, write_tiny_causal_lm
from tests.llm.helpers import CORPUS, FACTS, write_jsonl


@pytest.fixture(scope="session")
def chat_tokenizer() -> Any:
    """The test tokenizer with a ChatML template (used only where transformers renders templates)."""
    return build_tokenizer(CORPUS, chat_template=True)


@pytest.fixture(scope="session")
def plain_tokenizer() -> Any:
    """The test tokenizer without a chat template (the plain ### Instruction / ### Response format)."""
    return build_tokenizer(CORPUS, chat_template=False)


@pytest.fixture(scope="session")
def llm_folder(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Callable[..., Path]:
    """``llm_folder(arch, chat=True)``: a saved tiny model + tokenizer folder, built once per session."""
    made: dict[tuple[str, bool], Path] = {}

    def make(arch: str = "llama", chat: bool = True) -> Path:
        reason = architecture_available(arch)
        if reason:
            pytest.skip(reason)
        if (arch, chat) not in made:
            tokenizer = request.getfixturevalue("chat_tokenizer" if chat else "plain_tokenizer")
            folder = tmp_path_factory.mktemp(f"{arch}{'_chat' if chat else '_plain'}")
            made[(arch, chat)] = write_tiny_causal_lm(folder, arch, tokenizer, seed=0)
        return made[(arch, chat)]

    return make


@pytest.fixture
def facts_data(tmp_path: Path) -> Path:
    """The facts as Alpaca records in ``data/facts.jsonl``."""
    return write_jsonl(tmp_path / "data" / "facts.jsonl",
                       [{"instruction": q, "input": "", "output": a} for q, a in FACTS]).parent
