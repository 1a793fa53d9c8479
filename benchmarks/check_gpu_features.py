"""GPU checks for features CPU CI cannot exercise, printed as one report.

    PYTHONPATH=src python benchmarks/check_gpu_features.py [--json out.json]

1. Packed documents on CUDA: loss of a packed batch == each document alone (FlexAttention and
   SDPA-with-mask backends), and the attention fwd+bwd time of each backend at a 1B-like shape.
2. Exact resume on CUDA: per-step losses of a 2N-step run vs N steps + resume to 2N (fp32, bf16).
3. QLoRA on CUDA: a short NF4 LoRA run through the CLI trains (loss falls) and reports memory.
4. SDPA kernels (cuDNN, FlashAttention-2): causal GQA attention at the Llama-3-8B head shape,
   output and input-gradient error of each against an fp32 reference, and fwd+bwd time; plus
   which kernel tunesmith's preference makes a plain SDPA call take.

    --only sdpa    runs check 4 alone
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def packed_parity(backend: str) -> float:
    from tunesmith.models import build_model, init_random, resolve_model_config
    from tunesmith.models.attention import AttnSpec, set_attention_backend

    set_attention_backend(backend)
    fam, cfg = resolve_model_config("tiny", {"vocab_size": 256, "n_layers": 2})
    model = build_model(fam, cfg)
    init_random(model, device=torch.device("cuda"), dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    lens = [37, 90, 1, 128]  # one row of 256 tokens holding 4 documents
    docs = [torch.randint(0, 256, (n,), generator=g) for n in lens]
    ids = torch.cat(docs)[None].cuda()  # [1, 256]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None].cuda()
    with torch.no_grad():
        packed = model(ids, attn=AttnSpec.documents(doc_ids))  # positions restart per document
        alone = torch.cat([model(d[None].cuda()) for d in docs], dim=1)
    set_attention_backend("auto")
    return (packed - alone).abs().max().item()


def attention_timing(B=8, T=2048, H=32, Hkv=8, hd=64, n_docs=8) -> dict[str, float]:
    """fwd+bwd of one attention call with documents masks, bf16, per backend (median ms)."""
    from tunesmith.models.attention import AttnSpec, prepare_attention, sdpa_attention, set_attention_backend

    doc_ids = (torch.arange(T, device="cuda") * n_docs // T)[None].expand(B, T)
    out = {}
    for name in ("flex", "sdpa", "causal-only"):
        set_attention_backend("flex" if name == "flex" else "sdpa")
        spec = None if name == "causal-only" else AttnSpec.documents(doc_ids)
        prepared = prepare_attention(spec, T, T, torch.device("cuda"))
        q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, Hkv, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, Hkv, T, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        times = []
        for i in range(25):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sdpa_attention(q, k, v, prepared).sum().backward()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - t0)
        out[name] = 1000 * sorted(times)[len(times) // 2]
    set_attention_backend("auto")
    return out


def sdpa_kernels(B=2, T=4096, H=32, Hkv=8, hd=128) -> dict:
    """Each SDPA kernel forced in turn vs an fp32 math reference: max abs error of the output
    and of dq/dk/dv (bf16 inputs, causal, GQA), and median fwd+bwd ms."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import torch.nn.functional as F

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, T, hd, device="cuda", generator=g, dtype=torch.bfloat16)
               for h in (H, Hkv, Hkv))
    dout = torch.randn(B, H, T, hd, device="cuda", generator=g, dtype=torch.bfloat16)

    def fwd_bwd(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        out.backward(dout.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    with sdpa_kernel(SDPBackend.MATH):
        ref = fwd_bwd(torch.float32)
    report: dict = {}
    for name, kernel in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(kernel):
            got = fwd_bwd(torch.bfloat16)
            times = []
            for i in range(15):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fwd_bwd(torch.bfloat16)
                torch.cuda.synchronize()
                if i >= 5:
                    times.append(time.perf_counter() - t0)
        errs = [(a - b).abs().max().item() for a, b in zip(got, ref)]
        report[name] = {"max_abs_err_out_dq_dk_dv": errs, "ms": 1000 * sorted(times)[len(times) // 2]}
    from tunesmith.models.attention import configure_sdpa

    report["preferred"] = configure_sdpa(torch.device("cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd_bwd(torch.bfloat16)
    report["kernels_taken"] = sorted({e.key for e in prof.key_averages() if "sdpa" in e.key.lower()
                                      or "flash" in e.key.lower() or "fmha" in e.key.lower()})[:6]
    return report


def resume_exactness(tmp: Path, precision: str) -> float:
    from tunesmith.cli.demo import train_tokenizer, write_corpus
    from tunesmith.cli.main import run

    train, _ = write_corpus(tmp / "data", seed=0)
    tok = tmp / "tok"
    if not tok.exists():
        train_tokenizer(train, tok, vocab_size=512)
    base = [f"data.path={train}", f"model.tokenizer={tok}", "model.overrides={vocab_size: 512}",
            "data.block_size=128", "train.micro_batch_size=8", "train.grad_accum_steps=2",
            f"train.precision={precision}", "logging.steps=1", "logging.progress=false",
            "data.validation_split_percentage=0", "optim.lr=3e-3",
            # A horizon-free schedule: the first run stops through max_steps=N, which would
            # otherwise also change a cosine schedule's length.
            "schedule.name=constant"]

    def losses(out: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    full, part = tmp / f"full-{precision}", tmp / f"part-{precision}"
    assert run(["-q", "train", *base, "train.max_steps=40", f"output.dir={full}"]) == 0
    assert run(["-q", "train", *base, "train.max_steps=20", "checkpoint.every_steps=20",
                f"output.dir={part}"]) == 0
    assert run(["-q", "train", *base, "train.max_steps=40", "checkpoint.every_steps=20",
                "checkpoint.resume=auto", f"output.dir={part}"]) == 0
    a, b = losses(full), losses(part)
    assert len(a) == len(b) == 40, (len(a), len(b))
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def qlora_run(tmp: Path) -> dict:
    from tunesmith.cli.demo import train_tokenizer, write_corpus
    from tunesmith.cli.main import run

    train, _ = write_corpus(tmp / "qdata", seed=0)
    tok = train_tokenizer(train, tmp / "qtok", vocab_size=512)
    out = tmp / "qlora"
    torch.cuda.reset_peak_memory_stats()
    code = run(["-q", "train", f"data.path={train}", f"model.tokenizer={tok}",
                "model.overrides={vocab_size: 512, dim: 256, n_layers: 4, n_heads: 4, n_kv_heads: 2, intermediate_size: 768}",
                "data.block_size=128", "train.micro_batch_size=16", "train.max_steps=60",
                "peft.method=qlora", "peft.r=8", "optim.lr=3e-3", "logging.progress=false",
                f"output.dir={out}"])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {"exit": code, "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"],
            "adapter_files": sorted(p.name for p in (out / "final").iterdir())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=["sdpa"], default=None)
    args = p.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["sdpa"] = sdpa_kernels()
    print("sdpa kernels:", json.dumps(report["sdpa"]), flush=True)
    sdpa_ok = (report["sdpa"]["cudnn"]["max_abs_err_out_dq_dk_dv"][0]
               <= 2 * report["sdpa"]["flash"]["max_abs_err_out_dq_dk_dv"][0] + 1e-3)
    if args.only == "sdpa":
        report["ok"] = sdpa_ok
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        sys.exit(0 if sdpa_ok else 1)
    report["packed_max_abs_diff"] = {b: packed_parity(b) for b in ("flex", "sdpa")}
    print("packed vs alone, max |logit diff|:", report["packed_max_abs_diff"], flush=True)
    report["attention_ms"] = attention_timing()
    print("attention fwd+bwd ms (B8 T2048 H32/8 hd64, 8 docs/row):", report["attention_ms"], flush=True)
    with tempfile.TemporaryDirectory() as d:
        report["resume_max_rel_diff"] = {p_: resume_exactness(Path(d), p_) for p_ in ("fp32", "bf16")}
        print("resume vs uninterrupted, max rel loss diff:", report["resume_max_rel_diff"], flush=True)
        report["qlora"] = qlora_run(Path(d))
        print("qlora:", report["qlora"], flush=True)
    ok = (sdpa_ok and max(report["packed_max_abs_diff"].values()) < 1e-4
          and max(report["resume_max_rel_diff"].values()) <= 1e-6
          and report["qlora"]["exit"] == 0 and report["qlora"]["last_loss"] < report["qlora"]["first_loss"])
    report["ok"] = ok
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("gpu feature checks", "passed" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
