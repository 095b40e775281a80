"""GPU benchmark: SD1.5-shaped UNet + CLIP-L text encoder (random weights), 512px, bf16, against diffusers+PEFT
and against the hardware floor.

Prints one JSON line per figure (stdout); progress goes to stderr; a section that fails prints one line with
``"error"`` and the run goes on. Needs torch, diffusers, transformers and peft only.

* ``train_floor``: the frozen UNet's forward + input-gradient backward at batch 1, 4 and 8 (the least any
  LoRA step can cost), with the FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` and achieved TFLOP/s.
* ``train_step``: a LoRA r=4 step (to_q/k/v/out.0 of attn1+attn2, fp32 LoRA parameters, bf16 autocast, MSE,
  AdamW: fused for ours on CUDA, as our training loop; PEFT's as diffusers' script) with ours (``inject_lora``)
  against the floor and against diffusers+PEFT (``LoraConfig`` + ``unet.add_adapter`` +
  ``cast_training_params``, as ``train_text_to_image_lora.py``), same init (PEFT's A copied from ours), inputs
  and seed. Ours with its default backward (dense on CUDA: ``set_backward``) and with the low-rank one (PEFT's
  ops, ``..., lowrank backward``). ``train_peak_mem``: peak GPU memory of each above what was allocated
  before it built its model copy (so: its UNet copy, LoRA parameters, optimizer state, activations).
* ``train_fp8`` (``--fp8``, opt-in): our step with ``--fp8_base``'s fp8 weights and with kohya's, against the
  same step on the bf16 model: time, peak memory (``peak_vs_bf16``), the first step's loss difference; without
  and with gradient checkpointing.
* ``infer_fp8`` (``--fp8``): the CFG call with the UNet's weights in fp8 (diffusers' ``enable_layerwise_casting``)
  and 0 / 1 / 4 unfused adapters (PEFT's beside) or 4 fused, against the plain UNet's call, with the UNet's MB.
* ``train_step_compiled`` (``--compile``, opt-in): our step with ``torch.compile`` (default mode
  ``reduce-overhead``, i.e. CUDA graphs, with ``cudagraph_mark_step_begin`` per step and fused AdamW),
  checked against the eager step from the same start (losses and LoRA parameters after the same steps).
* ``train_floor`` / ``train_step`` with ``--floor-variants``: the floor and our step with the UNet in
  ``channels_last``, with cuDNN's attention kernel (``sdpa_cudnn``), or under ``torch.compile`` (default mode),
  each against the plain floor.
* ``infer_unfused`` / ``infer_fused``: one CFG UNet call (batch 2, 64x64 latents) with 0, 1, 4, 8 adapters
  loaded from files, ours vs PEFT's equivalents and vs the base UNet; ``infer_unfused_gpu_time``: the same calls'
  GPU time summed over their kernels (torch.profiler) with kernel counts, ours vs base (PEFT's beside): the eager
  call is launch-bound, so this is what the LoRA kernels cost where the host does not hide them (CUDA graphs);
  ``infer_unfused_pair``: 4 adapters with the merged weight off (every layer through the low-rank pair) against
  the default (merged weight where ``layers.merged_forward_pays``), wall clock and GPU time;
  ``infer_unfused_cached``: through kept merged weights (``cache_merged_weights``) vs the base, wall clock, GPU
  time and kernels, with the MB kept; ``reweight_call_cached``: 4 adapters re-weighted, then one call, vs PEFT's.
* ``fuse`` / ``reweight_fused``: fusing 4 adapters into UNet + text encoder, and changing their weights
  while fused (diffusers: ``unfuse_lora`` + ``set_adapters`` + ``fuse_lora``).
* ``infer_unfused_compiled`` / ``infer_fused_compiled`` (``--compile-infer``, opt-in): the same CFG call with
  the UNet under ``torch.compile`` (default: the ``cudagraphs`` backend), ours with 1 / 4 / 8 adapters and 4
  fused against the base UNet compiled alike; each line also says whether a re-weight recompiled (it must not).
  ``infer_unfused_kept_compiled`` (``--compile-infer-kept N...``): the same with the kept merged weights
  (``cache_merged_weights`` on the compiled wrapper: its graph runs the base ops on them, a hook re-merges changed
  layers before a call), wall clock (paired rounds), GPU time and kernels, a re-weight and the call after it.

    python bench/gpu.py                     # the full run, < 5 minutes on one H100
    python bench/gpu.py --compile           # plus the compiled training step (adds the compile time)
    python bench/gpu.py --floor-variants channels_last sdpa_cudnn compile   # the floor (and ours) lowered, TFLOP/s
    python bench/gpu.py --skip train infer --compile-infer   # compiled inference only (CUDA graphs, ~3 minutes)
    python bench/gpu.py --tiny --iters 1    # smoke run on CPU with tiny shapes (fp32)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CLIP_L, SD15_UNET, TINY_CLIP, TINY_UNET, Context, compare, compare_paired, cpu_name, emit,  # noqa: E402
                     kohya_fp8, log, median_ms, once_s, quiet)
from cpu import bench_cached, bench_layer, kept_mb, load_both, make_adapter_files, make_pipe, peft_add, reweighters, set_both  # noqa: E402

import lora_diffusion as ld  # noqa: E402
from lora_diffusion import layers  # noqa: E402
from lora_diffusion.inject import lora_layers, set_backward  # noqa: E402
from lora_diffusion.testing import tiny_components  # noqa: E402
from lora_diffusion.training import compile_unet  # noqa: E402


class Setup:
    """Device, dtype, shapes and the master (CPU) copies the benchmarks copy from."""

    def __init__(self, args) -> None:
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.iters, self.warmup = args.iters, args.warmup
        self.compile_backend = args.compile_backend
        self.compiled_who = args.compiled_steps  # our compiled steps beside the compiled floor (variant, profile)
        self.compile_step = args.compile_step  # our step for --compile (timed, checked against eager)
        self.compile_floor = args.compile_floor  # --compile: the floor compiled alike first
        self._resident = 0
        self.latent = 8 if args.tiny else 64
        unet_cfg, clip_cfg = (TINY_UNET, TINY_CLIP) if args.tiny else (SD15_UNET, CLIP_L)
        self.ctx_dim = unet_cfg["cross_attention_dim"]
        self.comps = self._components(unet_cfg, clip_cfg)
        name = torch.cuda.get_device_name() if self.cuda else cpu_name()
        shapes = "tiny" if args.tiny else "SD1.5 UNet + CLIP-L, 512px (64x64 latents)"
        self.ctx = Context(device=name, dtype=str(self.dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                           extra={"model": shapes})

    def _components(self, unet_cfg: dict, clip_cfg: dict) -> dict:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        comps = tiny_components(0)  # vae, tokenizer, scheduler: never run here, but pipelines need them
        log("building UNet and text encoder (random weights)")
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**unet_cfg)
            torch.manual_seed(1)
            te = CLIPTextModel(CLIPTextConfig(**clip_cfg, max_position_embeddings=77))
        comps["unet"] = unet.to(self.dtype).eval().requires_grad_(False)
        comps["text_encoder"] = te.to(self.dtype).eval().requires_grad_(False)
        comps["vae"] = comps["vae"].to(self.device, self.dtype)
        log(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params on {self.device}")
        return comps

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda)

    def inputs(self, batch: int, seed: int = 0) -> dict:
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, 4, self.latent, self.latent)
        with torch.no_grad():
            ids = torch.randint(0, 500, (batch, 77), generator=gen).to(self.device)
            ehs = self.comps["text_encoder"](ids)[0]
        return {
            "noisy": torch.randn(shape, generator=gen).to(self.device, self.dtype),
            "noise": torch.randn(shape, generator=gen).to(self.device, self.dtype),
            "t": torch.randint(0, 1000, (batch,), generator=gen).to(self.device),
            "ehs": ehs,
        }

    def unet_copy(self):
        return copy.deepcopy(self.comps["unet"])

    def resident(self) -> None:
        """Note what is allocated before a variant builds its model: its peak is counted above this (so the
        master copies and the text encoder kept on the GPU for all variants are left out)."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            self._resident = torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        """Peak GPU memory since ``reset_peak`` above ``resident()``: the variant's model copy, LoRA parameters,
        optimizer state, activations and workspace."""
        return (torch.cuda.max_memory_allocated() - self._resident) / 2**20 if self.cuda else None


# ------------------------------------------------------------------------------------------------ training
def floor_step(s: Setup, unet, inp: dict, cudagraphs: bool = False):
    """Frozen UNet forward + backward to the input only: what every LoRA step has to pay at least."""

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        x = inp["noisy"].detach().requires_grad_(True)
        with s.autocast():
            pred = unet(x, inp["t"], inp["ehs"]).sample
        F.mse_loss(pred.float(), inp["noise"].float()).backward()
        return x.grad

    return step


def lora_step(s: Setup, unet, params, inp: dict, *, fused_adam: bool = False, cudagraphs: bool = False, autocast=None):
    """One LoRA training step; returns (step, losses). ``autocast``: in place of ``s.autocast``."""
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused_adam and s.cuda else {}))
    losses: list[torch.Tensor] = []

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with (autocast or s.autocast)():
            pred = unet(inp["noisy"], inp["t"], inp["ehs"]).sample
        loss = F.mse_loss(pred.float(), inp["noise"].float())
        loss.backward()
        opt.step()
        if fused_adam:  # (as our training loop: a fused step counts no version, the loop counts one per tensor)
            for p in params:
                torch.autograd.graph.increment_version(p)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())

    return step, losses


def ours_model(s: Setup, backward: str = "auto"):
    unet = s.unet_copy()
    with torch.random.fork_rng(devices=[]):  # manual_seed seeds CUDA too: the same A on every call
        torch.manual_seed(123)
        params = ld.inject_lora(unet, rank=4, targets="attn")
    set_backward(unet, backward)
    unet.train()
    return unet, params


def peft_model(s: Setup, a_init: dict):
    from diffusers.training_utils import cast_training_params

    unet = s.unet_copy()
    peft_add(unet, rank=4)
    cast_training_params(unet, dtype=torch.float32)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for path, a in a_init.items():
            modules[path].lora_A["default"].weight.copy_(a)
    unet.train()
    return unet, [p for p in unet.parameters() if p.requires_grad]


def floor_or_ours(s: Setup, who: str):
    """``(unet, params)``: a fresh frozen UNet copy for ``"floor"`` (params ``None``), or one with our LoRA
    (``"ours"``: the default backward; ``"ours-lowrank"`` / ``"ours-dense"`` / ``"ours-merged"``: that mode)."""
    if who == "floor":
        return s.unet_copy(), None
    return ours_model(s, backward={"ours-lowrank": "lowrank", "ours-dense": "dense", "ours-merged": "merged"}.get(who, "auto"))


def step_of(s: Setup, who: str, unet, params, inp: dict):
    """The floor's step, or our LoRA step with fused AdamW (as our training loop on CUDA)."""
    return floor_step(s, unet, inp) if who == "floor" else lora_step(s, unet, params, inp, fused_adam=True)[0]


def _with_sdpa_backend(step, name: str):
    """``step`` with torch's scaled-dot-product attention restricted to one backend (cuDNN's on Hopper), where
    diffusers' default lets torch pick (flash attention for bf16)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel([getattr(SDPBackend, name)]):
            return step()

    return run


def bench_floor_variant(s: Setup, inp: dict, batch: int, variant: str, floor_ms: float, flops: float | None) -> None:
    """The floor lowered where our code controls it: channels_last (``--channels_last`` in training), cuDNN's
    attention kernel, or the UNet under torch.compile (``--compile default``); and our LoRA step the same way."""
    log(f"train, batch {batch}: floor and ours, {variant}")
    results = {}
    # compiled, ``auto`` keeps the low-rank backward: ours with the dense one (or the merged forward) compiled too
    for who in ("floor", *s.compiled_who) if variant == "compile" else ("floor", "ours"):
        s.resident()
        unet, params = floor_or_ours(s, who)
        if variant == "channels_last":
            unet.to(memory_format=torch.channels_last)
        model = compile_unet(unet, "default", s.compile_backend) if variant == "compile" else unet
        step = step_of(s, who, model, params, inp)
        if variant == "sdpa_cudnn":
            step = _with_sdpa_backend(step, "CUDNN_ATTENTION")
        first_s = once_s(step, s.sync)
        s.reset_peak()
        ms, mem = median_ms(step, s.iters, s.warmup, s.sync), s.peak_mb()
        # the GPU's share of the wall clock: a step whose kernels sum to much less than its wall time is host-bound
        gpu_ms, kernels = kernel_time(s, step, 3)
        results[who] = (ms, mem, first_s, {"gpu_ms_per_step": gpu_ms, "kernels_per_step": kernels})
        del unet, params, model, step
    f_ms, f_mem, f_first, f_gpu = results.pop("floor")
    tflops = flops / (f_ms / 1e3) / 1e12 if flops else None
    emit(s.ctx, "train_floor", f"batch {batch}, {variant}", f_ms, floor_ms, "floor", tflops_per_s=tflops, peak_mb=f_mem,
         first_call_s=round(f_first, 1), **f_gpu)
    for who, (o_ms, o_mem, o_first, o_gpu) in results.items():
        case = f"rank 4 attn, batch {batch}, {variant}" + {"ours-dense": ", dense backward", "ours-merged": ", merged"}.get(who, "")
        emit(s.ctx, "train_step", case, o_ms, f_ms, "floor", floor_variant=variant, peak_mb=o_mem, first_call_s=round(o_first, 1),
             floor_gpu_ms_per_step=f_gpu["gpu_ms_per_step"], **o_gpu)


def bench_training(s: Setup, batches: list[int], compile_mode: str | None, compile_batches: list[int],
                   floor_variants: list[str]) -> None:
    for batch in batches:
        inp = s.inputs(batch)
        log(f"train, batch {batch}: floor")
        s.resident()
        unet = s.unet_copy()
        step = floor_step(s, unet, inp)
        step()
        flops = None
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        except Exception as e:  # the counter is a nicety: the timing still counts
            log(f"flop counter failed: {e!r}")
        s.reset_peak()
        floor_ms = median_ms(step, s.iters, s.warmup, s.sync)
        floor_mem = s.peak_mb()
        del unet, step
        tflops = flops / (floor_ms / 1e3) / 1e12 if flops else None
        emit(s.ctx, "train_floor", f"batch {batch}", floor_ms, floor_ms, "floor", tflop=flops / 1e12 if flops else None,
             tflops_per_s=tflops, peak_mb=floor_mem)
        for variant in floor_variants:
            guarded(f"train_floor {variant} batch {batch}", bench_floor_variant, s, inp, batch, variant, floor_ms, flops)

        log(f"train, batch {batch}: ours")
        s.resident()
        unet, params = ours_model(s)
        a_init = {p: layer.lora_A["default"].detach().clone() for p, layer in lora_layers(unet)}
        step, losses_o = lora_step(s, unet, params, inp, fused_adam=True)  # as training does on CUDA
        s.reset_peak()
        ours_ms = median_ms(step, s.iters, s.warmup, s.sync)
        ours_mem = s.peak_mb()
        mode = next(layer for _, layer in lora_layers(unet)).backward_mode
        del unet, params, step

        log(f"train, batch {batch}: ours, low-rank backward (PEFT's ops)")
        s.resident()
        unet, params = ours_model(s, backward="lowrank")
        step, _ = lora_step(s, unet, params, inp, fused_adam=True)
        lowrank_ms = median_ms(step, s.iters, s.warmup, s.sync)
        lowrank_mem = s.peak_mb()
        del unet, params, step

        log(f"train, batch {batch}: ours, merged forward (dense backward, the forward through W + s B A)")
        s.resident()
        unet, params = ours_model(s, backward="merged")
        step, losses_m = lora_step(s, unet, params, inp, fused_adam=True)
        s.reset_peak()
        merged_ms = median_ms(step, s.iters, s.warmup, s.sync)
        merged_mem = s.peak_mb()
        del unet, params, step

        log(f"train, batch {batch}: diffusers+PEFT")
        s.resident()
        unet, params = peft_model(s, a_init)
        step, losses_p = lora_step(s, unet, params, inp)
        s.reset_peak()
        peft_ms = median_ms(step, s.iters, s.warmup, s.sync)
        peft_mem = s.peak_mb()
        del unet, params, step
        loss_diff = (losses_o[-1] - losses_p[-1]).abs().item()
        emit(s.ctx, "train_step", f"rank 4 attn, batch {batch}", ours_ms, floor_ms, "floor", backward=mode)
        emit(s.ctx, "train_step", f"rank 4 attn, batch {batch}, lowrank backward", lowrank_ms, floor_ms, "floor",
             backward="lowrank", vs_peft=round(lowrank_ms / peft_ms, 4), peak_mb=lowrank_mem)
        emit(s.ctx, "train_step", f"rank 4 attn, batch {batch}, merged forward", merged_ms, floor_ms, "floor",
             backward="merged", vs_peft=round(merged_ms / peft_ms, 4), peak_mb=merged_mem,
             loss_abs_diff_last_step_vs_peft=(losses_m[-1] - losses_p[-1]).abs().item())
        emit(s.ctx, "train_step", f"rank 4 attn, batch {batch}", ours_ms, peft_ms, "peft", loss_abs_diff_last_step=loss_diff)
        emit(s.ctx, "train_peak_mem", f"batch {batch}", ours_mem, peft_mem, "peft", unit="mb", floor_mb=floor_mem)
        guarded(f"train_step_paired batch {batch}", bench_paired, s, inp, batch, a_init)

        if compile_mode and batch in compile_batches:
            guarded(f"train_step_compiled batch {batch}", bench_compiled, s, inp, batch, compile_mode, ours_ms, peft_ms, a_init,
                    floor_ms, flops)


def bench_fp8(s: Setup, batches: list[int]) -> None:
    """``--fp8_base``'s training step (``fp8.store_fp8``: the frozen Linear / Conv2d weights in fp8, each
    layer keeping only its fp8 weight for the backward) and kohya's (the same weights in fp8, cast by autocast at
    each call, which keeps a bf16 copy of each for the backward) against our step on the bf16 model: time, peak
    memory and the loss, without and with gradient checkpointing. (Tiny: bf16 autocast on the CPU too.)"""
    from lora_diffusion.fp8 import store_fp8

    def autocast():
        return torch.autocast(s.device.type, dtype=torch.bfloat16)

    for batch in batches:
        inp = s.inputs(batch)
        for checkpointing in (False, True):
            ref = None
            for variant in ("bf16", "fp8", "fp8, kohya's"):
                log(f"train, batch {batch}: {variant} base{', gradient checkpointing' if checkpointing else ''}")
                s.resident()
                unet, params = ours_model(s)
                if checkpointing:
                    unet.enable_gradient_checkpointing()
                if variant == "fp8":
                    store_fp8([("unet", unet)], torch.bfloat16)
                elif variant != "bf16":
                    kohya_fp8(unet)
                weights_mb = sum(p.untyped_storage().nbytes() for p in unet.parameters()) / 2**20
                step, losses = lora_step(s, unet, params, inp, fused_adam=True, autocast=autocast)
                s.reset_peak()
                ms, mem = median_ms(step, s.iters, s.warmup, s.sync), s.peak_mb()
                del unet, params, step
                ref = ref or (ms, mem, losses[0].item())
                case = f"rank 4 attn, batch {batch}{', gradient checkpointing' if checkpointing else ''}, {variant} base"
                emit(s.ctx, "train_fp8", case, ms, ref[0], "bf16_base", peak_mb=mem, weights_mb=round(weights_mb, 1),
                     peak_vs_bf16=round(mem / ref[1], 4) if mem and ref[1] else None,
                     first_loss_abs_diff_vs_bf16=abs(losses[0].item() - ref[2]))


def bench_paired(s: Setup, inp: dict, batch: int, a_init: dict) -> None:
    """Our eager step (the default backward) against the floor and against PEFT's, timed in alternating rounds with
    all three models resident: the ratios above come from runs seconds apart, which a shared host's drift moves by
    10-40 % (the tenth session); here each round's two steps see the same host."""
    log(f"train, batch {batch}: ours against the floor and PEFT, alternating rounds")
    s.resident()
    floor = floor_step(s, s.unet_copy(), inp)
    unet, params = ours_model(s)
    ours, _ = lora_step(s, unet, params, inp, fused_adam=True)
    mode = next(layer for _, layer in lora_layers(unet)).backward_mode
    unet_p, params_p = peft_model(s, a_init)
    peft, _ = lora_step(s, unet_p, params_p, inp)
    ours_ms, floor_ms, spread = compare_paired(ours, floor, s.iters, s.warmup, s.sync)
    emit(s.ctx, "train_step_paired", f"rank 4 attn, batch {batch}", ours_ms, floor_ms, "floor", backward=mode, **spread)
    ours_ms, peft_ms, spread = compare_paired(ours, peft, s.iters, s.warmup, s.sync)
    emit(s.ctx, "train_step_paired", f"rank 4 attn, batch {batch}", ours_ms, peft_ms, "peft", backward=mode, **spread)


def bench_compiled(s: Setup, inp: dict, batch: int, mode: str, eager_ms: float, peft_ms: float, a_init: dict,
                   floor_ms: float, flops: float | None) -> None:
    """Our step (``--compile-step``: the default backward, or that mode) under torch.compile, timed, then checked
    against eager (the same backward mode) from the same start. With ``--compile-floor``, first the floor compiled
    the same way, in the same process: what the batch-8 target compares a compiled step with."""
    who = s.compile_step
    cudagraphs = mode == "reduce-overhead" and s.cuda
    floor_c = None
    if s.compile_floor:
        log(f"train, batch {batch}: floor compiled (mode={mode}); the first call compiles")
        s.resident()
        unet = s.unet_copy()
        step = floor_step(s, compile_unet(unet, mode, s.compile_backend), inp, cudagraphs=cudagraphs)
        first_s = once_s(step, s.sync)
        s.reset_peak()
        floor_c, floor_mem = median_ms(step, s.iters, s.warmup, s.sync), s.peak_mb()
        gpu_ms, kernels = kernel_time(s, step, 3)
        del unet, step
        emit(s.ctx, "train_floor", f"batch {batch}, compiled ({mode})", floor_c, floor_ms, "floor",
             tflops_per_s=flops / (floor_c / 1e3) / 1e12 if flops else None, peak_mb=floor_mem,
             first_call_s=round(first_s, 1), gpu_ms_per_step=gpu_ms, kernels_per_step=kernels)
    log(f"train, batch {batch}: {who} compiled (mode={mode}); the first call compiles")
    s.resident()
    unet, params = floor_or_ours(s, who)
    start = [p.detach().clone() for p in params]
    compiled = compile_unet(unet, mode, s.compile_backend)  # what `--compile` does in training
    step, losses_c = lora_step(s, compiled, params, inp, fused_adam=True, cudagraphs=cudagraphs)
    compile_s = once_s(step, s.sync)
    s.reset_peak()
    comp_ms = median_ms(step, s.iters, s.warmup, s.sync)
    comp_mem = s.peak_mb()
    n_steps = len(losses_c)
    final_c = [p.detach().float().clone() for p in params]
    comp_gpu_ms, comp_kernels = kernel_time(s, step, 3) if floor_c else (None, None)  # (steps after final_c)
    del compiled, unet, params, step

    log(f"train, batch {batch}: eager check, {n_steps} steps from the same start")
    unet, params = floor_or_ours(s, who)
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(start[i])
    step, losses_e = lora_step(s, unet, params, inp, fused_adam=True)
    for _ in range(n_steps):
        step()
    s.sync()
    num = max((pc - pe.detach().float()).abs().max().item() for pc, pe in zip(final_c, params))
    den = max(pe.detach().float().abs().max().item() for pe in params)
    loss_rel = max(abs(lc.item() - le.item()) / max(abs(le.item()), 1e-12) for lc, le in zip(losses_c, losses_e))
    ok = loss_rel < 2e-2 and num / den < 5e-2
    del unet, params, step
    extra = {"compile_mode": mode, "step": who, "compile_s": round(compile_s, 1), "cudagraph_skips": _cudagraph_skips(), "graph_breaks": _graph_breaks(), "loss_max_rel_diff_vs_eager": loss_rel,
             "param_max_rel_diff_vs_eager": num / den, "steps_checked": n_steps, "matches_eager": ok, "peak_mb": comp_mem}
    emit(s.ctx, "train_step_compiled", f"rank 4 attn, batch {batch}", comp_ms, peft_ms, "peft", **extra)
    emit(s.ctx, "train_step_compiled", f"rank 4 attn, batch {batch} vs our eager", comp_ms, eager_ms, "ours_eager")
    if floor_c:
        emit(s.ctx, "train_step_compiled", f"rank 4 attn, batch {batch} vs the floor compiled alike", comp_ms, floor_c,
             "floor_compiled", compile_mode=mode, step=who, gpu_ms_per_step=comp_gpu_ms, kernels_per_step=comp_kernels,
             tflops_per_s=flops / (comp_ms / 1e3) / 1e12 if flops else None)


def bench_profile(s: Setup, batch: int, compile_mode: str | None = None, steps: int = 3) -> None:
    """Where a step's GPU time goes: torch.profiler's kernel table (top 30 by GPU time) of the floor and of our
    LoRA step at ``batch`` (eager, or both under torch.compile ``compile_mode``; eager also our low-rank
    backward), on stderr; and ``profile`` lines: our GPU time per step summed over kernels against the floor's,
    with both kernel counts per step (on a CPU the GPU figures are empty)."""
    from torch.profiler import ProfilerActivity, profile

    inp = s.inputs(batch)
    totals = {}
    for who in ("floor", *s.compiled_who) if compile_mode else ("floor", "ours", "ours-lowrank", "ours-merged"):
        log(f"profile, batch {batch}: {who}" + (f", compiled ({compile_mode}); the first call compiles" if compile_mode else ""))
        s.resident()
        unet, params = floor_or_ours(s, who)
        model = compile_unet(unet, compile_mode, s.compile_backend) if compile_mode else unet
        step = step_of(s, who, model, params, inp)
        for _ in range(2):
            step()
        s.sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])) as prof:
            for _ in range(steps):
                step()
            s.sync()
        events = prof.key_averages()
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
        print(f"=== profile, batch {batch}, {who} ({steps} steps) ===\n{events.table(sort_by=key, row_limit=30)}",
              file=sys.stderr, flush=True)
        totals[who] = _kernel_totals(s, prof, steps)
        del unet, params, model, step
    floor_ms, floor_kernels = totals.pop("floor")
    for who, (ours_ms, ours_kernels) in totals.items():
        emit(s.ctx, "profile", f"batch {batch}, GPU time summed over kernels, {who}" + (f", compile {compile_mode}" if compile_mode else ""),
             ours_ms, floor_ms, "floor", kernels_per_step=ours_kernels, floor_kernels_per_step=floor_kernels)


def _kernel_totals(s: Setup, prof, calls: int) -> tuple[float | None, float | None]:
    """GPU ms per call summed over the profiled kernels, and kernels per call; ``(None, None)`` on a CPU."""
    if not s.cuda:
        return None, None
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return sum(e.time_range.elapsed_us() for e in kernels) / calls / 1e3, len(kernels) / calls


def kernel_time(s: Setup, fn, calls: int = 5) -> tuple[float | None, float | None]:
    """``_kernel_totals`` of ``calls`` calls of ``fn``: what a call costs the GPU, whatever the host adds (eager
    inference is launch-bound, so wall clock hides the LoRA kernels' own cost)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    s.sync()
    with profile(activities=[ProfilerActivity.CUDA] if s.cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        s.sync()
    return _kernel_totals(s, prof, calls)


# ------------------------------------------------------------------------------------------------ inference
@contextlib.contextmanager
def pairs_only():
    """Inference without the merged weight: every layer runs the stacked low-rank pair (the choice before it)."""
    rule = layers.LoraLayer._merge_pays
    layers.LoraLayer._merge_pays = lambda self, x: False
    try:
        yield
    finally:
        layers.LoraLayer._merge_pays = rule


def cfg_caller(s: Setup, graphed: bool = False):
    """``call(unet)``: a callable that runs one classifier-free-guidance UNet call (uncond + cond in one batch of 2,
    the same inputs for every UNet) without grad. ``graphed``: each call a new CUDA-graph step, its output cloned
    (the graph reuses its buffers)."""
    inp = s.inputs(2, seed=1)
    x, t, ehs = inp["noisy"], inp["t"], inp["ehs"]

    def call(unet):
        def run():
            if graphed:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                out = unet(x, t, ehs).sample
            return out.clone() if graphed else out

        return run

    return call


def bench_inference(s: Setup, files: list[Path]) -> None:
    base = s.comps["unet"]
    pipe_o, pipe_p = make_pipe(s.comps), make_pipe(s.comps)
    names = load_both(pipe_o, pipe_p, files)
    call = cfg_caller(s)
    call_o, call_p, call_b = call(pipe_o.unet), call(pipe_p.unet), call(base)
    iters, warmup = s.iters, s.warmup

    for k in (0, 1, 4, 8):
        log(f"inference, {k} adapters")
        weights = {n: 0.8 for n in names[:k]}
        ld.set_adapters(pipe_o, weights)
        if k:
            pipe_p.enable_lora()
            pipe_p.set_adapters(list(weights), list(weights.values()))
        else:
            pipe_p.disable_lora()
        diff = (call_o() - call_p()).abs().max().item()
        ours, ref = compare(call_o, call_p, iters, warmup, s.sync)
        ours_b, base_ms, spread = compare_paired(call_o, call_b, iters, warmup, s.sync)
        emit(s.ctx, "infer_unfused", f"{k} adapters", ours, ref, "peft", max_abs_diff=diff)
        emit(s.ctx, "infer_unfused", f"{k} adapters", ours_b, base_ms, "base", peft_vs_base=round(ref / base_ms, 4), **spread)
        (o_gpu, o_kernels), (p_gpu, p_kernels), (b_gpu, b_kernels) = (kernel_time(s, f) for f in (call_o, call_p, call_b))
        emit(s.ctx, "infer_unfused_gpu_time", f"{k} adapters, GPU time summed over kernels", o_gpu, b_gpu, "base",
             kernels_per_call=o_kernels, base_kernels_per_call=b_kernels, peft_ms=p_gpu, peft_kernels_per_call=p_kernels)
        if k == 4:  # the same call with the merged weight off: every layer through the stacked low-rank pair
            with pairs_only():
                pair = median_ms(call_o, iters, warmup, s.sync)
                pair_gpu, pair_kernels = kernel_time(s, call_o)
            emit(s.ctx, "infer_unfused_pair", f"{k} adapters, low-rank pair in every layer", pair, ours_b, "merged",
                 gpu_ms=pair_gpu, kernels_per_call=pair_kernels, merged_gpu_ms=o_gpu, merged_kernels_per_call=o_kernels)
        if not k:
            pipe_p.enable_lora()
            continue
        ld.fuse(pipe_o)
        pipe_p.fuse_lora(adapter_names=list(weights))
        diff = (call_o() - call_p()).abs().max().item()
        ours, ref = compare(call_o, call_p, iters, warmup, s.sync)
        ours_b, base_ms, spread = compare_paired(call_o, call_b, iters, warmup, s.sync)
        emit(s.ctx, "infer_fused", f"{k} adapters", ours, ref, "peft", max_abs_diff=diff)
        emit(s.ctx, "infer_fused", f"{k} adapters", ours_b, base_ms, "base", peft_vs_base=round(ref / base_ms, 4), **spread)
        # the wall clock of a launch-bound call moves by a few % between timings; the kernels show what differs
        (f_gpu, f_kernels), (b_gpu, b_kernels) = kernel_time(s, call_o), kernel_time(s, call_b)
        emit(s.ctx, "infer_fused_gpu_time", f"{k} adapters, GPU time summed over kernels", f_gpu, b_gpu, "base",
             kernels_per_call=f_kernels, base_kernels_per_call=b_kernels)
        ld.unfuse(pipe_o)
        pipe_p.unfuse_lora()

    # the kept merged weights run the base call's kernels: 3x the rounds, to read a few % through the host's spread
    bench_cached(s.ctx, pipe_o, pipe_p, names, (call_o, call_p, call_b), iters, warmup, s.sync,
                 kernels=lambda fn: kernel_time(s, fn), rounds=3 * iters)

    log("fuse / re-weight, 4 adapters")
    four = names[:4]
    set_both(pipe_o, pipe_p, four)
    ours, ref = compare(lambda: ld.fuse(pipe_o), lambda: pipe_p.fuse_lora(adapter_names=four), iters, warmup, s.sync,
                        between=(lambda: ld.unfuse(pipe_o), pipe_p.unfuse_lora))
    emit(s.ctx, "fuse", "4 adapters, UNet + text encoder", ours, ref, "peft")
    ld.fuse(pipe_o)
    pipe_p.fuse_lora(adapter_names=four)
    reweight_o, reweight_p, _ = reweighters(pipe_o, pipe_p, four)
    ours, ref = compare(reweight_o, reweight_p, iters, warmup, s.sync)
    emit(s.ctx, "reweight_fused", "4 adapters, UNet + text encoder", ours, ref, "peft")


def bench_fp8_infer(s: Setup, files: list[Path]) -> None:
    """A1111's FP8 weight, as diffusers' ``enable_layerwise_casting`` (fp8 storage, the UNet's dtype to compute):
    the CFG call of the fp8 UNet with 0, 1 and 4 unfused adapters (ours and PEFT's, which loads them before the
    cast) and 4 fused (ours), against the same call of the plain UNet, with the UNet's parameter MB; and ours
    unfused on ``fp8.store_fp8``'s weights (``generate --fp8-weight``)."""
    from lora_diffusion.fp8 import store_fp8

    pipe_o, pipe_p, pipe_s = make_pipe(s.comps), make_pipe(s.comps), make_pipe(s.comps)
    names = load_both(pipe_o, pipe_p, files[:4])
    for name, file in zip(names, files):
        ld.load_lora(pipe_s, file, adapter=name)
    compute = s.comps["unet"].dtype
    for pipe in (pipe_o, pipe_p):
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
    store_fp8([("unet", pipe_s.unet)], compute)  # (ours: every Linear / Conv2d weight, one cast per call)
    call = cfg_caller(s)

    def mb(unet) -> float:
        return round(sum(p.untyped_storage().nbytes() for p in unet.parameters()) / 2**20, 1)

    call_o, call_p, call_b, call_s = call(pipe_o.unet), call(pipe_p.unet), call(s.comps["unet"]), call(pipe_s.unet)
    for k in (0, 1, 4):
        log(f"inference, fp8 weights, {k} adapters")
        ld.set_adapters(pipe_s, {n: 0.8 for n in names[:k]})
        ours, base_ms, spread = compare_paired(call_s, call_b, s.iters, s.warmup, s.sync)
        emit(s.ctx, "infer_fp8", f"{k} adapters unfused, fp8 weights (store_fp8)", ours, base_ms, "base",
             unet_mb=mb(pipe_s.unet), base_unet_mb=mb(s.comps["unet"]), **spread)
        ld.set_adapters(pipe_o, {n: 0.8 for n in names[:k]})
        pipe_p.enable_lora() if k else pipe_p.disable_lora()
        if k:
            pipe_p.set_adapters(names[:k], [0.8] * k)
        diff = (call_o().float() - call_p().float()).abs().max().item()
        ours, base_ms, spread = compare_paired(call_o, call_b, s.iters, s.warmup, s.sync)
        emit(s.ctx, "infer_fp8", f"{k} adapters unfused, fp8 weights", ours, base_ms, "base",
             peft_ms=median_ms(call_p, s.iters, s.warmup, s.sync), max_abs_diff_vs_peft=diff, unet_mb=mb(pipe_o.unet),
             base_unet_mb=mb(s.comps["unet"]), **spread)
    ld.fuse(pipe_o)
    try:
        pipe_p.fuse_lora(adapter_names=names[:4])
        peft_fuse = "fused"
    except Exception as e:  # (diffusers 0.42 + PEFT 0.21: fp8 arithmetic in their fuse)
        peft_fuse = f"{type(e).__name__}: {str(e)[:120]}"
    ours, base_ms, spread = compare_paired(call_o, call_b, s.iters, s.warmup, s.sync)
    emit(s.ctx, "infer_fp8", "4 adapters fused, fp8 weights", ours, base_ms, "base", peft_fuse=peft_fuse, **spread)


def bench_inference_host(s: Setup, files: list[Path], calls: int = 5) -> None:
    """Where an eager CFG call's host time goes (the eager call is launch-bound on the GPU): torch.profiler's CPU
    table (top 25 by self CPU time) of the base call and of ours with one adapter on stderr, and one
    ``infer_host`` line: CPU time per call summed over the aten ops, and ops per call, ours against the base."""
    from torch.profiler import ProfilerActivity, profile

    pipe = make_pipe(s.comps)
    ld.load_lora(pipe, files[0], adapter=files[0].stem)
    inp = s.inputs(2, seed=1)
    x, t, ehs = inp["noisy"], inp["t"], inp["ehs"]
    totals = {}
    for who, unet in (("base", s.comps["unet"]), ("ours, 1 adapter", pipe.unet)):
        log(f"inference host profile: {who}")
        with torch.no_grad():
            for _ in range(3):
                unet(x, t, ehs)
            s.sync()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(calls):
                    unet(x, t, ehs)
                s.sync()
                wall_ms = (time.perf_counter() - t0) * 1e3 / calls  # (the profiler's own cost included)
        events = prof.key_averages()
        print(f"=== inference host profile, {who} ({calls} calls) ===\n{events.table(sort_by='self_cpu_time_total', row_limit=25)}",
              file=sys.stderr, flush=True)
        aten = [e for e in events if e.key.startswith("aten::")]
        totals[who] = (sum(e.self_cpu_time_total for e in aten) / 1e3 / calls, sum(e.count for e in aten) / calls, wall_ms)
    (b_ms, b_ops, b_wall), (o_ms, o_ops, o_wall) = totals["base"], totals["ours, 1 adapter"]
    emit(s.ctx, "infer_host", "1 adapter, CPU time summed over aten ops", o_ms, b_ms, "base", ops_per_call=o_ops,
         base_ops_per_call=b_ops, wall_ms_per_call=round(o_wall, 3), base_wall_ms_per_call=round(b_wall, 3))

    # the kept merged weights run the base's kernels, yet the call took 1.06-1.11x the base's wall clock on the
    # H100's host (eleventh session): where the Python goes, per function, in the kept call and in the base call
    ld.cache_merged_weights(pipe)
    for who, unet in (("base", s.comps["unet"]), ("ours, 1 adapter, kept merged weights", pipe.unet)):
        with torch.no_grad():
            for _ in range(3):
                unet(x, t, ehs)
            s.sync()
            python_profile(f"inference, {who}", lambda: unet(x, t, ehs), calls, s.sync)
    ld.cache_merged_weights(pipe, enabled=False)
    bench_layer(s.ctx, s.iters, s.device, s.dtype, s.sync)  # the per-layer cost on this host, bare / ours / kept / PEFT

    # re-weighting 4 fused adapters (the <= 15 ms target): its host side, per function and per aten op
    for f in files[1:4]:
        ld.load_lora(pipe, f, adapter=f.stem)
    names = [f.stem for f in files[:4]]
    ld.set_adapters(pipe, dict.fromkeys(names, 1.0))
    ld.fuse(pipe)
    reweight_ours = reweighters(pipe, None, names)[0]  # (ours only: the weight sets reweight_fused alternates)

    def reweight():
        reweight_ours()
        s.sync()

    for _ in range(3):
        reweight()
    ms = median_ms(reweight, s.iters, 0, s.sync)
    python_profile("re-weight of 4 fused adapters", reweight, calls, s.sync)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            reweight()
    print(f"=== re-weight of 4 fused adapters, aten ops ({calls} calls) ===\n"
          f"{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=20)}", file=sys.stderr, flush=True)
    aten = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    # (a diagnosis beside the profiles, not a figure: reweight_fused times it against PEFT's)
    log(f"re-weight of 4 fused adapters: {ms:.2f} ms (median of {s.iters}); aten ops per call "
        f"{sum(e.count for e in aten) / calls:.0f}, their CPU time {sum(e.self_cpu_time_total for e in aten) / 1e3 / calls:.2f} ms")


def python_profile(title: str, fn, calls: int, sync) -> None:
    """cProfile's table of ``fn`` over ``calls`` calls (top 25 by own time) on stderr: the Python functions' own
    time, which torch.profiler's aten-op table leaves out."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(f"=== {title}: Python functions ({calls} calls) ===\n{out.getvalue()}", file=sys.stderr, flush=True)


def bench_inference_compiled(s: Setup, files: list[Path], mode: str, counts: list[int], kept_counts: list[int]) -> None:
    """One CFG UNet call under torch.compile: ours with 1 / 4 / 8 adapters unfused and 4 fused, each against the
    base UNet compiled the same way (the launch overhead gone from both, what is left is the LoRA kernels), and a
    re-weight of the compiled model, which must not recompile.

    ``mode``: ``cudagraphs`` (dynamo's CUDA-graph backend over the eager kernels: compiles in seconds),
    ``reduce-overhead`` (inductor + CUDA graphs), ``default`` or ``max-autotune`` (inductor)."""
    from torch._dynamo.utils import counters

    def compiled(module):  # as training compiles; a backend other than inductor (aot_eager: CPU smoke) overrides
        if mode == "cudagraphs" and s.compile_backend == "inductor":
            return compile_unet(module, "default", "cudagraphs")
        return compile_unet(module, "default" if mode == "cudagraphs" else mode, s.compile_backend)

    graphed = s.cuda and mode in ("cudagraphs", "reduce-overhead")
    pipe = make_pipe(s.comps)
    names = [f.stem for f in files]
    for f, name in zip(files, names):
        ld.load_lora(pipe, f, adapter=name)
    call = cfg_caller(s, graphed)

    eager_o = call(pipe.unet)
    call_o, call_b = call(compiled(pipe.unet)), call(compiled(s.comps["unet"]))
    log(f"inference compiled ({mode}): base; the first call compiles")
    extra = {"compile_mode": mode, "base_compile_s": round(once_s(call_b, s.sync), 1)}

    def timed_first_call() -> tuple[float, float]:
        return round(once_s(call_o, s.sync), 1), (call_o() - eager_o()).abs().max().item()

    for k in counts:
        log(f"inference compiled ({mode}), {k} adapters: compiles")
        ld.set_adapters(pipe, {n: 0.8 for n in names[:k]})
        compile_s, diff = timed_first_call()
        ours, base_ms = compare(call_o, call_b, s.iters, s.warmup, s.sync)
        # re-weighting a compiled model: the new weights land in its scale tensors, no new graph
        graphs = counters["stats"]["unique_graphs"]
        reweight_ms = once_s(lambda: ld.set_adapters(pipe, {n: 0.8 - 0.1 * i for i, n in enumerate(names[:k])}), s.sync) * 1e3
        diff_after = (call_o() - eager_o()).abs().max().item()
        recompiled = counters["stats"]["unique_graphs"] != graphs
        emit(s.ctx, "infer_unfused_compiled", f"{k} adapters", ours, base_ms, "base_compiled", max_abs_diff=diff,
             compile_s=compile_s, reweight_ms=round(reweight_ms, 3), recompiled_on_reweight=recompiled,
             max_abs_diff_after_reweight=diff_after, cudagraph_skips=_cudagraph_skips(), graph_breaks=_graph_breaks(), **extra)

    if kept_counts:
        bench_kept_compiled(s, pipe, names, compiled(pipe.unet), call, call_b, eager_o, kept_counts, extra)

    log(f"inference compiled ({mode}), 4 adapters fused: compiles")
    ld.set_adapters(pipe, {n: 0.8 for n in names[:4]})
    ld.fuse(pipe)
    compile_s, diff = timed_first_call()
    ours, base_ms = compare(call_o, call_b, s.iters, s.warmup, s.sync)
    emit(s.ctx, "infer_fused_compiled", "4 adapters", ours, base_ms, "base_compiled", max_abs_diff=diff,
         compile_s=compile_s, cudagraph_skips=_cudagraph_skips(), graph_breaks=_graph_breaks(), **extra)


def bench_kept_compiled(s: Setup, pipe, names: list[str], wrapper, call, call_b, eager_o, counts: list[int],
                        extra: dict) -> None:
    """The compiled CFG call on kept merged weights: ``cache_merged_weights`` hooks ``wrapper`` (a second compiled
    wrapper of the pipeline's UNet: a graph of its own, traced with the kept buffers in it) and its graph runs the
    base model's ops on them; against the base compiled alike (``call_b``), by paired rounds (the hook's host work
    is in the wall clock of a call that waits for its result; ``loop_ratio``: ten calls back to back, as a sampling
    loop runs them, where it overlaps the previous call's kernels), and in GPU time."""
    from torch._dynamo.utils import counters

    ld.cache_merged_weights(wrapper)
    call_k = call(wrapper)
    try:
        for k in counts:
            log(f"inference compiled, kept merged weights, {k} adapters: compiles")
            ld.set_adapters(pipe, {n: 0.8 for n in names[:k]})
            compile_s = round(once_s(call_k, s.sync), 1)
            diff = (call_k() - eager_o()).abs().max().item()
            ours, base_ms, paired = compare_paired(call_k, call_b, 3 * s.iters, s.warmup, s.sync)
            # ten calls back to back, one sync, as a sampling loop runs them: the hook's host work overlaps the
            # previous call's kernels (ms per call, medians of alternating rounds)
            loop_k, loop_b = compare(lambda: [call_k() for _ in range(10)], lambda: [call_b() for _ in range(10)],
                                     s.iters, 1, s.sync)
            gpu_ms, kernels = kernel_time(s, call_k)
            base_gpu_ms, base_kernels = kernel_time(s, call_b)
            before, after = (next(iter(hooks.values())) for hooks in (wrapper._forward_pre_hooks, wrapper._forward_hooks))
            hook_s = time.perf_counter()
            for _ in range(100):  # the hook's host work between changes (the bulk check), per call
                before(wrapper, ())
                after(wrapper, (), None)
            hook_us = (time.perf_counter() - hook_s) * 1e4
            graphs = counters["stats"]["unique_graphs"]
            weights = {n: 0.8 - 0.1 * i for i, n in enumerate(names[:k])}
            reweight_ms = once_s(lambda: ld.set_adapters(pipe, weights), s.sync) * 1e3
            call_after_ms = once_s(call_k, s.sync) * 1e3  # (the hook re-merges every changed layer first)
            diff_after = (call_k() - eager_o()).abs().max().item()
            emit(s.ctx, "infer_unfused_kept_compiled", f"{k} adapters", ours, base_ms, "base_compiled",
                 max_abs_diff=diff, compile_s=compile_s, gpu_ms=gpu_ms, base_gpu_ms=base_gpu_ms, kernels=kernels,
                 base_kernels=base_kernels, kept_mb=round(kept_mb(pipe.unet), 1), hook_us=round(hook_us, 1), reweight_ms=round(reweight_ms, 3),
                 call_after_reweight_ms=round(call_after_ms, 3), loop_ms=round(loop_k / 10, 3), base_loop_ms=round(loop_b / 10, 3),
                 loop_ratio=round(loop_k / loop_b, 4), recompiled_on_reweight=counters["stats"]["unique_graphs"] != graphs,
                 max_abs_diff_after_reweight=diff_after, cudagraph_skips=_cudagraph_skips(), graph_breaks=_graph_breaks(),
                 **paired, **extra)
    finally:
        ld.cache_merged_weights(wrapper, enabled=False)


def _graph_breaks() -> int:
    """Graph breaks so far in this process, and frames dynamo gave up on (it runs those eagerly and compiles
    the frames they call one by one): 0 means each compiled model traced whole. (On torch 2.11 an unsupported
    op in a LoRA layer once made dynamo give up on the whole UNet, which no graph-break count showed.)"""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()) + counters["frames"]["total"] - counters["frames"]["ok"]


def _cudagraph_skips() -> int:
    """Graphs that torch left un-graphed so far in this process (each logs why): 0 means every graph replays as
    one CUDA graph."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def guarded(section: str, fn, *args) -> None:
    """Run one section; on failure print an ``error`` line and go on (one GPU run must yield what it can)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        traceback.print_exc(file=sys.stderr)
        print(json.dumps({"bench": section, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU in fp32 (smoke run)")
    parser.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, metavar="MODE",
                        help="also time our training step under torch.compile (default mode: reduce-overhead)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    parser.add_argument("--compile-batches", type=int, nargs="+", default=[1],
                        help="batches to compile for (each compiles afresh: ~2 min on an H100 for SD1.5)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--floor-variants", nargs="*", default=[], choices=["channels_last", "sdpa_cudnn", "compile"],
                        help="also time the floor and our eager step with the UNet in channels_last, with cuDNN "
                             "attention (GPU), or under torch.compile (default mode; compiles twice per batch: minutes)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per figure (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile-infer", nargs="?", const="reduce-overhead", default=None, metavar="MODE",
                        choices=["cudagraphs", "reduce-overhead", "default", "max-autotune"],
                        help="also time the CFG call compiled, ours vs the base compiled alike (default mode: "
                             "reduce-overhead, inductor + CUDA graphs; compiles 5 times)")
    parser.add_argument("--compile-infer-counts", type=int, nargs="*", default=[1, 4, 8], choices=range(1, 9),
                        metavar="N", help="numbers of unfused adapters for --compile-infer (each compiles once; none: "
                                          "only the base, --compile-infer-kept and 4 fused)")
    parser.add_argument("--compile-infer-kept", type=int, nargs="*", default=[], choices=range(1, 9), metavar="N",
                        help="with --compile-infer: also these numbers of adapters on kept merged weights "
                             "(cache_merged_weights on the compiled UNet; each compiles once)")
    parser.add_argument("--compiled-steps", nargs="+", default=["ours", "ours-dense"], choices=["ours", "ours-dense", "ours-lowrank", "ours-merged"],
                        help="our steps compiled beside the compiled floor (--floor-variants compile, --profile-compile): "
                             "ours = the default backward (low-rank when compiled), or that backward mode")
    parser.add_argument("--compile-step", default="ours", choices=["ours", "ours-dense", "ours-lowrank", "ours-merged"],
                        help="our step for --compile: the default backward (low-rank when compiled), or that backward mode")
    parser.add_argument("--compile-floor", action="store_true",
                        help="with --compile: the floor compiled the same way first, in the same process (compiles once more)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "infer"])
    parser.add_argument("--fp8", action="store_true",
                        help="also time --fp8_base's step and kohya's fp8 step against the bf16 model's, with their "
                             "peak memory, without and with gradient checkpointing (at --batches), and the CFG call on "
                             "fp8 weights (layerwise casting) with 0 / 1 / 4 adapters, ours and PEFT's")
    parser.add_argument("--profile", type=int, nargs="*", default=[], metavar="BATCH",
                        help="also print torch.profiler's kernel table of the floor and of our eager step at these batches")
    parser.add_argument("--profile-infer", action="store_true",
                        help="also print the eager CFG call's host profile (aten ops: base and ours with 1 adapter; Python "
                             "functions: base and ours with kept merged weights), the per-layer host cost on this device, and "
                             "the host profile of a fused re-weight")
    parser.add_argument("--profile-compile", default=None, metavar="MODE", choices=["default", "max-autotune"],
                        help="--profile the floor and our step under torch.compile in this mode instead of eagerly")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for a CPU smoke run")
    if torch.cuda.is_available() and not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = Setup(args)
    if "train" not in args.skip:
        guarded("train", bench_training, s, args.batches, args.compile, args.compile_batches, args.floor_variants)
    if args.fp8:
        guarded("train_fp8", bench_fp8, s, args.batches)
    for batch in args.profile:
        guarded(f"profile batch {batch}", bench_profile, s, batch, args.profile_compile)
    if "infer" not in args.skip or args.compile_infer or args.profile_infer or args.fp8:
        with tempfile.TemporaryDirectory(prefix="lora_bench_gpu_") as tmp:
            log("writing 8 adapter files")
            files = make_adapter_files(s.comps, Path(tmp), 8)
            if "infer" not in args.skip:
                guarded("infer", bench_inference, s, files)
            if args.profile_infer:
                guarded("infer_host", bench_inference_host, s, files)
            if args.fp8:
                guarded("infer_fp8", bench_fp8_infer, s, files)
            if args.compile_infer:
                guarded("infer_compiled", bench_inference_compiled, s, files, args.compile_infer, args.compile_infer_counts,
                        args.compile_infer_kept)
    log("done")


if __name__ == "__main__":
    main()
