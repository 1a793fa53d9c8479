"""Llama-Adapter (Zhang et al. 2023; peft's `adaption_prompt`), applied from outside the model.

The attention module of each of the top `adapter_layers` blocks is turned, in place, into an
adapted attention: its class becomes a subclass that adds, to the original output,

    wo( gate * softmax(q Kp^T / sqrt(hd)) Vp )      (softmax in fp32, as peft)

where q [B, H, T, hd] are the block's rotated queries (recomputed with the module's own `wq`
and the family's rotary embedding, as peft does), Kp = wk(P), Vp = wv(P) [1, Hkv, L, hd] are the
module's own projections of the learnable prompt P [1, L, D] (no rotary: the prompt has no
position; grouped-query heads repeated), and `gate` [1] starts at 0, so the adapted model starts
out computing exactly what the base model does. The prompt needs no causal or padding mask:
every token sees all of it.

The module keeps its name and its own parameters; it gains `adaption_prompt` [1, L, D] and
`adaption_gate` [1], so state-dict names are `layers.N.attention.adaption_prompt` (peft:
`base_model.model.model.layers.N.self_attn.adaption_prompt`). Where the family attaches it is
declared by the family descriptor (`ModelFamily.adaption`).

One difference from peft: peft applies `o_proj` with its bias to the prompt branch, so a model
whose output projection has a bias would get that bias twice; here the prompt branch is added
before the output projection's bias (wo's weight only). Llama/Mistral have no such bias, and
then both are the same.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.family import AdaptionPoint
from tunesmith.parallel.loading import copy_full_into
from tunesmith.peft.targets import KeyAdapter, hf_module_name

PROMPT, GATE = "adaption_prompt", "adaption_gate"


class AdaptedAttention(nn.Module):
    """Mixin placed before a family's attention class (see `_adapted_class`)."""

    adaption_prompt: nn.Parameter  # [1, L, D]
    adaption_gate: nn.Parameter  # [1]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
        out = super().forward(x, cos, sin, *args, **kwargs)  # [B, T, D], the base attention
        return out + self.adaption_output(x, cos, sin)

    def adaption_output(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The prompt branch for x [B, T, D] -> [B, T, D] (zero while the gate is 0)."""
        b, t, _ = x.shape
        hd = self.head_dim
        q = self.wq(x).view(b, t, -1, hd).transpose(1, 2)  # [B, H, T, hd]
        q = self.adaption_rotate(q, cos, sin)
        prompt = self.adaption_prompt  # [1, L, D]
        n = prompt.shape[1]
        k = self.wk(prompt).view(1, n, -1, hd).transpose(1, 2)  # [1, Hkv, L, hd], no rotary
        v = self.wv(prompt).view(1, n, -1, hd).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]  # grouped-query attention: each kv head serves rep heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [1, H, L, hd]
        scores = q @ k.transpose(2, 3).to(q.dtype) / math.sqrt(hd)  # [B, H, T, L]
        probs = self.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, t, -1)  # [B, T, H * hd]
        return F.linear(out, self.wo.weight)


@functools.cache
def _adapted_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`Adapted<cls>`: the family's attention with the prompt branch (one class per base)."""
    return type(f"Adapted{cls.__name__}", (AdaptedAttention, cls), {"__module__": __name__})


def is_adapted(module: nn.Module) -> bool:
    return isinstance(module, AdaptedAttention)


def adaption_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module path: adapted attention} in model order."""
    return {n: m for n, m in model.named_modules() if is_adapted(m)}


def attention_paths(model: nn.Module, point: AdaptionPoint, adapter: KeyAdapter) -> dict[str, str]:
    """{native attention path: HF attention path} for every block, e.g.
    layers.3.attention -> model.layers.3.self_attn (from the family's name mapping of wq)."""
    out = {}
    for i in range(len(model.layers)):  # type: ignore[arg-type]
        native = f"layers.{i}.{point.attention}"
        hf = hf_module_name(adapter, f"{native}.wq")
        if hf is None:
            raise TunesmithError(f"llama_adapter: the family has no HF name for {native}.wq")
        out[native] = hf.rpartition(".")[0]
    return out


def apply_adaption_prompt(model: nn.Module, point: AdaptionPoint, adapter_len: int,
                          adapter_layers: int, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze the whole model, then give the top `adapter_layers` blocks' attention a prompt of
    `adapter_len` tokens and a gate (uninitialised: `init_adaption` or a loaded adapter fills
    them; on the meta device nothing is allocated). Returns the adapted module paths."""
    n_blocks = len(model.layers)  # type: ignore[arg-type]
    if adapter_layers > n_blocks:
        raise TunesmithError(f"peft.adapter_layers={adapter_layers} exceeds the model's "
                             f"{n_blocks} transformer blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    paths = []
    for i in range(n_blocks - adapter_layers, n_blocks):
        path = f"layers.{i}.{point.attention}"
        attn = model.get_submodule(path)
        if is_adapted(attn):
            raise TunesmithError(f"llama_adapter: {path} already has an adaption prompt")
        dim, device = attn.wq.in_features, attn.wq.weight.device
        attn.__class__ = _adapted_class(type(attn))
        attn.adaption_rotate = point.rotate  # the family's rotary embedding for the queries
        attn.adaption_prompt = nn.Parameter(torch.empty(1, adapter_len, dim, device=device, dtype=dtype))
        attn.adaption_gate = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        paths.append(path)
    return paths


@torch.no_grad()
def init_adaption(model: nn.Module, seed: int) -> None:
    """peft's init: prompt ~ N(0, 1), gate = 0 (the zero-init that leaves the base output
    unchanged). Each full tensor is drawn on the host in module order and copied into the
    (possibly sharded) parameter, so every layout starts identical; collective when sharded."""
    gen = torch.Generator().manual_seed(seed)
    for mod in adaption_modules(model).values():
        copy_full_into(mod.adaption_prompt, torch.randn(tuple(mod.adaption_prompt.shape), generator=gen))
        copy_full_into(mod.adaption_gate, torch.zeros(tuple(mod.adaption_gate.shape)))
