"""Tokenizer loading.

`load_tokenizer` wraps `AutoTokenizer` so that every failure a user can cause (typo in a path, a
folder that holds no tokenizer, an unreachable hub) becomes one `TunesmithError` line, and so that
every tokenizer we hand out has a pad token (pad = eos, as the Llama recipes do; padded positions
are masked out of the loss by the collator, so reusing EOS is harmless).

`tokenizer_fingerprint` gives a stable id of what a tokenizer *does*, used to key the datasets
cache: change the tokenizer and no stale tokenisation is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

logger = logging.getLogger(__name__)

# Files whose presence marks a directory as a tokenizer directory (any one is enough).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)

# Texts encoded into the fingerprint: they catch settings that live outside the vocabulary
# (BOS/EOS added by the post-processor or by Python-side flags, normalisation, prefix space).
_PROBES = ("Hello world\n", " a\tb  c\r\n", "")


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception message, shortened: our errors are one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_local_path(name: str) -> bool:
    """True when `name` can only be meant as a filesystem path (hub ids look like `org/name`)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or "\\" in name
        or name.count("/") > 1
        or name in (".", "..")
    )


def _is_bare_sentencepiece(path: Path) -> bool:
    """A directory holding only a SentencePiece (protobuf) tokenizer.model, no HF files."""
    model = path / "tokenizer.model"
    if not model.is_file() or any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return False
    with open(model, "rb") as fh:
        return fh.read(1) == b"\x0a"  # protobuf field 1; tiktoken files start with base64 text


def _load_local(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    if not path.is_dir():
        raise TunesmithError(
            f"tokenizer path {path} is a file; pass the directory that holds tokenizer.json or "
            "tokenizer.model"
        )
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise TunesmithError(
            f"tokenizer directory {path} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)})"
        )
    try:
        if _is_bare_sentencepiece(path):
            # AutoTokenizer on a lone SentencePiece tokenizer.model builds a generic backend
            # without the "▁" dummy prefix (wrong ids); LlamaTokenizer converts it faithfully.
            # transformers 5 no longer defaults to adding BOS here; Llama models expect it.
            from transformers import LlamaTokenizer

            return LlamaTokenizer.from_pretrained(str(path), add_bos_token=True)
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any loader failure is bad input here
        model = path / "tokenizer.model"
        if model.is_file() and not (path / "tokenizer.json").is_file():
            # transformers converts a bare tokenizer.model with `protobuf` (SentencePiece) or
            # `tiktoken`; when they are missing, its own error names the wrong library.
            need = "protobuf" if _is_bare_sentencepiece(path) else "protobuf or tiktoken"
            raise TunesmithError(
                f"could not convert {model} ({type(exc).__name__}): it needs the `{need}` "
                "package; install it or use a directory with tokenizer.json"
            ) from exc
        raise TunesmithError(
            f"could not load a tokenizer from {path}: {_first_line(exc)}"
        ) from exc


def _load_hub(name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo...
        raise TunesmithError(
            f"tokenizer '{name}' is not a local directory and could not be loaded from the "
            f"Hugging Face hub (offline or unknown id?): {_first_line(exc)}"
        ) from exc


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """Load a `PreTrainedTokenizerBase` from a local directory or a hub id.

    A local directory needs tokenizer.json, a SentencePiece/tiktoken tokenizer.model or the
    classic vocab files. When the tokenizer has no pad token, pad is set to eos.
    Raises `TunesmithError` for a missing path, a directory without a tokenizer, or a hub id
    that cannot be fetched.
    """
    if not name_or_path or not name_or_path.strip():
        raise TunesmithError("tokenizer name or path is empty")
    path = Path(name_or_path).expanduser()
    if path.exists():
        tokenizer = _load_local(path, trust_remote_code)
    elif _looks_like_local_path(name_or_path):
        raise TunesmithError(f"tokenizer path {path} does not exist")
    else:
        tokenizer = _load_hub(name_or_path, trust_remote_code)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            # Left alone: `make_collator` reports it only if padding is actually needed.
            logger.warning("tokenizer %s has neither a pad nor an eos token", name_or_path)
        else:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hex digest that changes whenever the tokenizer would produce different ids.

    Hashes the full serialized backend (vocab, merges, normalizer, pre/post-processor) when the
    tokenizer has one, else the vocabulary, plus BOS/EOS ids and the ids of a few probe texts.
    The pad token is left out on purpose: it does not change tokenisation.
    """
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id]).encode())
    for text in _PROBES:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        digest.update(json.dumps(list(ids)).encode())
    return digest.hexdigest()[:32]


def eos_appended_by_tokenizer(tokenizer: Any) -> bool:
    """True when encoding already ends with EOS (e.g. a post-processor that appends it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[-1] == eos
