"""Autoregressive generation with a KV cache: one prefill pass, then one token per step."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.kv_cache import KVCache


def _last_logits(model: nn.Module, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run ids [B, T] through the model, project only the last position: -> [B, V] fp32."""
    hidden = model(ids, cache=cache, return_hidden=True)  # [B, T, D]
    return model.output(hidden[:, -1]).float()


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
) -> torch.Tensor:
    """Continue input_ids [T] or [B, T] (no padding); returns prompt + new tokens [B, T + n].

    Greedy when temperature == 0. A row stops at an eos token; finished rows are filled with
    pad_token_id (or the first eos id) until every row is done or max_new_tokens is reached.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    _check_args(input_ids, max_new_tokens, temperature, top_p)
    device = model.tok_embeddings.weight.device
    if hasattr(model, "generate_tokens"):  # generic HF fallback: HF's own generate
        return model.generate_tokens(input_ids.to(device), max_new_tokens, temperature,
                                     eos_token_id, generator)
    input_ids = input_ids.to(device)
    if max_new_tokens == 0:
        return input_ids
    b, t = input_ids.shape
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else (eos_ids or [0])[0]
    cache = KVCache.for_model(model, b, t + max_new_tokens)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    pieces = [input_ids]
    logits = _last_logits(model, input_ids, cache)  # prefill: [B, V]
    for step in range(max_new_tokens):
        token = _next_token(logits, temperature, top_k, top_p, generator)  # [B]
        token = torch.where(finished, torch.full_like(token, pad), token)
        pieces.append(token[:, None])
        if eos.numel():
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits = _last_logits(model, token[:, None], cache)
    return torch.cat(pieces, dim=1)
