#!/usr/bin/env bash
# Every GPU measurement of the float8 / low-memory work (issue #14) in one call, on one H200:
#   bash benchmarks/run_lowmem_device.sh OUT_DIR
# Each step has its own time limit so one failure cannot eat the others' time. Results: JSON per
# step under OUT_DIR (clm.json, lora.json, full8b.json, check.json) and the log on stdout.
set -u
OUT=${1:?usage: run_lowmem_device.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
python3 -c "import datasets, pyarrow, torchao, pydantic, transformers, torch; print('versions: torch', torch.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
# 1B shape full fine-tune: bf16 vs float8 (tensorwise, default layer rule), same batches.
timeout 140 python3 benchmarks/bench_clm.py --shape llama3.2-1b --seq 2048 --micro-batch 8 --steps 16 --warmup 6 \
  --variants tunesmith,tunesmith-float8 --json "$OUT/clm.json"
# LoRA r16 on the 8B shape with the float8 frozen base.
timeout 100 python3 benchmarks/bench_lora.py --shape llama3-8b --seq 2048 --micro-batch 4 --steps 10 --warmup 4 \
  --variants tunesmith-float8 --json "$OUT/lora.json"
# 8B full fine-tune, 8-bit AdamW + bf16 stochastic rounding + AC, capped at an 80 GB budget.
timeout 130 python3 benchmarks/bench_lowmem.py --shape llama3-8b --optim adamw8bit --seq 2048 --micro-batch 2 \
  --steps 10 --warmup 4 --mem-budget-gib 80 --json "$OUT/full8b.json"
# float8 resume exactness + HF export in transformers; low-bit optimizer resume on CUDA.
timeout 120 python3 benchmarks/check_lowmem.py --out /tmp/check_lowmem --steps 3 --json "$OUT/check.json"
echo done
