#!/usr/bin/env bash
# ON THE LENT GPU, after benchmarks/gpu_prepare.sh's calls: every check and measurement that
# needs the GPU, in one call (~6 min with the defaults), results under $OUT.
#
#   bash benchmarks/gpu_session.sh            # on the device (SSLSTREAM_CIFAR10=/root/data/cifar10)
#   GPU_SESSION_SECONDS=1 bash benchmarks/gpu_session.sh   # here: a dry run, GPU parts skip
#
# 1. tests/pipelines/test_dali.py + test_gpu.py: the GPU graph through the same statistical
#    checks as CPU mode (shapes, dtypes, layouts, event frequencies, parity with torchvision,
#    corrupt JPEGs), and the loader's device hand-off.
# 2. benchmarks/pipeline_throughput.py: (a) CIFAR-10 32 px and (b) 500x375 -> 224 px, DALI GPU vs
#    DALI CPU vs torchvision DataLoader (issue 4's targets: >= 25,000 and >= 9,000 img/s);
#    multi-crop (6 local crops) against two views, DALI GPU and CPU, at both sizes.
# 3. benchmarks/cifar10_knn.py: BYOL on CIFAR-10 for GPU_SESSION_EPOCHS (default 1) epochs,
#    ResNet-18, batch 512, bf16 + channels_last, without and with torch.compile: train img/s
#    and data-wait on the real feed (the issue's "a naive feed loses 30-50%" check).
# Each step runs even when an earlier one failed; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export SSLSTREAM_CIFAR10=${SSLSTREAM_CIFAR10:-/root/data/cifar10}
[ -f "$SSLSTREAM_CIFAR10/manifest.json" ] || SSLSTREAM_CIFAR10=$(cd .. && pwd)/shared/data/cifar10
SECS=${GPU_SESSION_SECONDS:-5}
CORES=$(nproc)
THREADS=${GPU_SESSION_THREADS:-$(( CORES > 3 ? CORES - 2 : 2 ))}
EPOCHS=${GPU_SESSION_EPOCHS:-1}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0
note() { echo "$*" | tee -a "$SUMMARY"; }
step() {  # step NAME LOGFILE CMD...: run, keep the log, record pass/fail
  local name=$1 logf=$2; shift 2
  local t0=$SECONDS
  "$@" > "$OUT/$logf" 2>&1
  local rc=$?
  note "$(printf '%-28s rc=%-3s %4ss  log %s' "$name" "$rc" "$(( SECONDS - t0 ))" "$logf")"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
  return 0
}

note "== gpu_session $(date -u +%FT%TZ) on $(hostname), $CORES cores, data $SSLSTREAM_CIFAR10"
note "$(nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi: CPU-only dry run')"
note "$(python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())')"
note "$(python3 -c 'import nvidia.dali as d; print("DALI", d.__version__)' 2>&1 | tail -1)"

step "pytest dali+gpu" pytest_gpu.log python3 -m pytest -q -p no:cacheprovider -rs \
    tests/pipelines/test_dali.py tests/pipelines/test_gpu.py
grep -E "passed|failed|error" "$OUT/pytest_gpu.log" | tail -1 | tee -a "$SUMMARY"

step "pipeline 32px (CIFAR)" pipeline_32.log python3 benchmarks/pipeline_throughput.py \
    "$SSLSTREAM_CIFAR10#train" --recipe byol_cifar --batch-size 512 --seconds "$SECS" \
    --threads "$THREADS" --samples 2048
LARGE=${TMPDIR:-/tmp}/sslstream_large
[ -d "$LARGE" ] || python3 benchmarks/make_large_jpeg_shards.py "$LARGE" --count 2048 \
    --per-shard 256 > "$OUT/make_large.log" 2>&1
step "pipeline 224px (500x375)" pipeline_224.log python3 benchmarks/pipeline_throughput.py \
    "$LARGE" --recipe byol_imagenet --batch-size 256 --seconds "$SECS" --threads "$THREADS" --samples 512
step "multi-crop 32px (2x32 + 6x16)" multicrop_32.log python3 benchmarks/pipeline_throughput.py \
    "$SSLSTREAM_CIFAR10#train" --recipe byol_cifar --batch-size 512 --seconds "$SECS" \
    --threads "$THREADS" --samples 512 --variants dali-gpu,dali-cpu --local-count 6 --local-size 16
step "multi-crop 224px (2x224 + 6x96)" multicrop_224.log python3 benchmarks/pipeline_throughput.py \
    "$LARGE" --recipe dino_imagenet --batch-size 256 --seconds "$SECS" --threads "$THREADS" \
    --samples 256 --variants dali-gpu,dali-cpu --local-count 6 --local-size 96 --local-blur-p 0.5
grep -h '^{' "$OUT"/pipeline_32.log "$OUT"/pipeline_224.log > "$OUT/pipeline.jsonl"
grep -h '^{' "$OUT"/multicrop_32.log "$OUT"/multicrop_224.log > "$OUT/multicrop.jsonl"

if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  for compile in false true; do  # the reference: 13,225 img/s bf16 + channels_last, 18,986 compiled
    step "cifar10 byol ${EPOCHS} ep compile=$compile" "train_byol_compile_$compile.log" \
        python3 benchmarks/cifar10_knn.py --method byol --epochs "$EPOCHS" --batch-size 512 \
        --output-dir "${TMPDIR:-/tmp}/sslstream_bench_$compile" trainer.progress=log \
        trainer.loader_threads="$THREADS" trainer.compile=$compile
  done
  grep -h '^{' "$OUT"/train_byol_compile_*.log > "$OUT/train.jsonl" || true
else
  note "cifar10 byol: skipped (no CUDA device; the CPU smoke run is in BENCHMARKS.md)"
fi

note ""
note "img/s (one image = both views):"
python3 - "$OUT/pipeline.jsonl" <<'PY' | tee -a "$SUMMARY"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'recipe':<11} {'variant':<23} {'measure':<10} {'batch':>5} {'threads':>7} {'img/s':>10}")
for r in rows:
    print(f"{r['recipe']:<11} {r['variant']:<23} {r['measure']:<10} {r['batch_size']:>5} "
          f"{r['threads']:>7} {r['img_per_s']:>10,.0f}")
PY
note "multi-crop vs two views (graph img/s, ratio):"
tee -a "$SUMMARY" < "$OUT/multicrop.jsonl"
[ -s "$OUT/train.jsonl" ] && tee -a "$SUMMARY" < "$OUT/train.jsonl"
note "exit $status"
exit "$status"
