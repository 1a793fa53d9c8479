"""Autoregressive generation: batched prompts (left padding), one prefill pass, then one token
per step over a static KV cache (a CUDA graph replay per step on CUDA; see models/decode.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.attention import AttnSpec
from tunesmith.models.decode import DecodeStep
from tunesmith.models.kv_cache import StaticKVCache


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # [B, V]
    probs = sorted_logits.softmax(-1)
    # Mass strictly before each token; drop a token once the mass before it already >= top_p.
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B]."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                top_p: float | None) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise TunesmithError(
            f"generate: input_ids must be [batch, seq] with seq > 0, got {tuple(input_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise TunesmithError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise TunesmithError(f"generate: temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise TunesmithError(f"generate: top_p must be in (0, 1], got {top_p}")


def _prefill(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None,
             cache: StaticKVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt [B, T]; -> (last-position logits [B, V] fp32, positions [B, T]).

    Left padding (mask [B, T], 0 = pad): each row's positions count its real tokens only
    (HF's cumsum - 1), so a padded row computes what the same prompt alone would."""
    b, t = input_ids.shape
    if mask is None:
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
        attn = None  # plain causal
    else:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        attn = AttnSpec.padding(mask)
    hidden = model(input_ids, positions=positions, attn=attn, cache=cache, return_hidden=True)
    return model.output(hidden[:, -1]).float(), positions


def _check_mask(input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != input_ids.shape:
        raise TunesmithError(f"generate: attention_mask {tuple(mask.shape)} must match "
                             f"input_ids {tuple(input_ids.shape)}")
    mask = mask.to(device=input_ids.device, dtype=torch.bool)
    if not bool(mask[:, -1].all()):
        raise TunesmithError("generate: pad prompts on the left (every row's last token must "
                             "be real; attention_mask[:, -1] == 1)")
    return None if bool(mask.all()) else mask


@torch.inference_mode()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    cuda_graph: bool = True,
    stop_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Continue input_ids [T] or [B, T]; returns prompt + new tokens [B, T + n].

    attention_mask [B, T] (1 = real token) marks left padding: a batch of prompts of unequal
    length gives each row what the prompt alone would give. Greedy when temperature == 0. A row
    stops at an eos token; finished rows are filled with pad_token_id (or the first eos id)
    until every row is done or max_new_tokens is reached.

    The KV cache is allocated once for T + max_new_tokens; the prompt runs in one pass, then
    every decode step has the same shapes. On CUDA with cuda_graph, the step is captured once
    as a CUDA graph and replayed (no per-layer kernel launches from Python).

    stop_fn(new tokens [B, n]) -> bool [B] marks rows that are done after each step (stop
    strings, e.g. lm-eval's `until`); such rows are padded like rows that emitted eos.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _check_args(input_ids, max_new_tokens, temperature, top_p)
    device = model.tok_embeddings.weight.device
    input_ids = input_ids.to(device)
    mask = _check_mask(input_ids, attention_mask)
    if hasattr(model, "generate_tokens"):  # generic HF fallback: HF's own generate
        return model.generate_tokens(input_ids, max_new_tokens, temperature, eos_token_id,
                                     generator, attention_mask=mask)
    if max_new_tokens == 0:
        return input_ids
    b, t = input_ids.shape
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos_ids or [0])[0]
    cache = StaticKVCache.for_model(model, b, t + max_new_tokens)
    logits, positions = _prefill(model, input_ids, mask, cache)  # [B, V], [B, T]
    cache.start_decode()
    key_mask = torch.zeros(b, t + max_new_tokens, dtype=torch.bool, device=device)
    key_mask[:, :t] = True if mask is None else mask
    step = DecodeStep(model, cache, key_mask, use_graph=cuda_graph)
    next_pos = positions[:, -1:] + 1  # [B, 1]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    pieces = [input_ids]
    for i in range(max_new_tokens):
        token = _next_token(logits, temperature, top_k, top_p, generator)  # [B]
        token = torch.where(finished, torch.full_like(token, pad), token)
        pieces.append(token[:, None])
        if eos.numel():
            finished |= torch.isin(token, eos)
        if stop_fn is not None:
            finished |= stop_fn(torch.cat(pieces[1:], dim=1)).to(device)
        if (eos.numel() or stop_fn is not None) and bool(finished.all()):
            break
        if i + 1 < max_new_tokens:
            logits = step(token[:, None], next_pos + i, t + i)  # written at slot t + i
    return torch.cat(pieces, dim=1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids [B, T], attention_mask [B, T]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TunesmithError("generate: every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, t - len(p):] = 1
    return ids.to(device), mask.to(device)
