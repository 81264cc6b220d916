#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA GPU (the `device` tool's H100/H200), within
# ~10 minutes (the steps' limits add up to 595 s). Exits 1 if any step failed. Prepare here first: `bash scripts/gpu_wheels.sh`; then run with carry [".whl"]:
#   bash scripts/gpu_check.sh            (results and logs under $OUT, else benchmarks/results/gpu:
#                                         device.txt, steps.log and three tables; 5 files)
# 1. every gpu-marked test (Triton kernels on CUDA vs their references; the torch-cuda backend,
#    fp8 included, vs the simulation), 2. the weight-only matmul table (ours vs torch's kernels),
# 3. the loss table with the peers' Triton kernels (issue 4), 4. mixed precision on torch-cuda,
# 5. the intrinsic-dimension, spiking and few-step jobs on the GPU (last: a run cut short keeps 1-4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/device.txt"
failed=0
# The device tool returns at most 8 files from $OUT: every step's log goes into one steps.log.
LOGS=$(mktemp -d)
step() {  # name, time limit (s), command...
  local name=$1 limit=$2 rc; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  { echo "===== $name: exit $rc"; cat "$LOGS/$name.log"; } >> "$OUT/steps.log"
  tail -25 "$LOGS/$name.log"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || failed=1
}
step gpu_tests 150 python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu \
  tests/gpu_kernels tests/workers/engine/quant/test_torch_backend.py
step qmatmul 45 python3 benchmarks/qmatmul.py --out "$OUT/qmatmul_gpu.md"
# Each case runs in a fresh process (peak memory); torch.compile's CPU peer is left out here.
step loss_memory 200 python3 benchmarks/loss_memory.py --n 8192 --d 2048 --dtype bfloat16 \
  --impls torch,triton,chunked,cce_triton,liger --out "$OUT/loss_memory_gpu.md"
step mixed_precision 140 python3 benchmarks/mixed_precision.py --backend torch-cuda \
  --models digits-cnn,char-gpt --out "$OUT/mixed_precision_torch_cuda.md"
step job_devices 60 python3 -m pytest --noconftest -p no:cacheprovider -q -m gpu \
  tests/workers/engine/test_job_devices.py
exit "$failed"
