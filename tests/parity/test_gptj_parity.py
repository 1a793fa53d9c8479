"""Native GPT-J vs HF `GPTJForCausalLM`: logits parity (fp32, atol 1e-5) through the production
load path, padding, KV-cache decoding, save/load round trip, old checkpoint buffers, LoRA in
peft's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.parity.helpers import load_ours
from tunesmith.models import build_model, resolve_model_config, save_pretrained
from tunesmith.models.attention import AttnSpec
from tunesmith.models.kv_cache import KVCache

ATOL = 1e-5
VOCAB = 128
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
CONFIGS = {
    # partial interleaved rotary (rotary_dim < head_dim), the GPT-J-6B layout
    "partial": dict(rotary_dim=8),
    # rotary over the whole head (head_dim 16), explicit n_inner, exact GELU, tied head
    "full": dict(rotary_dim=16, n_inner=96, activation_function="gelu", tie_word_embeddings=True),
}


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> None:
    """O(1) activations (HF inits tiny weights and zero biases) so parity means something."""
    for name, p in model.named_parameters():
        is_norm = ".ln_" in name
        p.normal_(1.0 if is_norm and name.endswith("weight") else 0.0, 0.1 if is_norm else 0.15)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_gptj(request, tmp_path_factory: pytest.TempPathFactory):
    cfg = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                  n_positions=64, bos_token_id=0, eos_token_id=0,
                                  **NO_DROPOUT, **CONFIGS[request.param])
    torch.manual_seed(0)
    model = transformers.GPTJForCausalLM(cfg).eval()
    _randomize(model)
    path = tmp_path_factory.mktemp(f"gptj_{request.param}")
    model.save_pretrained(path)
    return model, path


def _ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_logits_padding_and_cache_match_hf(hf_gptj) -> None:
    hf, path = hf_gptj
    ours = load_ours(path, "gptj")
    ids = _ids(2, 33)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # right padding
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=0)
        got = ours(ids, attn=AttnSpec.padding(mask))
        expected = hf(ids, attention_mask=mask).logits
        keep = mask.bool()
        torch.testing.assert_close(got[keep], expected[keep], atol=ATOL, rtol=0)
        # prefill 20 tokens, then one token at a time through the KV cache
        cache = KVCache.for_model(ours, 2, 33)
        steps = [ours(ids[:, :20], cache=cache)] + [ours(ids[:, i:i + 1], cache=cache)
                                                     for i in range(20, 33)]
        torch.testing.assert_close(torch.cat(steps, 1), hf(ids).logits, atol=ATOL, rtol=0)
    if hf.config.tie_word_embeddings:
        assert ours.output.weight is ours.tok_embeddings.weight


def test_save_roundtrip_loads_in_transformers(hf_gptj, tmp_path: Path) -> None:
    hf, path = hf_gptj
    ours = load_ours(path, "gptj")
    family, cfg = resolve_model_config(str(path))
    save_pretrained(ours, family, cfg, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded) is type(hf)
    assert reloaded.config.rotary_dim == hf.config.rotary_dim
    ids = _ids(2, 17, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(load_ours(tmp_path / "saved", "gptj")(ids), ours(ids), atol=0, rtol=0)


def test_old_checkpoint_buffers_are_ignored(hf_gptj, tmp_path: Path) -> None:
    """EleutherAI/gpt-j-6b's files carry attn.bias / attn.masked_bias mask buffers."""
    hf, path = hf_gptj
    sd = load_file(str(path / "model.safetensors"))
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64)).bool()
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    (tmp_path / "old").mkdir()
    save_file(sd, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    ids = _ids(1, 20, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(load_ours(tmp_path / "old", "gptj")(ids), hf(ids).logits,
                                   atol=ATOL, rtol=0)


def test_presets_and_hf_names_in_overrides() -> None:
    fam, cfg = resolve_model_config("gpt-j-6b")
    assert fam.name == "gptj" and (cfg.dim, cfg.n_layers, cfg.rotary_dim) == (4096, 28, 64)
    # GPT-J-6B on meta: exactly GPTJForCausalLM(GPTJConfig())'s parameter count
    assert build_model(fam, cfg).num_params() == 6_050_882_784
    _, small = resolve_model_config("gpt-j-6b", {"n_embd": 256, "n_layer": 2, "n_head": 4,
                                                 "rotary_dim": 16})
    assert (small.dim, small.intermediate_size, small.head_dim) == (256, 1024, 64)
    assert small.to_hf()["n_inner"] is None


def test_recipe_mirrors_the_guides_zero2_run() -> None:
    """recipes/gptj_clm_wikitext.yaml is what optimum-habana's GPT-J-6B command runs: its
    ZeRO-2 DeepSpeed JSON maps onto exactly the recipe's strategy, precision and clipping."""
    from tests.conftest import REPO
    from tunesmith.config import load_config
    from tunesmith.config.deepspeed import map_deepspeed

    cfg = load_config(REPO / "recipes" / "gptj_clm_wikitext.yaml", [])
    zero2 = {  # optimum-habana tests/configs/deepspeed_zero_2.json
        "steps_per_print": 64, "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_scatter": False,
                              "contiguous_gradients": False},
    }
    mapped = map_deepspeed(zero2).updates
    assert mapped["parallel.strategy"] == cfg.parallel.strategy == "shard_grad_op"
    assert mapped["train.precision"] == cfg.train.precision == "bf16"
    assert mapped["train.max_grad_norm"] == cfg.train.max_grad_norm == 1.0
    # run_clm's flags: --per_device_train_batch_size 4 --gradient_checkpointing; Trainer defaults
    assert (cfg.train.micro_batch_size, cfg.parallel.activation_checkpointing) == (4, "full")
    assert (cfg.optim.lr, cfg.optim.betas, cfg.schedule.name) == (5e-5, (0.9, 0.999), "linear")
    fam, full = resolve_model_config(cfg.model.name)  # model.overrides={} gives GPT-J-6B
    assert fam.name == "gptj" and (full.dim, full.n_layers, full.vocab_size) == (4096, 28, 50400)
