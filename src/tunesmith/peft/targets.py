"""Which linear layers get adapters: names, HF aliases, `all-linear` and regexes.

Every candidate is known by two full names: ours (`layers.0.attention.wq`) and the HF one
derived from the family's state-dict adapter (`model.layers.0.self_attn.q_proj`), so recipes
written for peft (`q_proj`, `down_proj`) work unchanged and nothing here is Llama-specific.

Matching rules (peft's, extended to both name spaces):
  * a list entry matches a module whose full name equals it or ends with "." + entry;
  * a single string is a regex that must match a whole full name (`re.fullmatch`);
  * `all-linear` is every linear layer except the LM head.

Stacked MoE expert weights are parameters, not linear layers: `target_modules` never selects
them (as in peft); `target_parameters` does, with the same list rule on parameter names
(`experts.w13` / `experts.gate_up_proj`, `w2` / `down_proj`, or full paths).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.models.registry import get_family
from tunesmith.peft.float8 import Float8FrozenLinear
from tunesmith.peft.lora import LoRALinear, NF4Linear


class KeyAdapter(Protocol):
    """What we need from a family's state-dict adapter: parameter names both ways."""

    def native_key_to_hf(self, key: str) -> str | None: ...

    def hf_key_to_native(self, key: str) -> str | None: ...


ALL_LINEAR = "all-linear"
_WEIGHT = ".weight"
# Linear layers as they may already have been transformed (QLoRA quantises before LoRA wraps).
_LINEAR_TYPES = (nn.Linear, NF4Linear, Float8FrozenLinear, LoRALinear)


@dataclass(frozen=True)
class Candidate:
    """One linear layer that could take an adapter."""

    native: str  # module path in our model, e.g. layers.3.feed_forward.w2
    hf: str  # module path in the HF model, e.g. model.layers.3.mlp.down_proj
    block: int | None  # transformer block index, None outside the blocks

    @property
    def short_names(self) -> tuple[str, str]:
        return self.native.rsplit(".", 1)[-1], self.hf.rsplit(".", 1)[-1]


def _block_index(native: str) -> int | None:
    m = re.match(r"^layers\.(\d+)\.", native)
    return int(m.group(1)) if m else None


def hf_module_name(adapter: KeyAdapter, native_module: str) -> str | None:
    """HF module path for a native module path, via the family's parameter-name mapping."""
    hf_key = adapter.native_key_to_hf(native_module + _WEIGHT)
    if hf_key is None or not hf_key.endswith(_WEIGHT):
        return None
    return hf_key[: -len(_WEIGHT)]


def native_module_name(adapter: KeyAdapter, hf_module: str) -> str | None:
    """Native module path for a HF module path; None when the family does not know it."""
    try:
        native = adapter.hf_key_to_native(hf_module + _WEIGHT)
    except TunesmithError:
        return None
    if native is None or not native.endswith(_WEIGHT):
        return None
    return native[: -len(_WEIGHT)]


def head_names(model: nn.Module) -> set[str]:
    """Module paths of the LM head (excluded from all-linear and from targeting)."""
    head = getattr(model, "output", None)
    return {name for name, mod in model.named_modules() if head is not None and mod is head}


def linear_candidates(model: nn.Module, adapter: KeyAdapter) -> list[Candidate]:
    """Every linear layer outside the LM head, in module order."""
    heads = head_names(model)
    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _LINEAR_TYPES) or name in heads:
            continue
        hf = hf_module_name(adapter, name)
        if hf is None:
            continue
        out.append(Candidate(name, hf, _block_index(name)))
    return out


@dataclass(frozen=True)
class ExpertTarget:
    """One stacked expert weight that could take a per-expert LoRA."""

    native: str  # parameter path in our model, e.g. layers.0.feed_forward.experts.w13
    hf: str  # transformers 5 parameter path, e.g. model.layers.0.mlp.experts.gate_up_proj
    block: int | None

    @property
    def module(self) -> str:
        return self.native.rsplit(".", 1)[0]

    @property
    def weight(self) -> str:
        return self.native.rsplit(".", 1)[1]

    @property
    def short_names(self) -> tuple[str, str]:
        return self.weight, self.hf.rsplit(".", 1)[-1]


def expert_candidates(model: nn.Module, adapter: KeyAdapter) -> list[ExpertTarget]:
    """Every stacked expert weight (MoE family), in module order, w13 before w2."""
    from tunesmith.models.moe.model import Experts

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, Experts):
            for w in ("w13", "w2"):
                hf = adapter.native_key_to_hf(f"{name}.{w}")
                if hf is not None:
                    out.append(ExpertTarget(f"{name}.{w}", hf, _block_index(name)))
    return out


def select_expert_targets(model: nn.Module, adapter: KeyAdapter, entries: Sequence[str]) -> list[ExpertTarget]:
    """The expert weights named by `peft.target_parameters` (peft's list rule, both name
    spaces); a clear error for entries that match nothing."""
    cands = expert_candidates(model, adapter)
    if not cands:
        raise TunesmithError(f"peft.target_parameters {list(entries)}: {type(model).__name__} has no "
                             "stacked expert weights (only the MoE family, Mixtral / Qwen3-MoE, has)")
    unmatched = [e for e in entries if not any(_list_match(e, c) for c in cands)]
    if unmatched:
        raise TunesmithError(f"peft.target_parameters {unmatched} match no expert weight; candidates: "
                             f"{candidate_names(cands, all_linear=False)} (or e.g. experts.gate_up_proj)")
    return [c for c in cands if any(_list_match(e, c) for e in entries)]


def peft_target_parameters(chosen: Sequence[ExpertTarget], all_cands: Sequence[ExpertTarget]) -> list[str]:
    """`target_parameters` for adapter_config.json that selects exactly `chosen` in peft (which
    matches a list entry as a full parameter name or its dotted suffix): `experts.<HF name>`
    when that picks exactly this set, else the full HF paths."""
    shorts = {c.short_names[1] for c in chosen}
    order = [s for s in ("gate_up_proj", "down_proj") if s in shorts]
    if {c.hf for c in all_cands if c.short_names[1] in shorts} == {c.hf for c in chosen}:
        return [f"experts.{s}" for s in order]
    return [c.hf for c in chosen]


def peft_expert_groups(targets: Sequence[ExpertTarget]) -> dict[str, ExpertTarget]:
    """HF module path under which peft stores each targeted expert weight's lora_A / lora_B.

    peft wraps one parameter per `ParamWrapper` and nests the wrappers of one module in the
    order of its parameters (gate_up_proj, then down_proj): the last targeted one is outermost
    (`...mlp.experts.lora_A.weight`), each earlier one sits one `.base_layer` deeper
    (both targeted: gate_up_proj's are `...mlp.experts.base_layer.lora_A.weight`)."""
    by_module: dict[str, list[ExpertTarget]] = {}
    for t in targets:
        by_module.setdefault(t.hf.rsplit(".", 1)[0], []).append(t)
    out = {}
    for hf_module, ts in by_module.items():
        ts = sorted(ts, key=lambda t: ("w13", "w2").index(t.weight))
        for k, t in enumerate(ts):
            out[hf_module + ".base_layer" * (len(ts) - 1 - k)] = t
    return out


def _list_match(entry: str, cand: Candidate | ExpertTarget) -> bool:
    return any(full == entry or full.endswith("." + entry) for full in (cand.native, cand.hf))


def _regex_match(pattern: re.Pattern[str], cand: Candidate) -> bool:
    return any(pattern.fullmatch(full) for full in (cand.native, cand.hf))


def candidate_names(cands: Sequence[Candidate | ExpertTarget], all_linear: bool = True) -> str:
    """The short names a user can write, for error messages."""
    native = sorted({c.short_names[0] for c in cands})
    hf = sorted({c.short_names[1] for c in cands})
    return ", ".join([*native, *hf, *([ALL_LINEAR] if all_linear else [])])


def select_targets(model: nn.Module, adapter: KeyAdapter, targets: str | Sequence[str]) -> list[Candidate]:
    """The candidates named by `targets`; a clear error for names that match nothing."""
    cands = linear_candidates(model, adapter)
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise TunesmithError(f"peft.target_modules regex {targets!r} is invalid: {e}") from None
        chosen = [c for c in cands if _regex_match(pattern, c)]
        if not chosen:
            raise TunesmithError(
                f"peft.target_modules regex {targets!r} matches no linear layer (it must match a "
                f"whole name such as {cands[0].native} or {cands[0].hf}); candidates: "
                f"{candidate_names(cands)}"
            )
        return chosen
    entries = [targets] if isinstance(targets, str) else list(targets)
    if ALL_LINEAR in entries:
        return cands
    _check_head(model, entries)
    unmatched = [e for e in entries if not any(_list_match(e, c) for c in cands)]
    if unmatched:
        note = _lora_note(model)
        raise TunesmithError(
            f"peft.target_modules {unmatched} match no linear layer; candidates: "
            f"{candidate_names(cands)}" + (f" ({note})" if note else "")
        )
    return [c for c in cands if any(_list_match(e, c) for e in entries)]


def _lora_note(model: nn.Module) -> str | None:
    """The model family's word on weights LoRA does not adapt (None for most families)."""
    cfg = getattr(model, "cfg", None)
    try:
        return get_family(cfg.model_type).lora_note if cfg is not None else None
    except TunesmithError:
        return None


def _check_head(model: nn.Module, entries: Sequence[str]) -> None:
    # The fused loss reads `output.weight` directly, so an adapter there would be ignored.
    for e in entries:
        if e in head_names(model) or e == "lm_head":
            raise TunesmithError(
                f"peft.target_modules: LoRA on the LM head ({e!r}) is not supported; the loss "
                "uses the head weight directly (train it with peft.method=none instead)"
            )


def peft_target_modules(chosen: Sequence[Candidate], all_cands: Sequence[Candidate]) -> list[str] | str:
    """`target_modules` for adapter_config.json that selects exactly `chosen` in peft.

    Short HF names when they pick exactly this set (the usual case), otherwise an anchored
    regex listing the HF module paths (e.g. adapters only on some blocks).
    """
    shorts = sorted({c.short_names[1] for c in chosen})
    by_short = {c.hf for c in all_cands if c.short_names[1] in shorts}
    if by_short == {c.hf for c in chosen}:
        return shorts
    return "^(?:" + "|".join(re.escape(c.hf) for c in chosen) + ")$"
