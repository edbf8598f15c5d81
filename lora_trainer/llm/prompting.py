"""Conversations as the model's text: the tokenizer's chat template when it has one, else a plain format.

The plain format (for tokenizers without a template, and transformers releases before chat templates)::

    <bos>### Instruction:
    {user}

    ### Response:
    {answer}<eos>

Training needs to know which characters are the answer: :meth:`PromptRenderer.segments` renders the conversation
turn by turn and marks every assistant turn (up to and including the template's end-of-turn text).
"""

from __future__ import annotations

from typing import Any

from lora_trainer.llm.formats import RecordError

Messages = list[dict[str, str]]
_MARK = "\x00lora-trainer-answer\x00"


class PromptRenderer:
    """Renders messages for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None)) \
            and hasattr(tokenizer, "apply_chat_template")

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The conversation as text; ``add_generation_prompt`` appends the opening of an assistant turn."""
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        return self._plain(messages, add_generation_prompt)

    def _plain(self, messages: Messages, add_generation_prompt: bool) -> str:
        eos = self.tokenizer.eos_token or ""
        blocks = []
        for message in messages:
            if message["role"] == "system":
                blocks.append(message["content"])
            elif message["role"] == "user":
                blocks.append(f"### Instruction:\n{message['content']}")
            else:
                blocks.append(f"### Response:\n{message['content']}{eos}")
        if add_generation_prompt:
            blocks.append("### Response:\n")
        return (self.tokenizer.bos_token or "") + "\n\n".join(blocks)

    def prompt(self, user_text: str) -> str:
        """What the model is given to answer ``user_text``."""
        return self.render([{"role": "user", "content": user_text}], add_generation_prompt=True)

    def segments(self, messages: Messages) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, is_answer)`` pieces, in order."""
        try:
            full = self.render(messages)
            spans = []
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                head = self.render(messages[:index], add_generation_prompt=True)
                end = self.render(messages[:index + 1])
                if not (full.startswith(head) and full.startswith(end) and len(head) <= len(end)):
                    raise RecordError("the chat template does not render this conversation turn by turn, so the "
                                      "answer tokens cannot be told apart")
                spans.append((len(head), len(end)))
        except RecordError:
            raise
        except Exception as err:  # noqa: BLE001 - templates raise anything (jinja errors, their own checks)
            raise RecordError(f"the chat template refused this conversation: {err}") from err
        pieces, position = [], 0
        for start, stop in spans:
            if start < position:
                continue
            pieces += [(full[position:start], False), (full[start:stop], True)]
            position = stop
        pieces.append((full[position:], False))
        return [(text, answer) for text, answer in pieces if text]

    def end_of_turn_token(self) -> int | None:
        """The special token that closes an assistant turn (``<|im_end|>``, ``<|eot_id|>``, eos), if any."""
        text = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARK}])
        after = text.split(_MARK, 1)[1].lstrip() if _MARK in text else ""
        ids = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        if ids and ids[0] in set(self.tokenizer.all_special_ids):
            return ids[0]
        return None
