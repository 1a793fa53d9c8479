"""Instruction, chat and summarization records -> rendered text with trainable spans.

`SFTFormatter(sft_cfg, tokenizer)(record, where)` returns a `Rendered` example: text segments
marked trainable (the response, or the assistant turns of a chat), plus the generation prompt
and the reference answer used by evaluation by generation. Formats:

    alpaca         instruction, input (optional), output          -> Stanford Alpaca prompt
                   (with sft.chat_template set, alpaca/dolly/summarization records are a
                   user turn and an assistant turn rendered through that chat template)
    dolly          instruction, context (optional), response, category (filter: sft.category)
    chat/sharegpt  messages [{role, content}] or conversations [{from, value}]
    summarization  dialogue -> summary (SAMSum field names)
    custom         sft.prompt_template / sft.response_template over any record fields

Every record problem raises `InvalidRecord` (a `TunesmithError`) naming the record and field;
`sft.invalid=skip` turns those into a count instead.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from tunesmith.config.tasks import SFTConfig
from tunesmith.data import chat
from tunesmith.errors import TunesmithError

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_SUMMARIZE = "Summarize this dialogue:\n{dialogue}\n---\nSummary:\n"

# format -> (prompt fields that must be present, optional prompt fields, response field)
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "alpaca": (("instruction",), ("input",), "output"),
    "dolly": (("instruction",), ("context",), "response"),
    "summarization": (("dialogue",), (), "summary"),
}


class InvalidRecord(TunesmithError):
    """A record that cannot be used (missing/mistyped field, empty response, ...)."""

    def with_skip_hint(self) -> InvalidRecord:
        """The same error, saying how to go on: real data sets have such records (Alpaca's
        record 285 has an empty output), and the first one stops the run."""
        return InvalidRecord(f"{self} (sft.invalid=skip skips such records and counts them)")


@dataclass
class Rendered:
    """One example as text. `prefix`: prepend the tokenizer's own leading special tokens
    (BOS); `eos`: append EOS as a trained token. Chat templates carry both in their text."""

    segments: list[tuple[str, bool]]
    prompt: str
    reference: str
    prefix: bool = True
    eos: bool = True


def _template_fields(template: str) -> list[str]:
    """Field names used by a format string ('{a} and {b[0]}' -> ['a', 'b'])."""
    names = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None and field != "":
            names.append(field.split(".")[0].split("[")[0])
    return names


class SFTFormatter:
    """Turns records of one format into `Rendered` examples."""

    def __init__(self, cfg: SFTConfig, tokenizer: Any, tokenizer_source: str = "tokenizer",
                 add_eos: bool = True) -> None:
        self.cfg = cfg
        self.fmt = "chat" if cfg.format == "sharegpt" else cfg.format
        self.add_eos = add_eos and tokenizer.eos_token_id is not None
        self.builtin: chat.ChatFormat | None = None
        self._render = None
        self.eos_text = tokenizer.eos_token or ""
        # alpaca/dolly/summarization with a chat template: each record becomes a user turn
        # (the instruction and its input) and an assistant turn (the response).
        self.as_chat = self.fmt in _FIELDS and cfg.chat_template is not None
        if self.fmt == "chat" or self.as_chat:
            name = cfg.chat_template or "tokenizer"
            if name == "tokenizer":
                self._render = chat.tokenizer_renderer(tokenizer, tokenizer_source)
            elif name in chat.BUILTIN_TEMPLATES:
                self.builtin = chat.BUILTIN_TEMPLATES[name]
                chat.check_builtin(self.builtin, tokenizer)
            else:
                known = ", ".join(["tokenizer", *chat.BUILTIN_TEMPLATES])
                raise TunesmithError(f"sft.chat_template={name!r} is unknown; known: {known}")
        for template in (cfg.prompt_template, cfg.response_template):
            if template:
                try:
                    _template_fields(template)
                except ValueError as exc:
                    raise TunesmithError(f"sft template {template!r} is not a valid format "
                                         f"string: {exc}") from None

    # -- field access -------------------------------------------------------------------
    def key(self, name: str) -> str:
        return self.cfg.fields.get(name, name)

    def _get(self, record: dict[str, Any], name: str, where: str, required: bool = True) -> str:
        key = self.key(name)
        if key not in record or record[key] is None:
            if required:
                state = "missing" if key not in record else "null"
                raise InvalidRecord(f"{where}: {state} field '{key}'")
            return ""
        value = record[key]
        if not isinstance(value, str):
            raise InvalidRecord(
                f"{where}: field '{key}' holds {type(value).__name__}, expected a string")
        return value

    def _format(self, template: str, record: dict[str, Any], where: str) -> str:
        for name in _template_fields(template):
            self._get(record, name, where)  # a clear error before str.format's KeyError
        values = {k: record[self.key(k)] for k in _template_fields(template)}
        try:
            return template.format(**values)
        except (IndexError, KeyError, AttributeError, ValueError) as exc:
            raise InvalidRecord(f"{where}: template {template!r} failed: {exc!r}") from None

    # -- rendering ----------------------------------------------------------------------
    def __call__(self, record: Any, where: str) -> Rendered:
        if not isinstance(record, dict):
            raise InvalidRecord(f"{where}: expected a JSON object, got {type(record).__name__}")
        if self.fmt == "chat":
            return self._chat(record, where)
        if self.fmt == "custom":
            prompt = self._format(self.cfg.prompt_template or "", record, where)
            response = self._format(self.cfg.response_template or "", record, where)
            response_name = ",".join(_template_fields(self.cfg.response_template or ""))
        elif self.as_chat:
            return self._standard_as_chat(record, where)
        else:
            prompt, response, response_name = self._standard(record, where)
        if not response.strip():
            raise InvalidRecord(f"{where}: empty response in field '{response_name}'")
        return Rendered([(prompt, False), (response, True)], prompt, response, True, self.add_eos)

    def _standard(self, record: dict[str, Any], where: str) -> tuple[str, str, str]:
        required, optional, response_field = _FIELDS[self.fmt]
        values = {name: self._get(record, name, where) for name in required}
        values.update({name: self._get(record, name, where, required=False) for name in optional})
        response = self._get(record, response_field, where)
        if self.cfg.prompt_template:
            prompt = self._format(self.cfg.prompt_template, record, where)
        elif self.fmt == "summarization":
            prompt = PROMPT_SUMMARIZE.format(dialogue=values["dialogue"])
        else:
            extra = values.get("input", values.get("context", ""))
            prompt = (PROMPT_WITH_INPUT.format(instruction=values["instruction"], input=extra)
                      if extra.strip() else PROMPT_NO_INPUT.format(**values))
        return prompt, response, self.key(response_field)

    def _standard_as_chat(self, record: dict[str, Any], where: str) -> Rendered:
        """A user turn (instruction, input/context or dialogue; or sft.prompt_template) and an
        assistant turn (the response), rendered through the chat template."""
        required, optional, response_field = _FIELDS[self.fmt]
        if self.cfg.prompt_template:
            user = self._format(self.cfg.prompt_template, record, where)
        elif self.fmt == "summarization":
            user = "Summarize this dialogue:\n" + self._get(record, "dialogue", where)
        else:
            parts = [self._get(record, required[0], where),
                     self._get(record, optional[0], where, required=False)]
            user = "\n\n".join(p for p in parts if p.strip())
        response = self._get(record, response_field, where)
        if not response.strip():
            raise InvalidRecord(f"{where}: empty response in field '{self.key(response_field)}'")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        return self._render_messages(messages, 1, where)

    def _messages_field(self, record: dict[str, Any], where: str) -> str:
        if self.cfg.fields.get("messages"):
            return self.cfg.fields["messages"]
        for name in (("conversations", "messages") if self.cfg.format == "sharegpt"
                     else ("messages", "conversations")):
            if name in record:
                return name
        raise InvalidRecord(f"{where}: missing field 'messages' (or ShareGPT 'conversations')")

    def _chat(self, record: dict[str, Any], where: str) -> Rendered:
        field = self._messages_field(record, where)
        try:
            messages = chat.normalize_messages(record.get(field), where, field)
        except TunesmithError as exc:
            raise InvalidRecord(str(exc)) from None
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return self._render_messages(messages, last, where)

    def _render_messages(self, messages: list[dict[str, str]], last: int, where: str) -> Rendered:
        """Messages through the chat template; `last`: index of the answer to generate."""
        reference = messages[last]["content"]
        if self.builtin is not None:
            segs = chat.render_builtin(self.builtin, messages, self.eos_text,
                                       self.cfg.system_prompt)
            prompt = chat.builtin_prompt(self.builtin, messages[:last], self.eos_text,
                                         self.cfg.system_prompt)
            return Rendered(segs, prompt, reference, prefix=True, eos=False)
        assert self._render is not None
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.cfg.system_prompt}, *messages]
            last += 1
        try:
            segs = chat.render_with_template(self._render, messages, where)
            prompt = self._render(messages[:last], True)
        except TunesmithError as exc:
            raise InvalidRecord(str(exc)) from None
        return Rendered(segs, prompt, reference, prefix=False, eos=False)

    def stop_ids(self, tokenizer: Any) -> list[int]:
        """Tokens that end a generated answer for this format."""
        return chat.stop_token_ids(tokenizer, self.builtin)

    def category_of(self, record: Any) -> str | None:
        if not isinstance(record, dict):
            return None
        value = record.get(self.key("category"))
        return value if isinstance(value, str) else None
