"""Native Mixture-of-Experts decoder (Mixtral, Qwen3-MoE), numerically matching HF transformers.

The Llama family's decoder (`models.llama.model.Llama`: embedding, attention, RoPE, norms, KV
cache) with sparse MLP blocks. Submodule names, as for Llama except the sparse MLP:

    layers[i].feed_forward             SparseMoE (or the dense FeedForward on Qwen3-MoE's
                                       dense layers: HF mlp.gate_proj/up_proj/down_proj)
        .router.weight                 [E, D]      HF mlp.gate.weight (Mixtral hub: block_sparse_moe.gate)
        .experts.w13                   [E, 2I, D]  gate rows then up rows of every expert
                                                   (HF 5 mlp.experts.gate_up_proj; hub: experts.{e}.w1/w3
                                                   or gate_proj/up_proj)
        .experts.w2                    [E, D, I]   (HF 5 mlp.experts.down_proj; hub: experts.{e}.w2 / down_proj)

Experts are 3-D parameters, one per layer, so FSDP2 shards them like any weight, the CUDA path
runs every expert in one grouped GEMM, and the adapter stacks the hub's per-expert tensors on
load (and splits them on save). The router is a plain module (not `nn.Linear`), as in HF 5, so
LoRA and float8 leave it alone. LoRA reaches the experts only when asked (peft.target_parameters,
as peft's): `peft.experts.LoRAExperts` replaces `experts` from outside and adds its update through
the two projection hooks `expert_linear` / `grouped_linear`.

Routing (HF): logits = x @ router^T; softmax in fp32; top-k; renormalised to sum to 1 (Mixtral
always, Qwen3-MoE iff norm_topk_prob); Qwen3-MoE casts the weights back to the logits' dtype,
Mixtral keeps them fp32. Each token's output is sum_k weight_k * expert_k(x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.llama.model import FeedForward, Llama, TransformerBlock
from tunesmith.models.moe.config import MoEConfig

_BACKENDS = ("auto", "loop", "grouped")
_backend = "auto"  # process-wide expert kernel choice (tests compare the two)


def set_expert_backend(name: str) -> None:
    """auto (grouped GEMM on CUDA when available, else the per-expert loop), loop or grouped."""
    global _backend
    if name not in _BACKENDS:
        raise TunesmithError(f"unknown expert backend {name!r}; known: {', '.join(_BACKENDS)}")
    _backend = name


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor, shape: tuple[int, ...] | None = None) -> bool:
    """Whether experts with weights like `w` [E, out, in] (`shape`: its logical shape when the
    storage is laid out otherwise, e.g. NF4) take the grouped GEMM for inputs on x's device.
    torch._grouped_mm serves CUDA bf16 on Hopper and later (torch >= 2.8), with every row
    16-byte aligned (dims multiples of 8); its CPU kernel's backward is not usable, so CPU and
    other dtypes take the loop."""
    dtype = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else w.dtype)
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9
            and all(d % 8 == 0 for d in (shape or tuple(w.shape))[1:]))


class Router(nn.Module):
    """Top-k softmax router: x [N, D] -> (probs [N, E] fp32, weights [N, k], experts [N, k])."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.cast_weights = cfg.model_type == "qwen3_moe"  # HF Qwen3-MoE: back to logits' dtype
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.dim))  # [E, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [N, E], autocast dtype under autocast
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E] fp32
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [N, k] each
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.cast_weights:
            weights = weights.to(logits.dtype)
        return probs, weights, experts


class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D weights; each token runs through its top-k experts.

    Tokens are sorted by expert (a stable sort of the N*k assignments), so each expert reads a
    contiguous block of rows: one grouped GEMM per projection on CUDA, or a loop over the experts
    that received tokens (CPU, and as the reference). Outputs are weighted, put back in token
    order and summed over each token's k experts.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        e, d, i = cfg.num_experts, cfg.dim, cfg.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, d))  # [E, 2I, D]: gate rows, then up rows
        self.w2 = nn.Parameter(torch.empty(e, d, i))  # [E, D, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x [N, D], weights / experts [N, k] -> [N, D]."""
        n_exp, k = self.weight_shape("w13")[0], experts.shape[1]
        flat = experts.reshape(-1)  # [N*k]
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        # [E] tokens per expert; a fixed-shape scatter (bincount's size depends on the data,
        # which compile cannot trace)
        counts = torch.zeros(n_exp, dtype=flat.dtype, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        xs = x[order // k]  # [N*k, D]: the token of each sorted assignment
        ys = self._grouped(xs, counts) if self.use_grouped(x) else self._loop(xs, counts)  # [N*k, D]
        weighted = ys * weights.reshape(-1)[order, None]  # [N*k, D]; Mixtral: fp32 weights
        # Back to token-major order (a permutation: deterministic, unlike index_add's atomics on
        # CUDA), then each token's k outputs summed in the product's dtype and cast once, as
        # transformers' default (grouped_mm) experts path does.
        unsorted = torch.empty_like(weighted).index_copy_(0, order, weighted)
        return unsorted.view(x.shape[0], k, -1).sum(dim=1).to(x.dtype)

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """The logical shape of weight `name` ([E, 2I, D] / [E, D, I]); a transform that stores
        it in another layout (QLoRA's NF4: [E*out, in]) keeps it in `shapes`."""
        shapes = self.__dict__.get("shapes")
        return shapes[name] if shapes else tuple(getattr(self, name).shape)

    def use_grouped(self, x: torch.Tensor) -> bool:
        """Grouped GEMM (CUDA bf16, Hopper) or the per-expert loop, for inputs like x."""
        return _backend == "grouped" or (
            _backend == "auto" and grouped_mm_available(x, self.w2, self.weight_shape("w2")))

    def _loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs = []
        for e, rows in enumerate(xs.split(counts.tolist())):  # one host sync per layer
            if rows.shape[0]:
                gate, up = self.expert_linear("w13", rows, e).chunk(2, dim=-1)  # [n_e, I] each
                outs.append(self.expert_linear("w2", F.silu(gate) * up, e))  # [n_e, D]
        return torch.cat(outs) if outs else xs.new_zeros(0, self.weight_shape("w2")[1])

    def expert_param_names(self) -> list[str]:
        """Parameters whose first dim is the expert (what TP / EP split by expert); a subclass
        that adds per-expert tensors (LoRA on the experts) lists them too."""
        return ["w13", "w2"]

    def local_piece(self, name: str) -> torch.Tensor:
        """The parameter `name` as this process computes with it: all of it here; this rank's
        experts when TP / EP split them (models.moe.parallel_plan.ShardedExperts)."""
        return self.get_parameter(name)

    def expert_linear(self, name: str, rows: torch.Tensor, e: int) -> torch.Tensor:
        """rows [n_e, in] through expert e's weight `name` (w13 or w2) -> [n_e, out]. LoRA on
        the experts (peft.experts.LoRAExperts) adds its low-rank update here and in
        `grouped_linear`."""
        return F.linear(rows, getattr(self, name)[e])

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # _grouped_mm is not on autocast's lists: cast to the autocast dtype by hand.
        dtype = (torch.get_autocast_dtype(xs.device.type)
                 if torch.is_autocast_enabled(xs.device.type) else self.w13.dtype)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end row of each expert's block
        gate, up = self.grouped_linear("w13", xs.to(dtype), offs).chunk(2, dim=-1)  # [N*k, I] each
        return self.grouped_linear("w2", F.silu(gate) * up, offs)

    def grouped_linear(self, name: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """x [N*k, in], rows sorted by expert (expert e's block ends at row offs[e]), through
        each row's expert weight `name` in one grouped GEMM -> [N*k, out] in x's dtype."""
        return torch._grouped_mm(x, getattr(self, name).to(x.dtype).transpose(-2, -1), offs=offs)


class SparseMoE(nn.Module):
    """Router + experts on x [B, T, D]. With `keep_router_stats` (set from outside when the
    run adds the load-balancing loss) it keeps the last call's router probabilities [N, E] and
    chosen experts [N, k] in `router_stats`, for `MoE.router_aux_loss`."""

    keep_router_stats: bool = False

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.router_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        flat = x.reshape(-1, d)  # [N, D]
        probs, weights, experts = self.router(flat)
        if self.keep_router_stats:
            self.router_stats = (probs, experts)
        return self.experts(flat, weights, experts).view(b, t, d)


class MoE(Llama):
    """Mixtral / Qwen3-MoE causal LM: `Llama` with `SparseMoE` feed-forwards."""

    cfg: MoEConfig

    def make_block(self, cfg: MoEConfig, layer_id: int) -> nn.Module:  # type: ignore[override]
        ff = SparseMoE(cfg) if cfg.is_sparse(layer_id) else FeedForward(cfg)
        return TransformerBlock(cfg, layer_id, feed_forward=ff)

    @staticmethod
    def init_block(layer: nn.Module, std: float, out_std: float,
                   generator: torch.Generator | None) -> None:
        """Llama's block init; router and expert inputs N(0, std), expert outputs N(0, out_std)."""
        Llama.init_block(layer, std, out_std, generator)
        ff = layer.feed_forward
        if isinstance(ff, SparseMoE):
            nn.init.normal_(ff.router.weight, 0.0, std, generator=generator)
            nn.init.normal_(ff.experts.w13, 0.0, std, generator=generator)
            nn.init.normal_(ff.experts.w2, 0.0, out_std, generator=generator)

    def graph_safe_decode(self) -> bool:
        """True when a decode step can be captured as a CUDA graph: the experts take the
        grouped GEMM (no host sync), not the per-expert loop (which reads counts on the host)."""
        blocks = self.sparse_blocks()
        if not blocks or _backend == "grouped":
            return True
        experts = blocks[0].experts
        return _backend == "auto" and experts.use_grouped(torch.empty(0, device=experts.w2.device))

    def sparse_blocks(self) -> list[SparseMoE]:
        return [m for m in self.modules() if isinstance(m, SparseMoE)]

    def keep_router_stats(self, on: bool = True) -> None:
        """Make every sparse layer keep its routing of the next forwards (for the aux loss), or
        stop keeping it (what is kept stays until `router_aux_loss` reads it)."""
        for moe in self.sparse_blocks():
            moe.keep_router_stats = on

    def router_aux_loss(self, token_mask: torch.Tensor | None = None,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """HF's load-balancing loss (Switch Transformer eq. 4-6, as `load_balancing_loss_func`)
        over the last forward's tokens and sparse layers:

            E * sum_e f_e * P_e,  f_e = top-k picks of e / rows,  P_e = sum of probs of e / rows

        with picks and probabilities summed over all sparse layers before the product and rows =
        layers x counted tokens. token_mask [B, T] (1 = counted) leaves padding out. The kept
        routing is released (the loss's graph holds what backward needs).

        `reduce` (context parallelism: one sequence's tokens spread over a group of ranks) sums
        a tensor over the group. The counts (picks, rows) are then the group's, and this rank
        returns its share E * sum_e f_e * (this rank's prob sum of e) / rows: the shares add up
        over the group to the loss of the whole sequence, and each one carries the gradient of
        this rank's probabilities (f has none: it counts top-k picks)."""
        blocks = self.sparse_blocks()
        stats = [m.router_stats for m in blocks]
        if not stats or any(s is None for s in stats):
            raise TunesmithError("router_aux_loss: no routing recorded; call keep_router_stats() "
                                 "before the forward")
        for m in blocks:
            m.router_stats = None
        n_exp = self.cfg.num_experts
        picks = torch.zeros(n_exp, dtype=torch.float32, device=stats[0][0].device)  # type: ignore[index]
        prob_sum = torch.zeros_like(picks)
        rows = picks.new_zeros(())
        for probs, experts in stats:  # type: ignore[misc]
            w = (torch.ones(probs.shape[0], device=probs.device) if token_mask is None
                 else token_mask.reshape(-1).to(probs.device, torch.float32))  # [N]
            picks = picks.index_add(0, experts.reshape(-1), w.repeat_interleave(experts.shape[1]))
            prob_sum = prob_sum + (probs * w[:, None]).sum(0)
            rows = rows + w.sum()
        if reduce is not None:  # one collective for both counts: [E] picks, then rows
            counts = reduce(torch.cat([picks, rows.reshape(1)]))
            picks, rows = counts[:-1], counts[-1]
        return n_exp * torch.sum((picks / rows) * (prob_sum / rows))
