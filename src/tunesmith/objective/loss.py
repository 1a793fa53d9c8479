"""Cross-entropy for causal LM heads.

`linear_cross_entropy` fuses the output projection with the loss and walks the tokens in
chunks, computing each chunk's gradient during the forward pass. The [N, V] logits tensor
(8 x 2048 x 128256 fp32 = 8.4 GB for Llama 3 at micro-batch 8) is never materialised; the peak
is one [chunk, V] block, whose row count is chosen from the memory it costs (`chunk_rows`).
FLOPs equal the unfused head (three matmuls per chunk), with no
recomputation. The head's weight gradient [V, D] is summed over chunks in fp32; on CUDA each
chunk's GEMM adds into it directly (`_add_weight_grad`), so the sum costs no [V, D] pass of its own.

Both functions return the *sum* of token losses: the trainer divides by the global count of
target tokens across all micro-batches of a step, so accumulation is exact.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError
from tunesmith.objective import ce_kernel
from tunesmith.objective.loss_float8 import check_float8_head, float8_chunks, quantize
from tunesmith.switches import switch

log = logging.getLogger("tunesmith")

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [..., V], labels [...] (already shifted; -100 = no target) -> scalar sum."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _chunk_loss_and_grad(logits: torch.Tensor, y: torch.Tensor, grad_dtype: torch.dtype,
                         grad_scale: float = 1.0):
    """logits [c, V], y [c] -> (sum of CE, d(sum CE)/d logits [c, V] x grad_scale in grad_dtype).

    Pure elementwise + row reductions: on CUDA it is compiled into one or two fused kernels,
    which turns ~6 passes over the [c, V] fp32 block into ~2 (it is memory-bound).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # softmax in >= fp32
    valid = y != IGNORE_INDEX
    safe_y = torch.where(valid, y, 0)
    lse = torch.logsumexp(logits, dim=-1)  # [c]
    picked = logits.gather(1, safe_y[:, None]).squeeze(1)
    loss = ((lse - picked) * valid).sum()
    # softmax - onehot(y), zero on ignored rows.
    vocab = torch.arange(logits.size(-1), device=logits.device)
    onehot = (vocab[None, :] == safe_y[:, None]).to(logits.dtype)  # [c, V]; fused when compiled
    g = (torch.exp(logits - lse[:, None]) - onehot) * valid[:, None]
    return loss, (g * grad_scale).to(grad_dtype)


def _chunk_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = y != IGNORE_INDEX
    picked = logits.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    return ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()


def _chunk_loss_and_grad_inplace(logits: torch.Tensor, y: torch.Tensor, grad_dtype: torch.dtype,
                                 grad_scale: float = 1.0):
    """`_chunk_loss_and_grad` for eager devices (CPU): the gradient is built in the logits block
    itself, so a chunk costs one [c, V] fp32 block instead of ~5 (logsumexp's temporary, exp,
    one-hot, difference, mask), and ~2 passes over it fewer. Same values as the reference."""
    if logits.dtype != torch.float32 and logits.dtype != torch.float64:
        logits = logits.float()  # softmax in fp32; the low-precision block is dropped here
    valid = y != IGNORE_INDEX
    safe_y = torch.where(valid, y, 0)
    picked = logits.gather(1, safe_y[:, None]).squeeze(1)  # [c], before the block is reused
    row_max = logits.amax(dim=-1)  # [c]
    g = logits.sub_(row_max[:, None]).exp_()  # [c, V] exp(x - max), in place
    row_sum = g.sum(dim=-1)  # [c]
    loss = ((row_max + row_sum.log() - picked) * valid).sum()
    g.div_(row_sum[:, None])  # softmax
    g[torch.arange(g.size(0), device=g.device), safe_y] -= 1.0  # - onehot(y)
    if not bool(valid.all()):
        g[~valid] = 0.0
    if grad_scale != 1.0:
        g.mul_(grad_scale)
    return loss, g.to(grad_dtype)


def _transpose(g: torch.Tensor) -> torch.Tensor:
    """g [c, V] -> g^T [V, c] contiguous."""
    return g.t().contiguous()


def _with_transpose(grad_fn, transpose=_transpose):
    """grad_fn plus G's transpose [V, c] (token-major, what the float8 dW GEMM reduces over).

    On CUDA `transpose` is its own compiled kernel: inductor tiles a pointwise transpose so
    both its reads and writes are coalesced, while a transposed store from inside the row-wise
    softmax reduction writes one byte per row at a stride of c (H200, [4096, 128256] chunks:
    3.2 ms per chunk for one kernel writing both layouts, 1.26 ms for the bf16 gradient alone)."""
    def fn(logits, y, grad_dtype, grad_scale):
        loss, g = grad_fn(logits, y, grad_dtype, grad_scale)
        return loss, g, transpose(g)
    return fn


def _chunk_loss_inplace(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`_chunk_loss` without logsumexp's [c, V] temporary (eager devices)."""
    if logits.dtype != torch.float32 and logits.dtype != torch.float64:
        logits = logits.float()
    valid = y != IGNORE_INDEX
    picked = logits.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1)
    lse = row_max + logits.sub_(row_max[:, None]).exp_().sum(dim=-1).log()
    return ((lse - picked) * valid).sum()


# Bytes one [chunk, V] fp32 logits block may take. CUDA: 4096 rows of Llama 3's 128k vocab
# (2 GiB), the measured setting of benchmarks/RESULTS.md; the compiled kernel keeps ~2 blocks.
# Elsewhere the block is host memory and the eager kernel keeps one: 64 MiB (130 rows at 128k,
# 524 at 32k) measured as fast as larger chunks on CPU (benchmarks/ce_cpu_memory.py).
_BLOCK_BYTES = {"cuda": 4096 * 128256 * 4, "cpu": 64 << 20}
_MIN_ROWS, _MAX_ROWS = 64, 4096


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk for a vocabulary of `vocab`: as many as the block budget allows."""
    budget = _BLOCK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(_MIN_ROWS, min(_MAX_ROWS, budget // (4 * max(vocab, 1))))


_COMPILED: dict[str, object] = {}


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _compiled_kernels(device: torch.device):
    """(grad_fn, loss_fn): inductor-compiled on CUDA (built once per process), eager elsewhere."""
    if device.type != "cuda":
        return _chunk_loss_and_grad_inplace, _chunk_loss_inplace
    if not _COMPILED:
        _COMPILED["grad"] = torch.compile(_chunk_loss_and_grad, dynamic=False)
        _COMPILED["loss"] = torch.compile(_chunk_loss, dynamic=False)
    return _COMPILED["grad"], _COMPILED["loss"]


def ce_kernel_choice() -> str:
    """"triton" (ce_kernel.py: one pass + one in-place pass per row) on CUDA when Triton is
    importable, else "inductor"; `TUNESMITH_CE=inductor` pins the compiled expression (A/B)."""
    if switch("TUNESMITH_CE") == "inductor" or not ce_kernel.available():
        return "inductor"
    return "triton"


def _kernels(device: torch.device):
    """(grad_fn, loss_fn) for one [c, V] block: Triton rows kernel on CUDA (see
    `ce_kernel_choice`), the compiled expression when the gradient's dtype differs from the
    block's (the kernel writes G over the block), eager elsewhere."""
    if device.type != "cuda" or ce_kernel_choice() != "triton":
        return _compiled_kernels(device)
    return _triton_grad, ce_kernel.chunk_loss


def _triton_grad(logits: torch.Tensor, y: torch.Tensor, grad_dtype: torch.dtype, grad_scale: float = 1.0):
    """`_chunk_loss_and_grad`'s contract through ce_kernel (G written over the block), or the
    compiled expression when G's dtype is not the block's."""
    if logits.dtype != grad_dtype:
        return _compiled_kernels(logits.device)[0](logits, y, grad_dtype, grad_scale)
    return ce_kernel.chunk_loss_and_grad(logits, y, grad_scale)


def _float8_kernels(device: torch.device):
    """(grad_fn that also returns G's transpose, loss_fn, quantize) for `float8_chunks`; the
    gradient is e5m2, so it comes from the compiled expression (`_compiled_kernels`)."""
    grad_fn, loss_fn = _compiled_kernels(device)
    if device.type != "cuda":
        return _with_transpose(grad_fn), loss_fn, quantize
    if "grad_f8" not in _COMPILED:
        _COMPILED["grad_f8"] = _with_transpose(grad_fn, torch.compile(_transpose, dynamic=False))
        _COMPILED["quantize"] = torch.compile(quantize, dynamic=False)  # amax + cast: 2 kernels
    return _COMPILED["grad_f8"], loss_fn, _COMPILED["quantize"]


def _accumulate_chunks(hidden, w, labels, chunk_size, grad_h, grad_w) -> torch.Tensor:
    """Loss sum over all rows; fills grad_h [N, D] and grad_w [V, D] (fp32; see
    `_weight_grad_buffer`) when given.

    hidden [N, D], w [V, D] already in the compute dtype, labels [N].
    """
    with_grad = grad_h is not None or grad_w is not None
    grad_fn, loss_fn = _kernels(hidden.device)
    mode = _grad_w_mode(hidden.device, w.dtype, grad_w)
    acc_dtype = torch.promote_types(w.dtype, torch.float32)
    total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    for start in range(0, hidden.size(0), chunk_size):
        h = hidden[start : start + chunk_size].to(w.dtype)  # [c, D]
        y = labels[start : start + chunk_size]  # [c]
        logits = h @ w.t()  # [c, V]
        if not with_grad:
            total += loss_fn(logits, y)
            continue
        loss, g = grad_fn(logits, y, w.dtype)
        total += loss
        if grad_h is not None:
            grad_h[start : start + chunk_size] = (g @ w).to(grad_h.dtype)
        if grad_w is not None:
            _add_weight_grad(grad_w, g, h, mode, first=start == 0)
        del logits, g  # one [c, V] block alive at a time: freed before the next is allocated
    return total


# ------------------------------------------------------------- weight-gradient accumulation
# How each chunk's dW = g^T h [V, D] reaches the fp32 accumulator grad_w, per (device, dtype):
#   "addmm"  one GEMM per chunk reads and writes grad_w in fp32 (cuBLAS with beta=1 and an fp32
#            C for bf16 A/B: `addmm(..., out_dtype=float32)`); the first chunk writes grad_w
#            outright (`mm(..., out_dtype=float32)`), so grad_w needs no zero fill either.
#   "mm"     the GEMM writes fp32 (no bf16 -> fp32 cast pass), then one add pass per chunk
#            (builds whose addmm.dtype wants `self` in the input dtype).
#   "same"   inputs already in grad_w's dtype (fp32 runs, CPU): in-place addmm_, no temporary.
#   "cast"   bf16 GEMM, cast to fp32, add: two extra [V, D] fp32 passes per chunk (CPU bf16,
#            and CUDA builds without the out_dtype overloads).
# "addmm" and "mm" also skip the bf16 rounding of each chunk's partial dW: the sum is the fp32
# sum of the products, up to summation order.
_GRAD_W_MODES: dict[str, str] = {}


def grad_w_mode_key(device: torch.device | str, dtype: torch.dtype) -> str:
    """`_GRAD_W_MODES`'s key: benchmarks pin a mode under it (the A/B against the old path)."""
    return f"{torch.device(device)}:{dtype}"


def _grad_w_mode(device: torch.device, dtype: torch.dtype, grad_w: torch.Tensor | None) -> str:
    if grad_w is None or grad_w.dtype == dtype:
        return "same"
    if device.type != "cuda":
        return "cast"  # the out_dtype overloads have no CPU kernel
    key = grad_w_mode_key(device, dtype)
    if key not in _GRAD_W_MODES:
        _GRAD_W_MODES[key] = _probe_out_dtype(device, dtype, grad_w.dtype)
    return _GRAD_W_MODES[key]


def _probe_out_dtype(device: torch.device, dtype: torch.dtype, acc: torch.dtype) -> str:
    """Which of "addmm" / "mm" this torch build runs correctly (once per process), else "cast"."""
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(32, 48, device=device, generator=gen).to(dtype)  # [c, V]
    h = torch.randn(32, 16, device=device, generator=gen).to(dtype)  # [c, D]
    ref = 2 * (g.t().to(acc) @ h.to(acc))  # two chunks' worth
    for mode in ("addmm", "mm"):
        out = torch.empty(48, 16, device=device, dtype=acc)
        try:
            _add_weight_grad(out, g, h, mode, first=True)
            _add_weight_grad(out, g, h, mode, first=False)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            log.debug("fused loss: dW accumulation %r unavailable (%s)", mode, str(e).splitlines()[0])
            continue
        if torch.allclose(out, ref, rtol=1e-2, atol=1e-2):
            return mode
    return "cast"


def _add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, mode: str,
                     first: bool) -> None:
    """grad_w [V, D] += g^T @ h, g [c, V], h [c, D]; `first`: grad_w may hold garbage (see
    `_weight_grad_buffer`) and is overwritten."""
    if mode == "same":
        if first:
            torch.mm(g.t(), h, out=grad_w)
        else:
            grad_w.addmm_(g.t(), h)
    elif mode == "cast":
        if first:
            grad_w.copy_(g.t() @ h)  # the cast is the copy
        else:
            grad_w += (g.t() @ h).to(grad_w.dtype)
    elif first:
        torch.mm(g.t(), h, out_dtype=grad_w.dtype, out=grad_w)
    elif mode == "addmm":
        torch.addmm(grad_w, g.t(), h, out_dtype=grad_w.dtype, out=grad_w)
    else:
        grad_w += torch.mm(g.t(), h, out_dtype=grad_w.dtype)


def _weight_grad_buffer(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """fp32 [V, D] accumulator. Every mode but "cast" overwrites it on the first chunk, so it is
    left unfilled (saves one [V, D] write) unless there are no rows at all."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    if rows == 0:
        return torch.zeros(weight.shape, dtype=acc, device=weight.device)
    return torch.empty(weight.shape, dtype=acc, device=weight.device)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, compute_dtype, chunk_size, float8):
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if needs_h else None
        # fp32 accumulation of dW over chunks
        grad_w = _weight_grad_buffer(weight, hidden.size(0)) if needs_w else None
        # Precision is chosen by compute_dtype; an enclosing autocast must not re-cast inside.
        with torch.autocast(hidden.device.type, enabled=False):
            if float8:  # the weight is quantised from its own dtype, never cast to compute_dtype
                grad_fn, loss_fn, quantize_fn = _float8_kernels(hidden.device)
                total = float8_chunks(hidden, weight, labels, chunk_size, grad_h, grad_w,
                                      (grad_fn, loss_fn), compute_dtype, quantize_fn)
            else:
                total = _accumulate_chunks(
                    hidden, weight.to(compute_dtype), labels, chunk_size, grad_h, grad_w
                )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.consumed = False
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.consumed:  # the buffers were scaled in place by the first backward
            raise TunesmithError("linear_cross_entropy: its backward runs once (the gradients "
                                 "computed in forward are scaled in place); do not backpropagate "
                                 "through it twice with retain_graph=True")
        ctx.consumed = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype = grad_h.dtype if grad_h is not None else None
        return (*_scaled_grads(grad_h, grad_w, grad_out, h_dtype, ctx.weight_dtype),
                None, None, None, None)


def _scaled_grads(grad_h, grad_w, grad_out, h_dtype, w_dtype):
    """(grad_h [N, D], grad_w [V, D]) x grad_out, in place, then cast to the inputs' dtypes: the
    forward's buffers are used once, and scaling grad_w fp32 in place is one pass with no second
    [V, D] allocation (autograd then takes the fp32 result as the weight's .grad as it is)."""
    gh = grad_h.mul_(grad_out.to(grad_h.dtype)).to(h_dtype) if grad_h is not None else None
    gw = grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None
    return gh, gw


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    float8: str | None = None,
) -> torch.Tensor:
    """Sum of CE of `hidden @ weight.T` against `labels`.

    hidden [..., D] (final normed hidden states), weight [V, D] (the LM head), labels [...].
    compute_dtype: matmul dtype (bf16 under mixed precision); defaults to hidden's dtype.
    float8: "tensorwise" runs the head's three matmuls in float8 (objective/loss_float8.py);
    V and D must be multiples of 16. None: compute_dtype matmuls.

    Tensor parallel: `weight` may be a DTensor sharded on the vocab dim (Shard(0) over the TP
    mesh) and `hidden` a sequence-sharded DTensor; the loss is then computed vocab-parallel on
    each rank's [V/tp, D] slice without ever gathering the head or the logits (no float8 there).
    chunk_size: rows per chunk; default `chunk_rows(V, device)`, from the memory a block costs.
    """
    if chunk_size is None:
        chunk_size = chunk_rows(weight.shape[0], hidden.device)
    if not torch.is_grad_enabled():  # no graph is recorded: the gradients made in forward are waste
        hidden, weight = hidden.detach(), weight.detach()
    if float8:
        check_float8_head(float8, weight.shape[0], weight.shape[-1])
    if _is_dtensor(hidden) or _is_dtensor(weight):
        if float8:
            raise TunesmithError("float8 LM head: not supported with tensor parallelism (a "
                                 "DTensor head); keep 'output' in train.float8_skip")
        return _dtensor_linear_cross_entropy(hidden, weight, labels, compute_dtype, chunk_size)
    h = hidden.reshape(-1, hidden.size(-1))
    y = labels.reshape(-1).to(h.device)
    dtype = compute_dtype or h.dtype
    return _LinearCrossEntropy.apply(h, weight, y, dtype, chunk_size, float8)


# ---------------------------------------------------------------------------- tensor parallel
def _vocab_parallel_chunks(hidden, w, labels, chunk_size, grad_h, grad_w, group, vocab_start) -> torch.Tensor:
    """Like `_accumulate_chunks`, with w [V/tp, D] this rank's vocab rows [vocab_start, +V/tp).

    The softmax normaliser needs every rank's logits: per chunk one MAX all-reduce (row max)
    and one SUM all-reduce of [2, c] (row sum of exp, picked target logit). grad_h [N, D] gets
    only this rank's vocab contribution; the caller sums it over the group once at the end.
    """
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    mode = _grad_w_mode(hidden.device, w.dtype, grad_w)
    v_local = w.size(0)
    for start in range(0, hidden.size(0), chunk_size):
        h = hidden[start : start + chunk_size].to(w.dtype)  # [c, D]
        y = labels[start : start + chunk_size]  # [c]
        logits = (h @ w.t()).float()  # [c, V/tp]
        row_max = logits.max(dim=-1).values  # [c]
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        valid = y != IGNORE_INDEX
        mine = valid & (y >= vocab_start) & (y < vocab_start + v_local)  # target on this rank
        local_y = torch.where(mine, y - vocab_start, 0)
        exp = torch.exp(logits - row_max[:, None])  # [c, V/tp]
        sums = torch.stack([exp.sum(-1), logits.gather(1, local_y[:, None]).squeeze(1) * mine])
        dist.all_reduce(sums, group=group)  # [2, c]: sum of exp, target logit
        lse = row_max + torch.log(sums[0])
        total += ((lse - sums[1]) * valid).sum()
        if grad_h is None and grad_w is None:
            continue
        g = exp / sums[0][:, None]  # softmax slice [c, V/tp]
        g[torch.arange(g.size(0), device=g.device), local_y] -= mine.to(g.dtype)
        g = (g * valid[:, None]).to(w.dtype)
        if grad_h is not None:
            grad_h[start : start + chunk_size] = (g @ w).float()
        if grad_w is not None:
            _add_weight_grad(grad_w, g, h, mode, first=start == 0)
    return total


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, compute_dtype, chunk_size, group, vocab_start):
        import torch.distributed as dist

        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # fp32 partial grads: summed over the TP group below, a bf16 sum would round twice.
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_h else None
        grad_w = _weight_grad_buffer(weight, hidden.size(0)) if needs_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            total = _vocab_parallel_chunks(hidden, weight.to(compute_dtype), labels, chunk_size,
                                           grad_h, grad_w, group, vocab_start)
        if grad_h is not None:
            dist.all_reduce(grad_h, group=group)  # [N, D]: sum over the vocab shards
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (*_scaled_grads(grad_h, grad_w, grad_out, *ctx.dtypes), None, None, None, None, None)


def _dtensor_linear_cross_entropy(hidden, weight, labels, compute_dtype, chunk_size):
    """hidden and/or weight are DTensors (tensor parallel): see `linear_cross_entropy`."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(hidden, DTensor):
        # Sequence-parallel hidden [B, T/tp, D] per rank -> the full [B, T, D] on every rank;
        # autograd slices the (identical) full gradient back to each rank's part.
        hidden = hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim).to_local()
    if not isinstance(weight, DTensor):
        return linear_cross_entropy(hidden, weight, labels, compute_dtype=compute_dtype, chunk_size=chunk_size)
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return linear_cross_entropy(hidden, weight.to_local(), labels, compute_dtype=compute_dtype,
                                    chunk_size=chunk_size)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise RuntimeError(
            f"LM head weight has placements {placements} on a {mesh.ndim}-D mesh; expected the "
            "FSDP-gathered head (Shard(0) over the TP mesh only)"
        )
    n, vocab = mesh.size(), weight.shape[0]
    vocab_start = mesh.get_local_rank() * -(-vocab // n)  # torch.chunk: ceil(V / n) rows each
    h = hidden.reshape(-1, hidden.size(-1))
    y = labels.reshape(-1).to(h.device)
    return _VocabParallelLinearCrossEntropy.apply(
        h, weight.to_local(), y, compute_dtype or h.dtype, chunk_size, mesh.get_group(), vocab_start
    )
