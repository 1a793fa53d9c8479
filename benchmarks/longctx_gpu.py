"""Long context and QLoRA at scale on GPUs (issue #15): one command per GPU kind, every step in
its own process under a timeout, results written after each step (JSON + markdown in --out).

    # 2 GPUs: CP / QLoRA tests on NCCL, CP loss parity at a long sequence (add --with-1gpu and
    # a larger --total for the 1-GPU steps on the same machine)
    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/longctx_gpu.py --gpus 2 --out $OUT/longctx2
    # 1 GPU: offload table, longest sequence (LoRA / QLoRA, 141 GB and an 80 GB budget), tok/s at 32k
    PYTHONPATH=/tmp/site:$PWD/src python3 benchmarks/longctx_gpu.py --gpus 1 --out $OUT/longctx1

2-GPU steps:
  nccl_tests   tests/distributed/test_cp.py + test_qlora.py with TUNESMITH_TEST_DEVICE=cuda
               (cp=2 under FSDP2/DDP/packed SFT and QLoRA under FSDP2/HSDP/DDP vs one process,
               exact resume; fp32, the tests' own tolerances)
  cp_parity    the Llama-3-8B block shape (dim 4096, 32/8 heads, MLP 14336; 2 blocks, vocab
               32768, one saved init) trained 3 steps at --cp-seq tokens with 4 packed
               documents per row: one GPU vs cp=2 on two GPUs (FSDP2 over the cp ranks), fp32,
               full AC; per-step loss and grad norm differences.
1-GPU steps (--one-gpu-steps, in order; default offload,seq_lora,seq_qlora,depth_lora,depth_qlora_80g):
  offload      none / full AC / full AC + offload / offload alone: 8 blocks of the 8B shape at
               8k, LoRA, eager (benchmarks/check_longctx.py offload --no-compile)
  seq_lora, seq_qlora, seq_qlora_80g
               the whole 8B shape (32 blocks), LoRA r=16 (bf16 base) or QLoRA (NF4 base), bf16,
               full AC + activation offload + chunked CE, micro-batch 1, eager: one step at each
               of 8k, 16k, 32k (twice: tokens/s), 128k; peak device memory, peak pinned host
               memory (the offloaded block inputs) and a linear fit of device memory in T.
               _80g caps the allocator at 80 GiB (torch.cuda.set_per_process_memory_fraction).
  depth_lora, depth_qlora, depth_qlora_80g, depth4_lora
               the same with the 8B shape truncated to 2 (4) blocks: with offload the device
               holds one block's working set whatever the depth, so the truncated model finds
               the device-side longest sequence in minutes instead of the full model's hours
               (probes at 128k, 256k, 384k, then a bisection while the time budget lasts).
               The full-depth limit is that minus the 30 missing blocks' weights (known), and
               its host side is n_layers x T x dim x 2 bytes of pinned memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GiB = 1024**3
STEP = 4096  # sequence granularity of the search
CALIBRATION_SEQ = 8192  # --emulate-depth: the short step that sizes the host ballast


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                                         os.environ.get("PYTHONPATH", "")])}


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run one step; its PROBE/RESULT lines (the last RESULT wins), or why it ended."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True,
                              timeout=max(timeout, 1), cwd=ROOT, check=False)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timeout after {timeout:.0f}s", 124
    lines = out.splitlines()
    res = {"rc": rc, "wall_s": round(time.monotonic() - t0, 1),
           "probes": [json.loads(x[6:]) for x in lines if x.startswith("PROBE ")]}
    found = [json.loads(x[7:]) for x in lines if x.startswith("RESULT ")]
    if found:
        res.update(found[-1])
    res["stdout_tail"] = lines[-3:]
    if rc != 0:
        res["error_tail"] = (err or "")[-2500:] + "\n" + "\n".join(lines[-15:])
    return res


# ---------------------------------------------------------------------------- longest sequence
def _trainer(cfg):
    from tunesmith.build import assemble
    from tunesmith.optim import build_scheduler
    from tunesmith.train.trainer import Trainer

    a = assemble(cfg, with_tokenizer=False)
    opt = a.need("optimizer")
    tr = Trainer(cfg=cfg, rt=a.need("rt"), model=a.need("model"), optimizer=opt,
                 scheduler=build_scheduler(opt, cfg.schedule, 100, 100), train_loader=None,
                 val_loader=None, out_dir=Path("."), total_steps=100, steps_per_epoch=100,
                 flops_per_token=0.0, peak_tflops=None, par=a.ctx if a.ctx and a.ctx.distributed else None)
    return a, tr


class _Ballast:
    """What the blocks a truncated model lacks would hold, so one step of it at T tokens stands
    for the full depth's memory: on the device the missing blocks' parameters (plus adapter
    gradients and AdamW state), allocated once; on the host their offloaded block inputs, sized
    per T from what the model's own last block stored, page-locked like the offloader's."""

    def __init__(self, model, depth: int, built_bytes: int) -> None:
        import torch

        n = len(model.layers)
        self.missing = max(depth - n, 0)
        # Device bytes per block from the allocator, not from numel (QLoRA's NF4 weights report
        # their logical shape): everything built minus the blocks' outside (embedding, head,
        # final norm: plain tensors), split evenly; then the adapters' gradient and AdamW state.
        blocks = set(id(p) for p in model.layers.parameters())
        outside = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                      if id(p) not in blocks)
        trainable = sum(p.numel() * p.element_size() for p in model.layers[n - 1].parameters() if p.requires_grad)
        per_block = (built_bytes - outside) // n + 3 * trainable
        self.device_bytes = self.missing * per_block
        self.device = torch.empty(self.device_bytes, dtype=torch.uint8, device="cuda") if self.missing else None
        self.host: list = []
        self.host_per_token = 0.0  # bytes per token per block, measured after a probe

    def hold_host(self, t: int) -> int:
        import torch

        self.release_host()
        nbytes = int(self.host_per_token * t)
        for _ in range(self.missing if nbytes else 0):
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf[:: 4096] = 0  # touch every page: really resident
            if int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), nbytes, 0)) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed")
            self.host.append(buf)
        return nbytes * len(self.host)

    def release_host(self) -> None:
        import torch

        for buf in self.host:
            torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
        self.host.clear()


def _mem_available() -> int:
    """Host bytes available now (/proc/meminfo MemAvailable)."""
    with open("/proc/meminfo") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return kib * 1024


def _probe(tr, vocab: int, t: int, ballast: _Ballast | None = None) -> dict:
    """One optimizer step at sequence length t; peak device memory, host memory (the
    offloader's buffers, the ballast's, the process's peak RSS) and time, or the OOM."""
    import resource

    import torch

    from tunesmith.parallel.offload import offloader_of

    ids = torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(t))
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    gc.collect()
    torch.cuda.empty_cache()
    if ballast is not None and ballast.host_per_token:
        # The whole depth's offloaded inputs must fit the host, or the kernel's OOM killer ends
        # the process: count that as this length failing (the limit is then the host's).
        need = ballast.host_per_token * t * (ballast.missing + len(tr.model.layers))
        ballast.release_host()
        off = offloader_of(tr.model)
        avail = _mem_available() + (off.pool.nbytes if off else 0)  # the pool's buffers get reused
        if need > 0.92 * avail:
            rec = {"seq": t, "ok": False, "error": f"host memory: the offloaded inputs need {need / GiB:.1f} "
                   f"GiB, {avail / GiB:.1f} GiB available"}
            print("PROBE " + json.dumps(rec), flush=True)
            return rec
    try:
        host_ballast = ballast.hold_host(t) if ballast is not None else 0
    except (RuntimeError, MemoryError) as e:
        rec = {"seq": t, "ok": False, "error": f"host ballast: {e}"[:200]}
        print("PROBE " + json.dumps(rec), flush=True)
        return rec
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        tr.train_step([{"input_ids": ids, "labels": labels}])
        torch.cuda.synchronize()
        ok, why = True, None
    except (torch.OutOfMemoryError, RuntimeError) as e:  # device OOM, or pinned host memory
        ok, why = False, str(e).splitlines()[0][:200]
        tr.optimizer.zero_grad(set_to_none=True)
    off = offloader_of(tr.model)
    n = len(tr.model.layers)
    rec = {"seq": t, "ok": ok, "step_s": round(time.perf_counter() - t0, 2),
           "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
           "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2),
           "offload_host_gib": round(off.pool.nbytes / GiB, 2) if off else None,
           "ballast_host_gib": round(host_ballast / GiB, 2),
           "ballast_device_gib": round(ballast.device_bytes / GiB, 2) if ballast else 0.0,
           "rss_max_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "error": why}
    if ok and off is not None and ballast is not None:
        ballast.host_per_token = off.pool.block_nbytes(n - 1) / t
    print("PROBE " + json.dumps(rec), flush=True)
    return rec


def _fit(a: dict, b: dict) -> tuple[float, float]:
    """(intercept, slope) of y = i + s * seq through two probes' (seq, y)."""
    s = (b[1] - a[1]) / (b[0] - a[0])
    return a[1] - s * a[0], s


def _seq_config(args):
    from tunesmith.config.schema import RunConfig

    overrides = {"n_layers": args.n_layers} if args.n_layers else {}
    return RunConfig.model_validate({
        "model": {"name": "llama3-8b", "overrides": overrides},
        "data": {"path": "synthetic", "block_size": 32768},
        "train": {"device": "cuda", "micro_batch_size": 1, "precision": "bf16", "seed": 0},
        "optim": {"lr": 1e-5}, "schedule": {"name": "constant"},
        "peft": {"method": args.method, "r": 16, "alpha": 32},
        "parallel": {"activation_checkpointing": "full", "activation_offload": not args.no_offload,
                     "mlp_chunk_size": args.mlp_chunk or None},
    })


def _seq_worker(args) -> None:
    """Probe the given lengths (--probes), then, with --search, bisect for the longest sequence
    that fits the budget while the time budget lasts. --n-layers truncates the 8B shape: with
    activation offload the device keeps one block's working set whatever the depth, so a
    truncated model finds the device-side limit of the full one (its weights differ by a known
    amount: `model_gib` is reported for both depths by the orchestration)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    budget = total if not args.mem_gib else min(total, args.mem_gib * GiB)
    if args.mem_gib:
        torch.cuda.set_per_process_memory_fraction(budget / total)
    deadline = time.monotonic() + args.budget
    a, tr = _trainer(_seq_config(args))
    mcfg = a.need("spec").model_cfg
    built_gib = torch.cuda.memory_allocated() / GiB
    ballast = _Ballast(tr.model, args.emulate_depth, torch.cuda.memory_allocated()) if args.emulate_depth else None
    result = {"method": args.method, "n_layers": mcfg.n_layers, "offload": not args.no_offload,
              "mlp_chunk_size": args.mlp_chunk or None,
              "emulated_depth": args.emulate_depth or mcfg.n_layers,
              "budget_gib": round(budget / GiB, 1), "model_gib": round(built_gib, 2)}
    if ballast is not None:
        # The host ballast is sized from what a step's blocks offloaded per token: learn it on
        # a short step first, so the first real probe already holds the missing blocks' host
        # memory (a first probe without it checked only the device side).
        cal = _probe(tr, mcfg.vocab_size, CALIBRATION_SEQ, ballast)
        result["calibration"] = {k: cal.get(k) for k in ("seq", "ok", "step_s", "error")}
    probes = []
    for t in (int(x) for x in args.probes.split(",") if x):
        probes.append(_probe(tr, mcfg.vocab_size, t, ballast))
        if time.monotonic() > deadline:
            result["stopped"] = f"time budget spent after the probe at {t}"
            break
    result["probes"] = probes
    ok = [p for p in probes if p["ok"]]
    for p in ok:  # the last successful probe of each length gives tokens/s (the first may compile)
        result[f"tokens_per_s_{p['seq'] // 1024}k"] = round(p["seq"] / p["step_s"], 1)
    if len({p["seq"] for p in ok}) >= 2:
        (t1, m1, s1), (t2, m2, s2) = [(t, p["peak_gib"], p["step_s"]) for t, p in
                                      sorted({p["seq"]: p for p in ok}.items())[-2:]]
        mi, ms = _fit((t1, m1), (t2, m2))
        # step time ~ c1 T + c2 T^2 (linear layers + attention), from the two longest probes
        c2 = (s2 / t2 - s1 / t1) / (t2 - t1)
        c1 = s1 / t1 - c2 * t1
        pred = int(((budget / GiB) * 0.97 - mi) / ms) // STEP * STEP if ms > 0 else None
        result.update(gib_per_1k_tokens=round(ms * 1024, 4), predicted_max_seq=pred,
                      step_s_model=[c1, c2])
        if args.search and pred:
            result.update(_bisect(tr, mcfg.vocab_size, max(ok, key=lambda p: p["seq"])["seq"],
                                  pred, (c1, c2), deadline, ballast))
    result.update(torch=torch.__version__, device=torch.cuda.get_device_name(),
                  host_mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1))
    print("RESULT " + json.dumps(result), flush=True)


def _bisect(tr, vocab: int, lo: int, pred: int, model: tuple[float, float], deadline: float,
            ballast: _Ballast | None) -> dict:
    """Longest length in [lo, ...) that trains, starting at the prediction; stops (and says so)
    when the next probe's predicted time does not fit the deadline."""
    c1, c2 = model
    res: dict = {}
    hi, t = None, max(pred, lo + STEP)
    while hi is None or hi - lo > 2 * STEP:
        est = 1.2 * (c1 * t + max(c2, 0.0) * t * t) + 20
        if time.monotonic() + est > deadline:
            res["stopped"] = f"time budget: a step at {t} tokens needs ~{est:.0f}s"
            break
        if _probe(tr, vocab, t, ballast)["ok"]:
            lo = t
        else:
            hi = t
        t = (lo + hi) // 2 // STEP * STEP if hi is not None else int(lo * 1.25) // STEP * STEP
    res.update(verified_max_seq=lo, first_failed_seq=hi)
    return res


# ---------------------------------------------------------------------------- CP parity
CP_OVERRIDES = {"n_layers": 2, "vocab_size": 32768, "max_position_embeddings": 131072}


def _cp_init(args) -> None:
    import torch

    from tunesmith.models import build_model, init_random, resolve_model_config, save_pretrained

    family, mcfg = resolve_model_config("llama3-8b", {**CP_OVERRIDES, **json.loads(args.overrides)})
    model = init_random(build_model(family, mcfg, "meta"), args.device, torch.float32, 0)
    save_pretrained(model, family, mcfg, Path(args.init))
    print("RESULT " + json.dumps({"init": args.init}), flush=True)


def _cp_batch(vocab: int, t: int, step: int) -> dict:
    """[1, t] random ids in 4 packed documents of uneven length; labels stay inside each."""
    import torch

    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (1, t), generator=g)
    cuts = sorted(torch.randint(1, t, (3,), generator=g).tolist())
    doc = torch.zeros(1, t, dtype=torch.long)
    for c in cuts:
        doc[:, c:] += 1
    labels = torch.where(doc[:, 1:] == doc[:, :-1], ids[:, 1:], -100)
    return {"input_ids": ids, "labels": torch.cat([labels, torch.full((1, 1), -100)], 1), "doc_ids": doc}


def _cp_worker(args) -> None:
    import torch

    from tunesmith.config.schema import RunConfig

    cfg = RunConfig.model_validate({
        "model": {"name": args.init}, "data": {"path": "synthetic", "block_size": args.seq},
        "train": {"device": args.device, "micro_batch_size": 1, "precision": "fp32", "seed": 0,
                  "max_grad_norm": None},
        "optim": {"lr": 1e-5}, "schedule": {"name": "constant"},
        "parallel": {"cp": args.cp, "activation_checkpointing": "full", "timeout_s": 300},
    })
    a, tr = _trainer(cfg)
    vocab = a.need("spec").model_cfg.vocab_size
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, norms, times = [], [], []
    for step in range(3):
        t0 = time.perf_counter()
        loss, norm, *_ = tr.train_step([_cp_batch(vocab, args.seq, step)])
        losses.append(float(loss))
        norms.append(float(norm))
        times.append(round(time.perf_counter() - t0, 2))
    if a.need("ctx").is_main:
        print("RESULT " + json.dumps({"cp": args.cp, "seq": args.seq, "losses": losses, "grad_norms": norms,
                                      "step_s": times, "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None}),
              flush=True)


# ---------------------------------------------------------------------------- orchestration
class Report:
    def __init__(self, out: Path) -> None:
        self.out, self.steps = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, res: dict) -> None:
        self.steps[name] = res
        print(f"== {name}: " + json.dumps(res)[:1500], flush=True)
        (self.out / "longctx_gpu.json").write_text(json.dumps(self.steps, indent=1))
        (self.out / "longctx_gpu.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = ["# longctx_gpu results", ""]
        par = self.steps.get("cp_parity")
        if par and "ref" in par and "cp2" in par:
            lines += [f"CP parity at {par['seq']} tokens (8B block shape, 2 blocks, fp32): max |d loss| "
                      f"{par['max_loss_diff']:.2e}, max rel d grad norm {par['max_grad_rel_diff']:.2e}; "
                      f"peak 1 GPU {par['ref'].get('peak_gib')} GiB, per cp rank {par['cp2'].get('peak_gib')} GiB", ""]
        lines += ["| step | result |", "|---|---|"]
        for name, r in self.steps.items():
            keys = ("passed", "n_layers", "model_gib", "verified_max_seq", "predicted_max_seq",
                    "gib_per_1k_tokens", *sorted(k for k in r if k.startswith("tokens_per_s_")),
                    "budget_gib", "stopped", "rc", "wall_s")
            lines.append(f"| {name} | " + ", ".join(f"{k}={r[k]}" for k in keys if k in r) + " |")
            for p in r.get("probes", []):
                lines.append(f"| {name} @ {p['seq']} | ok={p['ok']} step {p.get('step_s')} s, peak {p.get('peak_gib')} GiB "
                             f"(ballast {p.get('ballast_device_gib')}), offload host {p.get('offload_host_gib')} GiB "
                             f"+ ballast {p.get('ballast_host_gib')} GiB, rss {p.get('rss_max_gib')} GiB |")
        return "\n".join(lines) + "\n"


def _two_gpu(args, rep: Report, deadline: float) -> None:
    py = sys.executable
    env = {**_env(), "TUNESMITH_TEST_DEVICE": "cuda"}
    if not args.skip_nccl_tests:  # (run_x2_device.sh runs all of tests/distributed itself)
        res = _run([py, "-m", "pytest", "tests/distributed/test_cp.py", "tests/distributed/test_qlora.py",
                    "-q", "-p", "no:cacheprovider"], min(args.timeout, deadline - time.monotonic()), env)
        res["passed"] = res["rc"] == 0
        rep.add("nccl_tests", res)
    init = str(args.out / "cp_init")
    par = {"seq": args.cp_seq, "init": _run([py, __file__, "cp-init", "--init", init], 120)}
    # The reference attends with SDPA and a dense [T, T] document mask (no flex compile).
    par["ref"] = _run([py, __file__, "cp-worker", "--init", init, "--cp", "1", "--seq", str(args.cp_seq)],
                      min(args.timeout, deadline - time.monotonic()), {**_env(), "TUNESMITH_ATTENTION": "sdpa"})
    par["cp2"] = _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
                       "cp-worker", "--init", init, "--cp", "2", "--seq", str(args.cp_seq)],
                      min(args.timeout, deadline - time.monotonic()))
    if "losses" in par["ref"] and "losses" in par["cp2"]:
        r, c = par["ref"], par["cp2"]
        par["max_loss_diff"] = max(abs(x - y) for x, y in zip(r["losses"], c["losses"]))
        par["max_grad_rel_diff"] = max(abs(x - y) / y for x, y in zip(c["grad_norms"], r["grad_norms"]))
    rep.add("cp_parity", par)


# 1-GPU steps: name -> (method, 80 GiB cap?, n_layers (0 = all 32), probe lengths, bisect?);
# a "_tiled" suffix adds parallel.mlp_chunk_size=8192.
FULL_PROBES = "8192,16384,32768,32768,131072"
DEPTH_PROBES = "131072,262144,393216"
ONE_GPU_STEPS = {
    "seq_lora": ("lora", 0, 0, FULL_PROBES, False),
    "seq_qlora": ("qlora", 0, 0, FULL_PROBES, False),
    "seq_qlora_80g": ("qlora", 80, 0, "32768,131072", False),
    "depth_lora": ("lora", 0, 2, DEPTH_PROBES, True),
    "depth_qlora": ("qlora", 0, 2, DEPTH_PROBES, True),
    "depth_qlora_80g": ("qlora", 80, 2, "131072,262144", True),
    "depth4_lora": ("lora", 0, 4, "131072", False),
}


def _one_gpu(args, rep: Report, deadline: float) -> None:
    py = sys.executable
    for name in args.one_gpu_steps.split(","):
        left = deadline - time.monotonic()
        if left < 60:
            rep.add(name, {"rc": None, "stopped": "total time budget spent"})
            continue
        if name == "offload":
            off = _run([py, str(ROOT / "benchmarks/check_longctx.py"), "offload", "--no-compile", "--steps", "3",
                        "--out", str(args.out / "offload"), "--budget", "150", "--timeout", "60"], min(180, left))
            md = args.out / "offload" / "offload.md"
            off["table"] = md.read_text() if md.exists() else None
            rep.add("offload", off)
            continue
        method, mem, layers, probes, search = ONE_GPU_STEPS[name.removesuffix("_tiled")]
        budget = min(args.seq_budget, left - 40)
        rep.add(name, _run([py, __file__, "seq-worker", "--method", method, "--mem-gib", str(mem),
                            "--n-layers", str(layers), "--probes", probes, *(["--search"] if search else []),
                            *(["--emulate-depth", "32"] if layers else []),
                            *(["--mlp-chunk", "8192"] if name.endswith("_tiled") else []),
                            "--budget", str(int(budget))], budget + 90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "seq-worker", "cp-init", "cp-worker"])
    ap.add_argument("--gpus", type=int, default=1, choices=[1, 2])
    ap.add_argument("--out", type=Path, default=Path("outputs/longctx_gpu"))
    ap.add_argument("--with-1gpu", action="store_true", help="--gpus 2: also the 1-GPU steps (raise --total)")
    ap.add_argument("--total", type=int, default=470, help="seconds for everything (per GPU kind)")
    ap.add_argument("--timeout", type=int, default=270, help="seconds per 2-GPU step")
    ap.add_argument("--seq-budget", type=int, default=100, help="seconds per longest-sequence search")
    ap.add_argument("--cp-seq", type=int, default=16384)
    ap.add_argument("--skip-nccl-tests", action="store_true", help="--gpus 2: only the CP parity step")
    # worker arguments
    ap.add_argument("--one-gpu-steps", default="offload,seq_lora,seq_qlora,depth_lora,depth_qlora_80g",
                    help="1-GPU steps to run, in order: offload and " + ", ".join(ONE_GPU_STEPS))
    ap.add_argument("--method", default="lora")
    ap.add_argument("--n-layers", type=int, default=0, help="seq-worker: truncate the 8B shape (0: all 32)")
    ap.add_argument("--probes", default=FULL_PROBES, help="seq-worker: sequence lengths to step, in order")
    ap.add_argument("--search", action="store_true", help="seq-worker: then bisect for the longest that fits")
    ap.add_argument("--no-offload", action="store_true", help="seq-worker: full AC without activation offload")
    ap.add_argument("--mlp-chunk", type=int, default=0, help="seq-worker: parallel.mlp_chunk_size (0: off)")
    ap.add_argument("--emulate-depth", type=int, default=0,
                    help="seq-worker: hold the missing blocks' device and host memory (ballast) up to this depth")
    ap.add_argument("--mem-gib", type=float, default=0)
    ap.add_argument("--budget", type=int, default=100)
    ap.add_argument("--init", default="")
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--device", default="cuda", help="cp-init / cp-worker: cpu for a smoke run")
    ap.add_argument("--overrides", default="{}", help="cp-init: model overrides (JSON), e.g. a smaller shape")
    args = ap.parse_args()
    if args.mode != "run":
        {"seq-worker": _seq_worker, "cp-init": _cp_init, "cp-worker": _cp_worker}[args.mode](args)
        return
    rep, deadline = Report(args.out), time.monotonic() + args.total
    if args.gpus == 2:
        _two_gpu(args, rep, deadline)
    if args.gpus == 1 or args.with_1gpu:
        _one_gpu(args, rep, deadline)
    print(rep.markdown())


if __name__ == "__main__":
    main()
