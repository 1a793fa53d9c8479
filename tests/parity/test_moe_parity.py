"""Native MoE family (Mixtral, Qwen3-MoE) vs HF transformers: logits, gradients, the
load-balancing loss, greedy generation, and checkpoints in every layout both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from tests.parity.helpers import load_ours
from tunesmith.errors import TunesmithError
from tunesmith.models import (
    resolve_model_config,
    save_pretrained,
)
from tunesmith.models.generate import generate
from tunesmith.models.moe.model import SparseMoE

ATOL = 1e-5
VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.02,
              pad_token_id=0)


def _hf_configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        # Mixtral: every layer sparse, top-2 of 4, weights always renormalised (kept fp32).
        "mixtral": transformers.MixtralConfig(**COMMON, num_hidden_layers=2, num_local_experts=4,
                                              num_experts_per_tok=2, sliding_window=None),
        # Qwen3-MoE: q/k norm, head_dim 16 != 32 / 4, biases, top-3 of 8 without renormalising,
        # layer 1 dense (mlp_only_layers) beside sparse layers 0 and 2.
        "qwen3_moe": transformers.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=3, head_dim=16, attention_bias=True, num_experts=8,
            num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=False,
            mlp_only_layers=[1], tie_word_embeddings=True),
        # Qwen3-MoE renormalised, every second layer sparse (decoder_sparse_step=2).
        "qwen3_moe_step": transformers.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=2),
    }


NAMES = list(_hf_configs())


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """O(1) activations so parity is meaningful (HF inits tiny weights)."""
    for name, p in model.named_parameters():
        p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.2)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for i, (name, cfg) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        _randomize(model)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)  # transformers 5 writes the hub's per-expert layout
        out[name] = (model.eval(), path)
    return out


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_names(path: Path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", NAMES)
def test_hub_layout_loads_with_hf_logits(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    assert any(".experts.0." in k for k in _hf_names(path))  # per-expert tensors on disk
    ours = load_ours(path)
    ids = _ids(3, 21)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
    sparse = [i for i, b in enumerate(ours.layers) if isinstance(b.feed_forward, SparseMoE)]
    assert sparse == {"mixtral": [0, 1], "qwen3_moe": [0, 2], "qwen3_moe_step": [1]}[name]


@pytest.mark.parametrize("name", NAMES)
def test_experts_without_tokens(hf_models, name: str) -> None:
    """Two tokens, top-k <= 3 of >= 4 experts: some experts get no token at all."""
    hf, path = hf_models[name]
    ours = load_ours(path)
    ours.keep_router_stats()
    ids = _ids(1, 2, seed=5)
    with torch.no_grad():
        got = ours(ids)
        torch.testing.assert_close(got, hf(ids).logits, atol=ATOL, rtol=0)
    for moe in ours.sparse_blocks():
        assert moe.router_stats is not None
        used = moe.router_stats[1].unique().numel()
        assert used < ours.cfg.num_experts


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    adapter = family.adapter(cfg)
    ids = _ids(2, 13, seed=1)
    hf.zero_grad()
    hf(ids, labels=ids).loss.backward()
    logits = ours(ids)[:, :-1].reshape(-1, VOCAB)
    torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)).backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for hf_name, p in hf.named_parameters():
        native = adapter.hf_key_to_native(hf_name)
        if native is None:  # the tied head
            continue
        torch.testing.assert_close(ours_params[native].grad, p.grad, atol=ATOL, rtol=1e-4,
                                   msg=lambda m, n=hf_name: f"{n}: {m}")
        checked += 1
    assert checked == len(ours_params)
    hf.zero_grad()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_aux_loss_matches_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    ours.keep_router_stats()
    ids = _ids(2, 15, seed=2)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding: left out of the counts, as HF's attention_mask does
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        ours(ids)
        torch.testing.assert_close(ours.router_aux_loss(), ref.aux_loss, atol=1e-6, rtol=1e-5)
        ref_masked = hf(ids, attention_mask=mask, output_router_logits=True)
        ours(ids)  # the routing is released once read: route again
        torch.testing.assert_close(ours.router_aux_loss(mask), ref_masked.aux_loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_save_loads_in_transformers(hf_models, tmp_path: Path, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    save_pretrained(ours, family, cfg, tmp_path / "saved")
    assert sorted(_hf_names(tmp_path / "saved")) == sorted(_hf_names(path))  # the hub's names
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is type(hf)
    ids = _ids(2, 17, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_sharded_save_splits_experts_across_files(hf_models, tmp_path: Path) -> None:
    hf, path = hf_models["qwen3_moe"]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    out = save_pretrained(ours, family, cfg, tmp_path / "sharded", max_shard_size_bytes=6_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files_of_layer0 = {f for k, f in index.items() if k.startswith("model.layers.0.mlp.experts.")}
    assert len(files_of_layer0) > 1  # one layer's experts span files: stacked again on load
    ids = _ids(1, 9, seed=4)
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(load_ours(out)(ids), expected, atol=ATOL, rtol=0)
        again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(again(ids).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_stacked_layout_loads(hf_models, tmp_path: Path, name: str) -> None:
    """A file holding transformers 5's in-memory names and stacked [E, ...] experts (what a
    save that skips the per-expert conversion would write) loads too, in both tools."""
    hf, path = hf_models[name]
    out = tmp_path / "stacked"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()
             if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    ids = _ids(2, 11, seed=6)
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(load_ours(out)(ids), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits,
                                   expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_greedy_generation_matches_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    prompt = _ids(2, 5, seed=7)
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, prompt, max_new_tokens=12, eos_token_id=None)
    assert got.tolist() == expected.tolist()


def test_incomplete_or_extra_experts_are_named(hf_models, tmp_path: Path) -> None:
    """A file missing one expert's tensor, or holding an expert past num_experts, stops with one
    line naming what is wrong, before anything is allocated."""
    _, path = hf_models["mixtral"]
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for name, change, match in (
            ("missing", lambda s: s.pop("model.layers.1.block_sparse_moe.experts.3.w3.weight"),
             r"missing tensors: layers\.1\.feed_forward\.experts\.w13$"),
            ("extra", lambda s: s.update({"model.layers.0.block_sparse_moe.experts.4.w2.weight":
                                          s["model.layers.0.block_sparse_moe.experts.0.w2.weight"].clone()}),
             r"unexpected tensors: model\.layers\.0\.block_sparse_moe\.experts\.4\.w2\.weight$")):
        bad = dict(state)
        change(bad)
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text((path / "config.json").read_text())
        save_file(bad, str(out / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(TunesmithError, match=match):
            load_ours(out)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_aux_loss_shares_add_up_to_the_whole_batch(hf_models, name: str) -> None:
    """What context parallelism does with the aux loss, in one process: the batch's rows routed
    in two parts (two "ranks"), each part's counts summed with the other's through `reduce`; the
    two shares add up to the whole batch's aux loss (= HF's), and so do their router gradients."""
    _, path = hf_models[name]
    ours = load_ours(path)
    ids = _ids(4, 15, seed=3)
    parts = (slice(0, 1), slice(1, 4))  # unequal parts: rows are not a plain mean
    counts: dict[int, torch.Tensor] = {}

    def aux_of(rows, reduce=None) -> torch.Tensor:
        ours.keep_router_stats()
        ours(ids[rows])
        return ours.router_aux_loss(None, reduce)

    def keep(i):
        return lambda c: counts.setdefault(i, c.clone())  # records this part's counts, no sum

    for i, rows in enumerate(parts):
        aux_of(rows, keep(i))
    shares = [aux_of(rows, lambda c, i=i: c + counts[1 - i]) for i, rows in enumerate(parts)]
    whole = aux_of(slice(0, 4))
    routers = [p for n, p in ours.named_parameters() if n.endswith("router.weight")]
    got = [sum(gs) for gs in zip(*(torch.autograd.grad(s, routers) for s in shares), strict=True)]
    want = torch.autograd.grad(whole, routers)
    torch.testing.assert_close(shares[0] + shares[1], whole, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(shares[0], whole / 2, rtol=1e-3)  # a share is not half the loss
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)
