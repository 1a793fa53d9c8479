"""Context parallelism (`parallel.cp: N`): the sequence dimension split over N ranks, attention
done as ring attention over them.

Layout of the sequence (load balance for causal masks): a batch's T tokens are cut into 2N
equal chunks and rank i holds chunks i and 2N-1-i (`ContextParallel.local_index`), so every rank
gets one early and one late chunk and the causal work is the same on each. Everything
per-token is cut the same way (`tunesmith.objective.forward`, which owns the batch): input
ids, labels, RoPE position ids (computed on the whole row first, so they restart per packed
document exactly as in one process), the token's index in the row and its document id (what
the mask needs).

Ring attention (`ring_attention`, an autograd.Function): each rank keeps its queries; the keys
and values (with their row indices and document ids) travel around the ring of the N cp ranks
by point-to-point sends, one hop per step, the next hop's transfer overlapping the current
block's compute. Each step computes the block's attention output and log-sum-exp under the mask
"key index <= query index and same document", and merges it into the running output with the
online-softmax rule

    lse = logaddexp(lse_a, lse_b),   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).

Backward is written out, not left to autograd: the keys/values go around the ring again with
their gradient accumulators; each step recomputes the block's probabilities from the saved
global log-sum-exp (P = exp(S - lse)) and adds dQ here and dK/dV to the travelling
accumulators, which after N hops are back at their owner. So a rank saves only its own q, k, v,
output and lse (not every block's probabilities, which autograd through the blockwise math
would keep: O(T_local x T) per layer). Block math is plain matmuls in fp32 (it runs on gloo/CPU
for the parity tests and on CUDA alike), query rows in chunks whose scores stay under
CHUNK_BYTES, so the transient memory is bounded at any length. (Not done: fused CUDA kernels
returning the log-sum-exp -- flash/cuDNN for the causal sub-blocks, FlexAttention for document
masks -- which would run the blocks at flash speed instead of fp32-matmul speed.)

Works on torch.distributed point-to-point ops only (gloo or NCCL), unlike PyTorch's
experimental context_parallel, which needs CUDA SDPA kernels. The ring call is kept out of
torch.compile (the rest of a compiled block still compiles). Loss normalisation: see
`tunesmith.objective` (targets counted on each rank's own tokens, summed over dp x cp).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tunesmith.errors import TunesmithError

_ATTR = "_tunesmith_cp"


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its cp group (`size` ranks, this one is `rank`)."""

    group: Any  # dist.ProcessGroup; None when size == 1
    rank: int
    size: int

    def local_index(self, t: int, device: torch.device | str = "cpu") -> Tensor:
        """Row indices [2 * T/(2N)] of this rank's tokens: chunk `rank`, then chunk 2N-1-rank."""
        c = t // (2 * self.size)
        first = torch.arange(self.rank * c, (self.rank + 1) * c, device=device)
        last = torch.arange((2 * self.size - 1 - self.rank) * c, (2 * self.size - self.rank) * c, device=device)
        return torch.cat([first, last])

    def attention(self, index: Tensor, doc: Tensor):
        """The attention function for this batch: (q, k, v) -> out, over the ring."""
        return functools.partial(ring_attention, index=index, doc=doc, cp=self)


def apply_context_parallel(model: nn.Module, cp_mesh: Any) -> None:
    """Mark `model` as context-parallel over `cp_mesh` (1-D): the objective then shards each
    batch along the sequence and attends through the ring. Structure and names unchanged."""
    setattr(model, _ATTR, ContextParallel(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size()))


def context_parallel_of(model: nn.Module) -> ContextParallel | None:
    return getattr(model, _ATTR, None)


# ---------------------------------------------------------------------------- ring
class _Ring:
    """Point-to-point hops to the next rank of the cp group, receiving from the previous."""

    def __init__(self, cp: ContextParallel) -> None:
        self.group = cp.group
        self.next = dist.get_global_rank(cp.group, (cp.rank + 1) % cp.size)
        self.prev = dist.get_global_rank(cp.group, (cp.rank - 1) % cp.size)

    def start(self, tensors: list[Tensor]) -> tuple[list[Tensor], list[Any]]:
        """Send `tensors` on, receive their counterparts from the previous rank (async)."""
        tensors = [x.contiguous() for x in tensors]  # P2P sends/receives dense buffers
        recv = [torch.empty_like(x) for x in tensors]
        ops = [dist.P2POp(dist.isend, x, self.next, self.group) for x in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(pending: tuple[list[Tensor], list[Any]]) -> list[Tensor]:
        recv, reqs = pending
        for r in reqs:
            r.wait()
        return recv


def _expand_kv(x: Tensor, n_rep: int) -> Tensor:
    """[B, Hkv, S, hd] -> [B, H, S, hd]: query head h reads kv head h // n_rep (SDPA's GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _fold_kv(x: Tensor, n_rep: int) -> Tensor:
    """The gradient of `_expand_kv`: [B, H, S, hd] -> [B, Hkv, S, hd]."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x.view(b, h // n_rep, n_rep, s, d).sum(2)


@dataclass(frozen=True)
class _Score:
    """How a block's scores are made: q.k times `scale`, masked to key index <= query index,
    the same document and, with a sliding `window` (Gemma 3's local layers), key index >
    query index - window."""

    scale: float
    window: int | None = None

    def masked(self, q: Tensor, k: Tensor, qi: Tensor, ki: Tensor, qd: Tensor, kd: Tensor) -> Tensor:
        """Masked scores [B, H, L, S] in the block math dtype."""
        s = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        kk, qq = ki[:, None, :], qi[:, :, None]
        allowed = (kk <= qq) & (kd[:, None, :] == qd[:, :, None])  # [B, L, S]
        if self.window is not None:
            allowed &= kk > qq - self.window
        return s.masked_fill(~allowed[:, None], float("-inf"))


def _acc(q: Tensor) -> torch.dtype:
    """Block math dtype: fp32, or the inputs' own when wider (fp64 in tests)."""
    return torch.promote_types(q.dtype, torch.float32)


def _finite(lse: Tensor) -> Tensor:
    """lse with -inf (a row that sees no key in this block) replaced by 0, for safe subtraction."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


CHUNK_BYTES = 1 << 28  # one query chunk's fp32 scores [B, H, rows, S] stay under 256 MiB


def _row_chunks(q: Tensor, keys: int) -> list[slice]:
    """Query-row slices whose scores against `keys` keys fit CHUNK_BYTES: a block's transient
    memory stays bounded however long the local sequence is (the FLOPs are the same)."""
    b, h, rows = q.shape[:3]
    step = max(1, CHUNK_BYTES // (b * h * keys * 4))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def _block_forward(q, k, v, qi, ki, qd, kd, score: _Score, out, lse) -> None:
    """Merge one key/value block into (out [B, H, L, hd], lse [B, H, L]) in place (online softmax)."""
    for r in _row_chunks(q, k.shape[2]):
        s = score.masked(q[:, :, r], k, qi[:, r], ki, qd[:, r], kd)  # [B, H, rows, S]
        lse_b = torch.logsumexp(s, dim=-1)  # -inf where the block holds nothing visible
        out_b = torch.matmul(torch.exp(s - _finite(lse_b)[..., None]), v)
        new = torch.logaddexp(lse[:, :, r], lse_b)
        out[:, :, r] = (out[:, :, r] * torch.exp(lse[:, :, r] - _finite(new))[..., None]
                        + out_b * torch.exp(lse_b - _finite(new))[..., None])
        lse[:, :, r] = new


def _block_backward(q, do, delta, lse, k, v, qi, ki, qd, kd, score: _Score, dq) -> tuple[Tensor, Tensor]:
    """One block's gradients: adds into dq, returns (dk, dv) [B, H, S, hd]. P is recomputed
    from the global log-sum-exp, so it is the final softmax restricted to this block."""
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for r in _row_chunks(q, k.shape[2]):
        p = torch.exp(score.masked(q[:, :, r], k, qi[:, r], ki, qd[:, r], kd) - lse[:, :, r, None])
        ds = p * (torch.matmul(do[:, :, r], v.transpose(-1, -2)) - delta[:, :, r])
        dq[:, :, r] += torch.matmul(ds, k) * score.scale
        dk += torch.matmul(ds.transpose(-1, -2), q[:, :, r]) * score.scale
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, r])
    return dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index, doc, cp: ContextParallel, score: _Score):  # type: ignore[override]
        # q [B, H, L, hd]; k, v [B, Hkv, L, hd]; index, doc [B, L] (L = this rank's tokens)
        n_rep, acc = q.shape[1] // k.shape[1], _acc(q)
        qf = q.to(acc)
        out = torch.zeros_like(qf)  # [B, H, L, hd]
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)  # [B, H, L]
        ring = _Ring(cp) if cp.size > 1 else None
        block = [k, v, index, doc]
        for step in range(cp.size):
            pending = ring.start(block) if ring is not None and step < cp.size - 1 else None
            kb, vb, ib, db = block
            _block_forward(qf, _expand_kv(kb.to(acc), n_rep), _expand_kv(vb.to(acc), n_rep),
                           index, ib, doc, db, score, out, lse)
            if pending is not None:
                block = _Ring.wait(pending)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, index, doc, out, lse)
        ctx.cp, ctx.score = cp, score
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, index, doc, out, lse = ctx.saved_tensors
        cp: ContextParallel = ctx.cp
        n_rep, acc = q.shape[1] // k.shape[1], _acc(q)
        qf, do = q.to(acc), dout.to(acc)
        delta = (do * out.to(acc)).sum(-1, keepdim=True)  # [B, H, L, 1]: rowsum(dO * O)
        dq = torch.zeros_like(qf)
        ring = _Ring(cp) if cp.size > 1 else None
        block = [k, v, index, doc]
        grads = [torch.zeros(k.shape, dtype=acc, device=k.device),
                 torch.zeros(v.shape, dtype=acc, device=v.device)]  # travel with the block
        for step in range(cp.size):
            pending = ring.start(block) if ring is not None and step < cp.size - 1 else None
            kb, vb, ib, db = block
            dk, dv = _block_backward(qf, do, delta, lse, _expand_kv(kb.to(acc), n_rep),
                                     _expand_kv(vb.to(acc), n_rep), index, ib, doc, db, ctx.score, dq)
            grads[0] += _fold_kv(dk, n_rep)
            grads[1] += _fold_kv(dv, n_rep)
            if ring is not None:  # the accumulators follow their block; after N hops: home
                grads = _Ring.wait(ring.start(grads))
            if pending is not None:
                block = _Ring.wait(pending)
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None, None, None


@torch.compiler.disable
def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, index: Tensor, doc: Tensor,
                   cp: ContextParallel, scale: float | None = None, window: int | None = None) -> Tensor:
    """Causal, document-masked attention of this rank's queries over all cp ranks' keys.

    q [B, H, L, hd], k/v [B, Hkv, L, hd] (GQA: H a multiple of Hkv), index/doc [B, L] the
    tokens' row indices and document ids -> [B, H, L, hd] in q's dtype. `scale` multiplies q.k
    (None: 1 / sqrt(hd)); `window`: a causal sliding window (keys at most window - 1 back)."""
    if q.shape[1] % k.shape[1]:
        raise TunesmithError(f"ring attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} kv heads")
    score = _Score(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, window)
    return _RingAttention.apply(q, k, v, index.to(q.device), doc.to(q.device), cp, score)
