"""Native Gemma 3 (text) vs transformers' Gemma3ForCausalLM: logits, gradients, packed documents,
padding, save/load both ways and PEFT adapters, on tiny random configs whose sequences are
longer than the sliding window (so the local layers really differ from full causal attention).

Greedy generation past the window is covered with the other decoders in
test_batched_generation.py (its `gemma3` config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.parity.helpers import assert_padding_matches_hf, load_ours
from tunesmith.models import attention as attn_mod
from tunesmith.models import (
    build_model,
    load_pretrained,
    resolve_model_config,
    save_pretrained,
)
from tunesmith.models.attention import AttnSpec

ATOL = 1e-5
VOCAB, WINDOW, SEQ = 128, 8, 29
SLIDE, FULL = "sliding_attention", "full_attention"
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              sliding_window=WINDOW, pad_token_id=0, bos_token_id=2, eos_token_id=1)


def _hf_configs() -> dict[str, transformers.PretrainedConfig]:
    return {
        # transformers 5 layout: layer_types, per-kind rope_parameters, linear scaling on the
        # full layers (as gemma-3-4b), a score scale that is not head_dim ** -0.5 (as 27b).
        "tied_linear_rope": transformers.Gemma3TextConfig(
            **COMMON, num_hidden_layers=4, layer_types=[SLIDE, FULL, SLIDE, SLIDE],
            query_pre_attn_scalar=24, tie_word_embeddings=True,
            rope_parameters={FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                             SLIDE: {"rope_type": "default", "rope_theta": 500.0}}),
        # transformers 4 keys (sliding_window_pattern, rope_theta, rope_local_base_freq) and an
        # untied head with q/k/v/o biases.
        "untied_bias_pattern": transformers.Gemma3TextConfig(
            **COMMON, num_hidden_layers=3, sliding_window_pattern=2, rope_theta=20000.0,
            rope_local_base_freq=300.0, query_pre_attn_scalar=16, tie_word_embeddings=False,
            attention_bias=True),
    }


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """O(1) activations; norm weights around 0 (Gemma scales by 1 + weight)."""
    for name, p in model.named_parameters():
        p.normal_(0.0, 0.3 if "norm" in name else 0.15)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    out = {}
    for i, (name, cfg) in enumerate(_hf_configs().items()):
        torch.manual_seed(i)
        model = transformers.Gemma3ForCausalLM(cfg).float().eval()
        _randomize(model)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    # From 3 up: the pad (0), eos (1) and bos (2) ids stay out of the inputs (HF's embedding
    # has padding_idx=0, which zeroes that row's gradient).
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


NAMES = list(_hf_configs())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path, "gemma")
    assert {layer.sliding for layer in ours.layers} == {True, False}
    ids = _ids(2, SEQ)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
        # The window matters here: without it the logits are different.
        wide = transformers.Gemma3ForCausalLM(
            transformers.Gemma3TextConfig(**{**hf.config.to_dict(), "sliding_window": 4 * SEQ}))
        wide.load_state_dict(hf.state_dict())
        assert (wide.float().eval()(ids).logits - expected).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if hf.config.tie_word_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_hf(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path, "gemma")
    ids = _ids(2, SEQ, seed=5)
    targets = torch.roll(ids, -1, dims=1)
    hf.zero_grad()
    loss_hf = torch.nn.functional.cross_entropy(hf(ids).logits.flatten(0, 1), targets.flatten())
    loss_hf.backward()
    loss = torch.nn.functional.cross_entropy(ours(ids).flatten(0, 1), targets.flatten())
    loss.backward()
    torch.testing.assert_close(loss, loss_hf, atol=ATOL, rtol=0)
    family, cfg = resolve_model_config(str(path))
    adapter = family.adapter(cfg)
    hf_grads = dict(hf.named_parameters())
    for native, p in ours.named_parameters():
        ref = hf_grads[adapter.native_key_to_hf(native)].grad
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-4, msg=native)
    hf.zero_grad()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_documents_equal_separate_runs(hf_models, backend: str) -> None:
    """Packed rows (positions restart per document) give each document's own logits, with
    documents longer than the window; dense SDPA and FlexAttention block masks alike."""
    hf, path = hf_models["tied_linear_rope"]
    ours = load_ours(path, "gemma")
    t = 32
    ids = _ids(2, t, seed=2)
    cut = [11, 20]  # row r: doc A = ids[r, :cut[r]], doc B = the rest
    doc_ids = torch.stack([(torch.arange(t) >= c).long() for c in cut])
    attn_mod.set_attention_backend(backend)
    try:
        with torch.no_grad():
            packed = ours(ids, attn=AttnSpec.documents(doc_ids))
    finally:
        attn_mod.set_attention_backend("auto")
    with torch.no_grad():
        for r, c in enumerate(cut):
            for seg in (slice(0, c), slice(c, t)):
                reference = hf(ids[r : r + 1, seg]).logits[0]
                torch.testing.assert_close(packed[r, seg], reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_plain_causal_backends_agree(hf_models, backend: str) -> None:
    """Training rows without masks: the windowed causal mask as dense SDPA or a flex block mask."""
    hf, path = hf_models["untied_bias_pattern"]
    ours = load_ours(path, "gemma")
    ids = _ids(2, SEQ, seed=9)
    attn_mod.set_attention_backend(backend)
    try:
        with torch.no_grad():
            got = ours(ids)
    finally:
        attn_mod.set_attention_backend("auto")
    with torch.no_grad():
        torch.testing.assert_close(got, hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_padding_matches_hf_attention_mask(hf_models, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path, "gemma")
    assert_padding_matches_hf(hf, ours, _ids(3, 24, seed=1), ATOL)


@pytest.mark.parametrize("name", NAMES)
def test_native_save_loads_in_transformers(hf_models, tmp_path: Path, name: str) -> None:
    hf, path = hf_models[name]
    ours = load_ours(path, "gemma")
    family, cfg = resolve_model_config(str(path))
    out = tmp_path / "saved"
    save_pretrained(ours, family, cfg, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is transformers.Gemma3ForCausalLM
    assert reloaded.config.layer_types == hf.config.layer_types
    ids = _ids(2, SEQ, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(load_ours(out, "gemma")(ids), ours(ids), atol=0, rtol=0)


def test_lora_adapter_loads_in_peft(hf_models, tmp_path: Path) -> None:
    """A LoRA adapter trained on the native model, saved in PEFT format, loads into peft on
    Gemma3ForCausalLM with the same logits; peft's names (q_proj, down_proj) pick the layers."""
    peft = pytest.importorskip("peft")
    from tunesmith.peft import LoRASpec, apply_lora, lora_modules, save_adapter

    _, path = hf_models["tied_linear_rope"]
    ours = load_ours(path, "gemma")
    family, cfg = resolve_model_config(str(path))
    torch.manual_seed(0)
    apply_lora(ours, family.adapter(cfg), LoRASpec(r=4, alpha=8), ["q_proj", "v_proj", "down_proj"])
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):  # so B != 0
        ids = _ids(2, SEQ, seed=20 + step)
        ours(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.count_nonzero(m.lora_B) for m in lora_modules(ours).values())
    save_adapter(ours.eval(), family.adapter(cfg), tmp_path / "ad", base_model=str(path))
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    assert sum(n.endswith(".lora_A") for n, _ in theirs.named_modules()) == 3 * cfg.n_layers
    ids = _ids(2, SEQ, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=ATOL, rtol=0)


# ------------------------------------------------------------ image+text checkpoints (gemma3)
@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory):
    """(transformers' Gemma3ForConditionalGeneration, its save_pretrained dir)."""
    from tests.gemma3_multimodal import save_tiny_gemma3

    path = tmp_path_factory.mktemp("hf_gemma3")
    return save_tiny_gemma3(path), path


@pytest.mark.parametrize("layout", ["saved", "module_names"])
def test_image_text_checkpoint_text_tower_matches_hf(multimodal, tmp_path: Path, layout: str) -> None:
    """Text-only input: the image+text model's logits (plain causal and window masks, no image
    token) equal those of the text tower tunesmith reads. Layouts: what save_pretrained writes
    (`language_model.model.*`, the 4.5x hub files' names) and 5.x module names
    (`model.language_model.*`)."""
    from tests.gemma3_multimodal import rename_weights

    hf, path = multimodal
    assert any(k.startswith("language_model.model.layers.") for k in _tensor_names(path))
    if layout == "module_names":
        rename_weights(path, tmp_path / "renamed", "language_model.model.", "model.language_model.")
        path = tmp_path / "renamed"
    family, cfg = resolve_model_config(str(path))
    assert cfg.multimodal_source and cfg.vocab_size == hf.config.text_config.vocab_size
    ours = load_pretrained(build_model(family, cfg), str(path), "cpu", torch.float32).eval()
    ids = torch.randint(3, 512, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, atol=ATOL, rtol=0)
    assert ours.output.weight is ours.tok_embeddings.weight


def test_vision_tensors_are_skipped_only_for_image_text_sources(multimodal, tmp_path: Path) -> None:
    """The same weights under a text-only config: the vision tower is an unexpected tensor."""
    import json

    from tunesmith.errors import TunesmithError

    _, path = multimodal
    text = json.loads((path / "config.json").read_text())["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(text))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    family, cfg = resolve_model_config(str(tmp_path))
    with pytest.raises(TunesmithError, match="unexpected tensors: language_model.model"):
        load_pretrained(build_model(family, cfg), str(tmp_path), "cpu", torch.float32)


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return list(f.keys())
