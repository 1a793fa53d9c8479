"""build/: the assembly order, and that it builds exactly what the direct calls build
(one process: load / init, then PEFT on the real model, then adapters)."""

from __future__ import annotations

import pytest
import torch

from tests.peft_utils import QLORA_SHAPE, save_base
from tunesmith.build import STEPS, assemble
from tunesmith.config import load_config
from tunesmith.models import build_model, init_random, load_pretrained, resolve_model_config
from tunesmith.peft import apply_peft, fill_peft, nf4_available
from tunesmith.peft import base_dtype as peft_base_dtype
from tunesmith.runtime import resolve_runtime


def _cfg(tok_dir, model: str, *extra: str):
    return load_config(None, [f"model.name={model}", f"model.tokenizer={tok_dir}", "data.path=x",
                              "train.precision=fp32", "train.device=cpu", *extra])


def _direct(cfg, pretrained: bool):
    """The model the way the calls compose without the pipeline (the old one-process order)."""
    rt = resolve_runtime("cpu", "fp32")
    family, mcfg = resolve_model_config(cfg.model.name, cfg.model.overrides)
    model = build_model(family, mcfg, "meta")
    dtype = peft_base_dtype(cfg.peft, rt)
    if pretrained:
        load_pretrained(model, cfg.model.name, "cpu", dtype)
    else:
        init_random(model, "cpu", dtype, cfg.train.seed)
    apply_peft(model, cfg.peft, rt, family, mcfg)
    fill_peft(model, cfg.peft, family, mcfg, cfg.train.seed, loaded=True)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and repr(a) == repr(b)
    for k in sa:
        x, y = sa[k], sb[k]
        if hasattr(x, "get_original_weight"):  # NF4: compare what the model computes with
            x, y = x.get_original_weight(), y.get_original_weight()
        assert x.dtype == y.dtype and torch.equal(x, y), k
    assert [n for n, p in a.named_parameters() if p.requires_grad] == \
        [n for n, p in b.named_parameters() if p.requires_grad]


def test_steps_are_the_documented_order():
    assert [s.__name__ for s in STEPS] == [
        "runtime", "spec", "processes", "build_on_meta", "adapt", "parallelize", "materialize",
        "quantize", "fill_adapters", "optimizer"]
    for step in STEPS:
        assert step.__doc__ and len(step.__doc__.split()) > 10, step.__name__  # says why


@pytest.mark.parametrize("extra", [(), ("peft.method=lora", "peft.r=4"),
                                   ("peft.method=dora", "peft.r=4", "peft.num_freeze_layers=1")])
def test_pretrained_assembly_matches_the_direct_calls(tiny_tokenizer_dir, tmp_path, extra):
    base = save_base(tmp_path, vocab_size=512)
    cfg = _cfg(tiny_tokenizer_dir, str(base), *extra)
    a = assemble(cfg)
    _same(a.model, _direct(cfg, pretrained=True))
    opt_params = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in a.model.parameters() if p.requires_grad}
    assert all(".lora_" in n for n in a.added_names) and (bool(a.added_names) == bool(extra))


def test_from_scratch_lora_assembly_matches_the_direct_calls(tiny_tokenizer_dir):
    cfg = _cfg(tiny_tokenizer_dir, "tiny", "model.overrides={vocab_size: 512, dim: 64, n_layers: 2, "
               "n_heads: 4, n_kv_heads: 2, intermediate_size: 128}", "peft.method=lora", "peft.r=4")
    _same(assemble(cfg, until="fill_adapters").model, _direct(cfg, pretrained=False))


@pytest.mark.skipif(not nf4_available(), reason="QLoRA needs torchao")
def test_qlora_quantises_after_loading_like_the_direct_calls(tiny_tokenizer_dir, tmp_path):
    base = save_base(tmp_path, **{**QLORA_SHAPE, "vocab_size": 512})
    cfg = _cfg(tiny_tokenizer_dir, str(base), "peft.method=qlora", "peft.r=4")
    _same(assemble(cfg, until="fill_adapters").model, _direct(cfg, pretrained=True))


@pytest.mark.skipif(not nf4_available(), reason="QLoRA needs torchao")
@pytest.mark.parametrize(("model", "extra"), [
    ("tiny", ("model.overrides={vocab_size: 512, dim: 128, n_layers: 2, n_heads: 4, n_kv_heads: 4, "
              "intermediate_size: 256}",)),
    ("moe-tiny", ("model.overrides={dim: 128, n_heads: 2, n_kv_heads: 2, head_dim: 64}",
                  "peft.target_parameters=[experts.gate_up_proj, experts.down_proj]")),
], ids=["llama", "moe"])
def test_from_scratch_qlora_assembly_matches_the_direct_calls(tiny_tokenizer_dir, model, extra):
    """One process: the seeded init runs one block at a time (each quantised as it is made, so
    the dense model never exists) and gives the whole-model init's values, NF4 bits included."""
    cfg = _cfg(tiny_tokenizer_dir, model, *extra, "peft.method=qlora", "peft.r=4")
    _same(assemble(cfg, until="fill_adapters").model, _direct(cfg, pretrained=False))
