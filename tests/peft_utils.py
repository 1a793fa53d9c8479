"""Helpers shared by the PEFT tests: tiny Llama models, random batches, a few training steps."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import RunConfig
from tunesmith.models import (
    build_model,
    init_random,
    load_pretrained,
    resolve_model_config,
    save_pretrained,
)
from tunesmith.optim import build_optimizer, build_scheduler
from tunesmith.runtime import resolve_runtime
from tunesmith.train.trainer import Trainer

VOCAB = 128
# Untied (like Llama 3 8B) with GQA; widths are not NF4-friendly on purpose (see QLORA_SHAPE).
TINY = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
            max_position_embeddings=512, tie_word_embeddings=False)
# Every linear weight holds a multiple of 64 * 256 elements, as NF4 requires.
QLORA_SHAPE = dict(TINY, dim=128, n_kv_heads=4, intermediate_size=256, tie_word_embeddings=True)


def tiny_model(seed: int = 0, **overrides):
    """(model, family, cfg): a randomly initialised fp32 tiny Llama on CPU, O(1) activations."""
    family, cfg = resolve_model_config("tiny", {**TINY, **overrides})
    model = build_model(family, cfg, device="meta")
    init_random(model, "cpu", torch.float32, seed)
    with torch.no_grad():  # larger weights than the training init, so parity tests see real signal
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(seed + len(name)))
    return model, family, cfg


def save_base(tmp: Path, seed: int = 0, **overrides) -> Path:
    model, family, cfg = tiny_model(seed, **overrides)
    out = tmp / f"base{seed}"
    save_pretrained(model, family, cfg, out)
    return out


def load_ours(path: Path, dtype: torch.dtype = torch.float32):
    family, cfg = resolve_model_config(str(path))
    model = build_model(family, cfg, device="meta")
    load_pretrained(model, str(path), "cpu", dtype)
    return model, family, cfg


def ids(batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def batch(seed: int, b: int = 4, t: int = 24) -> dict[str, torch.Tensor]:
    x = ids(b, t, seed)
    labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
    return {"input_ids": x, "labels": labels}


def make_trainer(model: nn.Module, lr: float = 1e-2, weight_decay: float = 0.1, steps: int = 100) -> Trainer:
    """The production Trainer/optimizer on CPU fp32, fed batches by hand via train_step."""
    cfg = RunConfig.model_validate({
        "data": {"path": "x"}, "train": {"precision": "fp32"},
        "optim": {"lr": lr, "weight_decay": weight_decay}, "schedule": {"name": "constant"},
    })
    rt = resolve_runtime("cpu", "fp32")
    opt = build_optimizer(model, cfg.optim, rt.device)
    return Trainer(cfg=cfg, rt=rt, model=model, optimizer=opt,
                   scheduler=build_scheduler(opt, cfg.schedule, steps, steps), train_loader=None,
                   val_loader=None, out_dir=Path("."), total_steps=steps, steps_per_epoch=steps,
                   flops_per_token=1.0, peak_tflops=None)


def train_steps(trainer: Trainer, n: int, start_seed: int = 100, vary: bool = True) -> list[float]:
    """n optimizer steps on random batches (vary=False: the same batch, so the loss must fall)."""
    return [trainer.train_step([batch(start_seed + i * vary)])[0].item() for i in range(n)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def compile_or_skip() -> None:
    """Skip (with the reason) where torch.compile cannot build CPU kernels, e.g. no C++ compiler."""
    import pytest

    try:
        torch.compile(lambda t: t.sin() + 1)(torch.ones(4))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.compile does not work on this CPU: {type(e).__name__}: {str(e)[:200]}")


@dataclass
class NF4BackwardWatch:
    """What the last step of `watch_nf4_backward` showed: tensors autograd saved for backward
    (shape, dtype; parameters and NF4 storage left out), NF4 dequantisations made (`calls`), the
    most dense copies alive at once (`peak`) and those still alive after backward (`live`)."""

    saved: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    calls: int = 0
    peak: int = 0
    live: int = 0


def watch_nf4_backward(model: nn.Module, monkeypatch, rt, make_ids, steps: int = 2) -> NF4BackwardWatch:
    """Run `steps` forward + backward passes of `model(make_ids())` under rt's autocast (step 0
    compiles compiled blocks; the last is the steady state), counting the live dense copies of
    `quant._dequant` (freed when the op drops them) and recording what is saved for backward."""
    from tunesmith.peft import quant

    params = {p.untyped_storage().data_ptr() for p in model.parameters() if not quant.is_nf4(p)}
    watch = NF4BackwardWatch()
    dequant = quant._dequant

    def counted(*args):
        w = dequant(*args)
        watch.live += 1
        watch.calls += 1
        watch.peak = max(watch.peak, watch.live)
        weakref.finalize(w, lambda: setattr(watch, "live", watch.live - 1))
        return w

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not quant.is_nf4(t) and t.untyped_storage().data_ptr() not in params:
            watch.saved.append((tuple(t.shape), t.dtype))
        return t

    monkeypatch.setattr(quant, "_dequant", counted)
    for _ in range(steps):
        watch.saved.clear()
        watch.calls = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), rt.autocast():
            loss = model(make_ids()).float().square().mean()
        loss.backward()
    return watch
