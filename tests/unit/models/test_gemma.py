"""Gemma 3 config: presets, overrides, both HF config layouts, refusals; the sliding-window masks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import transformers

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.models import attention as attn_mod
from tunesmith.models import build_model, resolve_model_config
from tunesmith.models.attention import AttnSpec, prepare_attention, sdpa_attention
from tunesmith.models.gemma.config import (
    FULL,
    SLIDING,
    GemmaConfig,
    apply_overrides,
    preset,
)
from tunesmith.models.registry import adaption_point
from tunesmith.parallel.layout import check_run, resolve_layout

# google/gemma-3-1b-pt's config.json as published (transformers 4.50 layout).
GEMMA3_1B_HF = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}


def _hf_parsed(hf: dict) -> dict:
    """What transformers itself makes of a config dict, written back in its own layout."""
    kw = {k: v for k, v in hf.items() if k not in ("model_type", "architectures")}
    return json.loads(transformers.Gemma3TextConfig(**kw).to_json_string())


def test_presets_match_the_published_shapes():
    one = preset("gemma3-1b")
    assert (one.dim, one.n_layers, one.n_heads, one.n_kv_heads, one.head_dim) == (1152, 26, 4, 1, 256)
    assert one.types.count(FULL) == 4 and one.types[5] == FULL and one.types[0] == SLIDING
    from_hf = GemmaConfig.from_hf(GEMMA3_1B_HF)
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                 "intermediate_size", "sliding_window", "rope_theta", "rope_local_base_freq",
                 "query_pre_attn_scalar", "max_position_embeddings", "types"):
        assert getattr(one, name) == getattr(from_hf, name), name
    four = preset("gemma3-4b")
    assert four.rope_scaling_factor == 8.0 and four.sliding_window == 1024
    # Parameters (tied head): the 1B; the 12B and 27B text towers (the published totals,
    # 12.19B and 27.43B, add a ~0.42B SigLIP vision tower).
    for name, n in (("gemma3-1b", 999_885_952), ("gemma3-12b", 11_766_034_176),
                    ("gemma3-27b", 27_009_346_304)):
        assert build_model(*resolve_model_config(name)).num_params() == n, name
    assert preset("gemma3-27b").query_pre_attn_scalar == 168  # not head_dim (128)


def test_flops_per_token_counts_the_linears_and_full_attention():
    """6 N + 12 L H hd T: N = the 7 linears of every block plus the tied head (V x D), and the
    attention term counted over the full T x T square in sliding layers too (documented)."""
    c = preset("gemma3-1b")
    model = build_model(*resolve_model_config("gemma3-1b"), device="meta")
    per_layer = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.intermediate_size
    want = 6 * (c.n_layers * per_layer + c.vocab_size * c.dim) + 12 * c.n_layers * c.n_heads * c.head_dim * 2048
    assert model.flops_per_token(2048) == want


def test_both_hf_layouts_read_alike_and_round_trip():
    legacy = {**GEMMA3_1B_HF, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
              "rope_theta": 123456.0, "rope_local_base_freq": 777.0}
    ours_legacy = GemmaConfig.from_hf(legacy)
    ours_new = GemmaConfig.from_hf(_hf_parsed(legacy))  # transformers 5 layout, same settings
    assert (ours_legacy.rope_theta, ours_legacy.rope_local_base_freq,
            ours_legacy.rope_scaling_factor) == (123456.0, 777.0, 8.0)
    for cfg in (ours_legacy, ours_new):
        again = GemmaConfig.from_hf(cfg.to_hf())
        assert again.to_hf() == cfg.to_hf() == ours_legacy.to_hf()
    # transformers reads what we write as we do.
    theirs = _hf_parsed(ours_legacy.to_hf())
    assert theirs["rope_parameters"] == ours_legacy.to_hf()["rope_parameters"]
    assert theirs["layer_types"] == ours_legacy.types


def test_overrides_rederive_layer_types_and_take_hf_names():
    cfg = GemmaConfig.from_hf({**GEMMA3_1B_HF, "layer_types": preset("gemma3-1b").types})
    small = apply_overrides(cfg, {"num_hidden_layers": 7, "hidden_size": 64, "sliding_window": 4})
    assert small.types == [SLIDING] * 5 + [FULL, SLIDING] and small.dim == 64
    assert cfg.n_layers == 26  # the base is untouched
    explicit = apply_overrides(cfg, {"n_layers": 2, "layer_types": [FULL, SLIDING]})
    assert explicit.types == [FULL, SLIDING]
    odd = GemmaConfig.from_hf({**GEMMA3_1B_HF, "num_hidden_layers": 2, "layer_types": [FULL, FULL]})
    with pytest.raises(TunesmithError, match="layer_types must list 3 entries"):
        apply_overrides(odd, {"n_layers": 3})
    with pytest.raises(TunesmithError, match="did you mean 'sliding_window'"):
        apply_overrides(cfg, {"slidng_window": 8})


@pytest.mark.parametrize(("change", "message"), [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' on full_attention"),
    ({"rope_parameters": {SLIDING: {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope type 'linear' on sliding_attention"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    ({"layer_types": ["chunked_attention"] * 26}, "layer_types must list 26 entries"),
    ({"model_type": "gemma3", "text_config": None}, "model_type 'gemma3' without a text_config"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma2"}},
     "text_config.model_type 'gemma2' is not 'gemma3_text'"),
    ({"model_type": "gemma3", "text_config": {"hidden_size": "big"}},
     "config.json text_config: field 'hidden_size' must be an integer"),
    ({"model_type": "gemma3", "text_config": {"final_logit_softcapping": 30.0}},
     "final_logit_softcapping=30.0 is not supported"),
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, change, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GEMMA3_1B_HF, **change}))
    with pytest.raises(TunesmithError, match=message) as e:
        resolve_model_config(str(tmp_path))
    assert "\n" not in str(e.value)


# The top level of google/gemma-3-{4b,12b,27b}-it's config.json as published (transformers 4.50)
# and each one's text_config; the vision_config (SigLIP) is the same in all three.
GEMMA3_MM_TOP = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}
_LINEAR8 = {"factor": 8.0, "rope_type": "linear"}
GEMMA3_MM_TEXT = {
    "gemma3-4b": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                  "num_hidden_layers": 34, "rope_scaling": _LINEAR8, "sliding_window": 1024},
    "gemma3-12b": {"hidden_size": 3840, "intermediate_size": 15360, "model_type": "gemma3_text",
                   "num_attention_heads": 16, "num_hidden_layers": 48, "num_key_value_heads": 8,
                   "rope_scaling": _LINEAR8, "sliding_window": 1024},
    "gemma3-27b": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                   "model_type": "gemma3_text", "num_attention_heads": 32,
                   "num_hidden_layers": 62, "num_key_value_heads": 16,
                   "query_pre_attn_scalar": 168, "rope_scaling": _LINEAR8, "sliding_window": 1024},
}


@pytest.mark.parametrize("name", sorted(GEMMA3_MM_TEXT))
def test_image_text_configs_give_their_text_model(tmp_path, name):
    """The published gemma3 configs name a few text keys: transformers' Gemma3TextConfig
    defaults fill the rest (what the presets hold), and the top-level eos ids of -it win."""
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA3_MM_TOP,
                                                      "text_config": GEMMA3_MM_TEXT[name]}))
    _, cfg = resolve_model_config(str(tmp_path))
    want = preset(name)
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "intermediate_size", "sliding_window", "rope_theta", "rope_local_base_freq",
                  "rope_scaling_factor", "query_pre_attn_scalar", "max_position_embeddings",
                  "tie_word_embeddings", "norm_eps", "types"):
        assert getattr(cfg, field) == getattr(want, field), field
    assert cfg.model_type == "gemma3_text" and cfg.multimodal_source and cfg.vocab_size == 262208
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, [1, 106], 0)
    assert cfg.torch_dtype == "bfloat16"
    # transformers reads the same text model out of it.
    hf = transformers.Gemma3Config(**{k: v for k, v in GEMMA3_MM_TOP.items()
                                      if k not in ("model_type", "architectures")},
                                   text_config=GEMMA3_MM_TEXT[name]).text_config
    assert (hf.vocab_size, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
            hf.head_dim, hf.max_position_embeddings, hf.query_pre_attn_scalar, hf.layer_types) \
        == (cfg.vocab_size, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
            cfg.max_position_embeddings, cfg.query_pre_attn_scalar, cfg.types)
    # Saved as the text model.
    assert cfg.to_hf()["model_type"] == "gemma3_text"
    assert cfg.to_hf()["architectures"] == ["Gemma3ForCausalLM"]


def test_runs_it_cannot_serve_are_refused():
    cfg = RunConfig.model_validate({"data": {"path": "x", "block_size": 64},
                                    "parallel": {"cp": 2}})
    model_cfg = SimpleNamespace(model_type="gemma3_text")
    check_run(cfg, resolve_layout(cfg.parallel, 2), model_cfg, "cpu")  # ring attention serves it
    with pytest.raises(TunesmithError, match="llama_adapter is not available for model_type 'gemma3_text'"):
        adaption_point("gemma3_text")


def _reference(q, k, v, keep):
    """Attention by hand from a boolean mask [B, 1, T, S] (True = attend)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_window_masks_match_a_hand_built_band(backend):
    t, w = 20, 5
    q, k, v = torch.randn(2, 4, t, 8), torch.randn(2, 2, t, 8), torch.randn(2, 2, t, 8)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    band = (j <= i) & (i - j < w)  # [T, T]
    doc = torch.tensor([[0] * 7 + [1] * 13, [0] * 20])
    same_doc = doc[:, :, None] == doc[:, None, :]
    attn_mod.set_attention_backend(backend)
    try:
        plain = prepare_attention(None, t, t, q.device, window=w)
        docs = prepare_attention(AttnSpec.documents(doc), t, t, q.device, window=w)
        assert (plain.block_mask is not None) == (backend == "flex")
        got_plain = sdpa_attention(q, k, v, plain)
        got_docs = sdpa_attention(q, k, v, docs)
    finally:
        attn_mod.set_attention_backend("auto")
    torch.testing.assert_close(got_plain, _reference(q, k, v, band[None, None]), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_docs, _reference(q, k, v, (band & same_doc)[:, None]),
                               atol=1e-5, rtol=0)
    # A window as long as the sequence hides nothing: plain causal (the fast path).
    assert prepare_attention(None, t, t, q.device, window=t).is_causal


def test_decode_key_mask_keeps_the_last_window_slots():
    """A static-cache decode step: keys written at slots 0..9 (slots 0-2 left padding), the
    query at slot 9; window 4 keeps slots 6..9."""
    keys = torch.zeros(1, 12, dtype=torch.bool)
    keys[0, 3:10] = True
    mask = prepare_attention(AttnSpec.keys(keys), 1, 12, keys.device, window=4).mask
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [6, 7, 8, 9]
    with pytest.raises(TunesmithError, match="one query"):
        prepare_attention(AttnSpec.keys(keys), 2, 12, keys.device, window=4)
