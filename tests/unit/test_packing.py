"""Packing without cross-talk: a packed batch gives the same loss as each example alone (fp32),
through the trainer's own forward-loss path, for Llama and GPT-2, with SDPA and FlexAttention."""

from __future__ import annotations

import pytest
import torch

from tunesmith.data.sft_data import SFTCollator, pack_examples
from tunesmith.models import attention as attn_mod
from tunesmith.models import build_model, init_random, resolve_model_config
from tunesmith.models.attention import AttnSpec
from tunesmith.objective.forward import batch_loss_sum
from tunesmith.runtime import resolve_runtime

V = 97


def _examples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 19, (1,), generator=g))
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        ids = torch.randint(0, V, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "loss_mask": [False] * prompt + [True] * (length - prompt)})
    return out


def _model(name: str) -> torch.nn.Module:
    fam, cfg = resolve_model_config(name, {"vocab_size": V, "n_layers": 2})
    model = build_model(fam, cfg)
    return init_random(model, "cpu", torch.float32, seed=0).eval()


@pytest.mark.parametrize("name", ["tiny", "gpt2-tiny", "pythia-tiny"])
# The flex case runs FlexAttention eagerly on CPU on purpose (a reference, not for speed);
# torch warns that eager flex is unfused.
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_loss_equals_each_example_alone(name: str, backend: str) -> None:
    model = _model(name)
    rt = resolve_runtime("cpu", "fp32")
    examples = _examples(9)
    collate = SFTCollator(pad_token_id=0)
    rows = list(pack_examples(examples, block_size=40))
    assert len(rows) < len(examples)  # several examples really share rows
    attn_mod.set_attention_backend(backend)
    try:
        with torch.no_grad():
            packed = batch_loss_sum(model, collate(rows), rt, need_grad=False)
    finally:
        attn_mod.set_attention_backend("auto")
    with torch.no_grad():
        alone = sum(batch_loss_sum(model, collate([ex]), rt, need_grad=False) for ex in examples)
        # Unpacked but padded together: the padding path agrees as well.
        padded = batch_loss_sum(model, collate(examples), rt, need_grad=False)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_matches_dense_mask() -> None:
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1]] * 2)
    q, k, v = (torch.randn(2, 4, 12, 16) for _ in range(3))
    spec = AttnSpec.documents(doc)
    for causal in (True, False):
        attn_mod.set_attention_backend("flex")
        try:
            prepared = attn_mod.prepare_attention(spec, 12, 12, q.device, causal=causal)
            assert prepared.block_mask is not None
            flex = attn_mod.sdpa_attention(q, k, v, prepared)
        finally:
            attn_mod.set_attention_backend("auto")
        dense = attn_mod.sdpa_attention(
            q, k, v, attn_mod.prepare_attention(spec, 12, 12, q.device, causal=causal))
        torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    assert attn_mod.attention_backend(torch.device("cpu")) == "sdpa"


def test_generic_hf_fallback_trains_packed_like_native(tmp_path) -> None:
    """A model_type without a native port (Phi) runs through the HF wrapper: same loss as
    transformers computes, and packing stays exact there too."""
    import transformers

    cfg = transformers.PhiConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path / "phi")
    from tunesmith.models import load_pretrained

    family, mcfg = resolve_model_config(str(tmp_path / "phi"))
    assert family.name == "hf" and family.kind == "causal"
    model = load_pretrained(build_model(family, mcfg), str(tmp_path / "phi"), "cpu",
                            torch.float32).eval()
    rt = resolve_runtime("cpu", "fp32")
    examples = _examples(6, seed=1)
    collate = SFTCollator(pad_token_id=0)
    with torch.no_grad():
        packed = batch_loss_sum(model, collate(list(pack_examples(examples, 40))), rt, False)
        alone = sum(batch_loss_sum(model, collate([ex]), rt, False) for ex in examples)
        batch = collate([examples[0]])
        ours = batch_loss_sum(model, batch, rt, False) / (batch["labels"] != -100).sum()
        labels = torch.cat([torch.full((1, 1), -100), batch["labels"][:, :-1]], dim=1)
        theirs = hf(batch["input_ids"], labels=labels).loss  # HF shifts labels itself
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
