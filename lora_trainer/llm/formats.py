"""Recognise a record's data format and turn it into a conversation (or a plain-text document).

Formats, by the fields a record has:

- Alpaca: ``instruction``, optional ``input``, ``output`` (and optional ``system``)
- prompt/response: ``prompt`` and ``response`` or ``completion`` (and optional ``system``)
- chat: ``messages``, a list of ``{"role", "content"}``
- ShareGPT: ``conversations``, a list of ``{"from", "value"}``
- plain text: ``text`` (continued pre-training: every token is trained)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_trainer.llm.records import RawRecord

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "model": "assistant", "bot": "assistant", "chatgpt": "assistant"}
FORMAT_FIELDS = "instruction+output (Alpaca), prompt+response/completion, messages (chat), " \
                "conversations (ShareGPT) or text (plain)"


class RecordError(ValueError):
    """A record that does not fit its format; the message says what is wrong."""


@dataclass
class Example:
    """One training example: a conversation (``messages``) or a plain-text document (``text``)."""

    source: str
    format: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def to_example(record: RawRecord) -> Example:
    """The example a record holds; raises :class:`RecordError` naming what is missing or wrong."""
    fields = record.fields
    if "messages" in fields:
        return Example(record.source, "chat", messages=_conversation(fields["messages"], "messages"))
    if "conversations" in fields:
        return Example(record.source, "sharegpt", messages=_conversation(fields["conversations"], "conversations"))
    if "instruction" in fields:
        instruction = _text(fields, "instruction")
        extra = _text(fields, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Example(record.source, "alpaca", messages=_exchange(fields, user, _text(fields, "output")))
    if "prompt" in fields:
        answer_key = "response" if "response" in fields else "completion"
        return Example(record.source, "prompt-response",
                       messages=_exchange(fields, _text(fields, "prompt"), _text(fields, answer_key)))
    if "text" in fields:
        return Example(record.source, "text", text=_text(fields, "text"))
    found = ", ".join(sorted(map(str, fields))) or "nothing"
    raise RecordError(f"no known fields: expected {FORMAT_FIELDS}; found {found}")


def _text(fields: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = fields.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(f"'{key}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"'{key}' must be text, got {type(value).__name__}")
    return value


def _exchange(fields: dict[str, Any], user: str, answer: str) -> list[dict[str, str]]:
    system = _text(fields, "system", required=False)
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _conversation(turns: Any, key: str) -> list[dict[str, str]]:
    """role/content or from/value turns -> system/user/assistant messages, checked."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"'{key}' must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise RecordError(f"{key}[{number}] must be an object, got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise RecordError(f"{key}[{number}]: unknown role {role!r} (expected system, user or assistant; "
                              "ShareGPT: system, human or gpt)")
        if not isinstance(content, str):
            raise RecordError(f"{key}[{number}]: content must be text, got {type(content).__name__}")
        messages.append({"role": ROLES[role.lower()], "content": content})
    speakers = [m for m in messages if m["role"] != "system"]
    if not speakers or speakers[0]["role"] != "user":
        raise RecordError(f"'{key}' must start with a user turn (after any system turn)")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError(f"'{key}' has no assistant answer to learn")
    return messages
