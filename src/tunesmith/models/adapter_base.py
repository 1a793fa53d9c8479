"""Base class of the state-dict adapters that map native parameter names to HF names.

An adapter maps names one key at a time (so loads can stream tensor by tensor) and may also
change a tensor on the way, e.g. GPT-2's `Conv1D` stores weights as [in, out] where our
`nn.Linear` has [out, in]. Families whose tensors map 1:1 only override the two name maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


class StateDictAdapter:
    """Maps names (and, where layouts differ, tensors) between native and HF state dicts."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # -- names: subclasses implement these two ---------------------------------------------
    def native_key_to_hf(self, key: str) -> str | None:
        """HF name for a native key, or None when it is not saved (e.g. a tied output head)."""
        raise NotImplementedError

    def hf_key_to_native(self, key: str) -> str | None:
        """Native name for a HF key; None for keys ignored on load; raises for unknown keys."""
        raise NotImplementedError

    # -- tensors: identity unless a layout differs ----------------------------------------
    def tensor_to_native(self, hf_key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def tensor_to_hf(self, native_key: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def shape_to_native(self, hf_key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The native shape of HF tensor `hf_key`, checked before anything is loaded."""
        return shape

    # -- whole state dicts -------------------------------------------------------------------
    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            hf_key = self.native_key_to_hf(key)
            if hf_key is not None:
                out[hf_key] = self.tensor_to_hf(key, value)
        return out

    def from_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            native = self.hf_key_to_native(key)
            if native is not None:
                out[native] = self.tensor_to_native(key, value)
        return out
