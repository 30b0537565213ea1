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
# Hydra's parser runtime (antlr4-python3-runtime 4.9.x) is published as an sdist only, and the
# stage script takes wheels: build it here (pure Python, py3-none-any) and stage the file.
WHEELS=${TMPDIR:-/tmp}/sslstream-gpu-wheels
ANTLR=$(ver antlr4-python3-runtime)
ls "$WHEELS"/antlr4_python3_runtime-"$ANTLR"-*.whl > /dev/null 2>&1 ||
  python3 -m pip wheel -q --no-deps -w "$WHEELS" "antlr4-python3-runtime==$ANTLR"
mkdir -p "$(dirname "$(git rev-parse --git-path info/exclude)")"  # the stage script appends there
bash "$STAGE" "hydra-core==$(ver hydra-core)" "omegaconf==$(ver omegaconf)" \
    "$(ls "$WHEELS"/antlr4_python3_runtime-"$ANTLR"-*.whl | head -1)" > "${TMPDIR:-/tmp}/sslstream-stage.log"
n=$(ls -d .stage/c* | wc -l)
run_cmd='bash benchmarks/gpu_session.sh'
data_cmd='mkdir -p /root/data && cp -r .gpu_data/cifar10 /root/data/'
# The last chunk holds the unpacker; the shards ride with it when both fit one call's 64 MiB.
last_kb=$(du -sk ".stage/c$n" .gpu_data | awk '{s += $1} END {print s}')
tree_kb=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "Staged $(du -sh .stage | cut -f1) in $n chunks and the shards in .gpu_data ($(du -sh .gpu_data | cut -f1))."
echo "Make these device calls back to back (the machine is given back ~30 s after a call):"
for i in $(seq 1 $((n - 1))); do
  echo "  run carry=[\".stage/c$i\"]  command: mkdir -p /root/stage && cp -r .stage/c$i/* /root/stage/"
done
unpack="mkdir -p /root/stage && cp -r .stage/c$n/* /root/stage/ && bash /root/stage/unpack.sh"
if [ $(( last_kb + tree_kb )) -lt $(( 60 * 1024 )) ]; then
  echo "  run carry=[\".stage/c$n\", \".gpu_data\"]  timeout_s=600  command: $unpack && $data_cmd && $run_cmd"
else
  echo "  run carry=[\".stage/c$n\"]  command: $unpack"
  echo "  run carry=[\".gpu_data\"]  timeout_s=600  command: $data_cmd && $run_cmd"
fi
echo "gpu_session.sh's summary ends the output; logs and JSON rows come back under \$OUT."
