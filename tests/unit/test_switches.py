"""Kernel A/B switches (tunesmith/switches.py): defaults, allowed values, and the check at setup."""

from __future__ import annotations

import pytest

from tunesmith.errors import TunesmithError
from tunesmith.runtime import resolve_runtime
from tunesmith.switches import SWITCHES, switch


def test_defaults_and_values(monkeypatch):
    for name, allowed in SWITCHES.items():
        monkeypatch.delenv(name, raising=False)
        assert switch(name) == allowed[0]
        for value in allowed:
            monkeypatch.setenv(name, value)
            assert switch(name) == value


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_bad_value_fails_at_setup(monkeypatch, name):
    monkeypatch.setenv(name, "fastest")
    with pytest.raises(TunesmithError, match=f"{name}='fastest': expected one of"):
        resolve_runtime("cpu", "fp32")
