"""Helpers shared by the benchmark scripts: timing, device/version labels, one JSON line per figure.

Not part of the library (``bench/`` is a folder of scripts). Each figure is printed as one JSON line holding
our time, the reference time measured in the same run, their ratio, what the reference is (``"peft"`` =
diffusers+PEFT, ``"base"`` = the model without LoRA, ``"floor"`` = the frozen forward + input-grad backward),
and the device, dtype, thread count and library versions.

Example:
    >>> ours, ref = compare(lambda: f(x), lambda: g(x), iters=10, warmup=2)
    >>> emit(ctx, "infer", "1 adapter", ours, ref, "peft")
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Context:
    """What every JSON line repeats: device, dtype, threads, versions (and free-form extras)."""

    device: str
    dtype: str
    threads: int
    extra: dict = field(default_factory=dict)

    def labels(self) -> dict:
        import diffusers
        import peft

        return {
            "device": self.device,
            "dtype": self.dtype,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "threads": self.threads,
            **self.extra,
        }


def cpu_name() -> str:
    """``"<model name> (<n> cores)"`` from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name} ({os.cpu_count()} cores)"


def once_s(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Wall time of one call of ``fn()`` in seconds (a first call: compiling, CUDA-graph capture)."""
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def median_ms(fn: Callable[[], object], iters: int, warmup: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` in ms over ``iters`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rounds(ours, ref, iters, warmup, sync=None, between=None) -> tuple[list[float], list[float]]:
    """ms of ``ours`` and ``ref`` per round, timed alternately (one of each per round), after ``warmup`` rounds."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(warmup + max(1, iters)):
        for k, fn in enumerate((ours, ref)):
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            dt = (time.perf_counter() - t0) * 1e3
            if between:
                between[k]()
            if i >= warmup:
                times[k].append(dt)
    return times[0], times[1]


def compare(
    ours: Callable[[], object],
    ref: Callable[[], object],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    between: tuple[Callable[[], object], Callable[[], object]] | None = None,
) -> tuple[float, float]:
    """Median ms of ``ours`` and ``ref``, timed alternately (one of each per round) so that drift from a
    shared machine hits both alike. ``between = (after_ours, after_ref)`` run untimed after each timed call
    (e.g. to undo a fuse)."""
    t_ours, t_ref = _rounds(ours, ref, iters, warmup, sync, between)
    return statistics.median(t_ours), statistics.median(t_ref)


def compare_paired(
    ours: Callable[[], object],
    ref: Callable[[], object],
    iters: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
) -> tuple[float, float, dict]:
    """``compare`` for two calls whose ratio is within the spread of a shared host's wall clock (a launch-bound
    GPU call against its base): the medians, and ``ratio_paired`` (the median of each round's ours / ref: a slow
    stretch of the host hits one round's two calls alike) and ``ratio_min`` (fastest against fastest)."""
    t_ours, t_ref = _rounds(ours, ref, iters, warmup, sync)
    paired = statistics.median(o / r for o, r in zip(t_ours, t_ref))
    extra = {"ratio_paired": round(paired, 4), "ratio_min": round(min(t_ours) / min(t_ref), 4), "rounds": len(t_ours)}
    return statistics.median(t_ours), statistics.median(t_ref), extra


def emit(ctx: Context, bench: str, case: str, ours: float, ref: float, ref_kind: str, unit: str = "ms", **extra) -> dict:
    """Print (and return) one JSON line: ``ours_<unit>``, ``ref_<unit>``, ``ratio`` = ours / ref, labels."""
    line = {
        "bench": bench,
        "case": case,
        f"ours_{unit}": None if ours is None else round(ours, 4),
        f"ref_{unit}": None if ref is None else round(ref, 4),
        "ratio": round(ours / ref, 4) if ours is not None and ref else None,
        "ref": ref_kind,
        **ctx.labels(),
        **extra,
    }
    print(json.dumps(line, allow_nan=False, default=float), flush=True)
    return line


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress to stderr with the seconds since start (stdout is reserved for the JSON lines)."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def quiet() -> None:
    """Silence the progress bars and load reports diffusers/transformers print on every adapter load."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


# the GPU bench's models: SD1.5's UNet and CLIP-L shapes (random weights), and tiny ones for CPU smoke runs
SD15_UNET = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
)
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=49408)
TINY_UNET = dict(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    cross_attention_dim=32,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=1000)


def kohya_fp8(model: torch.nn.Module) -> None:
    """kohya's ``--fp8_base``: the frozen Linear / Conv2d weights cast to fp8 in place, left for autocast to cast
    back at every call (the reference ``lora_diffusion.fp8.store_fp8`` is measured against)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
