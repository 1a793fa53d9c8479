"""train.residual_dtype=bf16: under bf16 autocast the Llama residual stream between blocks is
bf16 (RoPE tables stay fp32), outputs stay close to the fp32 stream, nothing changes outside
autocast, and the option is refused where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from tests.peft_utils import ids, tiny_model
from tunesmith.build import assemble
from tunesmith.config import load_config
from tunesmith.errors import ConfigError, TunesmithError


def _stream_dtypes(model, x) -> dict[str, torch.dtype]:
    seen = {}
    def block_in(m, args, kwargs):
        seen.setdefault("block_in", args[0].dtype)
        seen.setdefault("rope", (args[1] if len(args) > 1 else kwargs["cos"]).dtype)

    hooks = [model.layers[0].register_forward_pre_hook(block_in, with_kwargs=True),
             model.norm.register_forward_pre_hook(lambda m, a: seen.update(final_norm_in=a[0].dtype))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    for h in hooks:
        h.remove()
    return seen, out


def test_bf16_stream_under_autocast_fp32_tables_close_outputs() -> None:
    model, _, _ = tiny_model(seed=3)
    x = ids(2, 16, seed=1)
    ref_dtypes, ref = _stream_dtypes(model, x)
    assert ref_dtypes == {"block_in": torch.float32, "rope": torch.float32, "final_norm_in": torch.float32}
    model.residual_dtype = torch.bfloat16
    dtypes, out = _stream_dtypes(model, x)
    assert dtypes == {"block_in": torch.bfloat16, "rope": torch.float32, "final_norm_in": torch.bfloat16}
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0)
    assert cos > 0.999 and not torch.equal(out, ref)


def test_no_effect_outside_autocast() -> None:
    model, _, _ = tiny_model(seed=3)
    x = ids(2, 16, seed=1)
    ref = model(x)
    model.residual_dtype = torch.bfloat16
    assert torch.equal(model(x), ref)


def test_config_and_family_refusals(tmp_path) -> None:
    with pytest.raises(ConfigError, match="residual_dtype=bf16 needs train.precision=bf16"):
        load_config(None, ["data.path=x", "train.residual_dtype=bf16", "train.precision=fp32"])
    cfg = load_config(None, ["data.path=x", "model.name=gpt2-tiny", "train.residual_dtype=bf16",
                             "train.device=cpu"])
    with pytest.raises(TunesmithError, match="supported for the native Llama-family and Gemma 3 models, not 'gpt2'"):
        assemble(cfg, with_tokenizer=False, until="build_on_meta")
    ok = assemble(load_config(None, ["data.path=x", "model.name=tiny", "train.residual_dtype=bf16",
                                     "train.device=cpu"]), with_tokenizer=False, until="build_on_meta")
    assert ok.model.residual_dtype is None  # CPU runs bf16 precision as fp32: nothing to cast
