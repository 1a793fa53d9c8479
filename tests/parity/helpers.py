"""What the parity tests against transformers share: loading a saved HF directory natively, the
padded-batch comparison, and the MoE experts' grouped-GEMM forward on CPU."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.models import build_model, load_pretrained, resolve_model_config
from tunesmith.models.attention import AttnSpec
from tunesmith.models.moe import model as moe_model


def load_ours(path: Path, family: str | None = None) -> nn.Module:
    """The HF model directory `path` loaded natively in fp32 on CPU, in eval mode; `family`: the
    family it must resolve to."""
    fam, cfg = resolve_model_config(str(path))
    if family is not None:
        assert fam.name == family
    return load_pretrained(build_model(fam, cfg), str(path), "cpu", torch.float32).eval()


def assert_padding_matches_hf(hf: nn.Module, ours: nn.Module, ids: torch.Tensor, atol: float) -> None:
    """ids [B >= 2, T > 15]: row 0 left-padded by 6, row 1 right-padded from 15, the rest
    unpadded; our padding mask must give transformers' logits on every real token."""
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[1, 15:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=positions).logits
        got = ours(ids, positions=positions, attn=AttnSpec.padding(mask))
    keep = mask.bool()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[keep], expected[keep], atol=atol, rtol=0)


@torch.no_grad()
def grouped_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """An MoE model's logits with the experts on the grouped-GEMM path (torch's CPU kernel,
    forward only); skips the test where this torch has no CPU kernel."""
    import pytest

    moe_model.set_expert_backend("grouped")
    try:
        return model(ids)
    except RuntimeError as e:
        pytest.skip(f"torch._grouped_mm on CPU: {e}")
    finally:
        moe_model.set_expert_backend("auto")
