"""GPU checks that CPU CI cannot run: compiled fused CE vs eager reference, tiny e2e training.

    PYTHONPATH=src python benchmarks/check_cuda.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.objective.loss import cross_entropy_sum, linear_cross_entropy  # noqa: E402


def check_fused_ce(dtype: torch.dtype, n=5000, d=256, v=32000, tol=1e-4) -> float:
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::7] = -100
    ref = cross_entropy_sum(h.double() @ w.double().t(), y)
    ref.backward()
    gh, gw = h.grad.double().clone(), w.grad.double().clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, y, compute_dtype=dtype, chunk_size=2048)
    out.backward()
    errs = [
        abs(out.item() - ref.item()) / abs(ref.item()),
        ((h.grad.double() - gh).norm() / gh.norm()).item(),
        ((w.grad.double() - gw).norm() / gw.norm()).item(),
    ]
    print(f"fused CE {dtype}: rel err loss {errs[0]:.2e}, dh {errs[1]:.2e}, dW {errs[2]:.2e}")
    assert max(errs) < tol, errs
    return max(errs)


def check_precisions(tmp: Path) -> None:
    """A tiny run of the real CLI in every precision, compiled and not: loss falls, model saved."""
    import json

    from tunesmith.cli.demo import train_tokenizer, write_corpus
    from tunesmith.cli.main import run

    train, valid = write_corpus(tmp / "data", seed=0)
    tok = train_tokenizer(train, tmp / "tok", vocab_size=512)
    for precision in ("fp32", "bf16", "fp16", "bf16-pure"):
        for compile_ in (False, True):
            out = tmp / f"run-{precision}-{compile_}"
            code = run(["-q", "train", f"data.path={train}", f"data.validation_path={valid}",
                        f"model.tokenizer={tok}", "model.overrides={vocab_size: 512}",
                        "data.block_size=128", "train.micro_batch_size=16", "train.max_steps=60",
                        f"train.precision={precision}", f"train.compile={compile_}",
                        "optim.lr=3e-3", "logging.progress=false", f"output.dir={out}"])
            summary = json.loads((out / "summary.json").read_text())
            losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in x]
            print(f"{precision:9s} compile={compile_!s:5s} exit {code} loss {losses[0]:.3f} -> "
                  f"{losses[-1]:.3f} eval ppl {summary['perplexity']:.1f}")
            assert code == 0 and losses[-1] < losses[0] - 0.5 and (out / "final" / "config.json").exists()


if __name__ == "__main__":
    import tempfile

    check_fused_ce(torch.float32, tol=1e-5)
    check_fused_ce(torch.bfloat16, tol=1e-2)
    with tempfile.TemporaryDirectory() as d:
        check_precisions(Path(d))
    print("cuda checks passed")
