"""Transforms applied to a built model from outside (like torchtitan's parallelize_*).

    apply_freezing(model, ...)        requires_grad=False on chosen blocks / embeddings
    apply_lora(model, adapter, ...)   swap targeted nn.Linear for LoRALinear (and MoE experts for
                                      LoRAExperts: peft's target_parameters), freeze the base
    quantize_base(model, ...)         QLoRA: every block linear's weight (and MoE expert stack) to NF4
    float8_base(model, ...)           peft.base_dtype=float8: block linear weights to float8 e4m3
    merge_lora(model)                 fold adapters back into plain nn.Linear layers

The model's own code is untouched; module paths and base parameter names stay the same, so
compile/FSDP/activation checkpointing and HF save/load keep working on the transformed model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from tunesmith.checkpoint import ModelState
from tunesmith.errors import TunesmithError
from tunesmith.parallel.loading import copy_full_into
from tunesmith.peft import float8, quant
from tunesmith.peft.adaption import AdaptedAttention
from tunesmith.models.moe.model import Experts
from tunesmith.peft.experts import WEIGHTS, ExpertLoRA, LoRAExperts, check_expert_spec, init_a
from tunesmith.peft.lora import LoRALinear, LoRASpec, NF4Linear
from tunesmith.peft.quant_experts import NF4Experts, lora_experts_class, quantize_experts
from tunesmith.peft.targets import (
    Candidate,
    ExpertTarget,
    KeyAdapter,
    linear_candidates,
    select_expert_targets,
    select_targets,
)

log = logging.getLogger("tunesmith")


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _n_blocks(model: nn.Module) -> int:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TunesmithError(f"{type(model).__name__} has no `layers` list of transformer blocks")
    return len(layers)


def frozen_block_set(model: nn.Module, freeze_layers: Iterable[int], num_freeze_layers: int) -> set[int]:
    """Block indices to freeze: the listed ones plus the first `num_freeze_layers`."""
    n = _n_blocks(model)
    chosen = set(freeze_layers) | set(range(num_freeze_layers))
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise TunesmithError(f"peft freezing: block indices {bad} out of range; the model has {n} blocks (0..{n - 1})")
    return chosen


def apply_freezing(model: nn.Module, blocks: set[int], freeze_embeddings: bool) -> int:
    """Freeze whole blocks and/or the input embedding (a tied LM head is the same tensor).

    Returns the number of parameters frozen.
    """
    frozen: list[nn.Parameter] = []
    layers = model.layers  # type: ignore[attr-defined]
    for i in sorted(blocks):
        frozen.extend(layers[i].parameters())
    if freeze_embeddings:
        frozen.append(model.tok_embeddings.weight)  # type: ignore[attr-defined]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in {id(p): p for p in frozen}.values())


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen floating-point tensor in `dtype`, in place (Parameter identity kept,
    so tied weights stay tied). NF4 and float8 weights are left alone."""
    for p in model.parameters():
        if (not p.requires_grad and p.is_floating_point() and p.dtype != dtype and not quant.is_nf4(p)
                and not float8.is_float8(p)):
            p.data = p.data.to(dtype)


def _quantized_targets(model: nn.Module, adapter: KeyAdapter) -> list[Candidate]:
    """The linear layers QLoRA stores in NF4 and are not yet: every block linear (never the
    LM head), plain or already wrapped by LoRA."""
    return [c for c in linear_candidates(model, adapter)
            if isinstance(model.get_submodule(c.native), (nn.Linear, LoRALinear))
            and not quant.is_nf4(model.get_submodule(c.native).weight)]


def _quantized_experts(model: nn.Module) -> dict[str, Experts]:
    """The MoE experts QLoRA stores in NF4 and are not yet (plain or with LoRA), by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts) and not isinstance(m, NF4Experts)}


def check_nf4_shards(model: nn.Module, adapter: KeyAdapter, shards: int) -> None:
    """Raise now when some NF4 weight cannot be split over `shards` FSDP2 ranks (works on a
    meta-device model, so it runs before any process group exists). Expert stacks [E, out, in]
    are stored as [E*out, in] (`peft.quant_experts`) and split by those rows."""
    weights = [(c.native, model.get_submodule(c.native).weight) for c in _quantized_targets(model, adapter)]
    weights += [(f"{path}.{n}", getattr(m, n)) for path, m in _quantized_experts(model).items() for n in WEIGHTS]
    for name, weight in weights:
        quant.check_quantizable(name, weight)
        if shards > 1:
            quant.check_shardable(name, (weight.shape[0] * weight.shape[1], weight.shape[-1])
                                  if weight.dim() == 3 else tuple(weight.shape), shards)


def quantize_base(model: nn.Module, adapter: KeyAdapter) -> int:
    """QLoRA: store every block linear weight (all-linear; never the LM head) and every MoE
    expert stack in NF4 (the router stays in the base dtype, like the norms).

    Either before `apply_lora`, which then wraps the NF4 layers, or after it (the assembly
    pipeline adds adapters on meta and quantises once the loaded values exist): a LoRA layer's
    base weight is then quantised in place. DoRA magnitudes are (re)computed by
    `init_adapters` from the dequantised weight the model really uses. One layer at a time, so peak memory is the
    dense model plus one bf16 matrix. Returns the number of layers quantised.
    """
    quant.require_nf4()
    check_nf4_shards(model, adapter, 1)
    cands = _quantized_targets(model, adapter)
    for c in cands:
        lin = model.get_submodule(c.native)
        if isinstance(lin, LoRALinear):  # adapters added first (the assembly order): keep them
            lin.weight = nn.Parameter(quant.to_nf4(lin.weight), requires_grad=False)
            lin.quantized = True
        else:
            _set_module(model, c.native, NF4Linear(quant.to_nf4(lin.weight), lin.bias))  # frees the dense copy
    experts = _quantized_experts(model)
    for path, mod in experts.items():  # one layer's stacks at a time, LoRA kept (QLoRAExperts)
        _set_module(model, path, quantize_experts(mod))
    return len(cands) + len(experts) * len(WEIGHTS)


def float8_base(model: nn.Module, adapter: KeyAdapter) -> tuple[int, list[str]]:
    """Store every block linear weight (all-linear; never the LM head) in float8 e4m3 with fixed
    per-row scales, one layer at a time; run before `apply_lora`, which wraps these layers.
    Layers whose dims are not multiples of 16 (the float8 GEMM's rule) stay dense; returns
    (layers quantised, names of those left dense)."""
    from tunesmith.peft.float8 import Float8FrozenLinear

    done, dense = 0, []
    for c in linear_candidates(model, adapter):
        lin = model.get_submodule(c.native)
        lora = isinstance(lin, LoRALinear) and not lin.quantized and not lin.float8
        if type(lin) is not nn.Linear and not lora:
            continue
        if not float8.quantizable(lin.weight):
            dense.append(c.native)
            continue
        if lora:  # adapters added first (the assembly order): quantise the base in place
            w8, scale = float8.quantize_rows(lin.weight.detach())
            lin.weight = nn.Parameter(w8, requires_grad=False)
            lin.weight_scale, lin.float8 = scale, True
        else:
            _set_module(model, c.native, Float8FrozenLinear.from_linear(lin))  # frees the dense copy
        done += 1
    return done, dense


def apply_lora(
    model: nn.Module,
    adapter: KeyAdapter,
    spec: LoRASpec,
    targets: str | Sequence[str] | Sequence[Candidate],
    *,
    adapter_dtype: torch.dtype = torch.float32,
    skip_blocks: set[int] = frozenset(),
    parameters: Sequence[str] | Sequence[ExpertTarget] = (),
) -> list[Candidate | ExpertTarget]:
    """Freeze the whole model, then give each targeted linear layer a trainable adapter, and
    each targeted stacked expert weight (`parameters`: peft's target_parameters) a per-expert one.

    `adapter` is the family's state-dict adapter (for HF names); `targets` is what the config
    says (names / all-linear / regex) or an explicit candidate list; `parameters` likewise
    (names, or an explicit `ExpertTarget` list). Blocks in `skip_blocks` (frozen by the user)
    get no adapter. Returns the candidates and expert weights that were wrapped.
    """
    if targets and isinstance(targets, (list, tuple)) and isinstance(targets[0], Candidate):
        chosen = list(targets)
    else:
        chosen = select_targets(model, adapter, targets) if targets else []  # type: ignore[arg-type]
    experts: list[ExpertTarget] = []
    if parameters:
        check_expert_spec(spec)
        experts = (list(parameters) if isinstance(parameters[0], ExpertTarget)  # type: ignore[misc]
                   else select_expert_targets(model, adapter, parameters))  # type: ignore[arg-type]
    chosen = [c for c in chosen if c.block not in skip_blocks]
    experts = [t for t in experts if t.block not in skip_blocks]
    if not chosen and not experts:
        raise TunesmithError("peft: every targeted layer is in a frozen block; nothing to train")
    freeze_all(model)
    for c in chosen:
        mod = model.get_submodule(c.native)
        if isinstance(mod, LoRALinear):
            raise TunesmithError(f"peft: {c.native} already has an adapter")
        _set_module(model, c.native, LoRALinear.from_linear(mod, spec, adapter_dtype))
    by_module: dict[str, list[str]] = {}
    for t in experts:
        by_module.setdefault(t.module, []).append(t.weight)
    for path, names in by_module.items():
        mod = model.get_submodule(path)
        if isinstance(mod, LoRAExperts):
            raise TunesmithError(f"peft: {path} already has an adapter")
        _set_module(model, path, lora_experts_class(mod)(mod, spec, tuple(names), adapter_dtype))
    return [*chosen, *experts]


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """(Re)initialise every adapter from `seed` the way `LoRALinear` does (as peft: A
    kaiming-uniform(a=sqrt(5)), B zeros, DoRA magnitude = ||W|| per row). Each full tensor is
    drawn on the host in module order and copied into the (possibly sharded) parameter, so
    one process and any sharded layout start from identical adapters. Collective when
    sharded: every rank."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            a = torch.empty(tuple(mod.lora_A.shape))  # [r, in]
            copy_full_into(mod.lora_A, nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen))
            copy_full_into(mod.lora_B, torch.zeros(tuple(mod.lora_B.shape)))
            if mod.lora_magnitude is not None:
                copy_full_into(mod.lora_magnitude, mod.base_row_norm())
        elif isinstance(mod, ExpertLoRA):
            n_exp, r, in_f = mod.lora_A.shape  # [E, r, in]
            copy_full_into(mod.lora_A, init_a(n_exp, r, in_f, gen))
            copy_full_into(mod.lora_B, torch.zeros(tuple(mod.lora_B.shape)))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_peft_model(model: nn.Module) -> bool:
    """True when the model carries LoRA/DoRA adapters or Llama-Adapter prompts (its
    checkpoints hold only adapters; its final save is a PEFT adapter)."""
    return any(isinstance(m, (LoRALinear, LoRAExperts, AdaptedAttention)) for m in model.modules())


def has_frozen_params(model: nn.Module) -> bool:
    """True when some parameters are frozen (LoRA, QLoRA or layer freezing)."""
    return any(not p.requires_grad for p in model.parameters())


def checkpoint_model_state(model: nn.Module) -> ModelState:
    """The `ModelState` a trainer should checkpoint: only trainable tensors when anything is
    frozen (the frozen base is reloaded from model.name on resume), else everything."""
    return ModelState(model, trainable_only=has_frozen_params(model))


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every LoRALinear (and NF4Linear / Float8FrozenLinear) with a plain nn.Linear
    holding the folded weight, and every LoRAExperts with plain experts holding W + s B A, in
    place; the merge is computed in fp32 and stored in `dtype` (default: the base weight's
    dtype, bf16 for NF4 and float8). Returns the number of adapted layers / expert weights merged."""
    from tunesmith.peft.float8 import Float8FrozenLinear

    merged = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALinear):
            _set_module(model, name, mod.to_linear(dtype))
            merged += 1
        elif isinstance(mod, LoRAExperts):
            _set_module(model, name, mod.to_experts(dtype))
            merged += len(mod.lora)
        elif isinstance(mod, (NF4Linear, Float8FrozenLinear)):
            _set_module(model, name, mod.to_linear(dtype))
        elif isinstance(mod, NF4Experts):
            _set_module(model, name, mod.to_experts(dtype))
    return merged


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameter counts."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
