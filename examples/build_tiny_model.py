"""Build the bundled tiny text-to-image model ``lora_diffusion/assets/tiny-shapes`` on CPU, from scratch.

Everything is made here: a word-level CLIP tokenizer for the caption words, a small AutoencoderKL
(64x64x3 -> 16x16x4), a 2-layer CLIPTextModel and a small UNet2DConditionModel with cross-attention, trained
on the procedural shapes of ``lora_diffusion.data.shapes`` (seeded, so the build is reproducible up to float
non-determinism of the CPU kernels).

Stages: (1) tokenizer, (2) VAE on a mix of plain/striped images of all shapes, until its reconstructions read right, (3) encode the base training set
(plain circle/square/triangle only) to latents once, (4) text encoder + UNet together, epsilon loss with
min-SNR weighting, 10% caption dropout for classifier-free guidance, warmup + cosine LR, EMA weights,
(5) evaluate colour/shape accuracy on held-out seeds, save the EMA pipeline in fp16 safetensors, reload it.

Usage (37 min measured on 2 busy CPU cores with the defaults, about 25 min on idle ones):
    python examples/build_tiny_model.py
    python examples/build_tiny_model.py --unet-steps 200 --vae-steps 50 --out /tmp/tiny  # smoke run
    python examples/build_tiny_model.py --reuse-vae   # retrain only text encoder + UNet
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

# Sleep rather than spin in OpenMP barriers: the build is meant to share a small CPU politely.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from lora_diffusion.data import TINY_MODEL  # noqa: E402
from lora_diffusion.data.metrics import classify_shape, dominant_color, foreground_mask  # noqa: E402
from lora_diffusion.data.shapes import (  # noqa: E402
    BACKGROUNDS,
    BASE_SHAPES,
    COLORS,
    SHAPES,
    generate_dataset,
)

#: Words that get one token each. Caption words first; the rest are common prompt words and trigger words
#: that LoRA training may use (the base model never sees them in a caption, so their embeddings stay random).
WORDS: tuple[str, ...] = (
    ("a", "an", "the", "on", "of", "in", "with", "and", "background", "shape", "photo", "picture", "image")
    + tuple(COLORS)
    + tuple(BACKGROUNDS)
    + ("grey",)
    + SHAPES
    + ("striped", "stripes", "stripe", "style", "pattern", "drawing", "sks", "zwx", "ohwx", "big", "small")
)

# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(words: tuple[str, ...], out_dir: str) -> CLIPTokenizer:
    """Byte-level CLIP BPE vocabulary plus one merged token per word (``"red</w>"``).

    ``vocab.json``: the 256 byte characters, the same with ``</w>``, every merge result, then the two special
    tokens. ``merges.txt``: for each word the merges that build it from the right (``"e d</w>"``, then
    ``"r ed</w>"``): every merge involves an end-of-word token, so merges of different words never compete and
    each listed word becomes exactly one token; any other text still tokenizes into byte characters.
    """
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for word in words:
        suffix = word[-1] + "</w>"
        for c in reversed(word[:-1]):
            merged = c + suffix
            if merged not in vocab:
                merges.append(f"{c} {suffix}")
                vocab[merged] = len(vocab)
            suffix = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=os.path.join(out_dir, "vocab.json"), merges=os.path.join(out_dir, "merges.txt"), model_max_length=77
    )
    for word in words:
        ids = tok(word)["input_ids"]
        assert len(ids) == 3, f"word {word!r} is not one token: {tok.convert_ids_to_tokens(ids)}"
    ids = tok("a red circle")["input_ids"]
    assert len(ids) == 5, ids
    return tok


# ---------------------------------------------------------------------------------------------------------
# Models


def make_vae() -> AutoencoderKL:
    """64x64x3 <-> 16x16x4: three levels (16, 32, 64 channels), one resnet per level, no attention.

    ``norm_num_groups=4`` (4+ channels per group): with one channel per group, GroupNorm is an instance norm
    that removes each channel's absolute level, i.e. the colour, and the codec learns colours very slowly.
    """
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
    )


def make_text_encoder(tok: CLIPTokenizer) -> CLIPTextModel:
    """2-layer CLIP text transformer, width 64, over our vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet(cross_attention_dim: int = 64) -> UNet2DConditionModel:
    """16x16x4 latents; channels 64/128/128; cross-attention at 8x8, 4x4 and in the mid block."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warmup, then cosine decay to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------------
# Stage 2: VAE


def train_vae(args: argparse.Namespace) -> AutoencoderKL:
    torch.manual_seed(args.seed)
    # The VAE is a generic image codec: it sees every shape and both styles, so LoRAs trained later on
    # striped images or new shapes can be encoded and decoded faithfully. The UNet only sees plain base shapes.
    parts = [
        generate_dataset(int(args.vae_images * 0.6), seed=args.seed + 101, shapes=BASE_SHAPES)[0],
        generate_dataset(int(args.vae_images * 0.2), seed=args.seed + 102, shapes=SHAPES, style="striped")[0],
        generate_dataset(int(args.vae_images * 0.2), seed=args.seed + 103, shapes=SHAPES)[0],
    ]
    images = np.concatenate(parts)
    data = to_tensor(images)
    # Foreground pixels (far from the border colour) weigh 5x: colour fidelity of the shape is what matters.
    weight = 1.0 + 4.0 * torch.from_numpy(np.stack([foreground_mask(im) for im in images])).float()[:, None]
    vae = make_vae()
    # Start with a tiny posterior std: at the default (std 1) the sampling noise drowns the latent signal
    # and the codec learns very slowly; the small KL term then keeps the scale in check.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :].fill_(-6.0)
        vae.encoder.conv_out.weight[vae.config.latent_channels :].mul_(0.1)
    print(f"[vae] {n_params(vae):,} params, {len(data)} images, {args.vae_steps} steps, batch {args.vae_batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * min(1.0, (step + 1) / 30)
        idx = torch.randint(0, len(data), (args.vae_batch,), generator=gen)
        x, w = data[idx], weight[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        err = recon - x
        rec = ((err.abs() + err.square()) * w).mean() / w.mean()
        # Low-frequency colour term: the mean colour of 8x8 patches must match. Without it the decoder keeps
        # drawing the right shapes in the average (orange-brown) colour for a long time.
        low = F.avg_pool2d(err, 8).square().mean()
        rec = rec + args.vae_lowfreq * low
        kl = posterior.kl().mean() / (16 * 16 * 4)
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vae_steps - 1:
            print(f"[vae] step {step:5d} rec {rec.item():.4f} kl {kl.item():.3f} {time.time() - t0:6.0f}s", flush=True)
        if (step + 1) % args.vae_check_every == 0:
            # Stop as soon as the metrics read the reconstructions right (deterministic check set).
            vae.eval()
            col, shp = vae_figures(vae, seed=args.seed + 555, n=60)
            vae.train()
            print(f"[vae] step {step:5d} check: colour {col:.0%} shape {shp:.0%}", flush=True)
            if col >= args.vae_target and shp >= args.vae_target:
                break
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_figures(vae: AutoencoderKL, seed: int, n: int = 120) -> tuple[float, float]:
    """Colour and shape accuracy of the metrics on VAE reconstructions of fresh images (all shapes, plain)."""
    images, _, specs = generate_dataset(n, seed=seed, shapes=SHAPES)
    recon = vae.decode(vae.encode(to_tensor(images)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    col = np.mean([dominant_color(r) == s.color for r, s in zip(recon, specs)])
    shp = np.mean([classify_shape(r, SHAPES) == s.shape for r, s in zip(recon, specs)])
    return float(col), float(shp)


# ---------------------------------------------------------------------------------------------------------
# Stage 4: text encoder + UNet


class EMA:
    """Exponential moving average of parameters with the usual warmup ``min(decay, (1+t)/(10+t))``."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.step = 0

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        d = min(self.decay, (1.0 + self.step) / (10.0 + self.step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        params = [p for m in modules for p in m.parameters()]
        for p, s in zip(params, self.shadow):
            p.copy_(s)


def train_unet(
    args: argparse.Namespace,
    tok: CLIPTokenizer,
    latents_mean: torch.Tensor,
    latents_std: torch.Tensor,
    caption_idx: torch.Tensor,
    caption_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    scaling: float,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    torch.manual_seed(args.seed + 1)
    text_encoder = make_text_encoder(tok)
    unet = make_unet(text_encoder.config.hidden_size)
    print(f"[unet] unet {n_params(unet):,} params, text encoder {n_params(text_encoder):,} params")
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=args.snr_gamma) / snr  # min-SNR-gamma for epsilon prediction
    modules: list[torch.nn.Module] = [text_encoder, unet]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = EMA(modules, args.ema_decay)
    gen = torch.Generator().manual_seed(args.seed + 2)
    n = len(latents_mean)
    t0 = time.time()
    running = 0.0
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr, warmup=args.warmup)
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        lat = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=gen)
        lat = lat * scaling
        ids = caption_ids[caption_idx[idx]]
        drop = torch.rand(args.batch, generator=gen) < args.cfg_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], ids)
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        noisy = scheduler.add_noise(lat, noise, t)
        hidden = text_encoder(ids)[0]
        pred = unet(noisy, t, hidden).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == args.unet_steps - 1:
            el = time.time() - t0
            eta = el / (step + 1) * (args.unet_steps - step - 1)
            print(f"[unet] step {step:5d} loss {running:.4f} lr {opt.param_groups[0]['lr']:.2e} {el:6.0f}s eta {eta:5.0f}s", flush=True)
        if args.save_every and step and step % args.save_every == 0:
            torch.save({"step": step, "ema": ema.shadow}, os.path.join(args.work_dir, "ema_ckpt.pt"))
    ema.copy_to(modules)
    text_encoder.eval()
    unet.eval()
    return text_encoder, unet


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def eval_prompts(seed: int, n: int) -> list[tuple[str, str, str, int]]:
    """``n`` (colour, shape, background, seed) cases cycling over every combination, held-out seeds."""
    combos = [(c, s, b) for s in BASE_SHAPES for c in COLORS for b in BACKGROUNDS]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    return [(*combos[order[i % len(combos)]], 10_000 + seed * 1000 + i) for i in range(n)]


@torch.no_grad()
def evaluate(pipe: StableDiffusionPipeline, cases: list[tuple[str, str, str, int]], steps: int, guidance: float) -> dict:
    prompts = [f"a {c} {s} on a {b} background" for c, s, b, _ in cases]
    gens = [torch.Generator().manual_seed(sd) for *_, sd in cases]
    images = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np", height=64, width=64
    ).images
    col = [dominant_color(im) == c for im, (c, _, _, _) in zip(images, cases)]
    shp = [classify_shape(im) == s for im, (_, s, _, _) in zip(images, cases)]
    return {"color": float(np.mean(col)), "shape": float(np.mean(shp)), "images": images}


def assemble(vae, text_encoder, tok, unet, scheduler_cls=DPMSolverMultistepScheduler) -> StableDiffusionPipeline:
    scheduler = scheduler_cls(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def default_to_fp32(out: str) -> None:
    """Let a plain ``from_pretrained(out)`` load every component in fp32 although the files are fp16.

    diffusers loads its models in fp32 unless told otherwise, but transformers >= 5 loads the text encoder in
    the dtype its config records ("auto"), which would mix fp16 and fp32 in one pipeline and fail on CPU.
    ``dtype=torch.float16`` in ``from_pretrained`` still gives an all-fp16 pipeline.
    """
    path = os.path.join(out, "text_encoder", "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def sample_grid(images: np.ndarray, cols: int, path: str, scale: int = 1) -> None:
    """Save ``images`` (float [0, 1], (N, H, W, 3)) as a PNG grid with a 2-pixel gutter."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 2) + 2, cols * (w + 2) + 2, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = (im * 255).round()
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(
        path, optimize=True
    )


def eval_only(args: argparse.Namespace) -> None:
    """Figures of a saved model: accuracy per sampler/steps/guidance, seconds per image, sample grid."""
    pipe = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    cases = eval_prompts(args.seed, args.eval_n)
    config = pipe.scheduler.config
    runs = [("DPMSolverMultistep", 20, 5.0), ("DPMSolverMultistep", 10, 5.0), ("DPMSolverMultistep", 20, 3.0),
            ("DPMSolverMultistep", 20, 7.5), ("DDIM", 20, 5.0)]
    for name, steps, g in runs:
        cls = DPMSolverMultistepScheduler if name == "DPMSolverMultistep" else DDIMScheduler
        pipe.scheduler = cls.from_config(config)
        t0 = time.time()
        r = evaluate(pipe, cases, steps, g)
        print(f"[eval] {name} {steps} steps cfg {g}: colour {r['color']:.0%} shape {r['shape']:.0%} "
              f"({(time.time() - t0) / len(cases):.3f}s/image in a batch of {len(cases)})", flush=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    t0 = time.time()
    for seed in range(3):
        pipe("a red circle on a white background", num_inference_steps=20, guidance_scale=5.0, height=64, width=64,
             generator=torch.Generator().manual_seed(seed), output_type="np")
    print(f"[eval] one image alone, 20 steps cfg 5: {(time.time() - t0) / 3:.3f}s")
    if args.grid:
        grid_cases = [(c, s, b, 77 + i) for i, (c, s, b) in enumerate(
            (c, s, list(BACKGROUNDS)[(i + j) % 3]) for j, s in enumerate(BASE_SHAPES) for i, c in enumerate(COLORS)
        )]
        r = evaluate(pipe, grid_cases, 20, 5.0)
        sample_grid(r["images"], cols=len(COLORS), path=args.grid, scale=2)
        print(f"[eval] grid {args.grid}: colour {r['color']:.0%} shape {r['shape']:.0%}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=TINY_MODEL, help="output pipeline folder")
    p.add_argument("--work-dir", default="/tmp/tiny-shapes-build", help="intermediate files (VAE, checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=300, help="max VAE steps")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-check-every", type=int, default=100)
    p.add_argument("--vae-target", type=float, default=0.97, help="stop when recon colour and shape acc reach it")
    p.add_argument("--vae-lowfreq", type=float, default=4.0, help="weight of the 8x8-patch colour loss")
    p.add_argument("--vae-kl", type=float, default=1e-4, help="KL weight (per latent element)")
    p.add_argument("--vae-images", type=int, default=3000)
    p.add_argument("--reuse-vae", action="store_true", help="load the VAE from --work-dir instead of training it")
    p.add_argument("--images", type=int, default=16000, help="UNet training images (plain base shapes)")
    p.add_argument("--unet-steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--cfg-dropout", type=float, default=0.1)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=54)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--eval-only", action="store_true", help="only evaluate the model in --out")
    p.add_argument("--grid", default=None, help="with --eval-only: write a sample grid PNG here")
    args = p.parse_args(argv)
    if args.eval_only:
        torch.set_num_threads(args.threads)
        eval_only(args)
        return

    torch.set_num_threads(args.threads)
    os.makedirs(args.work_dir, exist_ok=True)
    t_start = time.time()
    print(f"torch {torch.__version__}, {args.threads} threads, args {vars(args)}")

    tok = build_tokenizer(WORDS, os.path.join(args.work_dir, "tokenizer"))
    print(f"[tok] {len(tok)} tokens; 'a red circle' -> {tok('a red circle')['input_ids']}")

    vae_dir = os.path.join(args.work_dir, "vae")
    if args.reuse_vae:
        vae = AutoencoderKL.from_pretrained(vae_dir)
        vae.eval()
    else:
        vae = train_vae(args)
        vae.save_pretrained(vae_dir)
    t_vae = time.time() - t_start
    col, shp = vae_figures(vae, seed=args.seed + 999)
    print(f"[vae] reconstructions: colour {col:.0%} shape {shp:.0%}; {t_vae:.0f}s so far")

    images, captions, _ = generate_dataset(args.images, seed=args.seed + 7, shapes=BASE_SHAPES)
    mean, std = encode_latents(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"[lat] {tuple(mean.shape)} latents, std {mean.std():.3f} -> scaling_factor {scaling:.4f}, "
          f"mean posterior std {std.mean():.4f}")
    unique = sorted(set(captions))
    caption_idx = torch.tensor([unique.index(c) for c in captions])
    caption_ids = tok(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty_ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]

    text_encoder, unet = train_unet(args, tok, mean, std, caption_idx, caption_ids, empty_ids, scaling)
    t_train = time.time() - t_start
    print(f"[time] training done after {t_train / 60:.1f} min")

    pipe = assemble(vae, text_encoder, tok, unet)
    pipe.set_progress_bar_config(disable=True)
    cases = eval_prompts(args.seed, args.eval_n)
    for g in (3.0, 5.0, 7.5):
        t0 = time.time()
        r = evaluate(pipe, cases, args.sample_steps, g)
        print(f"[eval] DPM++ {args.sample_steps} steps cfg {g}: colour {r['color']:.0%} shape {r['shape']:.0%} "
              f"({(time.time() - t0) / len(cases):.2f}s/image)")

    # fp16 files; keep the tokenizer's source vocab.json/merges.txt beside tokenizer.json for older loaders.
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    pipe_fp16 = assemble(
        copy.deepcopy(vae).half(), copy.deepcopy(text_encoder).half(), tok, copy.deepcopy(unet).half()
    )
    pipe_fp16.save_pretrained(args.out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(args.work_dir, "tokenizer", name), os.path.join(args.out, "tokenizer", name))
    default_to_fp32(args.out)
    print(f"[save] {args.out}: {dir_size(args.out) / 1e6:.2f} MB; params vae {n_params(vae):,} "
          f"text_encoder {n_params(text_encoder):,} unet {n_params(unet):,}")

    loaded = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None)
    assert loaded.unet.dtype == loaded.text_encoder.dtype == loaded.vae.dtype == torch.float32
    loaded.set_progress_bar_config(disable=True)
    r = evaluate(loaded, cases, args.sample_steps, 5.0)
    print(f"[final] reloaded fp16->fp32 model, {args.sample_steps} steps cfg 5: colour {r['color']:.0%} "
          f"shape {r['shape']:.0%}; total build {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
