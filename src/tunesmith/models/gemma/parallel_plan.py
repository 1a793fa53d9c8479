"""Tensor-parallel plan for Gemma 3: the Llama family's plan (tunesmith.models.llama.parallel_plan)
plus the two norms Gemma puts after its sublayers.

The blocks use Llama's submodule names and Attention.forward signature, so its styles apply
unchanged (embedding rowwise, q/k/v and gate/up colwise, o and down rowwise reduce-scattered to
[B, T/tp, D], q_norm/k_norm over the local heads). `post_attention_norm` and `post_ffn_norm`
read those sequence-sharded outputs: SequenceParallel, handing a local tensor back so the
residual add stays on plain [B, T/tp, D] tensors as in Llama. The sliding window needs
nothing: it masks keys, and every rank holds the whole sequence inside attention.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel

from tunesmith.models.llama.parallel_plan import block_plan as llama_block_plan
from tunesmith.models.llama.parallel_plan import check_tp_shape, top_plan

__all__ = ["block_plan", "check_tp_shape", "top_plan"]


def block_plan(block: nn.Module | None = None) -> dict[str, ParallelStyle]:
    """Plan for one GemmaBlock (keys relative to the block)."""
    plan = llama_block_plan(block)
    for name in ("post_attention_norm", "post_ffn_norm"):
        plan[name] = SequenceParallel(use_local_output=True)
    return plan
