"""Import a DeepSpeed JSON config: map what has a PyTorch-native equivalent, say what does not.

    zero_optimization.stage 0          -> parallel.strategy = no_shard (DDP)
    zero_optimization.stage 1, 2       -> shard_grad_op (params stay gathered forward->backward)
    zero_optimization.stage 3          -> full_shard
    offload_optimizer/offload_param cpu -> parallel.cpu_offload = true
    train_micro_batch_size_per_gpu     -> train.micro_batch_size
    gradient_accumulation_steps        -> train.grad_accum_steps
    gradient_clipping                  -> train.max_grad_norm
    bf16.enabled / fp16.enabled        -> train.precision
    optimizer AdamW/Adam params        -> optim.lr, betas, eps, weight_decay

A value the recipe (or command line) sets explicitly wins over the JSON and is reported as
kept. Tuning knobs with no counterpart (bucket sizes, overlap_comm, ...) are listed as ignored.
Features that would silently change the run (NVMe offload, pipeline/MoE sections, ...) are
refused with a TunesmithError.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.schema import RunConfig
from tunesmith.errors import TunesmithError

log = logging.getLogger("tunesmith")

_STAGE_TO_STRATEGY = {0: "no_shard", 1: "shard_grad_op", 2: "shard_grad_op", 3: "full_shard"}
# Sections whose presence means the run would not be the one DeepSpeed describes.
_REFUSED_SECTIONS = {
    "pipeline": "pipeline parallelism",
    "moe": "mixture-of-experts parallelism",
    "sparse_attention": "DeepSpeed sparse attention",
    "compression_training": "DeepSpeed compression",
    "amp": "apex AMP",
}
_ZERO_IGNORED = {
    "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
    "allgather_partitions", "reduce_scatter", "round_robin_gradients", "sub_group_size",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "elastic_checkpoint",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "memory_efficient_linear", "load_from_fp32_weights", "ignore_unused_parameters",
}


@dataclass
class DeepSpeedImport:
    """Dotted config updates plus human-readable notes on what was mapped / ignored."""

    updates: dict[str, Any] = field(default_factory=dict)
    mapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any, source: str) -> None:
        self.updates[key] = value
        self.mapped.append(f"{source} -> {key}={value}")


def _is_auto(value: Any) -> bool:
    # HF Trainer's DeepSpeed templates use "auto" for "fill in from the trainer's args".
    return isinstance(value, str) and value.lower() == "auto"


def read_deepspeed(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TunesmithError(f"parallel.deepspeed_config: {p} not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TunesmithError(f"parallel.deepspeed_config: {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TunesmithError(f"parallel.deepspeed_config: {p} must hold a JSON object")
    return data


def _offload_device(zero: dict[str, Any], key: str) -> str | None:
    section = zero.get(key)
    if not isinstance(section, dict):
        return None
    device = str(section.get("device", "none")).lower()
    if device == "nvme":
        raise TunesmithError(
            f"DeepSpeed zero_optimization.{key}.device=nvme has no PyTorch-native equivalent; "
            "use cpu offload (parallel.cpu_offload) or more GPUs"
        )
    return device if device != "none" else None


def _map_zero(zero: Any, out: DeepSpeedImport) -> None:
    if not isinstance(zero, dict):
        raise TunesmithError("DeepSpeed zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in _STAGE_TO_STRATEGY:
        raise TunesmithError(f"DeepSpeed zero_optimization.stage={stage!r} is not 0, 1, 2 or 3")
    out.set("parallel.strategy", _STAGE_TO_STRATEGY[stage], f"zero_optimization.stage={stage}")
    opt_dev = _offload_device(zero, "offload_optimizer")
    param_dev = _offload_device(zero, "offload_param")
    if opt_dev or param_dev:
        if stage == 0:
            raise TunesmithError("DeepSpeed offload needs ZeRO stage >= 1 (a sharded strategy)")
        # FSDP2 offloads params, grads and optimizer state together; DeepSpeed can split them.
        which = "+".join(k for k, d in (("offload_optimizer", opt_dev), ("offload_param", param_dev)) if d)
        out.set("parallel.cpu_offload", True, f"zero_optimization.{which}=cpu")
    for key in sorted(set(zero) - {"stage", "offload_optimizer", "offload_param"}):
        note = "no counterpart" if key in _ZERO_IGNORED else "unknown to tunesmith"
        out.ignored.append(f"zero_optimization.{key} ({note})")


def _map_precision(ds: dict[str, Any], out: DeepSpeedImport) -> None:
    bf16 = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False))
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    if bf16 and fp16:
        raise TunesmithError("DeepSpeed config enables both bf16 and fp16")
    if bf16:
        out.set("train.precision", "bf16", "bf16.enabled")
    elif fp16:
        raise TunesmithError(
            "DeepSpeed fp16.enabled: fp16 loss scaling is not supported across ranks; use bf16"
        )


def _map_optimizer(opt: Any, out: DeepSpeedImport) -> None:
    if not isinstance(opt, dict):
        return
    kind = str(opt.get("type", "")).lower()
    if kind not in ("adamw", "adam"):
        out.ignored.append(f"optimizer.type={opt.get('type')} (only AdamW is mapped)")
        return
    params = opt.get("params") or {}
    for ds_key, key in (("lr", "optim.lr"), ("betas", "optim.betas"), ("eps", "optim.eps"),
                        ("weight_decay", "optim.weight_decay")):
        if ds_key in params and not _is_auto(params[ds_key]):
            value = params[ds_key]
            out.set(key, list(value) if isinstance(value, (list, tuple)) else value,
                    f"optimizer.params.{ds_key}")
    for k in sorted(set(params) - {"lr", "betas", "eps", "weight_decay"}):
        out.ignored.append(f"optimizer.params.{k}")


_SCALARS = {
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
}
_HANDLED = set(_SCALARS) | {"zero_optimization", "bf16", "bfloat16", "fp16", "optimizer"}


def map_deepspeed(ds: dict[str, Any]) -> DeepSpeedImport:
    """Translate a parsed DeepSpeed config; raise TunesmithError on unsupported features."""
    for key, what in _REFUSED_SECTIONS.items():
        section = ds.get(key)
        if section and not (isinstance(section, dict) and section.get("enabled") is False):
            raise TunesmithError(f"DeepSpeed '{key}' ({what}) is not supported by tunesmith")
    out = DeepSpeedImport()
    if "zero_optimization" in ds:
        _map_zero(ds["zero_optimization"], out)
    _map_precision(ds, out)
    _map_optimizer(ds.get("optimizer"), out)
    for ds_key, key in _SCALARS.items():
        value = ds.get(ds_key)
        if value is not None and not _is_auto(value):
            out.set(key, value, ds_key)
    for key in sorted(set(ds) - _HANDLED - set(_REFUSED_SECTIONS)):
        out.ignored.append(key)
    return out


def _explicit(cfg: RunConfig, dotted: str) -> bool:
    """True when `dotted` was set by the recipe or command line (not a default)."""
    section, name = dotted.split(".", 1)
    return name in getattr(cfg, section).model_fields_set


def apply_deepspeed(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` with `parallel.deepspeed_config` folded in (cfg itself when unset)."""
    path = cfg.parallel.deepspeed_config
    if not path:
        return cfg
    imported = map_deepspeed(read_deepspeed(path))
    data = cfg.model_dump()
    kept: list[str] = []
    for dotted, value in imported.updates.items():
        if _explicit(cfg, dotted):
            kept.append(f"{dotted}={getattr(getattr(cfg, dotted.split('.')[0]), dotted.split('.')[1])!r}")
            continue
        section, name = dotted.split(".", 1)
        data[section][name] = value
    try:
        new = RunConfig.model_validate(data)
    except ValueError as e:
        raise TunesmithError(f"parallel.deepspeed_config {path}: mapped values are invalid: {e}") from None
    _report(path, imported, kept)
    return new


def _report(path: str, imported: DeepSpeedImport, kept: list[str]) -> None:
    log.info("DeepSpeed config %s:", path)
    log.info("  mapped: %s", "; ".join(imported.mapped) or "nothing")
    if kept:
        log.info("  kept from the recipe (explicitly set): %s", "; ".join(kept))
    if imported.ignored:
        log.info("  ignored (no counterpart): %s", ", ".join(imported.ignored))
