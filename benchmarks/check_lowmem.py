"""GPU checks of the float8 / low-memory modes through the real `tunesmith train` CLI:

  1. float8 (tensorwise, every aligned layer, compiled blocks + activation checkpointing):
     a run stopped at step N and resumed to 2N matches the uninterrupted 2N run bit for bit
     (losses and final weights), and its loss tracks the same run in bf16;
  2. the float8-trained final model (OUTPUT/final, HF format) loads in `transformers` in bf16
     and gives the logits tunesmith gives for it;
  3. adamw8bit / adamw4bit on bf16 weights with stochastic rounding (the compiled CUDA step):
     stop-and-resume is exact as well.

    PYTHONPATH=src python3 benchmarks/check_lowmem.py --out /tmp/check --json check.json

A tiny Llama (dims multiples of 16) on a generated corpus with a BPE tokenizer trained on it
(tunesmith.cli.demo's helpers): no downloads. Prints one JSON object; exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODEL = ("model.overrides={vocab_size: 512, dim: 256, n_layers: 2, n_heads: 4, n_kv_heads: 4, "
         "intermediate_size: 512, max_position_embeddings: 512}")


def _overrides(root: Path, tok: Path, data: Path, out: Path, **extra) -> list[str]:
    base = {"model.name": "tiny", "model.tokenizer": str(tok), "data.path": str(data),
            "data.block_size": 128, "train.micro_batch_size": 8, "train.device": "cuda",
            "logging.progress": "false", "logging.steps": 1, "eval.at_end": "false",
            "schedule.name": "constant", "schedule.warmup_steps": 2, "optim.lr": 1e-3,
            "output.dir": str(out), "data.max_train_samples": 2000}
    base.update(extra)
    return [MODEL, *(f"{k}={v}" for k, v in base.items())]


def _losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def straight_losses(root: Path, tok: Path, data: Path, name: str, n: int, **extra) -> dict[int, float]:
    from tunesmith.cli.main import run

    out = root / f"{name}-straight"
    assert run(["-q", "train", *_overrides(root, tok, data, out, **extra, **{"train.max_steps": n})]) == 0
    return _losses(out)


def resume_check(root: Path, tok: Path, data: Path, name: str, n: int, **extra) -> dict:
    """Straight 2n steps vs n steps + resume to 2n, same settings."""
    from tunesmith.cli.main import run

    straight, split = root / f"{name}-straight", root / f"{name}-split"
    codes = [run(["-q", "train", *_overrides(root, tok, data, straight, **extra, **{"train.max_steps": 2 * n})]),
             run(["-q", "train", *_overrides(root, tok, data, split, **extra, **{"train.max_steps": n,
                                                                                "checkpoint.every_steps": n})]),
             run(["-q", "train", *_overrides(root, tok, data, split, **extra, **{
                 "train.max_steps": 2 * n, "checkpoint.every_steps": n, "checkpoint.resume": "auto"})])]
    a, b = _losses(straight), _losses(split)
    return {"exit_codes": codes, "losses": a, "resumed_losses": b,
            "exact": codes == [0, 0, 0] and a == b and _same_weights(straight, split)}


def export_check(final: Path, device: str = "cuda") -> dict:
    """The HF-format final model in transformers (bf16) vs tunesmith's own load of it."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.models import build_model, load_pretrained, resolve_model_config

    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.bfloat16).to(device).eval()
    family, cfg = resolve_model_config(str(final))
    ours = build_model(family, cfg, device="meta")
    load_pretrained(ours, str(final), device=torch.device(device), dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        want = hf(ids).logits.float()
        got = ours.eval()(ids).float()
    diff = float((got - want).abs().max())
    return {"hf_dtype": str(next(hf.parameters()).dtype), "max_abs_logit_diff": diff,
            "logit_scale": float(want.abs().max()), "ok": diff < 0.05 * float(want.abs().max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6, help="N: stop at N, resume to 2N")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test only")
    args = p.parse_args()
    from tunesmith.cli.demo import train_tokenizer, write_corpus

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    data, _ = write_corpus(root / "data", seed=0)
    tok = train_tokenizer(data, root / "tokenizer", vocab_size=512)
    if args.device == "cpu":  # smoke test of this script: float8 is refused on CPU
        res = {f"{n}_resume": resume_check(root, tok, data, n, 2, **{
            "optim.name": n, "train.precision": "bf16-pure", "train.device": "cpu"}) for n in ("adamw8bit",)}
        res["export"] = export_check(root / "adamw8bit-straight" / "final", "cpu")
        print(json.dumps(res, indent=2))
        return
    f8 = {"train.float8": "tensorwise", "train.float8_filter": "all", "train.compile": "true",
          "parallel.activation_checkpointing": "full", "train.precision": "bf16"}
    res = {"float8_resume": resume_check(root, tok, data, "float8", args.steps, **f8)}
    res["float8_export"] = export_check(root / "float8-straight" / "final")
    res["bf16_same_run_losses"] = straight_losses(root, tok, data, "bf16", 2 * args.steps,
                                                  **{**f8, "train.float8": "none"})
    for name in ("adamw8bit", "adamw4bit"):
        res[f"{name}_resume"] = resume_check(root, tok, data, name, args.steps, **{
            "optim.name": name, "train.precision": "bf16-pure", "optim.lr": 3e-4})
    res["ok"] = (res["float8_resume"]["exact"] and res["float8_export"]["ok"]
                 and res["adamw8bit_resume"]["exact"] and res["adamw4bit_resume"]["exact"])
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
