"""CPU benchmark: lora_diffusion against diffusers + PEFT on a small SD-1.x-shaped pipeline.

Prints one JSON line per figure (stdout); progress goes to stderr. Every figure is measured beside its
reference in the same run, timed alternately, median of ``--iters`` after ``--warmup``:

* ``train_step``: one LoRA training step (forward, MSE, backward, AdamW), ours (``inject_lora``) vs PEFT
  (``LoraConfig`` + ``unet.add_adapter``, as diffusers' ``train_text_to_image_lora.py``), same targets
  (to_q/k/v/out.0), rank, init (PEFT's A is copied from ours), inputs and seed.
* ``infer_unfused``: one CFG UNet call (batch 2) with 1, 4 and 8 adapters loaded from files and active, ours
  (``load_lora`` + ``set_adapters``) vs PEFT (``pipe.load_lora_weights`` + ``pipe.set_adapters``) and vs the
  base UNet without LoRA.
* ``infer_unfused_cached``: the same call through kept merged weights (``cache_merged_weights``) vs the base
  (``max_abs_diff``: against PEFT's output);
  ``reweight_call_cached``: with 4 adapters, a re-weight and one call (the merged weights made afresh) vs PEFT's.
* ``infer_fused``: the same call with 4 adapters fused (ours ``fuse``, PEFT ``pipe.fuse_lora``), vs both.
* ``fuse`` / ``unfuse`` / ``reweight_fused``: fusing 4 adapters, unfusing, and changing the weights of 4 fused
  adapters (ours: ``set_adapters`` while fused; diffusers: ``unfuse_lora``, ``set_adapters``, ``fuse_lora``).
* ``load``: loading one adapter file (UNet + text encoder) into a pipeline without LoRA.
* ``host_load`` / ``host_reweight_unfused`` / ``host_fuse`` / ``host_reweight_fused``: the same calls on a model with
  SD1.5's structure (176 LoRA layers) but 32 wide, so that the Python and dispatch work a GPU's host pays is what counts;
  ``host_train_step``: a training step of the GPU recipe (``Recipe``) on that UNet, with the floor beside it.
* ``file_size``: bytes of one adapter file per rank (same dtype; and each library's default dtype); diffusers'
  file is written with its ``LoraConfig`` metadata, as ours carries alpha too.

The model ("bench" shapes): UNet2DConditionModel with block_out_channels (64, 128), two cross-attention down
and up blocks, layers_per_block 2, cross_attention_dim 64 (88 attention projections), 16x16 latents; the
tiny pipeline's CLIP text encoder with hidden size 64 (5 layers). Random weights, fp32.

    python bench/cpu.py                 # full run, a few minutes on 2 cores
    python bench/cpu.py --quick         # 1 iteration of everything on 8x8 latents (CI smoke run)
    python bench/cpu.py --threads 2 --iters 20
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Context, compare, compare_paired, cpu_name, emit, log, median_ms, quiet  # noqa: E402

import lora_diffusion as ld  # noqa: E402
from lora_diffusion.inject import lora_layers  # noqa: E402
from lora_diffusion.testing import OpCounter, tiny_components  # noqa: E402

CTX_DIM = 64
LATENT = 16
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MODEL = "bench-unet(64,128) {n}x{n} latents, clip hidden 64"


def bench_components(seed: int = 0) -> dict:
    """Pipeline components with the bench UNet (a bit larger than the test tiny pipeline's)."""
    from diffusers import UNet2DConditionModel

    comps = tiny_components(seed, cross_attention_dim=CTX_DIM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        comps["unet"] = UNet2DConditionModel(
            block_out_channels=(64, 128),
            layers_per_block=2,
            sample_size=LATENT,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CTX_DIM,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
    return comps


def make_pipe(comps: dict):
    from diffusers import StableDiffusionPipeline

    comps = dict(comps, unet=copy.deepcopy(comps["unet"]), text_encoder=copy.deepcopy(comps["text_encoder"]))
    pipe = StableDiffusionPipeline(**comps, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_both(pipe_o, pipe_p, files: list[Path]) -> list[str]:
    """Load ``files`` into both pipelines (ours with ``load_lora``, diffusers' with ``load_lora_weights``), each
    adapter named after its file's stem; returns the names."""
    names = [f.stem for f in files]
    log(f"loading {len(files)} adapters into both pipelines")
    for f, name in zip(files, names):
        ld.load_lora(pipe_o, f, adapter=name)
        pipe_p.load_lora_weights(str(f), adapter_name=name)
    return names


def set_both(pipe_o, pipe_p, names: list[str], weight: float = 0.8) -> None:
    """The same adapters at the same weight in our pipeline (``set_adapters``) and diffusers+PEFT's."""
    ld.set_adapters(pipe_o, {n: weight for n in names})
    pipe_p.set_adapters(list(names), [weight] * len(names))


def peft_add(unet, text_encoder=None, rank: int = 4, alpha: float | None = None, use_dora: bool = False) -> None:
    """diffusers' training recipe: ``LoraConfig`` + ``add_adapter`` (kaiming A, zero B; ``use_dora``: DoRA)."""
    from peft import LoraConfig

    alpha = rank if alpha is None else alpha
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=TARGETS, use_dora=use_dora))
    if text_encoder is not None:
        text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=TE_TARGETS))


def make_adapter_files(comps: dict, folder: Path, n: int, rank: int = 4, alpha: float = 8.0) -> list[Path]:
    """``n`` diffusers-format files (UNet + text encoder attention, random non-zero A and B) written by us.

    A ~ N(0, 1/fan_in), B ~ N(0, 0.05^2): a visible but tame change of the output."""
    unet, te = copy.deepcopy(comps["unet"]), copy.deepcopy(comps["text_encoder"])
    files = []
    gen = torch.Generator().manual_seed(1234)
    for i in range(n):
        name = f"a{i}"
        for model in (unet, te):
            ld.inject_lora(model, rank=rank, alpha=alpha, targets="attn", adapter=name)
            for _, layer in lora_layers(model):
                a, b = layer.lora_A[name], layer.lora_B[name]
                with torch.no_grad():
                    a.copy_(torch.randn(a.shape, generator=gen) / a[0].numel() ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
        files.append(ld.save_lora(folder / f"{name}.safetensors", unet=unet, text_encoder=te, adapter=name, dtype=torch.float32))
    return files


def bench_train(ctx: Context, comps: dict, iters: int, warmup: int, batch: int = 2, dora: bool = False) -> None:
    """A LoRA training step (``dora``: DoRA's, PEFT's ``use_dora``), ours against diffusers+PEFT's."""
    log("train step" + (", DoRA" if dora else ""))
    unet_o, unet_p = copy.deepcopy(comps["unet"]), copy.deepcopy(comps["unet"])
    params_o = ld.inject_lora(unet_o, rank=4, targets="attn", use_dora=dora)
    peft_add(unet_p, rank=4, use_dora=dora)
    modules_p = dict(unet_p.named_modules())
    for path, layer in lora_layers(unet_o):  # identical start: PEFT's A := ours (B is zero in both)
        with torch.no_grad():
            modules_p[path].lora_A["default"].weight.copy_(layer.lora_A["default"])
            if dora:  # (both ||W|| per row at the start)
                magnitude = modules_p[path].lora_magnitude_vector["default"].weight
                magnitude.copy_(layer.lora_magnitude["default"].reshape(magnitude.shape))
    params_p = [p for p in unet_p.parameters() if p.requires_grad]
    assert len(params_o) == len(params_p), (len(params_o), len(params_p))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, LATENT, LATENT, generator=gen)
    noise = torch.randn(batch, 4, LATENT, LATENT, generator=gen)
    ehs = torch.randn(batch, 77, CTX_DIM, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noisy = latents + noise  # the scheduler's arithmetic is the same for both; keep the step about the UNet

    def stepper(unet, params):
        unet.train()
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses = []

        def step():
            loss = F.mse_loss(unet(noisy, t, ehs).sample.float(), noise.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

        return step, losses

    step_o, losses_o = stepper(unet_o, params_o)
    step_p, losses_p = stepper(unet_p, params_p)
    ours, ref = compare(step_o, step_p, iters, warmup)
    emit(ctx, "train_step", f"rank 4 attn, batch {batch}" + (", DoRA" if dora else ""), ours, ref, "peft",
         loss_abs_diff_last_step=abs(losses_o[-1] - losses_p[-1]), steps=len(losses_o))


@contextlib.contextmanager
def cuda_autocast_norms():
    """Within it, CPU autocast runs ``layer_norm`` and ``group_norm`` as CUDA autocast does: inputs cast to fp32,
    fp32 output (CPU autocast keeps them in bf16). Then the ops of an autocast step on a CPU are those a GPU runs,
    the casts of the norm outputs into the next matmul or conv included."""
    originals = F.layer_norm, F.group_norm

    def in_fp32(fn):
        def run(*args, **kwargs):
            if not torch.is_autocast_enabled("cpu"):
                return fn(*args, **kwargs)
            up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
            with torch.autocast("cpu", enabled=False):
                return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

        return run

    F.layer_norm, F.group_norm = in_fp32(originals[0]), in_fp32(originals[1])
    try:
        yield
    finally:
        F.layer_norm, F.group_norm = originals


class Recipe:
    """The GPU training recipe on a CPU: a bf16 UNet, fp32 LoRA factors (rank 4 on the attention projections),
    bf16 autocast with CUDA's fp32 norms (``cuda_autocast_norms``), foreach AdamW; ``floor`` is the frozen forward
    + input-gradient backward. Steppers for the floor, ours (``backward``: as ``auto`` picks on a GPU, ``"dense"``,
    unless told) and diffusers+PEFT on one batch."""

    def __init__(self, unet, batch: int, latent: int, ctx_dim: int) -> None:
        from diffusers.training_utils import cast_training_params

        self.base = copy.deepcopy(unet).to(torch.bfloat16).requires_grad_(False)
        gen = torch.Generator().manual_seed(0)
        self.noisy = torch.randn(batch, 4, latent, latent, generator=gen).bfloat16()
        self.noise = torch.randn(batch, 4, latent, latent, generator=gen).bfloat16()
        self.ehs = torch.randn(batch, 77, ctx_dim, generator=gen).bfloat16()
        self.t = torch.randint(0, 1000, (batch,), generator=gen)
        self.unet_p = copy.deepcopy(self.base)
        peft_add(self.unet_p, rank=4)
        cast_training_params(self.unet_p, dtype=torch.float32)

    @contextlib.contextmanager
    def autocast(self):
        with torch.autocast("cpu", dtype=torch.bfloat16), cuda_autocast_norms():
            yield

    def floor(self):
        x = self.noisy.detach().requires_grad_(True)
        with self.autocast():
            pred = self.base(x, self.t, self.ehs).sample
        F.mse_loss(pred.float(), self.noise.float()).backward()

    def ours(self, backward: str = "dense"):
        from lora_diffusion.inject import set_backward

        unet = copy.deepcopy(self.base)
        params = ld.inject_lora(unet, rank=4, targets="attn")
        set_backward(unet, backward)
        return self._stepper(unet, params)

    def peft(self):
        return self._stepper(self.unet_p, [p for p in self.unet_p.parameters() if p.requires_grad])

    def _stepper(self, unet, params):
        unet.train()
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def step():
            with self.autocast():
                pred = unet(self.noisy, self.t, self.ehs).sample
            F.mse_loss(pred.float(), self.noise.float()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step


def bench_ops(ctx: Context, comps: dict, files: list[Path], batch: int = 2) -> None:
    """aten ops (on a GPU: kernel launches, at least) per training step and per CFG call, in the GPU recipe
    (``Recipe``). Counted once after a warm-up step, with the floor and the base call beside them."""
    log("aten ops per training step and per CFG call (bf16 autocast)")
    recipe = Recipe(comps["unet"], batch, LATENT, CTX_DIM)
    base = recipe.base

    def count(fn) -> int:
        fn()  # warm-up: optimizer state, caches
        with OpCounter() as ops:
            fn()
        return ops.total

    floor_ops = count(recipe.floor)
    ours, ref = count(recipe.ours()), count(recipe.peft())
    emit(ctx, "train_step_ops", f"rank 4 attn, batch {batch}, bf16 autocast, dense backward", ours, ref, "peft", unit="ops",
         floor_ops=floor_ops, lora_ops_vs_peft=round((ours - floor_ops) / (ref - floor_ops), 4),
         lowrank_backward_ops=count(recipe.ours("lowrank")), merged_forward_ops=count(recipe.ours("merged")))

    pipe_o, pipe_p = make_pipe(comps), make_pipe(comps)
    for pipe in (pipe_o, pipe_p):
        pipe.unet.to(torch.bfloat16)
    names = load_both(pipe_o, pipe_p, files)
    cfg = recipe.noisy[:2], recipe.t[:2], recipe.ehs[:2]
    base_ops = count(lambda: unet_call(base, *cfg))
    for k in (1, 4, 8):
        set_both(pipe_o, pipe_p, names[:k])
        ours, ref = count(lambda: unet_call(pipe_o.unet, *cfg)), count(lambda: unet_call(pipe_p.unet, *cfg))
        ld.cache_merged_weights(pipe_o)
        cached = count(lambda: unet_call(pipe_o.unet, *cfg))
        ld.cache_merged_weights(pipe_o, enabled=False)
        emit(ctx, "infer_unfused_ops", f"{k} adapters, bf16", ours, ref, "peft", unit="ops", base_ops=base_ops,
             ours_vs_base=round(ours / base_ops, 4), peft_vs_base=round(ref / base_ops, 4), cached_ops=cached)


def bench_layer(ctx: Context, iters: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                sync=lambda: None) -> None:
    """Per-layer CPU cost of a LoRA call over the bare layer (a 64-wide ``nn.Linear`` on 16 tokens, eval, no_grad:
    compute is negligible, so this is the Python and dispatch work that a GPU's launch-bound call pays per layer).
    On a GPU (``device``, ``dtype``, ``sync``: ``bench/gpu.py --profile-infer``) the kernels are a few microseconds
    each and queue behind the host, so the same figure is that host's cost per layer."""
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    from lora_diffusion.layers import LoraLinear

    log("per-layer call overhead, 1 / 2 / 4 / 8 adapters")

    class Holder(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

    base = nn.Linear(64, 64).to(device, dtype).eval()
    x = torch.randn(2, 16, 64).to(device, dtype)
    calls = max(200, iters * 200)

    def per_call_us(layer) -> float:
        with torch.no_grad():
            for _ in range(calls // 10):
                layer(x)
            sync()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                sync()
                best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return best

    for k in (1, 2, 4, 8):
        ours = LoraLinear(copy.deepcopy(base))
        holder = Holder(copy.deepcopy(base))
        for i in range(k):
            ours.add_adapter(f"a{i}", rank=4, alpha=8)
            holder = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]), holder, adapter_name=f"a{i}")
        ours.to(device, dtype), holder.to(device, dtype)
        ours.requires_grad_(False).set_weights({f"a{i}": 0.8 for i in range(k)})
        holder.proj.set_adapter([f"a{i}" for i in range(k)])
        ours.eval(), holder.eval()
        bare = per_call_us(base)  # (per count: the host drifts over seconds)
        o, p = per_call_us(ours) - bare, per_call_us(holder.proj) - bare
        ours.merge_cache = True
        cached = per_call_us(ours) - bare
        emit(ctx, "layer_overhead", f"{k} adapters, 64-wide Linear, 16 tokens", o, p, "peft", unit="us", bare_us=round(bare, 2),
             cached_us=round(cached, 2))


def unet_call(unet, x, t, ehs):
    with torch.no_grad():
        return unet(x, t, ehs).sample


def bench_inference_and_fuse(ctx: Context, comps: dict, files: list[Path], iters: int, warmup: int) -> None:
    base = copy.deepcopy(comps["unet"])
    pipe_o, pipe_p = make_pipe(comps), make_pipe(comps)
    names = load_both(pipe_o, pipe_p, files)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, LATENT, LATENT, generator=gen)  # classifier-free guidance: uncond + cond
    ehs = torch.randn(2, 77, CTX_DIM, generator=gen)
    t = torch.tensor([500, 500])

    def call_o():
        return unet_call(pipe_o.unet, x, t, ehs)

    def call_p():
        return unet_call(pipe_p.unet, x, t, ehs)

    def call_b():
        return unet_call(base, x, t, ehs)

    for k in (1, 4, 8):
        log(f"unfused inference, {k} adapters")
        set_both(pipe_o, pipe_p, names[:k])
        diff = (call_o() - call_p()).abs().max().item()
        ours, ref = compare(call_o, call_p, iters, warmup)
        emit(ctx, "infer_unfused", f"{k} adapters", ours, ref, "peft", max_abs_diff=diff)
        ours, base_ms = compare(call_o, call_b, iters, warmup)
        emit(ctx, "infer_unfused", f"{k} adapters", ours, base_ms, "base")

    bench_cached(ctx, pipe_o, pipe_p, names, (call_o, call_p, call_b), iters, warmup)

    log("fuse / unfuse / re-weight, 4 adapters")
    four = names[:4]
    set_both(pipe_o, pipe_p, four)

    def fuse_o():
        ld.fuse(pipe_o)

    def fuse_p():
        pipe_p.fuse_lora(adapter_names=four)

    def unfuse_o():
        ld.unfuse(pipe_o)

    def unfuse_p():
        pipe_p.unfuse_lora()

    ours, ref = compare(fuse_o, fuse_p, iters, warmup, between=(unfuse_o, unfuse_p))
    emit(ctx, "fuse", "4 adapters", ours, ref, "peft")
    fuse_o(), fuse_p()
    ours, ref = compare(unfuse_o, unfuse_p, iters, warmup, between=(fuse_o, fuse_p))
    emit(ctx, "unfuse", "4 adapters", ours, ref, "peft")

    diff = (call_o() - call_p()).abs().max().item()
    ours, ref = compare(call_o, call_p, iters, warmup)
    emit(ctx, "infer_fused", "4 adapters", ours, ref, "peft", max_abs_diff=diff)
    ours, base_ms = compare(call_o, call_b, iters, warmup)
    emit(ctx, "infer_fused", "4 adapters", ours, base_ms, "base")

    reweight_o, reweight_p, state = reweighters(pipe_o, pipe_p, four)
    ours, ref = compare(reweight_o, reweight_p, iters, warmup)
    diff = (call_o() - call_p()).abs().max().item() if state["o"] == state["p"] else None
    emit(ctx, "reweight_fused", "4 adapters", ours, ref, "peft", max_abs_diff=diff)


def kept_mb(model) -> float:
    """MB of merged weights that ``model``'s LoRA layers keep (``cache_merged_weights``)."""
    return sum(layer._merged.numel() * layer._merged.element_size()
               for _, layer in lora_layers(model) if layer._merged is not None) / 2**20


def bench_cached(ctx: Context, pipe_o, pipe_p, names: list[str], calls: tuple, iters: int, warmup: int,
                 sync=None, kernels=None, rounds: int | None = None) -> None:
    """``cache_merged_weights``: the unfused CFG call through kept merged weights against the base call, with 1,
    4 and 8 adapters (``kernels``: a function giving a call's GPU time and kernel count, on a GPU; ``rounds``:
    timed rounds of that comparison, ``iters`` if not given), and with 4 adapters a re-weight followed by one
    call (which makes the merged weights afresh) against PEFT's."""
    call_o, call_p, call_b = calls
    ld.cache_merged_weights(pipe_o)
    try:
        for k in (1, 4, 8):
            log(f"unfused inference through kept merged weights, {k} adapters")
            set_both(pipe_o, pipe_p, names[:k])
            diff = (call_o() - call_p()).abs().max().item()
            ours, base_ms, extra = compare_paired(call_o, call_b, rounds or iters, warmup, sync)
            if kernels is not None:
                (o_gpu, o_kernels), (b_gpu, b_kernels) = kernels(call_o), kernels(call_b)
                extra.update(gpu_ms=o_gpu, base_gpu_ms=b_gpu, kernels_per_call=o_kernels, base_kernels_per_call=b_kernels)
            emit(ctx, "infer_unfused_cached", f"{k} adapters", ours, base_ms, "base", max_abs_diff=diff,
                 kept_mb=round(kept_mb(pipe_o.unet), 2), **extra)
        four = names[:4]
        reweight_o, reweight_p, _ = reweighters(pipe_o, pipe_p, four, fused=False)
        ours, ref = compare(lambda: (reweight_o(), call_o()), lambda: (reweight_p(), call_p()), iters, warmup, sync)
        emit(ctx, "reweight_call_cached", "4 adapters: set_adapters, then one call", ours, ref, "peft")
    finally:
        ld.cache_merged_weights(pipe_o, enabled=False)


def bench_host(ctx: Context, folder: Path, iters: int, warmup: int) -> None:
    """Re-weighting and fusing on a model with SD1.5's structure (4 UNet levels of 2 layers, 16 transformer
    blocks; a 12-layer CLIP: 176 LoRA layers) but 32 wide: the arithmetic is nearly nothing, so what is timed is
    the Python and dispatch work that a GPU's host pays for a slider move on SD1.5 itself."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    log("host cost: SD1.5 structure, 32 wide, 4 adapters; train step")
    comps = tiny_components(0, cross_attention_dim=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20)
        comps["unet"] = UNet2DConditionModel(sample_size=8, layers_per_block=2, block_out_channels=(32, 32, 32, 32),
                                             cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
        comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                                             intermediate_size=37, vocab_size=1000)).eval()
    # the training step of the GPU recipe (128 UNet layers; 16x16 latents: the 4th level is 2x2 for GroupNorm)
    recipe = Recipe(comps["unet"], batch=1, latent=16, ctx_dim=32)
    floor = median_ms(recipe.floor, iters, warmup)
    ours, ref = compare(recipe.ours(), recipe.peft(), iters, warmup)
    emit(ctx, "host_train_step", "rank 4 attn, SD1.5 structure (128 layers), 32 wide, bf16 autocast, dense backward",
         ours, ref, "peft", floor_ms=round(floor, 3), lora_overhead_vs_peft=round((ours - floor) / (ref - floor), 4))
    merged, ref = compare(recipe.ours("merged"), recipe.peft(), iters, warmup)
    emit(ctx, "host_train_step", "rank 4 attn, SD1.5 structure (128 layers), 32 wide, bf16 autocast, merged forward",
         merged, ref, "peft", floor_ms=round(floor, 3), lora_overhead_vs_peft=round((merged - floor) / (ref - floor), 4))
    files = make_adapter_files(comps, folder / "host", 4)
    bench_load(ctx, comps, files[0], iters, warmup, "host_load", ", SD1.5 structure (176 layers), 32 wide")
    pipe_o, pipe_p = make_pipe(comps), make_pipe(comps)
    names = load_both(pipe_o, pipe_p, files)
    case = "4 adapters, SD1.5 structure (176 layers), 32 wide"
    ours, ref = compare(*reweighters(pipe_o, pipe_p, names, fused=False)[:2], iters, warmup)
    emit(ctx, "host_reweight_unfused", case, ours, ref, "peft")
    ours, ref = compare(lambda: ld.fuse(pipe_o), lambda: pipe_p.fuse_lora(adapter_names=names), iters, warmup,
                        between=(lambda: ld.unfuse(pipe_o), pipe_p.unfuse_lora))
    emit(ctx, "host_fuse", case, ours, ref, "peft")
    ld.fuse(pipe_o), pipe_p.fuse_lora(adapter_names=names)
    ours, ref = compare(*reweighters(pipe_o, pipe_p, names)[:2], iters, warmup)
    emit(ctx, "host_reweight_fused", case, ours, ref, "peft")


def reweighters(pipe_o, pipe_p, names: list[str], fused: bool = True):
    """Two callables that change the weights of adapters ``names`` (alternating between two weight sets), ours
    and diffusers' way (``fused``: diffusers unfuses, re-weights and fuses again), and their state (equal counts
    mean equal weights)."""
    toggles = [[0.5, 1.0, -0.3, 0.8, 0.2, -0.6, 0.9, 0.4][: len(names)], [0.8] * len(names)]
    state = {"o": 0, "p": 0}

    def reweight_o():
        state["o"] ^= 1
        ld.set_adapters(pipe_o, dict(zip(names, toggles[state["o"]])))

    def reweight_p():
        state["p"] ^= 1
        if fused:
            pipe_p.unfuse_lora()
        pipe_p.set_adapters(names, toggles[state["p"]])
        if fused:
            pipe_p.fuse_lora(adapter_names=names)

    return reweight_o, reweight_p, state


def bench_load(ctx: Context, comps: dict, file: Path, iters: int, warmup: int, bench: str = "load", case: str = "") -> None:
    """Loading ``file`` into a pipeline of ``comps`` without LoRA, ours against diffusers+PEFT's (``bench`` and
    ``case``: the figure's name and what its case adds to the file's rank and size)."""
    log(f"load one file{case}")
    pipes = {"o": make_pipe(comps), "p": make_pipe(comps)}

    def fresh(key):
        def reset():
            pipes[key].unet = copy.deepcopy(comps["unet"])
            pipes[key].text_encoder = copy.deepcopy(comps["text_encoder"])

        return reset

    def load_o():
        ld.load_lora(pipes["o"], file, adapter="probe")

    def load_p():
        pipes["p"].load_lora_weights(str(file), adapter_name="probe")

    ours, ref = compare(load_o, load_p, iters, warmup, between=(fresh("o"), fresh("p")))
    emit(ctx, bench, f"1 file, rank 4, {file.stat().st_size} bytes{case}", ours, ref, "peft")


def bench_file_size(ctx: Context, comps: dict, folder: Path, ranks: list[int]) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    log(f"file size per rank {ranks}")
    for rank in ranks:
        unet_o, te_o = copy.deepcopy(comps["unet"]), copy.deepcopy(comps["text_encoder"])
        ld.inject_lora(unet_o, rank=rank, targets="attn")
        ld.inject_lora(te_o, rank=rank, targets="attn")
        unet_p, te_p = copy.deepcopy(comps["unet"]), copy.deepcopy(comps["text_encoder"])
        peft_add(unet_p, te_p, rank=rank)
        out_p = folder / f"peft_r{rank}"
        StableDiffusionPipeline.save_lora_weights(  # with the LoraConfig in the header, so alpha survives
            out_p,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet_p)),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te_p)),
            unet_lora_adapter_metadata=unet_p.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=te_p.peft_config["default"].to_dict(),
        )
        ref_path = out_p / "pytorch_lora_weights.safetensors"
        for dtype, label in ((torch.float32, "fp32 both"), (torch.float16, "defaults: ours fp16, diffusers fp32")):
            path = ld.save_lora(folder / f"ours_r{rank}_{label[:4]}.safetensors", unet=unet_o, text_encoder=te_o, dtype=dtype)
            emit(ctx, "file_size", f"rank {rank}, {label}", path.stat().st_size, ref_path.stat().st_size, "peft",
                 unit="bytes", ours_header_bytes=_header_bytes(path), ref_header_bytes=_header_bytes(ref_path))


def _header_bytes(path: Path) -> int:
    """Size of a safetensors file's JSON header (tensor index + metadata)."""
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


SECTIONS = ("train", "inference", "load", "file_size", "ops", "layer", "host")  # inference: unfused/fused calls, fuse, unfuse, re-weight


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 iteration, no warm-up, one rank (CI smoke run)")
    parser.add_argument("--iters", type=int, default=15, help="timed iterations per figure (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                        help="torch.set_num_threads (default: the CPUs this process may use)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections: {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    global LATENT
    if args.quick:
        args.iters, args.warmup, LATENT = 1, 0, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    torch.manual_seed(0)
    ctx = Context(device=cpu_name(), dtype="float32", threads=torch.get_num_threads(), extra={"model": MODEL.format(n=LATENT)})
    comps = bench_components(0)
    with tempfile.TemporaryDirectory(prefix="lora_bench_") as tmp:
        folder = Path(tmp)
        files = make_adapter_files(comps, folder, 8)
        if "train" in args.only:
            bench_train(ctx, comps, args.iters, args.warmup)
            bench_train(ctx, comps, args.iters, args.warmup, dora=True)
        if "inference" in args.only:
            bench_inference_and_fuse(ctx, comps, files, args.iters, args.warmup)
        if "load" in args.only:
            bench_load(ctx, comps, files[0], args.iters, args.warmup)
        if "file_size" in args.only:
            bench_file_size(ctx, comps, folder, [4] if args.quick else [1, 4, 16, 64])
        if "ops" in args.only:
            bench_ops(ctx, comps, files)
        if "layer" in args.only:
            bench_layer(ctx, args.iters)
        if "host" in args.only:
            bench_host(ctx, folder, args.iters, args.warmup)


if __name__ == "__main__":
    main()
