#!/usr/bin/env bash
# The GPU benchmark as one command: DiCo-XL train/forward/sampler in bf16 and fp32 against the
# PyTorch reference, a profile of the bf16 train step (with its roofline bound beside the
# measured device time), and the Pallas layer-norm, loop, fill, remat and depthwise variants.
#
#   OUT=results bash bench/gpu.sh [BUDGET_S]
#
# Runs in priority order and skips a run that its remaining budget (default 480 s) cannot
# hold, so the most important rows always come back. Writes bench.log, one JSON per run,
# and the bf16 step's trace (perfetto_trace.json.gz) and optimized HLO to $OUT.
# MODEL, BATCH and FWD_BATCH override DiCo-XL, 64 and 128 (e.g. a CPU dry run at DiCo-S).
set -u
OUT=${OUT:-bench_out}
BUDGET=${1:-480}
MODEL=${MODEL:-DiCo-XL}
BATCH=${BATCH:-64}
FWD_BATCH=${FWD_BATCH:-128}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/bench.log"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# JAX takes memory as it needs it (up to 92%); the PyTorch baseline runs first and frees its cache.
export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
} 2>&1 | tee "$LOG"

# run NAME SECONDS_NEEDED BENCHMARK_ARGS...
run() {
  local name=$1 need=$2
  shift 2
  if (($(left) < need)); then
    echo "skipped $name: $(left) s left, it needs about $need" | tee -a "$LOG"
    return
  fi
  echo "=== $name ($(left) s left)" | tee -a "$LOG"
  timeout $(($(left) - 3)) python3 -m dico_jax.tools.benchmark --models "$MODEL" --batch "$BATCH" \
    --fwd-batch "$FWD_BATCH" --sample-batch "$BATCH" --json "$OUT/$name.json" "$@" 2>&1 |
    grep -v "^[WI][0-9]\{4\} " >>"$LOG"
}

P=/tmp/dico_profile
run bf16 200 --dtypes bfloat16 --depthwise conv --torch --profile $P
# The layer norms' training path as Pallas kernels (dico_jax/models/kernels/fused_norm.py),
# second, so that a short run still compares them with the XLA baseline.
run bf16_pallas 100 --dtypes bfloat16 --depthwise conv --norm pallas --parts train --profile $P
run bf16_loop 150 --dtypes bfloat16 --depthwise conv --unrolled --parts train --profile $P
# XLA's pass (off by default) that skips zero-filling the scan's stacked residuals, which the
# roofline (dico_jax.tools.roofline) counts at 13 GB of the step's 368 GB at batch 64.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dus_accumulator_zero_init_elimination=true" \
  run bf16_nofill 80 --dtypes bfloat16 --depthwise conv --parts train
run bf16_dots 80 --dtypes bfloat16 --depthwise conv --remat dots --parts train --profile $P
run bf16_shift 80 --dtypes bfloat16 --depthwise shift --parts train
run fp32 150 --dtypes float32 --depthwise conv --torch
# The plan's best bound (Python loop, batch 128): its later --batch overrides $BATCH.
run bf16_loop_b128 150 --dtypes bfloat16 --depthwise conv --unrolled --parts train --batch 128
# The best plans (docs/performance.md, the Pallas layer norms).
run bf16_loop_b128_pallas 150 --dtypes bfloat16 --depthwise conv --norm pallas --unrolled \
  --parts train --batch 128
run bf16_loop_b192_pallas 150 --dtypes bfloat16 --depthwise conv --norm pallas --unrolled \
  --parts train --batch 192

# Traces, optimized HLO and JSON rows in one archive (the log stays beside it).
(cd $P && tar czf "$OUT/results.tar.gz" */train_step.hlo.txt.gz \
  */plugins/profile/*/perfetto_trace.json.gz -C "$OUT" $(cd "$OUT" && ls *.json)) &&
  rm -f "$OUT"/*.json
echo "=== tables ($(($(date +%s) - START)) s)"
grep -A 40 "^profile of" "$LOG" | grep -v "^device: \|^impl \|^jax \|^torch " | head -80
grep -h "^device: \|^impl \|^jax \|^torch " "$LOG" | awk '!seen[$0]++'
