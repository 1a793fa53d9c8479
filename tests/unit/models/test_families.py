"""Every model family, through its descriptor: discovery, build, forward, HF name round trip,
save/load through the one HF-directory writer."""

from __future__ import annotations

import pytest
import torch

from tunesmith.errors import TunesmithError
from tunesmith.models import (
    build_model,
    families,
    family_of,
    get_family,
    init_random,
    load_pretrained,
    resolve_model_config,
    save_pretrained,
)
from tunesmith.models.family import ModelFamily

TINY_PRESETS = {"llama": "tiny", "gpt2": "gpt2-tiny", "gptj": "gptj-tiny", "gpt_neox": "pythia-tiny", "bert": "roberta-tiny",
                "gemma": "gemma3-tiny", "moe": "moe-tiny"}


def test_registry_discovers_one_descriptor_per_family_folder():
    found = {fam.name for fam in families().values()}
    assert found == set(TINY_PRESETS)
    for model_type, fam in families().items():
        assert isinstance(fam, ModelFamily) and model_type in fam.model_types
        assert get_family(model_type) is fam
    assert get_family("roberta").kind == "masked" and get_family("qwen2").kind == "causal"
    with pytest.raises(TunesmithError, match="unsupported model_type 'not_a_model'"):
        get_family("not_a_model")


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_family_builds_runs_and_round_trips_hf_names(name, tmp_path):
    family, cfg = resolve_model_config(TINY_PRESETS[name])
    assert family.name == name
    model = init_random(build_model(family, cfg), "cpu", torch.float32, seed=0)
    assert family_of(model) is family
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 16, cfg.vocab_size) and torch.isfinite(logits).all()
    adapter = family.adapter(cfg)
    for key in model.state_dict():
        hf = adapter.native_key_to_hf(key)
        if hf is not None:  # None: a tied head, not saved
            assert adapter.hf_key_to_native(hf) == key
    out = save_pretrained(model, family, cfg, tmp_path / "m")
    reloaded = build_model(*resolve_model_config(str(out)))
    load_pretrained(reloaded, str(out), "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), logits)
