#!/usr/bin/env bash
# The GPU benchmark for a bare, offline GPU machine, in parts that each fit one 10-minute device call:
#   here:  bash bench/fetch_wheels.sh                  (diffusers + peft wheels into .whl/, git-ignored)
#   there: bash bench/gpu_device.sh N                  (with .whl carried)
# Part 1 (measured 2026-11-27, 196 s on an H100): everything eager, then compiled inference, each in its own
#         process with its own timeout: floor, our step and diffusers+PEFT's at batch 1/4/8 (+ the floor and ours
#         in channels_last and with cuDNN attention); inference with 0/1/4/8 adapters (ours, PEFT, base), fuse and
#         re-weight; then the CFG call under dynamo's cudagraphs backend (compiles fast, but copies every
#         parameter into the graph on each call: see docs/BENCHMARKS.md; part 4 is the figure to read).
# Part 2 (measured 2026-11-27, 210 s): our batch-1 step under CUDA graphs: dynamo's cudagraphs backend, then
#         inductor's reduce-overhead; each checked against eager.
# Part 3 (~6 min): the kernel profile of the floor and of our eager step at batch 8, then our batch-8 step under
#         reduce-overhead (inductor compiles ~2-3 min).
# Part 4 (~6 min): the CFG call under reduce-overhead, ours with 1/4/8 adapters and 4 fused against the base
#         compiled alike, and whether a re-weight recompiles.
# Part 5 (~8 min): the floor and our step at batch 8 under torch.compile default, ours with the default (low-rank
#         when compiled) and with the dense backward (measured 2026-11-27 with dense only, in 323 s).
# Part 6 (~5 min): everything eager after the dense backward: floor, ours (dense backward), ours (low-rank
#         backward), ours (merged forward) and diffusers+PEFT at batch 1/4/8; the kernel profile at batch 8 (floor,
#         dense, low-rank, merged); inference with 0/1/4/8 adapters (wall clock and GPU time; 4 also with the merged
#         weight off), fuse and re-weight.
#         (6, 5 and 4 measured 2026-11-27, second session: docs/results/gpu-h100-2026-11-27-b; part 4 was cut off
#         after 4 adapters: give it PART_SECONDS=450.)
# Part 7 (~5 min): the kernel profile at batch 8 with the floor and our step both under torch.compile default:
#         where the compiled step's 1.5x over the compiled floor goes.
# Part 8 (~5 min): the kernel profile at batch 8 of the compiled floor and our compiled step with the merged
#         forward (set_backward "merged": the frozen model's GEMMs on W + s B A, nothing over the activations).
#         Parts 6 and 8, then 4, are the next session's order (docs/BENCHMARKS.md, fourth session).
# Part 9 (~7 min): the targets' figures in one call: eager training at batch 1/4/8 (floor, dense, low-rank, merged,
#         PEFT), eager inference (0/1/4/8 adapters, fuse, re-weight), then the floor and our merged-forward step
#         compiled (default mode) at batch 8, timed, beside PEFT's eager step. Then part 4 with PART4_COUNTS=4 if
#         the session has ~4 minutes left (base and 4 adapters compiled).
# Part 10 (~4-5 min): the batch-8 step under CUDA graphs (inductor reduce-overhead) with the merged forward, checked
#         against eager, beside the eager floor, our eager steps and PEFT's: the compiled default-mode step was
#         launch-bound (part 9: 108.7 ms wall for 56.8 ms of kernels). First (~30 s) the host profile of the eager
#         CFG call, base and ours with one adapter (part 9: ~55 us of wall per LoRA layer, two launches at the
#         base call's ~26 us each; the CPU box: +6.6 us). Then part 4 with PART4_COUNTS="4 1 8".
# Part 11 (~8 min): eager inference as in part 9 with the kept merged weights (cache_merged_weights: the unfused
#         call on the base call's kernels alone, infer_unfused_cached, new in the seventh session), then part 10.
#         (measured 2026-11-28, tenth session: docs/results/gpu-h100-2026-11-28; the first gpu_infer run, on a cold
#         machine, ran past its 100 s: now 150.)
# Part 12 (~7 min): the batch-8 step under CUDA graphs (reduce-overhead, merged forward) beside the floor compiled
#         the same way in the same process (--compile-floor: the figure the <= 1.15x-the-floor target reads for a
#         compiled step), the eager floor, our eager steps and PEFT's.
# Part 13 (~2.5 min): eager inference alone (part 9's), the kept merged weights' wall clock over 3x the rounds,
#         with each line's ratio_paired (median of the rounds' ratios) and ratio_min beside the ratio of medians.
#         (12 and 13 measured 2026-11-28, eleventh session: docs/results/gpu-h100-2026-11-28-b.)
# Part 14 (~1.5 min, then part 13's ~2.5): the host side: the eager call's aten ops (base, 1 adapter), its Python
#         functions (base, kept merged weights: the 1.06x that remains with the base's kernels), the per-layer host
#         cost on this machine (layer_overhead: bare / ours / kept / PEFT), and a fused re-weight's Python functions
#         and aten ops (reweight_fused_host: the <= 15 ms target); then part 13.
# Part 15 (~1.5 min): --fp8_base's step and kohya's fp8 step against the bf16 model's, batch 1 and 8, without and
#         with gradient checkpointing: time and peak memory (the fp8 base's memory claim in docs/TRAINING.md); the CFG
#         call on fp8 weights (layerwise casting, A1111's FP8 weight) with 0 / 1 / 4 adapters, ours and PEFT's.
# Part 16 (~3.5 min): the compiled-unfused target (4 adapters <= 1.10x the base compiled alike; part 4 measured
#         1.339x under reduce-overhead, tenth session): the base compiled, then 4 adapters on kept merged weights
#         (cache_merged_weights on a compiled wrapper: its graph runs the base ops on them; new in the twenty-seventh
#         session), then 4 fused; wall (paired rounds, and ten calls back to back), GPU time, kernels. PART16_COUNTS="4"
#         adds part 4's 4 unfused adapters formed in the graph, in the same process (+~2 min).
# A 15-minute device session fits two or three parts when each call follows the last at once (the machine stays
# warm 30 s); PART_SECONDS caps the (single) run of parts 4 and 5 to what the session has left.
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
elif [ "$part" = 3 ]; then
    run gpu_profile_b8 90 --skip train infer --profile 8
    run gpu_compiled_b8 400 --skip infer --batches 8 --compile reduce-overhead --compile-batches 8
elif [ "$part" = 4 ]; then
    # shellcheck disable=SC2086  # PART4_COUNTS: the adapter counts to compile, e.g. "4" when time is short
    run gpu_infer_compiled_ro "${PART_SECONDS:-450}" --skip train infer --compile-infer reduce-overhead --compile-infer-counts ${PART4_COUNTS:-1 4 8}
elif [ "$part" = 5 ]; then
    run gpu_floor_compiled_b8 "${PART_SECONDS:-540}" --skip infer --batches 8 --floor-variants compile --compiled-steps ours ours-dense
elif [ "$part" = 6 ]; then
    run gpu_train 190 --skip infer
    run gpu_profile_b8 120 --skip train infer --profile 8
    run gpu_infer 150 --skip train
elif [ "$part" = 7 ]; then
    run gpu_profile_compiled_b8 "${PART_SECONDS:-420}" --skip train infer --profile 8 --profile-compile default --compiled-steps ours
elif [ "$part" = 8 ]; then
    run gpu_merged_compiled_b8 "${PART_SECONDS:-420}" --skip train infer --profile 8 --profile-compile default --compiled-steps ours-merged
elif [ "$part" = 9 ]; then
    run gpu_train 150 --skip infer
    run gpu_infer 100 --skip train
    run gpu_merged_compiled_b8 "${PART_SECONDS:-380}" --skip infer --batches 8 --floor-variants compile --compiled-steps ours-merged
elif [ "$part" = 10 ]; then
    run gpu_infer_host 60 --skip train infer --profile-infer
    run gpu_compiled_b8_ro "${PART_SECONDS:-330}" --skip infer --batches 8 --compile reduce-overhead --compile-batches 8 --compile-step ours-merged
elif [ "$part" = 11 ]; then
    run gpu_infer 150 --skip train
    run gpu_infer_host 60 --skip train infer --profile-infer
    run gpu_compiled_b8_ro "${PART_SECONDS:-330}" --skip infer --batches 8 --compile reduce-overhead --compile-batches 8 --compile-step ours-merged
elif [ "$part" = 12 ]; then
    run gpu_compiled_b8_floor "${PART_SECONDS:-480}" --skip infer --batches 8 --compile reduce-overhead --compile-batches 8 --compile-step ours-merged --compile-floor
elif [ "$part" = 13 ]; then
    run gpu_infer "${PART_SECONDS:-170}" --skip train
elif [ "$part" = 14 ]; then
    run gpu_infer_host 120 --skip train infer --profile-infer
    run gpu_infer "${PART_SECONDS:-170}" --skip train
elif [ "$part" = 15 ]; then
    run gpu_train_fp8 "${PART_SECONDS:-150}" --skip train infer --fp8 --batches 1 8
elif [ "$part" = 16 ]; then
    # shellcheck disable=SC2086  # PART16_COUNTS: unfused counts formed in the graph, e.g. "4"
    run gpu_infer_kept_compiled_ro "${PART_SECONDS:-330}" --skip train infer --compile-infer reduce-overhead --compile-infer-counts ${PART16_COUNTS:-} --compile-infer-kept 4
else
    echo "no part $part: 1-16" >&2
    exit 2
fi
grep -h '"error"' "$out"/*.jsonl || true
tail -n 3 "$out"/*.log
