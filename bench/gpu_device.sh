#!/usr/bin/env bash
# The GPU benchmark for a bare, offline GPU machine, in parts that each fit one 10-minute device call:
#   here:  bash bench/fetch_wheels.sh                  (diffusers + peft wheels into .whl/, git-ignored)
#   there: bash bench/gpu_device.sh 1                  (with .whl carried; at most 9 minutes, ~5 expected)
#          bash bench/gpu_device.sh 2                  (the batch-1 compiled training step; at most 6 minutes)
#          bash bench/gpu_device.sh 3                  (the batch-8 compiled step and compiled floor; ~6 minutes)
# Part 1: everything eager, then compiled inference, each in its own process with its own timeout:
#         floor, our step and diffusers+PEFT's at batch 1/4/8 (+ the floor and ours in channels_last and with
#         cuDNN attention); inference with 0/1/4/8 adapters (ours, PEFT, base), fuse and re-weight; then the CFG
#         call under torch.compile (dynamo's cudagraphs backend: no codegen, compiles fast), ours with 1/4/8
#         adapters and 4 fused against the base compiled alike, and whether a re-weight recompiles.
# Part 2: our batch-1 step under CUDA graphs: dynamo's cudagraphs backend (compiles in seconds), then inductor's
#         reduce-overhead (minutes of codegen); each checked against eager.
# Part 3: at batch 8, our step under torch.compile and the floor under torch.compile.
# A 15-minute device session fits part 1 and part 2 (one start, the second call at once, while it is warm).
# Smoke-test it on a CPU machine: GPU_BENCH_ARGS="--tiny --iters 1 --warmup 0 --compile-backend aot_eager" OUT=/tmp/g bash bench/gpu_device.sh 1
# Results (JSON lines, logs, versions) go to $OUT (the device tool's folder) or ./gpu-results; each run has its own
# timeout, so what finished comes back even if a later run is cut short.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-1}"
out="${OUT:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv >> "$out/versions.txt" 2>&1

run() {  # run NAME SECONDS ARGS...: one gpu.py invocation into $out/NAME.jsonl (+ .log)
    local name=$1 seconds=$2
    shift 2
    # shellcheck disable=SC2086  # GPU_BENCH_ARGS: extra flags, e.g. "--tiny --iters 1 --compile-backend aot_eager"
    timeout "$seconds" python3 bench/gpu.py "$@" ${GPU_BENCH_ARGS:-} > "$out/$name.jsonl" 2> "$out/$name.log"
    echo "$name: exit $? ($(wc -l < "$out/$name.jsonl") figures)"
}
if [ "$part" = 1 ]; then
    run gpu_train 200 --skip infer --floor-variants channels_last sdpa_cudnn
    run gpu_infer 130 --skip train
    run gpu_infer_compiled 200 --skip train infer --compile-infer cudagraphs
elif [ "$part" = 2 ]; then
    run gpu_compiled_b1_cudagraphs 120 --batches 1 --skip infer --compile reduce-overhead --compile-backend cudagraphs
    run gpu_compiled_b1 220 --batches 1 --skip infer --compile reduce-overhead
else
    run gpu_compiled_b8 540 --skip infer --batches 8 --compile reduce-overhead --compile-batches 8 --floor-variants compile
fi
grep -h '"error"' "$out"/*.jsonl || true
tail -n 3 "$out"/*.log
