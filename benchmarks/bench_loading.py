"""Host memory per rank while loading HF safetensors into a sharded (FSDP2 / TP) model.

    python benchmarks/bench_loading.py --shape llama3-8b --gpus 8 --json loading.json

Steps (one command):
1. Unless --model-dir is given, write a random HF checkpoint of the shape (bf16 safetensors,
   5 GB files, written tensor by tensor: the generator never holds the model).
2. Start N ranks under torchrun. Each builds the model on the meta device, applies tunesmith's
   `parallelize` (default FSDP2 full_shard), then `materialize` streams the files into its
   shards, while a sampler thread reads /proc/self/status every 5 ms.
3. Optionally (--baseline) one process loads the whole model into host memory the plain way
   (`load_pretrained` to CPU) for comparison.

Reported per rank: peak RSS (VmHWM / sampled VmRSS), peak private memory (RssAnon: what the rank
allocated itself) and peak file-backed RSS (RssFile: memory-mapped safetensors pages, which
live in the page cache and are shared by all ranks of a node). The full model's bytes are
printed alongside: the point is that private memory per rank stays near one tensor, not one
model copy. Load time is wall time of `materialize` on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status() -> dict[str, int]:
    """Memory fields of /proc/self/status in bytes (Linux)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in _FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    return out


class PeakSampler(threading.Thread):
    """Background sampler of the maxima of /proc/self/status memory fields."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, proc_status(), threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self.join()
        return self.peak


# ----------------------------------------------------------------------------- checkpoint
def write_random_checkpoint(shape: str, out: Path, n_layers: int | None, shard_bytes: int = 5 * 10**9) -> Path:
    """A random bf16 HF checkpoint of `shape`, written one tensor at a time."""
    import torch
    from safetensors.torch import save_file

    from tunesmith.hf.io import write_json
    from tunesmith.models import build_model, resolve_model_config, write_hf_config

    family, cfg = resolve_model_config(shape, {"n_layers": n_layers} if n_layers else None)
    meta = build_model(family, cfg, "meta")
    adapter = family.adapter(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_hf_config(out, cfg, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size, index, total = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        if shard:
            index += 1
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, t in meta.state_dict().items():
        hf = adapter.native_key_to_hf(name)
        if hf is None:
            continue
        value = (torch.randn(t.shape, generator=g) * 0.02).to(torch.bfloat16)
        if size + value.nbytes > shard_bytes:
            flush()
        shard[hf] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return out


# ----------------------------------------------------------------------------- workers
def worker(args) -> None:
    import torch

    from tunesmith.build import assemble
    from tunesmith.build.pipeline import build_on_meta, parallelize, processes, runtime, spec
    from tunesmith.build.pipeline import materialize as materialize_step
    from tunesmith.config.schema import RunConfig

    cfg = RunConfig.model_validate({"data": {"path": "x", "block_size": 4096},
                                    "model": {"name": args.model_dir},
                                    "train": {"device": args.device, "precision": "bf16"},
                                    "parallel": {"strategy": args.strategy, "tp": args.tp}})
    # The assembly's own steps up to materialize, which is timed on its own.
    a = assemble(cfg, steps=(runtime, spec, processes, build_on_meta, parallelize), with_tokenizer=False)
    ctx, rt = a.need("ctx"), a.need("rt")
    if args.device == "cuda":
        torch.zeros(1, device=rt.device)  # CUDA context before the baseline reading
    before = proc_status()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    materialize_step(a)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    record = {"rank": ctx.rank, "seconds": seconds, "before": before, "peak": peak,
              "gpu_alloc_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None}
    print("RESULT " + json.dumps(record), flush=True)


def baseline(args) -> None:
    """One process, whole model into host memory (what every rank would do without sharding)."""
    from tunesmith.models import build_model, load_pretrained, resolve_model_config

    family, mcfg = resolve_model_config(args.model_dir)
    model = build_model(family, mcfg, "meta")
    before = proc_status()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    load_pretrained(model, args.model_dir, "cpu", "bfloat16")
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"rank": "baseline", "seconds": seconds, "before": before,
                                  "peak": sampler.stop(), "gpu_alloc_gib": None}), flush=True)


# ----------------------------------------------------------------------------- driver
def _run(cmd: list[str]) -> list[dict]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--model-dir", default=None, help="existing HF model dir (else a random one is written)")
    p.add_argument("--work-dir", default="outputs/bench_loading")
    p.add_argument("--gpus", type=int, default=8, help="ranks on this node")
    p.add_argument("--strategy", default="full_shard")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--baseline", action="store_true", help="also time a one-process full host load")
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test only
    p.add_argument("--worker", choices=["rank", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "rank":
        return worker(args)
    if args.worker == "baseline":
        return baseline(args)
    model_dir = Path(args.model_dir or Path(args.work_dir) / f"{args.shape}-random")
    if not (model_dir / "config.json").exists():
        print(f"writing a random {args.shape} checkpoint to {model_dir} ...", file=sys.stderr)
        write_random_checkpoint(args.shape, model_dir, args.n_layers)
    model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    common = [__file__, "--model-dir", str(model_dir), "--strategy", args.strategy,
              "--tp", str(args.tp), "--device", args.device]
    rows = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                 str(args.gpus), *common, "--worker", "rank"])
    if args.baseline:
        rows += _run([sys.executable, *common, "--worker", "baseline"])
    print(f"\n{model_dir.name}: {_gib(model_bytes)} GiB of safetensors; {args.gpus} ranks, "
          f"{args.strategy}, tp={args.tp}\n")
    print("| rank | load (s) | peak RSS (GiB) | peak private RssAnon (GiB) | peak RssFile (GiB) | "
          "private before (GiB) | GPU alloc (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: str(r["rank"]).zfill(4)):
        pk, bf = r["peak"], r["before"]
        gpu = f"{r['gpu_alloc_gib']:.2f}" if r["gpu_alloc_gib"] is not None else "-"
        print(f"| {r['rank']} | {r['seconds']:.1f} | {_gib(pk.get('VmHWM', pk['VmRSS']))} | "
              f"{_gib(pk['RssAnon'])} | {_gib(pk['RssFile'])} | {_gib(bf['RssAnon'])} | {gpu} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "model_bytes": model_bytes,
                                               "results": rows}, indent=2))


if __name__ == "__main__":
    main()
