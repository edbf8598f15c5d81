"""Tokenized examples: loss only on answer tokens, chat template or plain format, truncation counted."""

from __future__ import annotations

import copy

import pytest

from lora_trainer.llm.dataset import IGNORE_INDEX, TextDataError, load_text_dataset
from lora_trainer.llm.prompting import PromptRenderer
from tests.llm.helpers import CHATML_TEMPLATE_RAISING, chat_templates_available, needs_chat_template, write_jsonl

ALPACA = {"instruction": "What colour is a zorblat?", "input": "", "output": "A zorblat is teal."}


def load(tokenizer, tmp_path, rows, **kwargs):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    options = {"max_seq_length": 128, **kwargs}
    return load_text_dataset(path, tokenizer, PromptRenderer(tokenizer), **options)


def answer_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                             if label != IGNORE_INDEX])


@needs_chat_template
def test_chat_template_renders_and_only_the_answer_is_trained(chat_tokenizer, tmp_path):
    data = load(chat_tokenizer, tmp_path, [ALPACA])
    example = data.examples[0]
    rendered = ("<|im_start|>user\nWhat colour is a zorblat?<|im_end|>\n<|im_start|>assistant\n"
                "A zorblat is teal.<|im_end|>\n")
    assert example.input_ids == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert answer_text(chat_tokenizer, example) == "A zorblat is teal.<|im_end|>\n"
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert chat_tokenizer.decode(example.input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE_INDEX for label in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]


def test_without_a_chat_template_the_plain_format_is_used(plain_tokenizer, tmp_path):
    data = load(plain_tokenizer, tmp_path, [ALPACA])
    example = data.examples[0]
    assert plain_tokenizer.decode(example.input_ids) == (
        "<|endoftext|>### Instruction:\nWhat colour is a zorblat?\n\n### Response:\nA zorblat is teal.<|endoftext|>")
    assert answer_text(plain_tokenizer, example) == "A zorblat is teal.<|endoftext|>"
    assert PromptRenderer(plain_tokenizer).prompt("Hi?").endswith("### Instruction:\nHi?\n\n### Response:\n")


@pytest.mark.parametrize("chat", [True, False])
def test_every_assistant_turn_of_a_conversation_is_trained(chat, chat_tokenizer, plain_tokenizer, tmp_path):
    tokenizer = chat_tokenizer if chat else plain_tokenizer
    if chat and chat_templates_available():
        pytest.skip(chat_templates_available())
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
             {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Colour?"},
             {"role": "assistant", "content": "Teal."}]
    example = load(tokenizer, tmp_path, [{"messages": turns}]).examples[0]
    trained = answer_text(tokenizer, example)
    end = "<|im_end|>\n" if chat else "<|endoftext|>"
    assert trained == f"Hi.{end}Teal.{end}"
    assert "Hello?" in tokenizer.decode(example.input_ids) and "Colour?" not in trained


def test_train_on_prompt_trains_every_token(plain_tokenizer, tmp_path):
    example = load(plain_tokenizer, tmp_path, [ALPACA], train_on_prompt=True).examples[0]
    assert example.labels == example.input_ids


def test_truncation_is_counted_and_answerless_examples_dropped(plain_tokenizer, tmp_path):
    long_answer = {"prompt": "Q?", "response": "word " * 60}
    long_prompt = {"prompt": "word " * 60, "response": "A."}
    data = load(plain_tokenizer, tmp_path, [ALPACA, long_answer, long_prompt], max_seq_length=32)
    report = data.report
    assert [e.source for e in data.examples] == ["d.jsonl:1", "d.jsonl:2"]
    assert all(len(e.input_ids) <= 32 for e in data.examples)
    assert report.truncated == ["d.jsonl:2"] and report.no_answer == ["d.jsonl:3"]
    warnings = "\n".join(report.warnings())
    assert "truncated 1 example(s) longer than max_seq_length 32 tokens: d.jsonl:2" in warnings
    assert "dropped 1 example(s) whose answer starts after max_seq_length 32 tokens: d.jsonl:3" in warnings
    assert report.summary() == "2 training example(s) from 1 file(s) (alpaca 1, prompt-response 1)"


def test_plain_text_is_cut_into_chunks_with_every_token_trained(plain_tokenizer, tmp_path):
    (tmp_path / "doc.txt").write_text("A plain text document about rivers and hills. " * 12, encoding="utf-8")
    data = load_text_dataset(tmp_path / "doc.txt", plain_tokenizer, PromptRenderer(plain_tokenizer),
                             max_seq_length=32)
    ids = plain_tokenizer((tmp_path / "doc.txt").read_text(encoding="utf-8"))["input_ids"] + [
        plain_tokenizer.eos_token_id]
    assert [t for e in data.examples for t in e.input_ids] == ids
    assert all(e.labels == e.input_ids and len(e.input_ids) <= 32 for e in data.examples)
    assert len(data.examples) == -(-len(ids) // 32) and data.report.chunked == 1
    assert data.report.truncated == []


def test_report_lists_malformed_lines_and_nothing_usable_is_an_error(plain_tokenizer, tmp_path):
    data = load(plain_tokenizer, tmp_path, [ALPACA, {"instruction": "no answer"}, {"foo": 1}])
    assert len(data.examples) == 1
    text = data.report.text()
    assert "skipped 2 malformed line(s): d.jsonl:2: 'output' is missing or empty; d.jsonl:3: no known fields" in text
    with pytest.raises(TextDataError, match="no usable example in .*d.jsonl:1: 'output' is missing"):
        load(plain_tokenizer, tmp_path, [{"instruction": "no answer"}])


@needs_chat_template
def test_a_template_refusing_a_conversation_skips_that_example(chat_tokenizer, tmp_path):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE_RAISING
    data = load(tokenizer, tmp_path, [ALPACA, {**ALPACA, "system": "Be brief."}])
    assert [e.source for e in data.examples] == ["d.jsonl:1"]
    assert data.report.problems == ["d.jsonl:2: the chat template refused this conversation: no system turns"]
