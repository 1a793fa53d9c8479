"""Activation offload (`tunesmith.parallel.offload`): the saved-tensor hooks move every block's
saved activations to a separate host copy and back, and gradients are bit-identical to a run
without offload -- alone, under full activation checkpointing, and with compiled blocks.

On CPU the config option is a no-op (there is no device memory to save); `force=True` runs the
same hooks with plain host copies, which is what these tests exercise. The CUDA streams
(pinned copies, prefetch) are measured by benchmarks/check_longctx.py on a GPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.peft_utils import batch, compile_or_skip, tiny_model
from tunesmith.parallel import apply_activation_checkpointing
from tunesmith.parallel.offload import apply_activation_offload


def _grads(model, data) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(data["input_ids"])  # [B, T, V]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data["labels"].flatten(), ignore_index=-100)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ac, compiled", [("none", False), ("full", False), ("full", True)],
                         ids=["offload", "full-ac+offload", "compiled+full-ac+offload"])
def test_offloaded_activations_give_identical_gradients(ac, compiled):
    if compiled:
        compile_or_skip()
        torch._dynamo.reset()
    data = batch(7)
    ref_model = tiny_model(seed=3)[0]
    apply_activation_checkpointing(ref_model, ac)
    if compiled:  # compiled kernels round differently from eager: compare like with like
        for block in ref_model.layers:
            block.compile()
    ref_loss, ref = _grads(ref_model, data)

    model = tiny_model(seed=3)[0]
    apply_activation_checkpointing(model, ac)
    off = apply_activation_offload(model, torch.device("cpu"), force=True, min_bytes=0)
    if compiled:
        for block in model.layers:
            block.compile()
    loss, got = _grads(model, data)
    assert off is not None and off.offloaded_bytes > 0  # the hooks really moved tensors
    b, t = data["input_ids"].shape
    inputs = len(model.layers) * b * t * model.cfg.dim * 4  # every block's input [B, T, D], fp32
    if ac == "full":  # checkpointing keeps each block's inputs (x and the RoPE table): offloaded
        assert inputs <= off.offloaded_bytes < 2 * inputs
    else:  # every saved activation of the blocks: many times their inputs
        assert off.offloaded_bytes > 10 * inputs
    assert loss == ref_loss
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    # A second step reuses nothing stale: the same gradients again.
    assert _grads(model, data)[1]["layers.0.attention.wq.weight"].equal(ref["layers.0.attention.wq.weight"])


def test_offload_is_a_no_op_on_cpu(caplog):
    model = tiny_model()[0]
    forwards = [b.forward for b in model.layers]
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        assert apply_activation_offload(model, torch.device("cpu")) is None
    assert [b.forward for b in model.layers] == forwards
    assert "activation_offload: no-op on cpu" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned-memory stream path needs CUDA")
@pytest.mark.parametrize("ac", ["none", "full"])
def test_offload_streams_on_cuda_give_identical_gradients(ac):
    """The real path: pinned host copies on a side stream, prefetched back one block ahead."""
    data = {k: v.cuda() for k, v in batch(7).items()}
    ref_model = tiny_model(seed=3)[0].cuda()
    apply_activation_checkpointing(ref_model, ac)
    ref_loss, ref = _grads(ref_model, data)
    model = tiny_model(seed=3)[0].cuda()
    apply_activation_checkpointing(model, ac)
    off = apply_activation_offload(model, torch.device("cuda", torch.cuda.current_device()), min_bytes=0)
    for _ in range(2):  # the second step starts from fresh stashes
        loss, got = _grads(model, data)
        assert off is not None and off.offloaded_bytes > 0 and loss == ref_loss
        for name in ref:  # CUDA's embedding backward sums with atomics: not bitwise
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_tensors_on_the_runs_gpu_are_offloaded_whatever_the_index_spelling():
    """One GPU runs on `torch.device("cuda")` while its tensors report `cuda:0`; comparing the
    two with `!=` kept every activation on the GPU (measured on an H200: offload alone left the
    peak at 18.8 GiB, the same as no offload). A missing index matches any index."""
    from tunesmith.parallel.offload import same_device

    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert torch.device("cuda") != cuda0  # why the helper exists
    assert same_device(cuda0, cuda) and same_device(cuda, cuda0) and same_device(cuda1, cuda)
    assert same_device(cuda0, cuda0) and not same_device(cuda0, cuda1)
    assert not same_device(torch.device("cpu"), cuda) and same_device(torch.device("cpu"), torch.device("cpu"))


def test_host_buffers_are_exact_size_and_reused_step_after_step():
    """Host copies live in one buffer per (block, saved tensor) of exactly the tensor's bytes
    (torch's pinned caching allocator rounds to a power of two), reused by the next step; a
    longer sequence grows them, a shorter one reuses them."""
    model = tiny_model(seed=3)[0]
    apply_activation_checkpointing(model, "full")
    off = apply_activation_offload(model, torch.device("cpu"), force=True, min_bytes=0)
    assert off is not None
    _grads(model, batch(7))
    first = {k: (b.data_ptr(), b.numel()) for k, b in off.pool.buffers.items()}
    per_step = off.offloaded_bytes
    assert off.pool.nbytes == per_step  # exact sizes: nothing rounded up
    _grads(model, batch(8))
    assert {k: (b.data_ptr(), b.numel()) for k, b in off.pool.buffers.items()} == first
    assert off.offloaded_bytes == 2 * per_step
    _grads(model, batch(9, t=48))  # twice the tokens: buffers grow
    assert off.pool.nbytes == off.offloaded_bytes - 2 * per_step > per_step
    grown = off.pool.nbytes
    _grads(model, batch(9, t=24))  # shorter again: the grown buffers serve it
    assert off.pool.nbytes == grown


def test_a_tensor_every_block_receives_is_offloaded_once():
    """The RoPE tables go to every block: the first block's copy is the only one; later blocks
    keep theirs on the device (alive there until backward anyway). Under full checkpointing a
    step offloads each block's input [B, T, D] plus one copy of the tables."""
    model = tiny_model(seed=3)[0]
    apply_activation_checkpointing(model, "full")
    off = apply_activation_offload(model, torch.device("cpu"), force=True, min_bytes=0)
    data = batch(7)
    _grads(model, data)
    b, t = data["input_ids"].shape
    inputs = len(model.layers) * b * t * model.cfg.dim * 4  # fp32 block inputs
    rope = 2 * b * t * model.cfg.head_dim * 4  # cos and sin [B, T, hd], fp32, once
    assert off.offloaded_bytes == inputs + rope
    assert len(off.stashes[0].host) == 3 and all(len(s.host) == 1 for s in off.stashes[1:])


def test_a_new_tensor_at_a_freed_tensors_address_is_still_offloaded():
    """A block's activations die after its forward, and the allocator may hand their address
    to the next block's tensor of the same shape, which then has the same storage key: only a
    tensor that is still alive counts as shared. Forced here with two views of one storage."""
    from tunesmith.parallel.offload import ActivationOffloader

    off = ActivationOffloader(torch.device("cpu"), min_bytes=0, force=True)
    w = torch.randn(64, 64, requires_grad=True)
    base = torch.randn(64 * 64)

    def block(x):
        view = base.view(64, 64)  # a new tensor object each call, same (ptr, offset, shape, stride)
        return (view * w * x).sum()  # saves the view; it dies when the block returns

    first, second = off.wrap(block, first=True), off.wrap(block)
    x = torch.randn(64, 64)
    loss = first(x) + second(x)
    assert [len(s.host) for s in off.stashes] == [2, 1]  # view + (view * w) once; view again (x is shared)
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * base.view(64, 64) * x)
