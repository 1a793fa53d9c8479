"""The assembly pipeline: a run config in, a runnable model and optimizer out, in one order.

    runtime -> spec -> processes -> build_on_meta -> adapt -> parallelize -> materialize
            -> quantize -> fill_adapters -> optimizer

The order is the same for one process and for N: the model is always built on the meta device,
transformed there (nothing allocated), parallelised, and only then given memory and values. One
process is the N-process path with a world of one (no mesh: no TP, no FSDP; AC and compile
still apply). Each step is a function of `Assembly` below, with a docstring saying why it sits
where it does; `STEPS` is the order. A new transform is one new step inserted in `STEPS`
(see docs/architecture.md for where float8, QLoRA shards and context parallelism go).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.build.spec import ModelSpec, resolve_model, resolve_spec
from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.models.io import build_model, weights_dir
from tunesmith.optim import build_optimizer
from tunesmith.parallel.apply import parallelize as parallelize_model
from tunesmith.parallel.apply import parallelize_frozen
from tunesmith.parallel.dist import ParallelContext, init_parallel
from tunesmith.parallel.layout import check_run, env_world, resolve_layout
from tunesmith.parallel.loading import materialize as materialize_model
from tunesmith.peft import apply_peft, check_peft_layout, fill_peft, quantize_peft_base
from tunesmith.runtime import Runtime, resolve_runtime, seed_everything
from tunesmith.transforms.float8 import check_float8_device

log = logging.getLogger("tunesmith")


@dataclass
class Assembly:
    """What the steps build, filled in step by step (a step reads only what earlier ones set).

    `base_names` are the model's own tensor names right after `build_on_meta`; tensors that
    structural transforms add (LoRA A/B, DoRA magnitudes) are the difference, which the weight
    source does not hold and `fill_adapters` gives values instead.
    """

    cfg: RunConfig
    with_tokenizer: bool = True  # False: synthetic token ids (benchmarks), no tokenizer loaded
    rt: Runtime | None = None
    spec: ModelSpec | None = None
    ctx: ParallelContext | None = None
    model: nn.Module | None = None
    base_names: frozenset[str] = frozenset()
    optimizer: torch.optim.Optimizer | None = None

    def need(self, name: str):  # -> the field's value, never None
        value = getattr(self, name)
        if value is None:
            raise TunesmithError(f"assembly: step order broken, {name} is not built yet")
        return value

    @property
    def added_names(self) -> frozenset[str]:
        """Tensors the structural transforms added (not in the base checkpoint)."""
        return frozenset(self.need("model").state_dict()) - self.base_names


# ---------------------------------------------------------------------------- the steps
def runtime(a: Assembly) -> None:
    """Device and precision, first: every later step allocates on this device in these dtypes,
    and a bad device/precision is the cheapest thing to refuse."""
    a.rt = resolve_runtime(a.cfg.train.device, a.cfg.train.precision)
    check_float8_device(a.cfg, a.rt.device)  # float8 needs SM >= 8.9: refuse before any work


def spec(a: Assembly) -> None:
    """Model family + config (resolved once), the weight source and the tokenizer. Before the
    process group: the layout checks need the model's shape, and a bad model name or
    tokenizer then exits 2 on every rank at once instead of after a rendezvous."""
    a.spec = resolve_spec(a.cfg, with_tokenizer=a.with_tokenizer)


def processes(a: Assembly) -> None:
    """Layout checked against world, model and data (no communication), then the process
    group and device mesh (world of one: no group, no mesh); the runtime moves to this rank's
    GPU. Seeds are set here, after the group exists and before anything draws random numbers."""
    cfg, rt, s = a.cfg, a.need("rt"), a.need("spec")
    world, local_world = env_world()
    layout = resolve_layout(cfg.parallel, world, local_world)
    check_run(cfg, layout, s.model_cfg, rt.device.type)
    check_peft_layout(cfg.peft, s.family, s.model_cfg, layout.fsdp_shard)  # NF4 rows split evenly
    a.ctx = init_parallel(cfg.parallel, rt.device, layout)
    a.rt = dataclasses.replace(rt, device=a.ctx.device)
    seed_everything(cfg.train.seed)


def build_on_meta(a: Assembly) -> None:
    """The bare model on the meta device, cast to the parameter dtype (metadata only). Nothing
    is allocated yet, so every transform below is free and no rank ever holds a full copy."""
    s = a.need("spec")
    model = build_model(s.family, s.model_cfg, device="meta")
    model.to(dtype=a.need("rt").param_dtype)
    if a.cfg.train.residual_dtype == "bf16":
        if not hasattr(model, "residual_dtype"):
            raise TunesmithError(f"train.residual_dtype=bf16: supported for the native "
                                 f"Llama-family and Gemma 3 models, not {s.family.name!r}")
        if a.need("rt").autocast_dtype == torch.bfloat16:  # CPU runs fp32: nothing to cast
            model.residual_dtype = torch.bfloat16
    a.model, a.base_names = model, frozenset(model.state_dict())


def adapt(a: Assembly) -> None:
    """Structural transforms on meta (PEFT: freezing, LoRA / DoRA layers, frozen tensors stored
    in the base dtype, QLoRA's NF4 storage). Before parallelize: FSDP2 shards the parameters
    that exist when it runs (NF4 codes and scales included), and compile/AC must wrap the final
    modules. Values come later: `materialize` quantises each NF4 weight as it fills it."""
    s = a.need("spec")
    apply_peft(a.need("model"), a.cfg.peft, a.need("rt"), s.family, s.model_cfg, on_meta=True)


def parallelize(a: Assembly) -> None:
    """float8 -> TP -> CP -> activation checkpointing -> activation offload -> compile -> FSDP2/DDP
    (`tunesmith.parallel.apply`), still on meta: placements are decided before memory exists,
    so materialize allocates only this rank's shards."""
    parallelize_model(a.need("model"), a.cfg, a.need("ctx"), a.need("rt"))


def materialize(a: Assembly) -> None:
    """Allocate (local shards only) and give the model its values: the pretrained weights
    streamed tensor by tensor from `model.name`, or a seeded init identical in any layout.
    Tensors the transforms added are skipped; `fill_adapters` sets them next."""
    s, model, rt = a.need("spec"), a.need("model"), a.need("rt")
    mc = a.cfg.model
    if s.pretrained and s.family.load_fn is not None:  # the family loads through transformers
        s.family.load_fn(model, weights_dir(s.source), rt.device, rt.param_dtype)
        return
    materialize_model(model, a.need("ctx"), rt, family=s.family, model_cfg=s.model_cfg,
                      source=s.source if s.pretrained else None, seed=a.cfg.train.seed,
                      allow_pickle=mc.allow_unsafe_pickle, offload=a.cfg.parallel.cpu_offload,
                      skip=a.added_names)


def quantize(a: Assembly) -> None:
    """Base storage formats that need the loaded values: float8 e4m3 with row scales
    (`peft.base_dtype=float8`, one process), and NF4 for a family loaded through transformers
    (one process). One layer at a time, so the peak is the dense model plus one matrix. Before
    fill_adapters: DoRA's initial magnitude is the norm of the weight the model really uses.
    (Every other QLoRA base already holds NF4 values: `adapt` made the structure on meta and
    `materialize` quantised each weight, whole, into this rank's shard.)"""
    s = a.need("spec")
    quantize_peft_base(a.need("model"), a.cfg.peft, s.family, s.model_cfg)


def fill_adapters(a: Assembly) -> None:
    """The added tensors' values: a seeded adapter init (identical in any layout) or the
    adapter of `peft.from_checkpoint`. After materialize: shards exist to copy into, and
    DoRA's initial magnitude is read from the loaded base."""
    s = a.need("spec")
    fill_peft(a.need("model"), a.cfg.peft, s.family, s.model_cfg, a.cfg.train.seed, loaded=False)


def optimizer(a: Assembly) -> None:
    """Last: the optimizer must see the final parameters (trainable set after PEFT, sharded
    DTensors after FSDP2, host tensors under CPU offload, where it steps on the host)."""
    device = torch.device("cpu") if a.cfg.parallel.cpu_offload else a.need("rt").device
    a.optimizer = build_optimizer(a.need("model"), a.cfg.optim, device)


Step = Callable[[Assembly], None]
STEPS: tuple[Step, ...] = (
    runtime, spec, processes, build_on_meta, adapt, parallelize, materialize, quantize,
    fill_adapters, optimizer,
)


def build_reference(a: Assembly) -> nn.Module:
    """A frozen copy of the pretrained model `a` was assembled from, for forward passes only
    (task=dpo's reference policy of a full fine-tune): built on meta from the same spec, in the
    compute dtype, parallelised as a frozen model (sharded like the policy under FSDP2), its
    values streamed from `model.name`. Never the resumed weights, so a resumed run compares with
    the same reference as an uninterrupted one. Call it on every rank."""
    rt = a.need("rt")
    ref = Assembly(a.cfg, with_tokenizer=False, rt=dataclasses.replace(rt, param_dtype=rt.compute_dtype),
                   spec=a.need("spec"), ctx=a.need("ctx"))
    build_on_meta(ref)
    parallelize_frozen(ref.need("model"), a.cfg, ref.need("ctx"), ref.need("rt"))
    materialize(ref)
    model = ref.need("model")
    model.requires_grad_(False)
    return model.eval()


def assemble(cfg: RunConfig, *, steps: tuple[Step, ...] = STEPS, until: str | None = None,
             with_tokenizer: bool = True) -> Assembly:
    """Run `steps` in order on a fresh `Assembly`; `until` stops after the named step."""
    a = Assembly(cfg, with_tokenizer=with_tokenizer)
    for step in steps:
        step(a)
        if step.__name__ == until:
            break
    return a


__all__ = ["STEPS", "Assembly", "ModelSpec", "assemble", "build_reference", "resolve_model"]
