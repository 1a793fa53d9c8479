"""Accelerator-specific flags from the guides (Gaudi/HPU, TPU/XLA SPMD) and their CUDA meaning.

Each either maps onto a tunesmith key, or is accepted with a one-line note saying why nothing
is needed here. The XLA profiler's PROFILE_* environment variables map onto `profile.*`.
"""

from __future__ import annotations

import os

from tunesmith.errors import TunesmithError
from tunesmith.frontends.flags import Flag, ParsedFlags
from tunesmith.frontends.recipe import Recipe, out_path

# Flags that need nothing on CUDA/CPU: name -> (kind, why).
_NOTHING_NEEDED: dict[str, tuple[object, str]] = {
    "use_habana": (bool, "not needed: tunesmith runs on CUDA or CPU (train.device=auto picks)"),
    "use_lazy_mode": (bool, "not needed: Gaudi graph mode; eager PyTorch here (train.compile "
                            "compiles each block)"),
    "gaudi_config_name": (str, "not needed: Gaudi mixed-precision/fused-op config; precision "
                               "comes from train.precision, fused AdamW is on by default on CUDA"),
    "use_hpu_graphs_for_inference": (bool, "not needed: evaluation runs eagerly on CUDA; "
                                           "generation uses a KV cache"),
    "use_hpu_graphs_for_training": (bool, "not needed: HPU graphs; train.compile is the CUDA "
                                          "counterpart"),
    "use_hpu_graphs": (bool, "not needed: HPU graphs"),
    "distribution_strategy": (str, "not needed: data parallelism is FSDP2/DDP (parallel.strategy)"),
    "pipelining_fwd_bwd": (bool, "not needed: HPU host/device pipelining"),
    "non_blocking_data_copy": (bool, "not needed: batches are copied with non_blocking on CUDA"),
    "adjust_throughput": (bool, "not needed: throughput already leaves out warm-up steps"),
    "use_compiled_autograd": (bool, "not needed: HPU compiled autograd"),
    "compile_dynamic": (bool, "not needed: blocks are compiled with static shapes"),
    "sdp_on_bf16": (bool, "not needed: SDPA runs in the autocast dtype"),
    "attn_softmax_bf16": (bool, "not needed: Gaudi softmax dtype"),
    "use_flash_attention": (bool, "not needed: SDPA picks flash/cuDNN attention on CUDA"),
    "flash_attention_recompute": (bool, "not needed: Gaudi flash attention option"),
    "flash_attention_causal_mask": (bool, "not needed: Gaudi flash attention option"),
    "use_fused_rope": (bool, "not needed: Gaudi fused RoPE"),
    "spmd_defer_init": (bool, "not needed: models are always built on the meta device and "
                              "weights streamed into their shards"),
    "spmd_debug": (bool, "not needed: use --debug for tracebacks, parallel.nccl_debug for NCCL"),
}

# XLA environment variables of the PyTorch/XLA guide.
_XLA_ENV = {
    "PJRT_DEVICE": "not needed: the device is CUDA or CPU (train.device)",
    "XLA_USE_BF16": "not needed: precision comes from --bf16 / --torch_dtype (train.precision)",
    "XLA_IR_DEBUG": "not needed: XLA IR debug info",
    "XLA_HLO_DEBUG": "not needed: XLA HLO debug info",
}
_XLA_PROFILE = ("PROFILE_EPOCH", "PROFILE_STEP", "PROFILE_DURATION_MS", "PROFILE_LOGDIR")
_XLA_TRACED_STEPS = 3  # PROFILE_DURATION_MS is wall time; traces here cover whole steps


def accel_flags() -> list[Flag]:
    flags = [Flag(name, kind, None if kind is not bool else False, why)
             for name, (kind, why) in _NOTHING_NEEDED.items()]
    flags += [
        Flag("spmd_fsdp_sharding", bool, False, "FSDP over all devices -> parallel.strategy="
             "full_shard"),
        Flag("spmd_2d_sharding", int, 0, "N: model axis of a 2-D mesh -> parallel.tp=N over an "
             "FSDP mesh"),
        Flag("spmd_grad_chkpt", bool, False, "-> parallel.activation_checkpointing=full"),
        Flag("spmd_dcn_parallelism", int, 1, "N slices data-parallel -> parallel.dp_replicate=N"),
    ]
    return flags


def apply_accel(flags: ParsedFlags, recipe: Recipe) -> None:
    """Map the accelerator flags that were given; note the rest."""
    for name, (_, why) in _NOTHING_NEEDED.items():
        if flags.has(name):
            recipe.note(f"--{name}", why)
    if flags["spmd_fsdp_sharding"] and flags["spmd_2d_sharding"]:
        raise TunesmithError("--spmd_fsdp_sharding and --spmd_2d_sharding exclude each other "
                             "(as in the SPMD guide)")
    if flags["spmd_fsdp_sharding"]:
        recipe.set("parallel.strategy", "full_shard")
        recipe.note("--spmd_fsdp_sharding", "FSDP2 over all ranks (parallel.strategy=full_shard)")
    if flags["spmd_2d_sharding"]:
        tp = flags["spmd_2d_sharding"]
        recipe.set("parallel.strategy", "full_shard")
        if tp > 1:
            recipe.set("parallel.tp", tp)
        recipe.note("--spmd_2d_sharding", f"a model axis of {tp}: tensor parallel {tp} "
                    "(parallel.tp) inside an FSDP2 mesh over the remaining ranks")
    if flags["spmd_grad_chkpt"]:
        recipe.set("parallel.activation_checkpointing", "full")
    if flags["spmd_dcn_parallelism"] > 1:
        # Slices replicate, devices of a slice shard: HSDP (full_shard forbids replication).
        recipe.set("parallel.strategy", "hybrid_shard")
        recipe.set("parallel.dp_replicate", flags["spmd_dcn_parallelism"])
        recipe.note("--spmd_dcn_parallelism", "replicated data-parallel degree "
                    "(parallel.dp_replicate; shards within each replica, HSDP)")
    for var, why in _XLA_ENV.items():
        if var in os.environ:
            recipe.note(var, why)
    _xla_profile(recipe)


def _env_int(var: str) -> int:
    try:
        return int(os.environ[var])
    except ValueError:
        raise TunesmithError(f"{var}={os.environ[var]!r}: expected an integer") from None


def _xla_profile(recipe: Recipe) -> None:
    """The PyTorch/XLA guide's PROFILE_* variables -> profile.steps / profile.dir.

    XLA traces from its 0-based step PROFILE_STEP of epoch PROFILE_EPOCH for PROFILE_DURATION_MS
    of wall time; the torch profiler traces whole optimizer steps, counted 1-based over the
    run."""
    given = [v for v in _XLA_PROFILE if v in os.environ]
    if not given:
        return
    if "PROFILE_STEP" not in os.environ:
        recipe.note(", ".join(given), "nothing is traced without PROFILE_STEP (as with XLA)")
        return
    step, epoch = _env_int("PROFILE_STEP"), _env_int("PROFILE_EPOCH") if "PROFILE_EPOCH" in os.environ else 0
    if step < 0 or epoch != 0:
        raise TunesmithError(f"PROFILE_EPOCH={epoch} PROFILE_STEP={step}: only epoch 0 and a step "
                             ">= 0 map to profile.steps (optimizer steps counted over the run); "
                             "set profile.steps in the printed recipe instead")
    start = step + 1
    recipe.set("profile.steps", [start, start + _XLA_TRACED_STEPS - 1])
    recipe.note("PROFILE_STEP", f"profile.steps=[{start}, {start + _XLA_TRACED_STEPS - 1}]: the "
                "torch profiler's Chrome-trace JSON instead of an XLA trace (steps counted from 1)")
    if "PROFILE_DURATION_MS" in os.environ:
        _env_int("PROFILE_DURATION_MS")
        recipe.note("PROFILE_DURATION_MS", f"traces cover whole steps: {_XLA_TRACED_STEPS} steps "
                    "(widen profile.steps for more)")
    if os.environ.get("PROFILE_LOGDIR"):
        recipe.set("profile.dir", out_path(os.environ["PROFILE_LOGDIR"]))
