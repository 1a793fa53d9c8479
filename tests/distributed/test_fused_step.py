"""The fused optimizer step on 2 ranks (gloo): with fused AdamW the NaN guard's flag and the
gradient clip go into the kernel (`found_inf`, `grad_scale`), for FSDP2's and TP's DTensor
parameters, DDP's plain ones and FSDP2-sharded LoRA adapters alike. The runs clip on every step
and must reproduce the one-process run that clips with a separate pass and steps unfused
AdamW, within test_training's tolerances. A non-finite loss on one rank is seen by both (the
flag comes from the all-reduced loss and the global norm): `halt` ends both ranks with the same
one-line error, `skip` counts one skipped step and finishes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import job, losses, run_jobs, save_init
from tests.distributed.test_training import WEIGHT_ATOL, _assert_same, _assert_same_weights
from tunesmith.cli.main import run

pytestmark = pytest.mark.slow

# The full fine-tune's norms are 0.66-0.85 and LoRA's 0.08-0.10 (B starts at zero): both clip.
CLIP = {"full": ("train.max_grad_norm=0.3",),
        "lora": ("train.max_grad_norm=0.02", "peft.method=lora", "peft.r=4", "peft.alpha=8")}
# name -> (data-parallel degree, layout, reference: "full" | "lora")
LAYOUTS = {
    "full_shard": (2, ("parallel.strategy=full_shard",), "full"),
    "ddp": (2, ("parallel.strategy=no_shard",), "full"),
    "tp2": (1, ("parallel.tp=2",), "full"),  # DTensor Shard and Replicate params, one kernel
    "lora_full_shard": (2, ("parallel.strategy=full_shard",), "lora"),
}


def test_fused_step_with_clip_matches_the_clip_pass(tiny_tokenizer_dir, demo_text, tmp_path):
    train, valid = demo_text
    data = (tiny_tokenizer_dir, train, valid)
    init = save_init(tmp_path / "init", tied=False)
    refs = {}
    for kind, clip in CLIP.items():  # one process, unfused AdamW: the host decides, clip is a pass
        refs[kind] = tmp_path / f"ref_{kind}"
        assert run(["-q", "train", *job(*data, refs[kind], init=init, extra=(*clip, "optim.fused=false"))]) == 0
        limit = float(clip[0].split("=")[1])
        assert all(g > limit for _, g in losses(refs[kind])), kind  # the clip acts on every step
    one = tmp_path / "one_fused"  # one process, the fused path
    assert run(["-q", "train", *job(*data, one, init=init, extra=(*CLIP["full"], "optim.fused=true"))]) == 0
    run_jobs(2, [job(*data, tmp_path / name, dp=dp, init=init, extra=(*CLIP[kind], "optim.fused=true", *layout))
                 for name, (dp, layout, kind) in LAYOUTS.items()])
    for name, kind in (("one_fused", "full"), *((n, spec[2]) for n, spec in LAYOUTS.items())):
        _assert_same(tmp_path / name, refs[kind], name)
        if kind == "full":
            _assert_same_weights(tmp_path / name, refs[kind], name)
        else:  # the saved adapter
            got = load_file(tmp_path / name / "final" / "adapter_model.safetensors")
            want = load_file(refs[kind] / "final" / "adapter_model.safetensors")
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=WEIGHT_ATOL, rtol=0, msg=f"{name}: {k}")


@pytest.mark.parametrize("policy", ["halt", "skip"])
def test_non_finite_step_on_one_rank_is_handled_on_every_rank(tiny_tokenizer_dir, demo_text, tmp_path, policy):
    # Rank 1's loss is infinite at step 3: the all-reduced loss and the reduced gradients are
    # non-finite on both ranks, so both read the same flag (one step late, on the fused path).
    from tests.distributed.helpers import REPO, torchrun

    train, valid = demo_text
    out = tmp_path / "run"
    argv = ["train", *job(tiny_tokenizer_dir, train, valid, out, dp=2, steps=6,
                          extra=("optim.fused=true", "parallel.strategy=full_shard",
                                 f"train.nan_policy={policy}"))]
    proc = torchrun(2, [str(REPO / "tests/distributed/_fault_worker.py"), *argv], timeout=240,
                    TUNESMITH_TEST_FAULT="nan")
    if policy == "halt":
        assert proc.returncode != 0, proc.stderr[-3000:]
        for rank in (0, 1):  # each rank's one-line error (torchrun's summary repeats them)
            assert f"tunesmith: error (rank {rank}): non-finite loss and grad norm at step 3" in proc.stderr, \
                proc.stderr[-3000:]
        diag = json.loads((out / "nan_diagnostics.json").read_text())
        assert diag["step"] == 3 and diag["non_finite"] == ["loss", "grad_norm"]
        assert not (out / "final").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1
        recs = losses(out)  # the skipped step's loss is logged as what it was
        assert len(recs) == 6 and all(math.isfinite(loss) for i, (loss, _) in enumerate(recs) if i != 2)
