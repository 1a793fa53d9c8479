"""The fused optimizer step on 2 ranks (gloo): with fused AdamW the NaN guard's flag and the
gradient clip go into the kernel (`found_inf`, `grad_scale`), for FSDP2's DTensor parameters
and DDP's plain ones alike. The runs clip on every step (max norm 0.3 under norms of 0.66-0.85)
and must reproduce the one-process run that clips with a separate pass and steps unfused
AdamW, within test_training's tolerances."""

from __future__ import annotations

import pytest

from tests.distributed.helpers import job, losses, run_jobs, save_init
from tests.distributed.test_training import _assert_same, _assert_same_weights
from tunesmith.cli.main import run

pytestmark = pytest.mark.slow

CLIP = "train.max_grad_norm=0.3"
LAYOUTS = {"full_shard": "parallel.strategy=full_shard", "ddp": "parallel.strategy=no_shard"}


def test_fused_step_with_clip_matches_the_clip_pass(tiny_tokenizer_dir, demo_text, tmp_path):
    train, valid = demo_text
    data = (tiny_tokenizer_dir, train, valid)
    init = save_init(tmp_path / "init", tied=False)
    ref = tmp_path / "ref"  # one process, unfused AdamW: the host decides, clipping is a pass
    assert run(["-q", "train", *job(*data, ref, init=init, extra=(CLIP, "optim.fused=false"))]) == 0
    assert all(g > 0.3 for _, g in losses(ref))  # the clip acts on every step
    one = tmp_path / "one_fused"  # one process, the fused path
    assert run(["-q", "train", *job(*data, one, init=init, extra=(CLIP, "optim.fused=true"))]) == 0
    run_jobs(2, [job(*data, tmp_path / name, dp=2, init=init, extra=(CLIP, "optim.fused=true", layout))
                 for name, layout in LAYOUTS.items()], tmp_path)
    for name in ("one_fused", *LAYOUTS):
        _assert_same(tmp_path / name, ref, name)
        _assert_same_weights(tmp_path / name, ref, name)
