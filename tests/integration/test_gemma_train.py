"""A tiny Gemma 3 through the real CLI: the fused-loss training loop learns, the saved model is
an ordinary Gemma3ForCausalLM with the same logits, and a run stopped and resumed is bitwise
the uninterrupted one. Sequences (64) are longer than the sliding window (16) of the
`gemma3-tiny` preset (4 layers, sliding and full alternating)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tunesmith.cli.main import run



def _overrides(tok: Path, train: Path, out: Path, **extra: object) -> list[str]:
    ov = ["model.name=gemma3-tiny", f"model.tokenizer={tok}", f"data.path={train}",
          "data.block_size=64", "data.max_train_samples=200", "train.micro_batch_size=8",
          "train.precision=fp32", "logging.progress=false", "logging.steps=1", "eval.at_end=false",
          f"output.dir={out}", "optim.lr=3e-3", "schedule.name=constant", "schedule.warmup_steps=2"]
    return ov + [f"{k}={v}" for k, v in extra.items()]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_gemma_trains_saves_and_resumes_exactly(tmp_path: Path, tiny_tokenizer_dir: Path,
                                                demo_text: tuple[Path, Path]) -> None:
    train = demo_text[0]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(["-q", "train", *_overrides(tiny_tokenizer_dir, train, straight,
                                           **{"train.max_steps": 10})]) == 0
    losses = _losses(straight)
    assert len(losses) == 10 and losses[10] < losses[1] - 0.4, losses  # measured: 6.25 -> 5.50

    # Stopped at 5 with a checkpoint, resumed to 10: the same losses and weights, bit for bit.
    ckpt = {"checkpoint.every_steps": 5}
    assert run(["-q", "train", *_overrides(tiny_tokenizer_dir, train, split,
                                           **{"train.max_steps": 5, **ckpt})]) == 0
    assert run(["-q", "train", *_overrides(tiny_tokenizer_dir, train, split,
                                           **{"train.max_steps": 10, **ckpt,
                                              "checkpoint.resume": "auto"})]) == 0
    assert _losses(split) == losses
    a, b = (load_file(d / "final" / "model.safetensors") for d in (split, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # The final model is a Gemma3ForCausalLM with our logits.
    from transformers import AutoModelForCausalLM

    from tunesmith.eval.run import load_for_inference
    from tunesmith.runtime import resolve_runtime

    hf = AutoModelForCausalLM.from_pretrained(straight / "final", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    model, _ = load_for_inference(str(straight / "final"), resolve_runtime("cpu", "fp32"))
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
