#!/usr/bin/env bash
# The GPU benchmark as one command for a bare, offline GPU machine (see docs/BENCHMARKS.md, "GPU"):
#   here:  bash bench/fetch_wheels.sh
#   there: bash bench/gpu_device.sh            (with .whl carried; results in $OUT or ./gpu-results)
# Installs the carried wheels into /tmp/site, then runs the plain benchmark and the compiled training step,
# each writing JSON lines, so that what finishes comes back even if a later part runs out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv >> "$out/versions.txt" 2>&1
timeout "${GPU_BENCH_TIMEOUT:-240}" python3 bench/gpu.py "$@" > "$out/gpu.jsonl" 2> "$out/gpu.log"
echo "gpu.py exit $?"
timeout "${GPU_COMPILE_TIMEOUT:-240}" python3 bench/gpu.py --skip infer --batches 1 8 --compile-only --compile \
    --compile-batches 1 8 > "$out/gpu_compiled.jsonl" 2> "$out/gpu_compiled.log"
echo "gpu.py --compile exit $?"
cat "$out"/*.jsonl
