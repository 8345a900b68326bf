#!/usr/bin/env bash
# The first-GPU check (issue 23), one script, about 6-8 minutes on one H100/H200; every step
# has its own time limit so the whole stays under 10. It runs, in order:
#   1. tests/test_gpu.py: our Pallas flash kernel (Triton) forward and gradients against the
#      float32 reference (fp32/bf16, causal, packed segments, grouped-query heads), cuDNN
#      attention against the reference, and `auto` picking cuDNN;
#   2. `jaxlm bench attention`: xla, cudnn and pallas at S = 1k..16k, head dim 64 and 128;
#   3. `jaxlm bench train --config configs/gpt2-small.yaml`: step time and MFU;
#   4. two 100-step bfloat16 training runs (attention auto = cuDNN, and our pallas kernel),
#      each checked for a falling loss;
#   5. a sweep of the pallas kernel's Triton block sizes, printing the best.
# Results go to benchmarks/gpu-<device>.md (plus JSON beside it); a failed step is recorded
# there and makes the script exit 1 after the others have run.
#
# Usage: benchmarks/gpu.sh [--dry-run]      (PYTHON=... picks the interpreter; default python)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

if [[ $DRY == 1 ]]; then
  DEVICE="<device>"
else
  if ! command -v nvidia-smi >/dev/null 2>&1 ||
    ! "$PY" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' >/dev/null 2>&1; then
    echo "benchmarks/gpu.sh needs an NVIDIA GPU that JAX can see (nvidia-smi and a CUDA jaxlib), and this machine has none; run it on a GPU machine, or pass --dry-run to list its steps." >&2
    exit 1
  fi
  DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 |
    tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/-+$//')"
fi
OUT="benchmarks/gpu-$DEVICE"
TMP="${TMPDIR:-/tmp}/jaxlm-gpu-$$"
JAXLM="$PY -m jaxlm.cli"

# name | time limit (s) | command
STEPS=(
  "gpu tests|100|$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_kernels_flash_attention.py"
  "attention: xla, cudnn, pallas|180|$JAXLM bench attention --impls xla,cudnn,pallas --mode fwd,fwd+bwd --batch 1 --heads 16 --kv-heads 16 --seq 1024,2048,4096,8192,16384 --head-dim 64,128 --causal true --dtype bfloat16 --iters 10 --json $OUT-attention.json --markdown $OUT-attention.md --title 'Attention on $DEVICE'"
  "train step MFU, GPT-2 small|90|$JAXLM bench train --config configs/gpt2-small.yaml --steps 10 --warmup 2 --json $OUT-train.json"
  "100 bf16 steps, attention auto|70|$JAXLM train -c configs/tiny.yaml -w $TMP/auto --no-progress model.dtype=bfloat16 model.attention=auto train.steps=100 train.log_every=1 optimizer.warmup_steps=10 train.eval_every=100 && $PY benchmarks/loss_falls.py $TMP/auto/metrics.jsonl"
  "100 bf16 steps, attention pallas|70|$JAXLM train -c configs/tiny.yaml -w $TMP/pallas --no-progress model.dtype=bfloat16 model.attention=pallas train.steps=100 train.log_every=1 optimizer.warmup_steps=10 train.eval_every=100 && $PY benchmarks/loss_falls.py $TMP/pallas/metrics.jsonl"
  "Triton block sizes of the pallas kernel|90|$PY benchmarks/triton_sweep.py --json $OUT-triton-sweep.json"
)

if [[ $DRY == 1 ]]; then
  echo "benchmarks/gpu.sh would write $OUT.md after running:"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    echo "- $name (at most ${limit}s): $cmd"
  done
  exit 0
fi

mkdir -p "$TMP"
REPORT="$OUT.md"
{
  echo "# jaxlm on $DEVICE"
  echo
  echo "Written by \`benchmarks/gpu.sh\` on $(date -u '+%Y-%m-%d %H:%M UTC'), jaxlm $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)."
  echo
  echo '```text'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
  echo '```'
} >"$REPORT"

FAILED=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  echo "== $name" >&2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$TMP/step.log" 2>&1
  rc=$?
  took=$(($(date +%s) - start))
  status="ok"
  if [[ $rc != 0 ]]; then
    status="FAILED (exit $rc$([[ $rc == 124 ]] && echo ", over its ${limit}s limit"))"
    FAILED=1
  fi
  echo "   $status in ${took}s" >&2
  {
    echo
    echo "## $name: $status, ${took}s"
    echo
    echo "\`$cmd\`"
    echo
    echo '```text'
    grep -v -E '^(WARNING|I0000|W0000)' "$TMP/step.log" | tail -n 120
    echo '```'
  } >>"$REPORT"
done
echo "wrote $REPORT" >&2
exit $FAILED
