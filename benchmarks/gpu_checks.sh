#!/usr/bin/env bash
# Device checks of the Ranked List Loss on one CUDA GPU, in one go: the CUDA tests (values equal to the CPU's,
# no host synchronisation in forward+backward), then the loss speed benchmark's speed, memory, hard-input,
# cross-batch memory and torch.compile modes with --device cuda. The outputs are written to a scratch folder; $OUT
# (default gpu_out/) receives few files: machine.txt, the Markdown tables of each mode (<mode>.md) and everything
# (logs, JSON) in gpu_results.tgz.
#
#   bash benchmarks/gpu_checks.sh                  # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_checks.sh   # a dry run of the script itself on a CPU (tiny sizes)
#
# pytorch-metric-learning is pure Python: where it is not installed, a copy in .gpu_deps/ (put on PYTHONPATH)
# is used. Each step has its own time limit, so that one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .gpu_deps ]; then export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"; fi

if [ -n "${QUICK:-}" ]; then  # dry run: tiny sizes
  SIZES=(--batch-sizes 16 32 --dim 8 --repeats 2 --warmup 1)
  HARD_SIZES=(--batch-sizes 16 32 --dim 8 --repeats 2 --warmup 1)
  XBM_SIZES=(--batch-sizes 16 --dim 8 --ref-size 256 --repeats 2 --warmup 1)
  COMPILE_SIZES=(--batch-sizes 16 --dim 8 --repeats 2 --warmup 2)
  LIMIT=120
else
  SIZES=(--repeats 15 --warmup 3)
  HARD_SIZES=(--batch-sizes 512 1024 2048 4096 --repeats 15 --warmup 3)
  XBM_SIZES=(--batch-sizes 256 1024 --dim 128 --ref-size 65536 --repeats 15 --warmup 3)
  COMPILE_SIZES=(--batch-sizes 4096 --repeats 15 --warmup 3)
  LIMIT=100
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report the exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  tail -n 3 "$WORK/$name.log"
  # what is done comes back even if a later step is cut off
  if [ -f "$WORK/$name/loss_speed.md" ]; then
    cp "$WORK/$name/loss_speed.md" "$OUT/$name.md"
  else
    cp "$WORK/$name.log" "$OUT/$name.log"
  fi
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import torch, pytorch_metric_learning as p, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'pml', p.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  git log -1 --oneline 2>/dev/null || cat COMMIT 2>/dev/null || true
} >"$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt"
cp "$WORK/machine.txt" "$OUT/"

if [ "$DEVICE" = cuda ]; then
  step cuda_tests 100 "$PY" -m pytest tests/losses/test_ranked_list_loss_cuda.py -q -p no:cacheprovider -x
fi
BENCH=("$PY" -m benchmarks.loss_speed --device "$DEVICE" --no-progress --no-plot)
step speed "$LIMIT" "${BENCH[@]}" "${SIZES[@]}" --out "$WORK/speed"
step speed_hard "$LIMIT" "${BENCH[@]}" "${HARD_SIZES[@]}" --inputs hard --no-memory \
  --losses rll rll-autograd pml-rll floor --out "$WORK/speed_hard"
step xbm "$LIMIT" "${BENCH[@]}" "${XBM_SIZES[@]}" \
  --losses rll rll-autograd contrastive multi-similarity floor --out "$WORK/xbm"
step compile $((LIMIT + 30)) "${BENCH[@]}" "${COMPILE_SIZES[@]}" --compile --no-memory \
  --losses rll rll-autograd floor --out "$WORK/compile"
tar czf "$OUT/gpu_results.tgz" -C "$WORK" .
ls -la "$OUT"
