"""Activation offload: each transformer block's saved activations go to pinned host memory
during forward and come back just before backward needs them (`parallel.activation_offload`).

How (torch.autograd.graph.saved_tensors_hooks around each block's forward):

* **pack** (forward, a tensor autograd saves for backward): a copy to pinned host memory is
  issued on a side stream (`d2h`) that first waits for the compute stream, so the copy of
  block i overlaps the compute of block i+1. The GPU tensor is released when the block's
  forward returns; `record_stream` keeps its memory from being reused before the copy has
  read it.
* **unpack** (backward): block i's tensors are copied back on another side stream (`h2d`),
  which is started for block i-1 as soon as backward first touches block i (prefetch one
  block ahead), so the copies overlap the backward compute of block i. The compute stream
  waits on the copy's event only when it needs that tensor.

Host memory: one exact-size buffer per (block, saved tensor), page-locked with
`cudaHostRegister` once and reused every step (`_HostPool`). Pinned tensors from torch's caching
host allocator would be rounded up to a power of two (a 3 GiB block input at 384k tokens of the
8B shape takes 4 GiB), and the sizes change whenever the sequence length does.

Kept on the GPU: parameters (and FSDP2's gathered ones), integer tensors (QLoRA's NF4 codes and
scales, token ids, masks), tensors below `min_bytes` (RoPE tables: not worth a transfer) and
anything not on the compute device. One tensor saved
several times in a block (e.g. the normalised input of q, k and v) is copied once, and one that
an earlier block of the same step already saved (the RoPE tables every block receives) stays on
the GPU: it is alive there anyway until the step's backward.

Composes with activation checkpointing: the offload wraps the checkpointed forward, so with
`full` the block inputs that checkpointing keeps are offloaded (the recomputed internals are
checkpointing's own business); with `none` every saved activation of the block is. With
`train.compile` the hooks sit in a frame torch.compile skips (the block's own forward is
compiled as before) and apply at run time to what the compiled graph saves.

On CPU there is no device memory to save: `apply_activation_offload` is a no-op there (one log
line). `ActivationOffloader(device, force=True)` still runs the same hooks with plain host
copies, which is how tests check that gradients are unchanged.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger("tunesmith")

_MARK = "_tunesmith_offloaded"
MIN_BYTES = 1 << 20  # smaller tensors stay on the device: the transfer costs more than it saves


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether a tensor on `a` lives on the run's device `b`. The runtime's device on one GPU is
    `cuda` without an index while tensors report `cuda:0`, and `torch.device("cuda") !=
    torch.device("cuda:0")`: an index missing on either side matches any index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _dense(t: torch.Tensor) -> bool:
    """True when `t`'s strides are a permutation of a contiguous layout (no gaps, no overlap):
    then a buffer with the same strides holds exactly its elements."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _contiguous_strides(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class _HostPool:
    """Host buffers keyed by (block index, slot), exact size, reused step after step.

    On CUDA each buffer is page-locked once with cudaHostRegister, so copies are asynchronous
    DMA; it is unregistered when a longer sequence needs a bigger one. Off CUDA (force=True on
    CPU, for tests) the buffers are plain host memory."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}  # flat uint8

    def get(self, key: tuple[int, int], nbytes: int) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                self._release(buf)
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if self.pin:
                err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)
                if int(err) != 0:
                    raise RuntimeError(f"activation offload: cudaHostRegister of {nbytes / 2**30:.2f} GiB "
                                       f"failed (cudaError {int(err)}): host memory exhausted?")
            self.buffers[key] = buf
        return buf[:nbytes]

    def _release(self, buf: torch.Tensor) -> None:
        if self.pin:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())

    def block_nbytes(self, block: int) -> int:
        return sum(b.numel() for (i, _), b in self.buffers.items() if i == block)

    def clear(self) -> None:
        for buf in self.buffers.values():
            self._release(buf)
        self.buffers.clear()

    def __del__(self) -> None:
        # Registered host memory must be unregistered before it is freed. At interpreter exit
        # CUDA may already be gone; the process's memory goes with it then.
        try:
            self.clear()
        except Exception:  # noqa: BLE001 -- nothing left to do on a failed cleanup
            pass


class _Stash:
    """One block call's offloaded tensors: host copies, and GPU copies once brought back."""

    def __init__(self) -> None:
        self.host: list[torch.Tensor] = []
        self.seen: dict[tuple, int] = {}  # (storage ptr, offset, shape, stride, dtype) -> slot
        # The packed originals, alive until the block's forward returns: a freed tensor's
        # address could otherwise come back for another tensor and match `seen` wrongly.
        self.live: list[torch.Tensor] = []
        self.device: list[torch.Tensor | None] = []
        self.uses: list[int] = []  # saved references per slot still to be unpacked
        self.copied: torch.cuda.Event | None = None  # d2h of every slot done
        self.fetched: torch.cuda.Event | None = None  # h2d of every slot done (prefetch)


class ActivationOffloader:
    """The pack/unpack hooks and streams shared by every block of one model."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_BYTES, force: bool = False) -> None:
        self.device = device
        self.min_bytes = min_bytes
        self.cuda = device.type == "cuda"
        self.enabled = self.cuda or force
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.h2d = torch.cuda.Stream(device) if self.cuda else None
        self.stashes: list[_Stash] = []  # forward order of the current step's block calls
        self.pool = _HostPool(pin=self.cuda)
        # Tensors this step's earlier blocks saved, by storage key, held weakly: one still alive
        # when a later block saves it again (the RoPE tables) stays put. Only a live tensor
        # matches: a freed tensor's address may come back for a new tensor with the same key.
        self.step_seen: dict[tuple, weakref.ref] = {}
        self.offloaded_bytes = 0  # since construction; tests and logs read it

    # -- per block ----------------------------------------------------------------------------
    def wrap(self, forward: Callable[..., Any], first: bool = False) -> Callable[..., Any]:
        """`forward` with its saved tensors offloaded; `first`: the model's first block, whose
        call starts a new step (what an interrupted step left behind is dropped)."""

        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            if first:
                self.stashes.clear()
                self.step_seen.clear()
            stash = _Stash()
            index = len(self.stashes)
            self.stashes.append(stash)
            with torch.autograd.graph.saved_tensors_hooks(
                functools.partial(self._pack, index), functools.partial(self._unpack, index)
            ):
                out = forward(*args, **kwargs)
            self.step_seen.update({key: weakref.ref(stash.live[slot]) for key, slot in stash.seen.items()})
            stash.live.clear()
            stash.seen.clear()
            if self.cuda and stash.host:
                stash.copied = torch.cuda.Event()
                stash.copied.record(self.d2h)
            return out

        # Skipped by torch.compile (the context manager is not traceable); the wrapped
        # forward below it is still compiled as its own frame.
        return torch._dynamo.disable(run, recursive=False)

    def _keep(self, t: torch.Tensor) -> bool:
        # Integer tensors are weights' storage (QLoRA's NF4 codes and scales, saved by
        # tunesmith::nf4_linear and re-gathered by FSDP2) or ids and masks: never activations.
        return (not self.enabled or isinstance(t, nn.Parameter) or not same_device(t.device, self.device)
                or not t.is_floating_point() or t.numel() * t.element_size() < self.min_bytes)

    def _pack(self, index: int, t: torch.Tensor) -> Any:
        if self._keep(t):
            return t
        stash = self.stashes[index]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        earlier = self.step_seen.get(key)
        if earlier is not None and earlier() is t:  # an earlier block's too (RoPE tables): alive anyway
            return t
        slot = stash.seen.get(key)
        if slot is None:
            slot = stash.seen[key] = len(stash.host)
            stash.host.append(self._to_host(t, (index, slot)))
            stash.device.append(None)
            stash.uses.append(0)
            stash.live.append(t)
            self.offloaded_bytes += t.numel() * t.element_size()
        stash.uses[slot] += 1
        return slot

    def _to_host(self, t: torch.Tensor, key: tuple[int, int]) -> torch.Tensor:
        """A host copy in the pool's buffer for `key` with the same shape and, when dense, the
        same strides (so backward runs the same kernels); asynchronous on CUDA."""
        stride = t.stride() if _dense(t) else _contiguous_strides(t.shape)  # e.g. an expanded view
        nbytes = t.numel() * t.element_size()
        host = self.pool.get(key, nbytes).view(t.dtype).as_strided(t.shape, stride)
        if not self.cuda:
            return host.copy_(t.detach())
        self.d2h.wait_stream(torch.cuda.current_stream(self.device))
        self.d2h.wait_stream(self.h2d)  # the buffer's last fetch (an earlier step) has read it
        with torch.cuda.stream(self.d2h):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.d2h)  # its memory is not reused before this copy has read it
        return host

    def _unpack(self, index: int, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        stash = self.stashes[index]
        if not self.cuda:
            return stash.host[packed]
        if stash.fetched is None:
            self._fetch(stash)
        if index > 0 and self.stashes[index - 1].fetched is None:
            self._fetch(self.stashes[index - 1])  # prefetch the block backward reaches next
        current = torch.cuda.current_stream(self.device)
        current.wait_event(stash.fetched)
        t = stash.device[packed]
        assert t is not None
        t.record_stream(current)  # allocated on h2d, used (and freed) on the compute stream
        stash.uses[packed] -= 1
        if stash.uses[packed] == 0:  # autograd holds the last reference from here on
            stash.device[packed] = None
        return t

    def _fetch(self, stash: _Stash) -> None:
        """Copy a stash back to the device on the h2d stream (after its d2h copies)."""
        stash.fetched = torch.cuda.Event()
        with torch.cuda.stream(self.h2d):
            if stash.copied is not None:
                self.h2d.wait_event(stash.copied)
            for i, host in enumerate(stash.host):
                stash.device[i] = host.to(self.device, non_blocking=True)
            stash.fetched.record(self.h2d)


def apply_activation_offload(model: nn.Module, device: torch.device, *, force: bool = False,
                             min_bytes: int = MIN_BYTES) -> ActivationOffloader | None:
    """Offload each block of `model.layers` (outside its checkpointing, if any). Returns the
    offloader, or None on a CPU device without `force` (nothing to save there)."""
    if device.type != "cuda" and not force:
        log.info("parallel.activation_offload: no-op on %s (activations already live in host memory)", device.type)
        return None
    off = ActivationOffloader(device, min_bytes=min_bytes, force=force)
    for i, block in enumerate(model.layers):  # type: ignore[attr-defined]
        if getattr(block, _MARK, None) is None:
            block.forward = off.wrap(block.forward, first=i == 0)  # instance attribute: keys unchanged
            setattr(block, _MARK, off)
    return off


def offloader_of(model: nn.Module) -> ActivationOffloader | None:
    """The offloader `apply_activation_offload` put on `model`'s blocks (benchmarks read its
    host buffers), or None."""
    layers = getattr(model, "layers", None)
    return getattr(layers[0], _MARK, None) if layers is not None and len(layers) else None
