#!/usr/bin/env bash
# #14's one-GPU speed A/B in one call (one H200): where the step goes, then this tree against the
# previous commit's, every variant in its own process on the same synthetic batches:
#   PYTHONPATH=/tmp/site:$PWD/src bash benchmarks/run_speed_device.sh OUT_DIR [PREV_TREE [BENCH_ARGS...]]
# PREV_TREE: a checkout of the previous commit (e.g. `git archive HEAD~1 src benchmarks | tar -x
# -C DIR`; "" for none); its bench_clm.py runs with its own src/ first on PYTHONPATH.
# BENCH_ARGS go to this tree's bench_clm.py (e.g. --define NAME:KEY=JSON). Environment:
#   VARIANTS   this tree's bench_clm variants (default tunesmith,tunesmith-float8-head)
#   PREV_VARIANTS  the previous tree's (default the same)
#   PROFILE    0 skips the two step profiles
#   MB         micro-batch of the profiles and of every bench variant (default 8)
# Results: profile.md/.json (bf16), profile_f8h.md/.json (float8 + float8 head), clm_prev.json,
# clm.json; each step has its own time limit so one failure cannot eat the others' time.
set -u
OUT=${1:?usage: run_speed_device.sh OUT_DIR [PREV_TREE]}
PREV=${2:-}
shift; [ $# -gt 0 ] && shift
VARIANTS=${VARIANTS:-tunesmith,tunesmith-float8-head}
PREV_VARIANTS=${PREV_VARIANTS:-$VARIANTS}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the previous tree's run changes directory
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
t0=$(date +%s)
python3 -c "import torch, torchao, transformers; print('versions: torch', torch.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
MB=${MB:-8}
BENCH="--shape llama3.2-1b --seq 2048 --micro-batch $MB --steps 16 --warmup 6"
if [ "${PROFILE:-1}" != 0 ]; then
  timeout 110 python3 benchmarks/profile_step.py --out "$OUT" --warmup 5 --timed 5 --active 3 --top 40 --micro-batch "$MB"
  echo "profile bf16: exit $? after $(( $(date +%s) - t0 )) s"
  timeout 110 python3 benchmarks/profile_step.py --out "$OUT" --warmup 5 --timed 5 --active 3 --top 40 --micro-batch "$MB" \
    --set 'train.float8="tensorwise"' --set 'train.float8_skip=[]' --tag _f8h
  echo "profile float8-head: exit $? after $(( $(date +%s) - t0 )) s"
fi
rm -f "$OUT"/trace*.json.gz  # 100+ MB each; the tables above are what is kept
if [ -n "$PREV" ]; then
  (PREV_ABS=$(cd "$PREV" && pwd) && export PYTHONPATH="$PREV_ABS/src:${PYTHONPATH:-}" && cd "$PREV_ABS" && \
   timeout 170 python3 benchmarks/bench_clm.py $BENCH --variants "$PREV_VARIANTS" --json "$OUT/clm_prev.json")
  echo "bench_clm previous: exit $? after $(( $(date +%s) - t0 )) s"
fi
timeout 330 python3 benchmarks/bench_clm.py $BENCH --variants "$VARIANTS" --json "$OUT/clm.json" "$@"
echo "bench_clm: exit $? after $(( $(date +%s) - t0 )) s"
echo done
