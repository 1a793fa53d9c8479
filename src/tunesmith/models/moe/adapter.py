"""State-dict adapter of the MoE family: Llama names plus the router and the stacked experts.

Three layouts of the expert weights exist:
    native:        layers.{i}.feed_forward.experts.w13 [E, 2I, D] and .w2 [E, D, I]
    transformers 5 (in memory): model.layers.{i}.mlp.experts.gate_up_proj [E, 2I, D], .down_proj [E, D, I]
    hub files (what the published checkpoints hold and what transformers 5 save_pretrained
    writes): one tensor per expert and projection,
        mixtral:   model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3/w2.weight, router .gate.weight
        qwen3_moe: model.layers.{i}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight, router mlp.gate.weight

Names map 1:1 between native and the transformers 5 layout (`native_key_to_hf`). The hub files
are a view of it: `hf_view_shapes` / `hf_view_tensors` stack the per-expert tensors into one
[E, ...] tensor on load (holding one layer's expert tensors at a time: files list a layer's
tensors together), and `hf_save_view` splits each stacked tensor back into per-expert tensors
when a directory is written, so saves have the published checkpoints' layout (transformers 5
loads them; tested).
Checkpoints already in the stacked layout load as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tunesmith.models.llama.adapter import LlamaStateDictAdapter
from tunesmith.models.moe.config import MoEConfig

_EXPERT_NATIVE = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(w13|w2)$")
_EXPERT_HF = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_NATIVE_TO_FUSED = {"w13": "gate_up_proj", "w2": "down_proj"}
_FUSED_TO_NATIVE = {v: k for k, v in _NATIVE_TO_FUSED.items()}
# One expert's tensor in the hub files -> (fused name, which half of gate_up or None)
_PART = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
                   r"(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_HALF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}
# Hub names per model type: (gate, up, down) projection names and the sparse block's name.
_HUB = {"mixtral": (("w1", "w3", "w2"), "block_sparse_moe"),
        "qwen3_moe": (("gate_proj", "up_proj", "down_proj"), "mlp")}

Shapes = dict[str, tuple[tuple[int, ...], Any]]


class MoEStateDictAdapter(LlamaStateDictAdapter):
    """Llama's names, the router (`mlp.gate`) and the experts' stacked tensors; the hub's
    per-expert layout through the three view methods."""

    cfg: MoEConfig

    FAMILY = "MoE"
    LAYER_MAP = {**LlamaStateDictAdapter.LAYER_MAP, "feed_forward.router": "mlp.gate"}

    # -- names: native <-> transformers 5 ------------------------------------------------
    def native_key_to_hf(self, key: str) -> str | None:
        m = _EXPERT_NATIVE.match(key)
        if m:
            return f"model.layers.{m.group(1)}.mlp.experts.{_NATIVE_TO_FUSED[m.group(2)]}"
        return super().native_key_to_hf(key)

    def normalize_hf_key(self, key: str) -> str:
        return key.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's hub name of the sparse block

    def hf_key_to_native(self, key: str) -> str | None:
        m = _EXPERT_HF.match(key)
        if m:
            return f"layers.{m.group(1)}.feed_forward.experts.{_FUSED_TO_NATIVE[m.group(2)]}"
        return super().hf_key_to_native(key)

    # -- hub files: per-expert tensors <-> stacked ----------------------------------------
    def _part(self, name: str) -> tuple[str, int, int | None] | None:
        """(fused name, expert, half) for one expert's tensor in the hub layout, else None."""
        m = _PART.match(name)
        if m is None or int(m.group(2)) >= self.cfg.num_experts:
            return None  # an expert index past E stays unknown: reported as unexpected
        fused = "gate_up_proj" if _HALF[m.group(3)] is not None else "down_proj"
        return f"model.layers.{m.group(1)}.mlp.experts.{fused}", int(m.group(2)), _HALF[m.group(3)]

    def _parts_needed(self, fused: str) -> int:
        return self.cfg.num_experts * (2 if fused.endswith("gate_up_proj") else 1)

    def hf_view_shapes(self, shapes: Shapes) -> Shapes:
        """The checkpoint's {name: (shape, where)} with each complete set of per-expert
        tensors replaced by its stacked tensor (incomplete sets stay missing)."""
        out: Shapes = {}
        groups: dict[str, list[tuple[tuple[int, ...], Any]]] = {}
        for name, value in shapes.items():
            part = self._part(name)
            if part is None:
                out[name] = value
            else:
                groups.setdefault(part[0], []).append(value)
        for fused, values in groups.items():
            first = values[0][0]
            if len(values) != self._parts_needed(fused) or any(v[0] != first for v in values):
                continue  # some expert is missing or misshapen: the stacked tensor is missing
            e = self.cfg.num_experts
            stacked = (e, 2 * first[0], first[1]) if fused.endswith("gate_up_proj") else (e, *first)
            out[fused] = (stacked, values[0][1])
        return out

    def hf_view_tensors(self, tensors: Iterator[tuple[str, torch.Tensor]]
                        ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors in order, each set of per-expert tensors yielded as one
        stacked tensor once its last part has been read."""
        pending: dict[str, dict[tuple[int, int | None], torch.Tensor]] = {}
        for name, tensor in tensors:
            part = self._part(name)
            if part is None:
                yield name, tensor
                continue
            fused, expert, half = part
            parts = pending.setdefault(fused, {})
            parts[(expert, half)] = tensor
            if len(parts) == self._parts_needed(fused):
                del pending[fused]
                yield fused, self._stack(parts)

    def _stack(self, parts: dict[tuple[int, int | None], torch.Tensor]) -> torch.Tensor:
        e = self.cfg.num_experts
        if (0, None) in parts:  # down_proj: [E, D, I]
            return torch.stack([parts[(i, None)] for i in range(e)])
        return torch.stack([torch.cat([parts[(i, 0)], parts[(i, 1)]]) for i in range(e)])

    def hf_save_view(self, names: list[str], get_tensor: Callable[[str], torch.Tensor],
                     nbytes: Callable[[str], int]
                     ) -> tuple[list[str], Callable[[str], torch.Tensor], Callable[[str], int]]:
        """(names, getter, sizes) of the hub layout for a save given in the stacked layout:
        each stacked tensor is fetched once (`get_tensor`: the caller's gather or read) and
        cut into per-expert copies while its parts are written."""
        (gate, up, down), block = _HUB[self.cfg.model_type]
        source: dict[str, tuple[str, int, int | None]] = {}  # hub name -> (fused, expert, half)
        out: list[str] = []
        for name in names:
            m = _EXPERT_HF.match(name)
            if m is None:
                hub = name.replace(".mlp.gate.", f".{block}.gate.")
                source[hub] = (name, -1, None)
                out.append(hub)
                continue
            prefix = f"model.layers.{m.group(1)}.{block}.experts"
            for e in range(self.cfg.num_experts):
                halves = ((gate, 0), (up, 1)) if m.group(2) == "gate_up_proj" else ((down, None),)
                for proj, half in halves:
                    hub = f"{prefix}.{e}.{proj}.weight"
                    source[hub] = (name, e, half)
                    out.append(hub)
        cache: dict[str, tuple[torch.Tensor, int]] = {}  # fused name -> (tensor, parts left)

        def get(hub: str) -> torch.Tensor:
            fused, expert, half = source[hub]
            if expert < 0:
                return get_tensor(fused)
            if fused not in cache:
                cache[fused] = (get_tensor(fused), self._parts_needed(fused))
            full, left = cache[fused]
            cache[fused] = (full, left - 1)
            if left == 1:
                del cache[fused]
            piece = full[expert]
            if half is not None:
                piece = piece.chunk(2, dim=0)[half]
            return piece.clone()  # its own storage: safetensors refuses shared tensors

        def size(hub: str) -> int:
            fused, expert, _ = source[hub]
            return nbytes(fused) if expert < 0 else nbytes(fused) // self._parts_needed(fused)

        return out, get, size
