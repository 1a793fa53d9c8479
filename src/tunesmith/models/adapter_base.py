"""Base class of the state-dict adapters that map native parameter names to HF names.

An adapter maps names one key at a time (so loads can stream tensor by tensor) and may also
change a tensor on the way, e.g. GPT-2's `Conv1D` stores weights as [in, out] where our
`nn.Linear` has [out, in]. Families whose tensors map 1:1 only override the two name maps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from tunesmith.errors import TunesmithError


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

    # -- files whose tensors are not 1:1 with the model's (the MoE family's per-expert files) --
    def hf_view_shapes(self, shapes: dict[str, Any]) -> dict[str, Any]:
        """{HF name: (shape, where)} of a checkpoint as the name maps see it (identity here)."""
        return shapes

    def hf_view_tensors(self, tensors: Iterator[tuple[str, torch.Tensor]]
                        ) -> Iterator[tuple[str, torch.Tensor]]:
        """A checkpoint's (HF name, tensor) stream as the name maps see it (identity here)."""
        return tensors

    def hf_save_view(self, names: list[str], get_tensor: Callable[[str], torch.Tensor],
                     nbytes: Callable[[str], int]
                     ) -> tuple[list[str], Callable[[str], torch.Tensor], Callable[[str], int]]:
        """The (names, getter, sizes) a HF directory is written with, given those of the name
        maps (identity here)."""
        return names, get_tensor, nbytes

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


_NATIVE_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


class TableAdapter(StateDictAdapter):
    """Name mapping driven by tables: per-layer suffixes, top-level keys and the HF layer prefix.

    Subclasses set the class attributes; the inverse maps and the HF layer pattern are derived
    once per class. `normalize_hf_key` lets a family accept older checkpoint layouts.
    """

    FAMILY = "model"
    LAYER_MAP: dict[str, str] = {}  # native layer suffix -> HF layer suffix (no .weight/.bias)
    TOP_MAP: dict[str, str] = {}  # native top-level key -> HF key
    HF_LAYER_PREFIX = ""  # e.g. "model.layers": HF layer i lives under f"{prefix}.{i}."
    HF_HEAD = "lm_head.weight"  # HF name of the output head (absent when tied)
    HF_IGNORED: re.Pattern[str] | None = None  # HF keys without learned state (old buffers)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._HF_LAYER_MAP = {v: k for k, v in cls.LAYER_MAP.items()}
        cls._HF_TOP_MAP = {v: k for k, v in cls.TOP_MAP.items()}
        cls._HF_LAYER_RE = re.compile(
            rf"^{re.escape(cls.HF_LAYER_PREFIX)}\.(\d+)\.(.+)\.(weight|bias)$"
        )

    def normalize_hf_key(self, key: str) -> str:
        return key

    def native_key_to_hf(self, key: str) -> str | None:
        if key == "output.weight" and self.cfg.tie_word_embeddings:
            return None
        if key in self.TOP_MAP:
            return self.TOP_MAP[key]
        m = _NATIVE_LAYER_RE.match(key)
        if m and m.group(2) in self.LAYER_MAP:
            return f"{self.HF_LAYER_PREFIX}.{m.group(1)}.{self.LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"state dict: no HF name for parameter {key!r}")

    def hf_key_to_native(self, key: str) -> str | None:
        key = self.normalize_hf_key(key)
        if key == self.HF_HEAD and self.cfg.tie_word_embeddings:
            return None
        if self.HF_IGNORED is not None and self.HF_IGNORED.search(key):
            return None
        if key in self._HF_TOP_MAP:
            return self._HF_TOP_MAP[key]
        m = self._HF_LAYER_RE.match(key)
        if m and m.group(2) in self._HF_LAYER_MAP:
            return f"layers.{m.group(1)}.{self._HF_LAYER_MAP[m.group(2)]}.{m.group(3)}"
        raise TunesmithError(f"checkpoint: unexpected tensor {key!r} for a {self.FAMILY} model")
