"""The benchmark scripts run end to end and print one valid JSON line per figure (CI smoke runs).

``bench/cpu.py --quick`` takes ~30 s on an idle 2-core machine (1 iteration of every figure); the GPU script's
``--tiny`` mode runs its code paths on CPU with tiny shapes. Timings are not checked here: that is what the
scripts are for (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"device", "dtype", "torch", "diffusers", "peft", "threads"}


CPU_ARGS = ("bench/cpu.py", "--quick", "--threads", "1")
GPU_ARGS = ("bench/gpu.py", "--tiny", "--iters", "1", "--warmup", "0", "--batches", "1", "--threads", "1",
            "--compile", "default", "--compile-floor", "--compile-backend", "aot_eager", "--floor-variants", "channels_last", "compile",
            "--compiled-steps", "ours",
            "--compile-infer", "--compile-infer-counts", "4", "--compile-infer-kept", "4", "--profile", "1", "--profile-infer", "--fp8")  # each count is a compile: ~10 s here


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.Popen]:
    """Both smoke runs, started together: each takes one thread, so on a 2-core machine the pair took ~79 s rather
    than the ~96 s of one after the other. Timings are not checked, so sharing the cores changes nothing."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in (("cpu", CPU_ARGS), ("gpu", GPU_ARGS))}
    yield procs
    for proc in procs.values():
        proc.kill()


def _run(proc: subprocess.Popen) -> list[dict]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]  # every line is JSON
    assert lines, stderr[-3000:]
    errors = [line for line in lines if "error" in line]
    assert not errors, errors
    for line in lines:
        assert LABELS <= set(line), line
        assert line["ref"] in {"peft", "base", "floor", "floor_compiled", "ours_eager", "base_compiled", "merged", "bf16_base"}, line
        unit = next((u for u in ("ms", "us", "bytes", "mb", "ops") if f"ours_{u}" in line), None)
        assert unit, line
        ours, ref = line[f"ours_{unit}"], line[f"ref_{unit}"]
        if ours is not None and ref:
            assert abs(line["ratio"] - ours / ref) <= 1e-3 * max(1.0, line["ratio"]), line
    return lines


def test_cpu_bench_quick(runs):
    lines = _run(runs["cpu"])
    figures = {(line["bench"], line["case"], line["ref"]) for line in lines}
    for k in (1, 4, 8):
        assert ("infer_unfused", f"{k} adapters", "peft") in figures
        assert ("infer_unfused", f"{k} adapters", "base") in figures
    benches = {line["bench"] for line in lines}
    assert {"train_step", "fuse", "unfuse", "reweight_fused", "infer_fused", "load", "file_size", "train_step_ops",
            "infer_unfused_ops", "layer_overhead", "host_reweight_unfused", "host_load", "host_fuse", "host_reweight_fused",
            "infer_unfused_cached", "reweight_call_cached"} <= benches
    for line in lines:
        if line["bench"] == "infer_unfused_ops":  # kept merged weights: the base call's ops, nothing more
            assert line["cached_ops"] == line["base_ops"] < line["ours_ops"], line
        if line["bench"] == "infer_unfused_cached":
            assert line["kept_mb"] > 0, line
    ops = next(line for line in lines if line["bench"] == "train_step_ops")
    assert ops["floor_ops"] < ops["ours_ops"] <= ops["ref_ops"], ops  # a LoRA step costs more ops than the floor
    # the same weights give the same outputs in both libraries (fp32 on CPU)
    for line in lines:
        if "max_abs_diff" in line and line["max_abs_diff"] is not None:
            assert line["max_abs_diff"] < 1e-4, line
    train = [line for line in lines if line["bench"] == "train_step"]
    assert [line["case"] for line in train] == ["rank 4 attn, batch 2", "rank 4 attn, batch 2, DoRA"], train
    for line in train:  # the same losses (fp32 on CPU): DoRA's is PEFT's bit for bit too
        assert line["loss_abs_diff_last_step"] < 1e-5, line


def test_gpu_bench_tiny_on_cpu(runs):
    lines = _run(runs["gpu"])
    benches = {line["bench"] for line in lines}
    assert {"train_floor", "train_step", "train_peak_mem", "infer_unfused", "infer_fused", "fuse", "reweight_fused",
            "train_step_compiled", "infer_unfused_compiled", "infer_fused_compiled", "profile", "infer_host",
            "infer_fused_gpu_time", "infer_unfused_cached", "reweight_call_cached", "train_step_paired",
            "layer_overhead", "train_fp8", "infer_fp8", "infer_unfused_kept_compiled"} <= benches  # (layer_overhead: --profile-infer measures the per-layer host cost too)
    cases = {line["case"] for line in lines}
    # (--compiled-steps ours: the default compiled step, whose graphs --compile then reuses; the dense backward
    # compiled is left to test_training and test_dense_backward, a third compile here, ~25 s)
    assert {"batch 1, channels_last", "batch 1, compile", "rank 4 attn, batch 1, compile", "batch 1, compiled (default)",
            "rank 4 attn, batch 1 vs the floor compiled alike"} <= cases
    for line in lines:  # a wall-clock ratio against the base comes with the paired and the fastest rounds' ratios
        if line["bench"] == "train_step_paired" or (line["bench"] in ("infer_unfused", "infer_fused", "infer_unfused_cached")
                                                    and line["ref"] == "base"):
            assert line["ratio_paired"] > 0 and line["ratio_min"] > 0 and line["rounds"] >= 1, line
    compiled = next(line for line in lines if line["bench"] == "train_step_compiled")
    assert compiled["matches_eager"] and compiled["graph_breaks"] == 0, compiled
    for line in lines:
        if line["bench"].startswith("infer_") and line["bench"].endswith("_compiled"):  # aot_eager: eager's aten ops
            assert line["max_abs_diff"] == 0.0 and not line.get("recompiled_on_reweight"), line
            assert line["graph_breaks"] == 0, line
            assert line.get("max_abs_diff_after_reweight", 0.0) == 0.0, line
        if line["bench"] == "infer_unfused_kept_compiled":  # the graph on the kept weights, re-merged after the re-weight
            assert line["kept_mb"] > 0 and line["call_after_reweight_ms"] > 0 and line["loop_ratio"] > 0 and line["hook_us"] > 0, line
    fp8 = {line["case"]: line for line in lines if line["bench"] == "train_fp8"}  # (tiny: an fp32 model)
    for variant in ("fp8 base", "fp8, kohya's base", "gradient checkpointing, fp8 base"):
        assert fp8[f"rank 4 attn, batch 1, {variant}"]["weights_mb"] < fp8["rank 4 attn, batch 1, bf16 base"]["weights_mb"] / 2
        assert 0 < fp8[f"rank 4 attn, batch 1, {variant}"]["first_loss_abs_diff_vs_bf16"] < 0.05
    for line in lines:  # (fp8 storage, fp32 compute: ours is PEFT's to rounding; the UNet's weights a quarter)
        if line["bench"] == "infer_fp8" and "max_abs_diff_vs_peft" in line:
            assert line["max_abs_diff_vs_peft"] < 1e-4 and line["unet_mb"] < line["base_unet_mb"] / 2, line
    floor = next(line for line in lines if line["bench"] == "train_floor")
    assert floor["tflop"] and floor["tflop"] > 0, floor


def test_fp8_memory_bench_tiny():
    """``bench/fp8_memory.py``: kohya's fp8 step holds more than the bf16 model's (a bf16 copy of each weight kept for
    the backward beside the fp8 one); ours holds the fp8 weights and no copy."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "bench/fp8_memory.py", "--tiny", "--latent", "8"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = {line["case"]: line for line in _run(proc)}
    bf16, kohya, ours = (lines[f"LoRA step, batch 1, {v} base"] for v in ("bf16", "fp8, kohya's", "fp8, ours"))
    assert kohya["weights_mb"] == ours["weights_mb"] < bf16["weights_mb"] / 1.5
    assert kohya["ratio"] > 1.0 and ours["ratio"] < 0.75 and ours["saved_for_backward_mb"] <= bf16["saved_for_backward_mb"]
