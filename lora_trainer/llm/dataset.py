"""The text-generation training set: records -> examples -> token ids with labels, and a report of what happened.

Labels are the token ids where the loss is computed and ``-100`` elsewhere: the answer tokens of every assistant
turn by default, every token with ``train_on_prompt`` and for plain text. Examples longer than
``max_seq_length`` are truncated (counted); plain-text documents are cut into ``max_seq_length`` chunks instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.errors import UserError
from lora_trainer.llm.formats import Example, RecordError, to_example
from lora_trainer.llm.prompting import PromptRenderer
from lora_trainer.llm.records import read_records

IGNORE_INDEX = -100
LISTED = 20  # problems shown in a log line; the report file lists all


class TextDataError(UserError):
    """No usable example in the data."""


@dataclass
class TokenizedExample:
    source: str
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    """What reading and tokenizing the data did: formats found, lines skipped, examples truncated or dropped."""

    max_seq_length: int
    files: list[str] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    no_answer: list[str] = field(default_factory=list)
    chunked: int = 0
    examples: int = 0

    def summary(self) -> str:
        kinds = ", ".join(f"{name} {count}" for name, count in sorted(self.formats.items()))
        return f"{self.examples} training example(s) from {len(self.files)} file(s) ({kinds})"

    def warnings(self, listed: int = LISTED) -> list[str]:
        lines = []
        if self.problems:
            lines.append(f"skipped {len(self.problems)} malformed line(s): " + _listing(self.problems, listed))
        if self.truncated:
            lines.append(f"truncated {len(self.truncated)} example(s) longer than max_seq_length "
                         f"{self.max_seq_length} tokens: " + _listing(self.truncated, listed))
        if self.no_answer:
            lines.append(f"dropped {len(self.no_answer)} example(s) whose answer starts after max_seq_length "
                         f"{self.max_seq_length} tokens: " + _listing(self.no_answer, listed))
        if self.chunked:
            lines.append(f"{self.chunked} plain-text document(s) longer than max_seq_length were cut into chunks")
        return lines

    def text(self) -> str:
        """The whole report (every problem listed), for the report file."""
        return "\n".join([self.summary(), *self.warnings(listed=len(self.problems) + len(self.truncated)
                                                         + len(self.no_answer) + 1)]) + "\n"


def _listing(items: list[str], listed: int) -> str:
    more = f"; and {len(items) - listed} more (see the data report file)" if len(items) > listed else ""
    return "; ".join(items[:listed]) + more


@dataclass
class TextDataset:
    examples: list[TokenizedExample]
    report: DataReport


def load_text_dataset(path: str | Path, tokenizer: Any, renderer: PromptRenderer, *, max_seq_length: int,
                      train_on_prompt: bool = False) -> TextDataset:
    """Read every data file under ``path`` and tokenize it; raises :class:`TextDataError` when nothing is usable."""
    read = read_records(path)
    report = DataReport(max_seq_length, files=read.files, problems=list(read.problems))
    examples: list[TokenizedExample] = []
    for record in read.records:
        try:
            example = to_example(record)
            made = _tokenize(example, tokenizer, renderer, max_seq_length, train_on_prompt, report)
        except RecordError as err:
            report.problems.append(f"{record.source}: {err}")
            continue
        if made:
            report.formats[example.format] += 1
        examples += made
    report.examples = len(examples)
    if not examples:
        listed = "; ".join(report.problems[:LISTED]) or "no records"
        raise TextDataError(f"train_data_dir: no usable example in {path}: {listed}")
    return TextDataset(examples, report)


def _tokenize(example: Example, tokenizer: Any, renderer: PromptRenderer, max_seq_length: int,
              train_on_prompt: bool, report: DataReport) -> list[TokenizedExample]:
    if example.text is not None:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        ids = tokenizer(example.text)["input_ids"] + eos
        chunks = [ids[start:start + max_seq_length] for start in range(0, len(ids), max_seq_length)]
        chunks = [chunk for chunk in chunks if len(chunk) > 1]
        report.chunked += len(chunks) > 1
        return [TokenizedExample(example.source, chunk, list(chunk)) for chunk in chunks]
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in renderer.segments(example.messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if (is_answer or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    if len(input_ids) > max_seq_length:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            report.no_answer.append(example.source)
            return []
        report.truncated.append(example.source)
    return [TokenizedExample(example.source, input_ids, labels)]
