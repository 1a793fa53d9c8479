"""Native GPT-2, GPT-NeoX, BERT and RoBERTa vs HF transformers: logits parity (fp32,
atol 1e-5) through the production load/save path, old checkpoint layouts, config round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.parity.helpers import load_ours
from tunesmith.models import (
    build_model,
    get_family,
    resolve_model_config,
    save_pretrained,
)
from tunesmith.models.attention import AttnSpec

ATOL = 1e-5
VOCAB = 128
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _hf_models() -> dict[str, tuple[type, transformers.PretrainedConfig]]:
    enc = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=96, **NO_DROPOUT)
    return {
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "gpt_neox": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64)),
        "neox_sequential": (transformers.GPTNeoXForCausalLM, transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=64, use_parallel_residual=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                             "partial_rotary_factor": 0.5})),
        "bert": (transformers.BertForMaskedLM, transformers.BertConfig(
            **enc, max_position_embeddings=64, pad_token_id=0)),
        "roberta": (transformers.RobertaForMaskedLM, transformers.RobertaConfig(
            **enc, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """O(1) activations (HF inits tiny weights and zero biases) so parity means something."""
    for name, p in model.named_parameters():
        is_norm = "norm" in name.lower() or ".ln_" in name
        p.normal_(1.0 if is_norm and name.endswith("weight") else 0.0, 0.1 if is_norm else 0.15)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for i, (name, (cls, cfg)) in enumerate(_hf_models().items()):
        torch.manual_seed(i)
        model = cls(cfg).eval()
        _randomize(model)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def _ids(batch: int, seq: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    return torch.randint(low, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "neox_sequential", "bert", "roberta"])
def test_logits_and_padding_match_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    ids = _ids(2, 33)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # right padding
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    ids[1, 25:] = pad
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
        got = ours(ids, attn=AttnSpec.padding(mask))
        expected = hf(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=ATOL, rtol=0)
    if name in ("bert", "roberta"):
        assert get_family(name).kind == "masked"
    if hf.config.tie_word_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "bert", "roberta"])
def test_save_roundtrip_loads_in_transformers(hf_models, tmp_path: Path, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path)
    family, cfg = resolve_model_config(str(path))
    save_pretrained(ours, family, cfg, tmp_path / "saved")
    auto = (transformers.AutoModelForMaskedLM if name in ("bert", "roberta")
            else transformers.AutoModelForCausalLM)
    reloaded = auto.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is type(hf)
    ids = _ids(2, 17, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_gpt2_old_openai_layout_loads(hf_models, tmp_path: Path) -> None:
    """No `transformer.` prefix, causal-mask buffers present (as openai-community/gpt2)."""
    hf, path = hf_models["gpt2"]
    sd = load_file(str(path / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    old["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    ids = _ids(1, 20, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(load_ours(tmp_path / "old")(ids), hf(ids).logits,
                                   atol=ATOL, rtol=0)


def test_bert_tf_era_names_and_pretraining_heads_load(hf_models, tmp_path: Path) -> None:
    hf, path = hf_models["bert"]
    sd = load_file(str(path / "model.safetensors"))
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                  "LayerNorm.beta"): v
           for k, v in sd.items()}
    old["bert.pooler.dense.weight"] = torch.zeros(64, 64)
    old["cls.seq_relationship.weight"] = torch.zeros(2, 64)
    (tmp_path / "old").mkdir()
    save_file(old, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    ids = _ids(1, 20, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(load_ours(tmp_path / "old")(ids), hf(ids).logits,
                                   atol=ATOL, rtol=0)


def test_gpt2_names_in_overrides_and_presets() -> None:
    fam, cfg = resolve_model_config("gpt2", {"n_embd": 1024, "n_head": 16, "n_layer": 24})
    assert fam.name == "gpt2" and (cfg.dim, cfg.n_heads, cfg.n_layers) == (1024, 16, 24)
    assert cfg.intermediate_size == 4096  # the 4x MLP follows the width
    model = build_model(fam, cfg)  # on meta: nothing allocated
    assert abs(model.num_params() - 354_823_168) < 1e6  # GPT-2 medium: ~355M
    _, llama = resolve_model_config("tiny", {"n_embd": 128, "n_head": 8, "n_layer": 3})
    assert (llama.dim, llama.n_heads, llama.n_layers, llama.head_dim) == (128, 8, 3, 16)
    _, rob = resolve_model_config("roberta-base")
    assert rob.position_offset == 2 and rob.max_positions == 512
    assert resolve_model_config("roberta-base")[1].to_hf()["model_type"] == "roberta"
