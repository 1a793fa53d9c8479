"""Unit tests of the native Llama model, config handling and the model API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.hf import io as hfio
from tunesmith.models import (
    build_model,
    get_family,
    init_random,
    load_pretrained,
    resolve_model_config,
    save_pretrained,
)
from tunesmith.models.attention import AttnSpec, document_positions
from tunesmith.models.generate import generate
from tunesmith.models.llama.config import LlamaConfig, apply_overrides, preset
from tunesmith.models.llama.model import KVCache


def _tiny(seed: int = 0, **overrides):
    family, cfg = resolve_model_config("tiny", overrides or None)
    return family, cfg, init_random(build_model(family, cfg), "cpu", torch.float32, seed).eval()


def test_meta_build_allocates_nothing_and_init_random_works() -> None:
    family, cfg = resolve_model_config("tiny")
    model = build_model(family, cfg)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    init_random(model, "cpu", torch.float32, seed=0)
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in model.parameters())
    std = model.layers[0].attention.wq.weight.std().item()
    assert abs(std - cfg.initializer_range) < 0.005
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    # Same seed -> same weights; different seed -> different weights.
    other = init_random(build_model(family, cfg), "cpu", torch.float32, seed=0)
    assert torch.equal(other.tok_embeddings.weight, model.tok_embeddings.weight)
    third = init_random(build_model(family, cfg), "cpu", torch.float32, seed=1)
    assert not torch.equal(third.tok_embeddings.weight, model.tok_embeddings.weight)


def test_rope_buffer_recomputed_after_to_empty_and_casts() -> None:
    _, cfg, model = _tiny()
    reference = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, reference)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


def test_tied_weights_stay_tied_after_init_and_load(tmp_path: Path) -> None:
    family, cfg, model = _tiny()
    assert model.output.weight is model.tok_embeddings.weight
    save_pretrained(model, family, cfg, tmp_path / "m")
    names = hfio.tensor_shapes(hfio.find_weight_files(tmp_path / "m"))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    loaded = load_pretrained(build_model(*resolve_model_config(str(tmp_path / "m"))),
                             str(tmp_path / "m"), "cpu", torch.float32)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    torch.testing.assert_close(loaded.output.weight, model.tok_embeddings.weight, atol=0, rtol=0)
    assert json.loads((tmp_path / "m/generation_config.json").read_text())["eos_token_id"] == 2


def test_kv_cache_decoding_equals_full_forward() -> None:
    _, cfg, model = _tiny(initializer_range=0.2)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2, max_len=20)
        steps = [model(ids[:, :7], cache=cache)]  # prefill (is_causal path)
        steps.append(model(ids[:, 7:12], cache=cache))  # chunk with offset (explicit mask)
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]  # 1-token steps
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 20
    with pytest.raises(TunesmithError, match="KV cache full"):
        model(ids[:, :1], cache=cache)


def test_generate_greedy_matches_argmax_and_stops_at_eos() -> None:
    _, cfg, model = _tiny(initializer_range=0.2)
    prompt = torch.tensor([[1, 5, 9, 13]])
    out = generate(model, prompt, max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()
    first_new = int(out[0, 4])
    stopped = generate(model, prompt, max_new_tokens=6, eos_token_id=first_new)
    assert stopped.tolist() == out[:, :5].tolist()
    sampled = generate(model, prompt.repeat(2, 1), 5, temperature=0.8, top_k=20, top_p=0.9,
                       generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9)


def test_document_positions_restart() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_documents_spec_equals_separate_runs() -> None:
    _, cfg, model = _tiny(initializer_range=0.2)
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        packed = model(ids, attn=AttnSpec.documents(doc_ids))
        a, b = model(ids[:, :5]), model(ids[:, 5:])
    torch.testing.assert_close(packed, torch.cat([a, b], dim=1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "expected"), [("llama3.2-1b", 1_235_814_400),
                                                ("llama3-8b", 8_030_261_248)])
def test_preset_param_counts(name: str, expected: int) -> None:
    model = build_model(*resolve_model_config(name))
    assert model.num_params() == expected


def test_flops_per_token() -> None:
    model = build_model(*resolve_model_config("llama3-8b"))
    cfg = model.cfg
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.flops_per_token(0) == 6 * linear
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    assert linear == model.num_params(exclude_embedding=True) - norms
    t = 8192
    assert model.flops_per_token(t) - model.flops_per_token(0) == 12 * 32 * 32 * 128 * t
    assert 6.0 * 7.5e9 < model.flops_per_token(2048) < 6.0 * 8.5e9
    tied = build_model(*resolve_model_config("llama3.2-1b"))
    head = tied.cfg.vocab_size * tied.cfg.dim
    assert tied.flops_per_token(0) == 6 * (tied.cfg.n_layers * tied.cfg.n_matmul_params_per_layer
                                           + head)


def test_config_hf_roundtrip_for_every_preset() -> None:
    from tunesmith.models.llama.config import PRESET_NAMES

    for name in PRESET_NAMES:
        cfg = preset(name)
        again = LlamaConfig.from_hf(json.loads(json.dumps(cfg.to_hf())))
        assert {k: v for k, v in again.to_dict().items() if k != "extra"} == \
            {k: v for k, v in cfg.to_dict().items() if k != "extra"}, name


def test_from_hf_reads_transformers4_rope_layout() -> None:
    cfg = LlamaConfig.from_hf({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 100,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 32.0
    assert cfg.torch_dtype == "bfloat16" and cfg.head_dim == 16 and cfg.n_kv_heads == 4


def test_overrides_accept_our_and_hf_names() -> None:
    cfg = apply_overrides(preset("tiny"), {"hidden_size": 128, "n_layers": 3, "vocab_size": 1000})
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.head_dim) == (128, 3, 1000, 32)
    assert preset("tiny").dim == 64  # presets are not mutated


def test_errors_are_helpful(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # GPT-2 names (n_layer, n_embd, ...) are valid overrides now; typos still get a hint.
    assert apply_overrides(preset("tiny"), {"n_layer": 3}).n_layers == 3
    with pytest.raises(TunesmithError, match=r"did you mean 'n_layers?'"):
        apply_overrides(preset("tiny"), {"n_layerz": 3})
    with pytest.raises(TunesmithError, match=r"neither a preset.*did you mean 'llama3-8b'"):
        resolve_model_config("llama3-8bb")
    with pytest.raises(TunesmithError, match=r"known: bert, gemma3, gemma3_text, gpt2, gpt_neox, gptj, llama, mistral, mixtral, qwen2"):
        get_family("not_a_model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(TunesmithError, match=r"unsupported model_type 'not_a_model'"):
        resolve_model_config(str(tmp_path))
    with pytest.raises(TunesmithError, match=r"has no config.json"):
        resolve_model_config(str(tmp_path / ".."))

    def offline(repo_id: str, filename: str) -> Path:
        raise TunesmithError(f"cannot fetch {filename} of hub repo {repo_id!r}: offline")

    monkeypatch.setattr(hfio, "download_hub_file", offline)
    with pytest.raises(TunesmithError, match=r"neither a preset.*nor reachable on the HF hub"):
        resolve_model_config("some-org/some-model")
    with pytest.raises(TunesmithError, match=r"n_heads \(4\) must be a multiple of n_kv_heads"):
        apply_overrides(preset("tiny"), {"num_key_value_heads": 3})


def test_load_reports_missing_and_unexpected(tmp_path: Path) -> None:
    family, cfg, model = _tiny()
    save_pretrained(model, family, cfg, tmp_path / "m")
    bigger = apply_overrides(cfg, {"n_layers": 3})
    with pytest.raises(TunesmithError, match=r"missing tensors: layers\.2\."):
        load_pretrained(build_model(family, bigger), str(tmp_path / "m"), "cpu", torch.float32)
    smaller = apply_overrides(cfg, {"n_layers": 1})
    with pytest.raises(TunesmithError, match=r"unexpected tensors: model\.layers\.1\."):
        load_pretrained(build_model(family, smaller), str(tmp_path / "m"), "cpu", torch.float32)
    with pytest.raises(TunesmithError, match=r"no weights in"):
        load_pretrained(build_model(family, cfg), str(tmp_path), "cpu", torch.float32)


def test_save_is_atomic_and_overwrite_rules(tmp_path: Path) -> None:
    family, cfg, model = _tiny()

    class CrashingTokenizer:
        def save_pretrained(self, path: str) -> None:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, family, cfg, tmp_path / "m", tokenizer=CrashingTokenizer())
    assert list(tmp_path.iterdir()) == []  # neither a half-written model nor a temp dir
    save_pretrained(model, family, cfg, tmp_path / "m")
    save_pretrained(model, family, cfg, tmp_path / "m")  # replacing a saved model is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    with pytest.raises(TunesmithError, match="refusing to overwrite"):
        save_pretrained(model, family, cfg, tmp_path / "notes")


def test_loads_pickle_checkpoint_with_weights_only(tmp_path: Path) -> None:
    family, cfg, model = _tiny(seed=3)
    save_pretrained(model, family, cfg, tmp_path / "m")
    files = hfio.find_weight_files(tmp_path / "m")
    state = dict(hfio.iter_tensors(files))
    (tmp_path / "m/model.safetensors").unlink()
    torch.save(state, tmp_path / "m/pytorch_model.bin")
    loaded = load_pretrained(build_model(family, cfg), str(tmp_path / "m"), "cpu", "bfloat16")
    assert loaded.norm.weight.dtype == torch.bfloat16
    ref = model.layers[1].feed_forward.w2.weight.to(torch.bfloat16)
    assert torch.equal(loaded.layers[1].feed_forward.w2.weight, ref)


def test_sdpa_preference_moves_one_kernel_first_and_rejects_unknown() -> None:
    from tunesmith.models.attention import configure_sdpa

    assert configure_sdpa(torch.device("cpu")) == "default"  # CPU: torch's order untouched
    before = torch._C._get_sdp_priority_order()
    try:
        # An explicit choice needs no GPU to be recorded: it is a process-wide priority order.
        assert configure_sdpa(torch.device("cuda"), "cudnn") == "cudnn"
        from torch.nn.attention import SDPBackend

        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(before)
    finally:
        torch._C._set_sdp_priority_order(before)
    with pytest.raises(TunesmithError, match="TUNESMITH_SDPA='fa9'"):
        configure_sdpa(torch.device("cpu"), "fa9")


def test_qwen3_from_scratch_initialises_the_qk_norms() -> None:
    from tunesmith.models import build_model, init_random, resolve_model_config

    family, cfg = resolve_model_config("qwen3-0.6b", {"vocab_size": 64, "dim": 32, "n_layers": 2,
                                                      "n_heads": 4, "n_kv_heads": 2, "head_dim": 8,
                                                      "intermediate_size": 48})
    model = init_random(build_model(family, cfg, "meta"), "cpu", torch.float32, seed=0)
    for layer in model.layers:
        assert torch.equal(layer.attention.q_norm.weight, torch.ones(8))
        assert torch.equal(layer.attention.k_norm.weight, torch.ones(8))
    assert torch.isfinite(model(torch.randint(0, 64, (2, 10)))).all()
    assert "layers.0.attention.q_norm.weight" in model.state_dict()
