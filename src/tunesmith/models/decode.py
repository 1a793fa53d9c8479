"""Static-shape decoding: a KV cache whose tensors never change shape, and a decode step that
runs eagerly or replays a captured CUDA graph (HF/optimum's `--use_hpu_graphs_for_inference`).

A CUDA graph replays fixed kernels on fixed addresses, so one decode step must not depend on
the step number through Python. Here every step has the same shapes: the new token's k/v are
written at slot `cache.slot` (a device tensor) with `index_copy_`, attention spans the whole
cache buffer [B, H, max_len, hd] with a key mask [B, max_len] (1 = a prompt token or an already
generated one; 0 = left padding or a slot not written yet), and positions arrive as a tensor.
The prompt (prefill) runs once, eagerly, on the ordinary growing-prefix path.
"""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.models.attention import AttnSpec
from tunesmith.models.kv_cache import StaticKVCache


class DecodeStep:
    """logits [B, V] fp32 of one new token per row over a `StaticKVCache`.

    The step reads only static buffers: `token` [B, 1], `positions` [B, 1], `key_mask`
    [B, max_len] and `cache.slot`. `__call__` fills them (outside the graph) and runs the
    model: eagerly, or, with `use_graph`, by replaying a CUDA graph captured on the first call.
    """

    def __init__(self, model: nn.Module, cache: StaticKVCache, key_mask: torch.Tensor,
                 use_graph: bool) -> None:
        b = key_mask.shape[0]
        dev = key_mask.device
        self.model, self.cache, self.key_mask = model, cache, key_mask
        self.token = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        # A model whose step syncs with the host (the MoE family's per-expert loop) cannot be
        # captured; it says so with `graph_safe_decode()` and then runs eagerly.
        safe = getattr(model, "graph_safe_decode", None)
        self.use_graph = use_graph and dev.type == "cuda" and (safe is None or safe())
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer [B, V]

    def _forward(self) -> torch.Tensor:
        hidden = self.model(self.token, positions=self.positions,
                            attn=AttnSpec.keys(self.key_mask), cache=self.cache,
                            return_hidden=True)  # [B, 1, D]
        return self.model.output(hidden[:, -1]).float()  # [B, V]

    def _graph_autocast(self) -> torch.autocast:
        """The caller's autocast, without its weight-cast cache: cached casts made outside the
        capture would be freed when the caller's autocast region ends, under a live graph."""
        on = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if on else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype, enabled=on, cache_enabled=False)

    def _capture(self) -> None:
        # Warm-up on a side stream (lazy inits, cuBLAS/SDPA workspaces) as torch.cuda.graphs
        # asks, then capture. Both rerun the first step on its real inputs: writing the same
        # k/v at the same slot again is idempotent.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._graph_autocast():
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self._graph_autocast():
            self.logits = self._forward()

    def __call__(self, token: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """token, positions [B, 1]; slot: cache index the token is written to."""
        self.token.copy_(token)
        self.positions.copy_(positions)
        self.key_mask[:, slot] = True  # the new token sees itself and everything before
        self.cache.slot.fill_(slot)
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            self._capture()  # records only: the replay below runs it
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits
