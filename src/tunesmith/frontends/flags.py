"""A small, strict parser for other tools' command-line flags.

The front-ends accept flags exactly as users typed them for Hugging Face's example scripts
(`HfArgumentParser`) or llama-recipes (`fire`): `--name value`, `--name=value`, a bare boolean
`--name` (true), booleans spelled `True/False/yes/no/1/0`, `--no_name` for booleans that default
to true, and list flags that take every following non-flag word. A flag that is not in the
table is a `TunesmithError` naming it and the closest known flag (exit 2), never a silent skip.

argparse is not used because its error path prints usage plus a message, abbreviates long
options (`--model` would match `--model_name_or_path`) and cannot express "a boolean with an
optional value" together with the closest-match hint these front-ends promise.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError

_TRUE = {"true", "yes", "y", "1", "t", "on"}
_FALSE = {"false", "no", "n", "0", "f", "off"}


def parse_bool(text: str, flag: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise TunesmithError(f"--{flag}: expected a boolean (true/false, yes/no, 1/0), got {text!r}")


def _convert(kind: type | str, text: str, flag: str) -> Any:
    if kind is bool:
        return parse_bool(text, flag)
    if kind is str:
        return text
    if kind is int:
        try:
            return int(text)
        except ValueError:
            # HF writes integers as floats at times (--num_train_epochs 3.0): accept whole floats.
            try:
                value = float(text)
            except ValueError:
                value = None
            if value is None or not value.is_integer():
                raise TunesmithError(f"--{flag}: expected an integer, got {text!r}") from None
            return int(value)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise TunesmithError(f"--{flag}: expected a number, got {text!r}") from None
    raise AssertionError(f"unknown flag kind {kind!r}")


@dataclass(frozen=True)
class Flag:
    """One accepted flag. `kind` is bool, int, float, str, "list" (words up to the next flag)
    or "opt" (a string that may be left out: the value is then True).

    `choices` restricts string values; `aliases` are other spellings (llama-recipes'
    `fsdp_config.pure_bf16` for `pure_bf16`); `help` is shown by `--help`."""

    name: str
    kind: Any = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()


@dataclass
class ParsedFlags:
    """The flags a user gave (`given`) over the table's defaults."""

    table: dict[str, Flag]
    given: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # given flags in command-line order

    def __getitem__(self, name: str) -> Any:
        if name in self.given:
            return self.given[name]
        return self.table[name].default

    def get_given(self, name: str) -> Any:
        """Like `self[name]`, but None for a flag this tool's table does not have."""
        return self[name] if name in self.table else None

    def has(self, name: str) -> bool:
        return name in self.given


class FlagParser:
    """Parse argv against a table of `Flag`s (see the module docstring for the syntax)."""

    def __init__(self, prog: str, flags: Iterable[Flag], *, extra: Iterable[Flag] = ()) -> None:
        self.prog = prog
        self.table: dict[str, Flag] = {}
        self._spellings: dict[str, str] = {}
        for f in [*flags, *extra]:
            if f.name in self.table:
                raise AssertionError(f"duplicate flag {f.name}")
            self.table[f.name] = f
            for spelling in (f.name, *f.aliases):
                self._spellings[spelling] = f.name
                self._spellings[spelling.replace("_", "-")] = f.name

    def closest(self, name: str) -> str | None:
        close = difflib.get_close_matches(name, list(self._spellings), n=1, cutoff=0.6)
        return f"--{close[0]}" if close else None

    def _unknown(self, token: str) -> TunesmithError:
        name = token.lstrip("-").split("=", 1)[0]
        hint = self.closest(name)
        tail = f" (closest known flag: {hint})" if hint else f" (see tunesmith {self.prog} --help)"
        return TunesmithError(f"{self.prog}: unknown or unsupported flag {token.split('=', 1)[0]}"
                              + tail)

    def _lookup(self, raw: str) -> tuple[Flag, bool] | None:
        """(flag, negated) for a spelling; `no_x` negates a boolean `x` (HfArgumentParser)."""
        if raw in self._spellings:
            return self.table[self._spellings[raw]], False
        for prefix in ("no_", "no-"):
            base = raw[len(prefix):] if raw.startswith(prefix) else None
            if base and base in self._spellings and self.table[self._spellings[base]].kind is bool:
                return self.table[self._spellings[base]], True
        return None

    def parse(self, argv: list[str]) -> ParsedFlags:
        out = ParsedFlags(self.table)
        i = 0
        while i < len(argv):
            token = argv[i]
            if not token.startswith("-") or token in ("-", "--"):
                raise TunesmithError(f"{self.prog}: unexpected argument {token!r} "
                                     "(every setting is a --flag)")
            name, eq, inline = token.lstrip("-").partition("=")
            found = self._lookup(name)
            if found is None:
                raise self._unknown(token)
            flag, negated = found
            i += 1
            value, i = self._value(flag, negated, inline if eq else None, argv, i)
            if flag.choices is not None and flag.kind is not bool and value not in flag.choices:
                raise TunesmithError(f"--{flag.name}: {value!r} is not one of "
                                     f"{', '.join(flag.choices)}")
            out.given[flag.name] = value
            if flag.name in out.order:
                out.order.remove(flag.name)
            out.order.append(flag.name)
        return out

    def _value(self, flag: Flag, negated: bool, inline: str | None, argv: list[str],
               i: int) -> tuple[Any, int]:
        nxt = argv[i] if i < len(argv) and not argv[i].startswith("--") else None
        if flag.kind is bool:
            if negated:
                return False, i
            if inline is not None:
                return parse_bool(inline, flag.name), i
            if nxt is not None and nxt.strip().lower() in _TRUE | _FALSE:
                return parse_bool(nxt, flag.name), i + 1
            return True, i
        if flag.kind == "opt":  # an optional value: `--print-recipe` or `--print-recipe FILE`
            if inline is not None:
                return inline, i
            return (nxt, i + 1) if nxt is not None else (True, i)
        if flag.kind == "list":
            if inline is not None:
                return [w for w in inline.replace(",", " ").split() if w], i
            words = []
            while i < len(argv) and not argv[i].startswith("--"):
                words.append(argv[i])
                i += 1
            if not words:
                raise TunesmithError(f"--{flag.name}: expected one or more values")
            return words, i
        if inline is not None:
            return _convert(flag.kind, inline, flag.name), i
        if i >= len(argv):
            raise TunesmithError(f"--{flag.name}: expected a value")
        # A value may itself start with "-" (a negative number); flags start with "--".
        return _convert(flag.kind, argv[i], flag.name), i + 1

    def help_text(self, header: str) -> str:
        lines = [header, "", "flags:"]
        for f in self.table.values():
            kind = {bool: "bool", int: "int", float: "float", str: "str", "list": "list",
                    "opt": "[str]"}[f.kind]
            default = "" if f.default in (None, False, "") else f" (default {f.default})"
            lines.append(f"  --{f.name} {kind}{default}: {f.help}".rstrip(": "))
        return "\n".join(lines)

