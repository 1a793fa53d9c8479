"""Native Llama family vs HF transformers: logits parity through the production load/save path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.parity.helpers import assert_padding_matches_hf, load_ours
from tunesmith.models import resolve_model_config, save_pretrained
from tunesmith.models.attention import AttnSpec

ATOL = 1e-5
VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              max_position_embeddings=256, initializer_range=0.02)


def _hf_configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        # Llama-2 style: MHA, untied, default RoPE.
        "llama2": transformers.LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4,
                                           tie_word_embeddings=False, rms_norm_eps=1e-5),
        # Llama-3 style: GQA, tied, llama3 RoPE scaling with all three frequency bands in use.
        "llama3": transformers.LlamaConfig(
            **{**COMMON, "max_position_embeddings": 16384}, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
        "mistral": transformers.MistralConfig(**COMMON, num_attention_heads=4,
                                              num_key_value_heads=2, sliding_window=None),
        "qwen2": transformers.Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                                          tie_word_embeddings=False),
        # Qwen3: per-head q/k RMSNorm; head_dim 24 != hidden / heads (16) as in the real models;
        # biases on all four projections (attention_bias applies to o too).
        "qwen3": transformers.Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=24, tie_word_embeddings=True, attention_bias=True),
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """HF inits tiny weights and zero biases; use O(1) activations so parity is meaningful."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(1.0, 0.1)
        else:
            p.normal_(0.0, 0.15)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for i, (name, cfg) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        _randomize(model)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


NAMES = list(_hf_configs())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    ids = _ids(2, 33)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if hf.config.tie_word_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3"])
def test_padding_matches_hf_attention_mask(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    assert_padding_matches_hf(hf, ours, _ids(3, 20, seed=1), ATOL)


def test_documents_equal_separate_runs(hf_models) -> None:
    hf, path = hf_models["llama3"]
    ours = load_ours(path)
    ids = _ids(2, 24, seed=2)
    cut = [9, 17]  # row r: doc A = ids[r, :cut[r]], doc B = the rest
    doc_ids = torch.stack([(torch.arange(24) >= c).long() for c in cut])
    with torch.no_grad():
        packed = ours(ids, attn=AttnSpec.documents(doc_ids))  # positions restart per document
        for r, c in enumerate(cut):
            for seg in (slice(0, c), slice(c, 24)):
                alone = ours(ids[r : r + 1, seg])[0]
                torch.testing.assert_close(packed[r, seg], alone, atol=ATOL, rtol=0)
                reference = hf(ids[r : r + 1, seg]).logits[0]
                torch.testing.assert_close(alone, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_save_roundtrip_loads_in_transformers(hf_models, tmp_path: Path, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    out = tmp_path / "saved"
    save_pretrained(ours, family, cfg, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    ids = _ids(2, 17, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_sharded_save_loads_in_transformers_and_ours(hf_models, tmp_path: Path) -> None:
    hf, path = hf_models["llama3"]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    out = tmp_path / "sharded"
    save_pretrained(ours, family, cfg, out, max_shard_size_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    assert not (out / "model.safetensors").exists()
    ids = _ids(1, 12, seed=4)
    with torch.no_grad():
        expected = hf(ids).logits
        hf_again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        torch.testing.assert_close(hf_again(ids).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(load_ours(out)(ids), expected, atol=ATOL, rtol=0)


def test_save_in_bfloat16(hf_models, tmp_path: Path) -> None:
    _, path = hf_models["mistral"]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    save_pretrained(ours, family, cfg, tmp_path / "bf16", dtype=torch.bfloat16)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.config.model_type == "mistral"
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    again = load_ours(tmp_path / "bf16")
    ref = ours.layers[0].attention.wq.weight.to(torch.bfloat16).float()
    torch.testing.assert_close(again.layers[0].attention.wq.weight, ref, atol=0, rtol=0)
