"""PEFT-format adapters: `adapter_config.json` + `adapter_model.safetensors`.

What we write loads with `peft.PeftModel.from_pretrained(<transformers model>, dir)`, and
adapters peft wrote load into our model. Tensor names are peft's:

    base_model.model.<HF module path>.lora_A.weight        A [r, in]
    base_model.model.<HF module path>.lora_B.weight        B [out, r]
    base_model.model.<HF module path>.lora_magnitude_vector m [out]    (DoRA)

LoRA on stacked MoE expert weights (`target_parameters` in adapter_config.json) is stored as
peft's ParamWrapper stores it: A [E*r, in] and B [out, r*E] under the experts module's HF path,
one `.base_layer` deeper per nesting level (`peft.targets.peft_expert_groups`).

HF module paths come from the family's state-dict adapter, so any family with one works.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tunesmith.checkpoint import load_weights_file, process_rank
from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.parallel.loading import copy_full_into
from tunesmith.peft.experts import ExpertLoRA, LoRAExperts, expert_lora_modules
from tunesmith.peft.lora import LoRALinear, LoRASpec
from tunesmith.peft.targets import (
    Candidate,
    ExpertTarget,
    KeyAdapter,
    expert_candidates,
    hf_module_name,
    linear_candidates,
    native_module_name,
    peft_expert_groups,
    peft_target_modules,
    peft_target_parameters,
    select_expert_targets,
)
from tunesmith.peft.transform import apply_lora, lora_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
# our LoRALinear attribute -> peft's tensor suffix
_TO_PEFT = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_FROM_PEFT = {v: k for k, v in _TO_PEFT.items()}
_KEY_RE = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
# adapter_config.json keys whose non-default values change the math in ways we do not implement
_UNSUPPORTED = {
    "bias": "none", "fan_in_fan_out": False, "lora_bias": False, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "use_qalora": False,
    "trainable_token_indices": None,
}
_WRITTEN_DEFAULTS = ("bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern")


# ---------------------------------------------------------------------------- save
def _single_spec(mods: dict[str, LoRALinear | LoRAExperts]) -> LoRASpec:
    specs = {m.spec for m in mods.values()}
    if len(specs) != 1:
        raise TunesmithError(f"PEFT format needs one r/alpha for all layers; the model has {len(specs)}")
    return specs.pop()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A host copy of the whole tensor (sharded: gathered, a collective)."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().to("cpu").contiguous()


def expert_targets_in(model: nn.Module, adapter: KeyAdapter) -> list[ExpertTarget]:
    """The expert weights that carry a LoRA in `model`."""
    return [t for t in expert_candidates(model, adapter)
            if isinstance(m := model.get_submodule(t.module), LoRAExperts) and t.weight in m.lora]


def adapter_state_dict(model: nn.Module, adapter: KeyAdapter) -> dict[str, torch.Tensor]:
    """peft key -> host tensor, for every adapter tensor in the model."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in lora_modules(model).items():
        hf = hf_module_name(adapter, name)
        for local, t in mod.adapter_parameters().items():
            out[f"{PREFIX}{hf}.{_TO_PEFT[local]}"] = _full(t)
    for group, t in peft_expert_groups(expert_targets_in(model, adapter)).items():
        lora = model.get_submodule(t.module).lora[t.weight]
        for local, v in ExpertLoRA.to_peft(_full(lora.lora_A), _full(lora.lora_B)).items():
            out[f"{PREFIX}{group}.{_TO_PEFT[local]}"] = v
    return out


def adapter_config(model: nn.Module, adapter: KeyAdapter, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json contents (peft LoraConfig fields) describing this model's adapters."""
    mods = lora_modules(model)
    experts = expert_lora_modules(model)
    if not mods and not experts:
        raise TunesmithError("the model has no LoRA adapters to save")
    spec = _single_spec({**mods, **experts})
    cands = linear_candidates(model, adapter)
    chosen = [c for c in cands if c.native in mods]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora, "use_dora": spec.dora,
        "target_modules": peft_target_modules(chosen, cands),
        "init_lora_weights": True, "inference_mode": True, "revision": None,
        "layers_to_transform": None, "layers_pattern": None,
        # Only keys every peft since 0.9 knows: older releases reject unknown config keys.
        **{k: _UNSUPPORTED[k] for k in _WRITTEN_DEFAULTS},
    }
    if experts:  # peft >= 0.17 (ParamWrapper); written only when there are expert adapters
        cfg["target_parameters"] = peft_target_parameters(expert_targets_in(model, adapter),
                                                          expert_candidates(model, adapter))
    return cfg


def save_adapter(model: nn.Module, adapter: KeyAdapter, out_dir: str | Path, *, base_model: str | None = None,
                 tokenizer: Any = None) -> Path:
    """Write a PEFT-format adapter dir atomically (temp dir renamed into place)."""
    cfg = adapter_config(model, adapter, base_model)
    tensors = adapter_state_dict(model, adapter)  # every rank: gathering shards is collective
    return write_adapter_dir(out_dir, tensors, cfg, tokenizer)


def write_adapter_dir(out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any],
                      tokenizer: Any = None) -> Path:
    """adapter_model.safetensors + adapter_config.json (+ tokenizer) into `out_dir`, atomically;
    rank 0 writes, other ranks return at once (their part, gathering the tensors, is done)."""
    from safetensors.torch import save_file

    if process_rank() != 0:
        return Path(out_dir)
    with hfio.atomic_output_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        hfio.write_json(tmp / ADAPTER_CONFIG, cfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


# ---------------------------------------------------------------------------- read
@dataclass
class AdapterFiles:
    """A PEFT adapter as read from disk: its spec and tensors grouped by HF module path."""

    path: Path
    spec: LoRASpec
    tensors: dict[str, dict[str, torch.Tensor]]  # hf module -> {lora_A, lora_B[, lora_magnitude]}
    config: dict[str, Any]


def _check_supported(cfg: dict[str, Any], where: Path) -> None:
    if cfg.get("peft_type") == "ADAPTION_PROMPT":
        raise TunesmithError(f"{where} is a Llama-Adapter (peft_type ADAPTION_PROMPT): use it with "
                             "peft.method=llama_adapter; its prompt cannot be merged into the weights")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise TunesmithError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    for key, default in _UNSUPPORTED.items():
        value = cfg.get(key, default)
        plain = value in ("none", None) if default == "none" else value in (default, None, {}, [], False)
        if not plain:
            raise TunesmithError(f"{where}: {key}={value!r} is not supported by tunesmith adapters")


def _spec_from_config(cfg: dict[str, Any], where: Path) -> LoRASpec:
    try:
        return LoRASpec(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                        dropout=float(cfg.get("lora_dropout") or 0.0),
                        rslora=bool(cfg.get("use_rslora", False)), dora=bool(cfg.get("use_dora", False)))
    except KeyError as e:
        raise TunesmithError(f"{where}: adapter_config.json lacks {e.args[0]!r}") from None
    except TunesmithError as e:
        raise TunesmithError(f"{where}: {e}") from None


def weights_file(d: Path) -> Path:
    for name in (ADAPTER_WEIGHTS, ADAPTER_BIN):
        if (d / name).is_file():
            return d / name
    raise TunesmithError(f"PEFT adapter {d} has no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN})")


def _group(raw: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in raw.items():
        m = _KEY_RE.match(key.removeprefix(PREFIX))
        if m is None:
            unknown.append(key)
            continue
        groups.setdefault(m.group(1), {})[_FROM_PEFT[m.group(2)]] = t
    if unknown:
        raise TunesmithError(f"{where}: tensors tunesmith cannot load: {', '.join(sorted(unknown)[:3])}")
    if not groups:
        raise TunesmithError(f"{where}: the adapter holds no LoRA tensors")
    return groups


def read_adapter(path: str | Path) -> AdapterFiles:
    """Read and validate a PEFT-format adapter directory."""
    d = Path(path).expanduser()
    if not (d / ADAPTER_CONFIG).is_file():
        raise TunesmithError(f"{d} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    cfg = hfio.read_json(d / ADAPTER_CONFIG)
    _check_supported(cfg, d)
    spec = _spec_from_config(cfg, d)
    groups = _group(load_weights_file(weights_file(d)), d)
    return AdapterFiles(d, spec, groups, cfg)


# ---------------------------------------------------------------------------- load
def _expected_shapes(mod: nn.Module, spec: LoRASpec) -> dict[str, tuple[int, ...]]:
    out_f, in_f = mod.weight.shape
    shapes = {"lora_A": (spec.r, in_f), "lora_B": (out_f, spec.r)}
    if spec.dora:
        shapes["lora_magnitude"] = (out_f,)
    return shapes


def _plan_experts(model: nn.Module, adapter: KeyAdapter, files: AdapterFiles,
                  problems: list[str]) -> dict[str, ExpertTarget]:
    """{peft group name: expert weight} the adapter's `target_parameters` selects in `model`,
    with every expected tensor present and shaped right (else a line in `problems`)."""
    names = files.config.get("target_parameters") or []
    if not names:
        return {}
    try:
        groups = peft_expert_groups(select_expert_targets(model, adapter, names))
    except TunesmithError as e:
        problems.append(str(e))
        return {}
    for group, t in groups.items():
        n_exp, out_f, in_f = model.get_submodule(t.module).weight_shape(t.weight)  # [E, out, in] (NF4 too)
        r = files.spec.r
        want = {"lora_A": (n_exp * r, in_f), "lora_B": (out_f, r * n_exp)}
        tensors = files.tensors.get(group, {})
        if set(tensors) != set(want):
            problems.append(f"{group} ({t.hf}) has {sorted(tensors)}, expected {sorted(want)}")
        for local, shape in want.items():
            if local in tensors and tuple(tensors[local].shape) != shape:
                problems.append(f"{group}.{_TO_PEFT[local]} is {list(tensors[local].shape)}, the "
                                f"model needs {list(shape)}")
    return groups


def _plan(model: nn.Module, adapter: KeyAdapter, files: AdapterFiles) -> tuple[list[Candidate], list[ExpertTarget]]:
    """Map the adapter's modules (and expert weights) onto the model and check every shape
    before touching it."""
    cands = {c.native: c for c in linear_candidates(model, adapter)}
    chosen, problems = [], []
    experts = _plan_experts(model, adapter, files, problems)
    for hf, tensors in files.tensors.items():
        if hf in experts:
            continue
        native = native_module_name(adapter, hf)
        if native is None or native not in cands:
            problems.append(f"it targets {hf}, which the base model does not have")
            continue
        want = _expected_shapes(model.get_submodule(native), files.spec)
        if set(tensors) != set(want):
            problems.append(f"{hf} has {sorted(tensors)}, expected {sorted(want)}")
        for local, shape in want.items():
            got = tuple(tensors[local].shape) if local in tensors else None
            if got is not None and got != shape:
                problems.append(f"{hf}.{_TO_PEFT[local]} is {list(got)}, the model needs {list(shape)}")
        chosen.append(cands[native])
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TunesmithError(f"adapter {files.path} does not match the base model: {problems[0]}{more}")
    return chosen, list(experts.values())


@torch.no_grad()
def load_adapter(model: nn.Module, adapter: KeyAdapter, path: str | Path, *,
                 adapter_dtype: torch.dtype = torch.float32, values: bool = True) -> AdapterFiles:
    """Give `model` the adapters stored at `path` (frozen base, trainable adapters).

    values=False only adds the adapter layers (a meta-device model about to be sharded);
    `copy_adapter_values` fills them once the shards exist."""
    files = read_adapter(path)
    chosen, experts = _plan(model, adapter, files)
    apply_lora(model, adapter, files.spec, chosen, adapter_dtype=adapter_dtype, parameters=experts)
    if values:
        copy_adapter_values(model, adapter, files)
    return files


@torch.no_grad()
def copy_adapter_values(model: nn.Module, adapter: KeyAdapter, files: AdapterFiles) -> None:
    """Copy the adapter tensors of `files` into the model's (possibly sharded) adapters."""
    by_hf = {hf_module_name(adapter, name): mod for name, mod in lora_modules(model).items()}
    experts = peft_expert_groups(expert_targets_in(model, adapter))
    for hf, tensors in files.tensors.items():
        if hf in experts:
            t = experts[hf]
            lora = model.get_submodule(t.module).lora[t.weight]
            ours = ExpertLoRA.from_peft(tensors["lora_A"], tensors["lora_B"], lora.lora_A.shape[0])
            for local, v in ours.items():
                copy_full_into(getattr(lora, local), v)
            continue
        mod = by_hf[hf]
        for local, t in tensors.items():
            copy_full_into(getattr(mod, local), t)
