#!/usr/bin/env bash
# HERE, on the development machine, before a session's first device call: stage what the lent
# GPU lacks and copy the CIFAR-10 shards into a carried folder, then print the device calls.
#
#   bash benchmarks/gpu_prepare.sh
#
# The GPU machine has torch and torchvision but no DALI, webdataset or Hydra and no package
# registry: ../shared/device/stage.sh packs those into chunks of at most 58 MiB (.stage/cN),
# and the shards travel in .gpu_data/ (17 MB). Both folders are git-ignored. Make the printed
# calls back to back (the machine is given back ~30 s after a call returns); the last one runs
# benchmarks/gpu_session.sh, which checks and measures everything that needs the GPU in one go.
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
CIFAR=${SSLSTREAM_CIFAR10:-$ROOT/../shared/data/cifar10}
[ -f "$CIFAR/manifest.json" ] || { echo "no CIFAR-10 shards at $CIFAR (set SSLSTREAM_CIFAR10)" >&2; exit 2; }
STAGE=${STAGE_SCRIPT:-$ROOT/../shared/device/stage.sh}
[ -f "$STAGE" ] || { echo "no stage script at $STAGE (set STAGE_SCRIPT)" >&2; exit 2; }
rm -rf .gpu_data && mkdir -p .gpu_data/cifar10
cp "$CIFAR"/*.tar.gz "$CIFAR"/manifest.json .gpu_data/cifar10/
ver() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Hydra for the trainer's config; tracking stays off there (an untracked run never imports MLflow).
bash "$STAGE" "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" \
    "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"
cat <<MSG

Then (first, or right after the stage calls): the data,
  run carry=[".gpu_data"]  command: mkdir -p /root/data && cp -r .gpu_data/cifar10 /root/data/
and as "<your GPU command>" of the last stage call (or a call of its own right after):
  bash benchmarks/gpu_session.sh
Its summary ends the output; logs and JSON rows come back under \$OUT.
MSG
