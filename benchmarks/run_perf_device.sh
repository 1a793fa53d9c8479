#!/usr/bin/env bash
# The bf16-step and quality-guard measurements of issue #14 (items 3 and 5) in one call, one H200:
#   PYTHONPATH=/tmp/site:$PWD/src bash benchmarks/run_perf_device.sh OUT_DIR [DATA_DIR]
# DATA_DIR: a copy of ../shared/data holding text/tinyshakespeare/input.txt,
# text/wikitext-2/wiki.{valid,test}.raw and tokenizers/llama3/hf (default: ./shared/data, else
# ../shared/data). Each step has its own time limit (total at most 9.5 minutes), so one failure
# cannot eat the others' time. Results under OUT_DIR:
#   profile.md/.json, trace.json.gz   per-category GPU time of a compiled 1B step (default flags)
#   clm.json (+ the table in the log)  1B bf16 A/B: default vs the opt-in speed flags
#   quality/result.md/.json, logs/*.log  every speed/memory mode's eval loss vs its baseline
set -u
OUT=${1:?usage: run_perf_device.sh OUT_DIR [DATA_DIR]}
DATA=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
t0=$(date +%s)
python3 -c "import torch, torchao, transformers; print('versions: torch', torch.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# 1. Where the 1B step's GPU time goes (llama3.2-1b, seq 2048, micro-batch 8, compiled blocks).
timeout 115 python3 benchmarks/profile_step.py --out "$OUT" --warmup 5 --timed 5 --active 3
echo "profile_step: exit $? after $(( $(date +%s) - t0 )) s"
# 2. A/B in fresh processes, same synthetic batches (clm.json is rewritten after each variant):
#    tunesmith: the default (fused AdamW after backward, grad clipping at 1.0);
#    ib:    optim.in_backward (each parameter stepped during backward; clipping off, as it must);
#    mb16:  micro-batch 16 with selective activation checkpointing;
#    cdt:   TorchInductor coordinate-descent tuning of the blocks' triton kernels (slow compile: last).
timeout 235 python3 benchmarks/bench_clm.py --shape llama3.2-1b --seq 2048 --micro-batch 8 --steps 16 --warmup 6 \
  --define 'ib:optim.in_backward=true' --define 'ib:train.max_grad_norm=null' \
  --define 'mb16:train.micro_batch_size=16' --define 'mb16:parallel.activation_checkpointing="selective"' \
  --define 'cdt:train.compile_options={"coordinate_descent_tuning": true}' \
  --variants tunesmith,ib,mb16,cdt --json "$OUT/clm.json"
echo "bench_clm: exit $? after $(( $(date +%s) - t0 )) s"
# 3. Quality guard: ~174M Llama, 320 steps on real data: the baseline, then 11 runs at once.
timeout 210 python3 benchmarks/quality_guard.py --out "$OUT/quality" --work /tmp/quality_guard_work ${DATA:+--data "$DATA"} \
  --jobs 11 --mode-timeout 150
echo "quality_guard: exit $? after $(( $(date +%s) - t0 )) s"
echo done
