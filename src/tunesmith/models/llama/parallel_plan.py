"""Tensor-parallel plan for the Llama family (Megatron-style, with sequence parallelism).

Lives beside the model because it names the model's submodules; it is applied from outside
(`tunesmith.parallel.tp`) so `model.py` itself stays single-device code.

Activations between sublayers are sharded on the sequence dim, Shard(1): [B, T/tp, D].

    tok_embeddings   RowwiseParallel: the table is split by vocab rows (Shard(0) of [V, D]);
                     each rank looks up its rows, the partial sums are reduce-scattered to
                     [B, T/tp, D].
    *_norm, norm     SequenceParallel: RMSNorm runs on the local [B, T/tp, D] slice.
    attention        inputs all-gathered to [B, T, D]; wq/wk/wv ColwiseParallel (local heads:
                     [B, T, H/tp * hd]); wo RowwiseParallel, reduce-scattered to [B, T/tp, D].
                     Qwen3's q_norm/k_norm: SequenceParallel over the head dim (local heads).
    feed_forward     same pattern: w1/w3 colwise, w2 rowwise.
    output           ColwiseParallel (Shard(0) of [V, D], local vocab slice). Only used for
                     full logits (eval/generate); training takes the sharded weight straight
                     into the vocab-parallel fused cross-entropy (tunesmith.objective.loss).

Tied embeddings work: both tok_embeddings (rowwise on nn.Embedding) and output (colwise on
nn.Linear) shard the shared [V, D] matrix on dim 0, so one DTensor serves both.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)


def _sublayer_input() -> PrepareModuleInput:
    # Attention.forward(x, cos, sin, attn, cache, layer_idx): only x is sharded; cos/sin are
    # computed per rank from the (replicated) positions, the rest are not tensors.
    return PrepareModuleInput(
        input_layouts=(Shard(1), None, None, None, None, None),
        desired_input_layouts=(Replicate(), None, None, None, None, None),
        use_local_output=True,
    )


def block_plan(block: nn.Module | None = None) -> dict[str, ParallelStyle]:
    """Plan for one TransformerBlock (keys relative to the block). Qwen3's q_norm / k_norm
    [hd] run on the local heads, [B, T, H/tp, hd]: SequenceParallel over the head dim (2)
    keeps their weights Replicate, so each weight's gradient, a partial sum over this rank's
    heads, is reduced over the TP group like the sequence-parallel norms'."""
    plan = {
        "attention_norm": SequenceParallel(),
        "attention": _sublayer_input(),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        "feed_forward.w3": ColwiseParallel(),
    }
    if block is not None and hasattr(block.attention, "q_norm"):
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def top_plan() -> dict[str, ParallelStyle]:
    """Plan for the modules outside the blocks (keys relative to the model)."""
    return {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        # Full logits [B, T, V] on every rank when the head is called as a module.
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


def check_tp_shape(model: nn.Module, tp: int) -> None:
    """The plan shards whole heads and equal MLP slices; the caller validates divisibility."""
    cfg = model.cfg  # type: ignore[attr-defined]
    for name in ("n_heads", "n_kv_heads", "intermediate_size"):
        if int(getattr(cfg, name)) % tp:
            raise ValueError(f"tp={tp} does not divide {name}={getattr(cfg, name)}")
