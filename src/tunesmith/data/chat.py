"""Chat conversations -> text segments marked trainable or not.

A conversation is a list of `{"role", "content"}` messages (ShareGPT's `{"from", "value"}` is
converted). It is rendered either with

* the tokenizer's own chat template (`sft.chat_template: tokenizer`): the Jinja template is
  rendered for growing prefixes of the conversation and the text each assistant turn adds is
  found by difference, so any template that renders a conversation as an extension of its
  prefixes works (all common ones do); or
* a built-in template (`llama3`, `chatml`, `alpaca`), written out here.

Only assistant turns are trainable: the content plus the turn's end marker (`<|eot_id|>`,
`<|im_end|>`, EOS), never the role headers, so the model learns to answer and to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.errors import TunesmithError

Segment = tuple[str, bool]  # (text, trainable)
Message = dict[str, str]

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                   "bard": "assistant", "system": "system"}
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.")


@dataclass(frozen=True)
class ChatFormat:
    """A built-in template: format strings over `{content}` per role.

    The assistant turn is `assistant_header` (not trained), `assistant` (trained), then
    `assistant_footer` (not trained). `{eos}` stands for the tokenizer's EOS token text.
    """

    name: str
    system: str
    user: str
    assistant_header: str
    assistant: str
    assistant_footer: str = ""
    default_system: str | None = None
    special_tokens: tuple[str, ...] = ()  # must each be one token of the tokenizer
    trim: bool = False  # strip message content (Meta's Llama 3 template does)
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens that stop generation


BUILTIN_TEMPLATES: dict[str, ChatFormat] = {
    "llama3": ChatFormat(
        name="llama3",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant="{content}<|eot_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        trim=True,
        stop_tokens=("<|eot_id|>",),
    ),
    "chatml": ChatFormat(
        name="chatml",
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_header="<|im_start|>assistant\n",
        assistant="{content}<|im_end|>",
        assistant_footer="\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
        stop_tokens=("<|im_end|>",),
    ),
    "alpaca": ChatFormat(
        name="alpaca",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_header="### Response:\n",
        assistant="{content}{eos}",
        assistant_footer="\n\n",
        default_system=ALPACA_SYSTEM,
    ),
}


# ------------------------------------------------------------------------------ messages
def normalize_messages(raw: Any, where: str, field: str, *,
                       need_assistant: bool = True) -> list[Message]:
    """Validate a conversation; ShareGPT `from`/`value` turns become `role`/`content`.
    `need_assistant=False` accepts a prompt alone (preference records' `prompt` list)."""
    if not isinstance(raw, list) or not raw:
        kind = type(raw).__name__ if raw is not None else "null"
        raise TunesmithError(f"{where}: field '{field}' must be a non-empty list of messages, "
                             f"got {kind if raw != [] else 'an empty list'}")
    out: list[Message] = []
    for i, msg in enumerate(raw):
        at = f"{where}: {field}[{i}]"
        if not isinstance(msg, dict):
            raise TunesmithError(f"{at}: expected an object, got {type(msg).__name__}")
        if "role" in msg or "content" in msg:
            role, content = msg.get("role"), msg.get("content")
            keys = ("role", "content")
        else:
            role, content = _SHAREGPT_ROLES.get(str(msg.get("from")), msg.get("from")), \
                msg.get("value")
            keys = ("from", "value")
        for key, value in zip(keys, (role, content)):
            if value is None:
                raise TunesmithError(f"{at}: missing field '{key}'")
            if not isinstance(value, str):
                raise TunesmithError(
                    f"{at}: field '{key}' holds {type(value).__name__}, expected a string")
        if role not in ROLES:
            raise TunesmithError(f"{at}: unknown role {role!r}; expected one of "
                                 f"{', '.join(ROLES)} (ShareGPT: human, gpt, system)")
        out.append({"role": str(role), "content": str(content)})
    if not need_assistant:
        return out
    assistants = [m for m in out if m["role"] == "assistant"]
    if not assistants:
        raise TunesmithError(f"{where}: conversation has no assistant turn (nothing to learn)")
    if not any(m["content"].strip() for m in assistants):
        raise TunesmithError(f"{where}: every assistant turn is empty")
    return out


# ------------------------------------------------------------------------------ built-in
def check_builtin(fmt: ChatFormat, tokenizer: Any) -> None:
    """Refuse a template whose special tokens the tokenizer would split into pieces."""
    missing = [t for t in fmt.special_tokens
               if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        raise TunesmithError(
            f"chat template {fmt.name!r} needs the special tokens {', '.join(missing)}, which the "
            f"tokenizer does not have as single tokens; use sft.chat_template=alpaca (works with "
            "any tokenizer) or a tokenizer made for this template"
        )
    if "{eos}" in fmt.assistant and tokenizer.eos_token is None:
        raise TunesmithError(f"chat template {fmt.name!r} ends answers with EOS, and the "
                             "tokenizer has no EOS token")


def render_builtin(fmt: ChatFormat, messages: list[Message], eos: str,
                   system_prompt: str | None = None) -> list[Segment]:
    """Segments of a whole conversation in a built-in template."""
    segs: list[Segment] = []
    system = system_prompt if system_prompt is not None else fmt.default_system
    if system is not None and not (messages and messages[0]["role"] == "system"):
        segs.append((fmt.system.format(content=system), False))
    for m in messages:
        content = m["content"].strip() if fmt.trim else m["content"]
        if m["role"] == "assistant":
            segs.append((fmt.assistant_header, False))
            segs.append((fmt.assistant.format(content=content, eos=eos), True))
            if fmt.assistant_footer:
                segs.append((fmt.assistant_footer, False))
        else:
            tmpl = fmt.system if m["role"] == "system" else fmt.user
            segs.append((tmpl.format(content=content), False))
    return segs


def builtin_prompt(fmt: ChatFormat, messages: list[Message], eos: str,
                   system_prompt: str | None = None) -> str:
    """Text that asks for the next assistant turn after `messages` (generation prompt)."""
    segs = render_builtin(fmt, messages, eos, system_prompt)
    return "".join(text for text, _ in segs) + fmt.assistant_header


# ------------------------------------------------------------------------------ tokenizer's
def tokenizer_renderer(tokenizer: Any, source: str) -> Callable[[list[Message], bool], str]:
    """`render(messages, add_generation_prompt) -> text` with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TunesmithError(
            f"tokenizer {source} has no chat template; set sft.chat_template to a built-in one "
            "(llama3, chatml, alpaca)"
        )

    def render(messages: list[Message], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def render_with_template(render: Callable[[list[Message], bool], str],
                         messages: list[Message], where: str) -> list[Segment]:
    """Segments of a conversation rendered by a Jinja chat template, found by prefix diffs:
    for assistant turn i, render(messages[:i], generation prompt) ends where its trainable text
    starts and render(messages[:i + 1]) ends where it stops."""
    segs: list[Segment] = []
    done = ""
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True)
            after = render(messages[: i + 1], False)
            if not (before.startswith(done) and after.startswith(before)):
                raise TunesmithError(
                    f"{where}: the tokenizer's chat template does not render turn {i + 1} as an "
                    "extension of the earlier turns, so the answer cannot be located; use a "
                    "built-in sft.chat_template (llama3, chatml, alpaca)")
            segs += [(before[len(done):], False), (after[len(before):], True)]
            done = after
        full = render(messages, False)
    except TunesmithError:
        raise
    except Exception as exc:  # noqa: BLE001 - Jinja raise_exception, bad role order, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunesmithError(f"{where}: the chat template failed: {msg}") from None
    if not full.startswith(done):
        raise TunesmithError(f"{where}: the chat template renders the whole conversation "
                             "differently from its prefixes; use a built-in sft.chat_template")
    segs.append((full[len(done):], False))
    return [s for s in segs if s[0]]


def stop_token_ids(tokenizer: Any, fmt: ChatFormat | None) -> list[int]:
    """Token ids that end an answer: EOS plus the template's end-of-turn tokens (also the
    usual ones when the tokenizer's own template is used)."""
    names = list(fmt.stop_tokens) if fmt else ["<|eot_id|>", "<|im_end|>", "<|end|>"]
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[n] for n in names if n in vocab]
    return sorted(set(ids))
