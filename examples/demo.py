"""The main job: train a style LoRA and a subject LoRA on the bundled tiny model, then blend them.

Offline, on a CPU, in a few minutes (the two LoRAs train at once, in two processes). Writes to --out:
  style/pytorch_lora_weights.safetensors     striped style (trigger word "striped")
  subject/pytorch_lora_weights.safetensors   the heart, a shape the base model never saw ("sks heart")
  grid.png                                   rows: prompts; columns: base | style | subject | style 0.5 + subject 0.5
  metrics.json                               stripe energy and heart IoU per column

Run: python examples/demo.py [--out out] [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_diffusion import load_lora, set_adapters
from lora_diffusion.cli import setup_logging
from lora_diffusion.data import TINY_MODEL
from lora_diffusion.data.metrics import shape_iou, stripe_energy
from lora_diffusion.training import TrainConfig, train

DATA = Path(__file__).resolve().parent / "data"
PROMPTS = [  # (prompt, seed)
    ("a red circle on a white background", 1),
    ("a blue square on a black background", 2),
    ("a yellow triangle on a gray background", 3),
]
STYLE_SUFFIX = ", in the style of striped"
SUBJECT_PROMPTS = ["a red sks heart on a white background", "a blue sks heart on a black background", "a yellow sks heart on a gray background"]


def train_lora(name: str, data: Path, out: Path, steps: int, mode: str, token: str, targets: str) -> Path:
    config = TrainConfig(
        pretrained_model_name_or_path=TINY_MODEL,
        train_data_dir=str(data),
        output_dir=str(out / name),
        overwrite=True,
        mode=mode,
        token=token,
        rank=8,
        target_modules=targets,
        learning_rate=1e-3,
        snr_gamma=5.0,  # min-SNR weighting (kohya's --min_snr_gamma 5): the stripes come through for each training seed tried
        lr_scheduler="constant",
        max_train_steps=steps,
        train_batch_size=4,
        resolution=64,
        random_flip=False,
        cache_latents=True,  # each image through the VAE once, not every step (each step still samples its latent)
        checkpointing_steps=0,
        num_validation_images=0,
        seed=0,
    )
    start = time.perf_counter()
    result = train(config, progress=lambda p: None)
    if result.status != "completed":
        raise SystemExit(f"training {name} ended: {result.status}: {result.message}")
    print(f"{name}: {steps} steps in {time.perf_counter() - start:.0f} s, final loss {result.final_loss:.4f} -> {result.lora_path}")
    return Path(result.lora_path)


def _start_worker(threads: int, counter) -> None:
    """A training process: its share of the cores, the commands' logging, and its own progress-bar line."""
    torch.set_num_threads(threads)
    setup_logging()
    with counter.get_lock():
        os.environ["TQDM_POSITION"], counter.value = str(counter.value), counter.value + 1


def train_both(out: Path, steps: int) -> tuple[Path, Path]:
    """The style and the subject LoRA, trained at once in two processes on half the cores each: the tiny model's
    ops leave cores idle, so on 2 cores this takes ~1/3 less time than one after the other."""
    # stripes are a 16 px texture: the style LoRA needs the 16x16 ResNet convs (LoCon), where the UNet has no attention
    jobs = [("style", DATA / "style", out, steps, "style", "striped", "full"),
            ("subject", DATA / "subject", out, steps, "subject", "sks", "attn-mlp")]
    context = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // len(jobs))
    with ProcessPoolExecutor(len(jobs), mp_context=context, initializer=_start_worker,
                             initargs=(threads, context.Value("i", 0))) as pool:
        futures = [pool.submit(train_lora, *job) for job in jobs]
        # Ctrl-C reaches the workers too: each stops after its step, saves a checkpoint and ends with a message
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            errors = [str(e) for e in [f.exception() for f in futures] if e is not None]  # (waits for both)
        finally:
            signal.signal(signal.SIGINT, previous)
    if errors:
        raise SystemExit("\n".join(errors))
    style, subject = [f.result() for f in futures]
    return style, subject


def generate(pipe, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
    """One image per prompt, each from its own seed, in one batch (one UNet call per step for all of them)."""
    out = pipe(prompts, num_inference_steps=20, guidance_scale=5.0, height=64, width=64,
               generator=[torch.Generator().manual_seed(seed) for seed in seeds], output_type="np")
    return list((out.images * 255).round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--steps", type=int, default=400, help="training steps per LoRA")
    args = parser.parse_args()
    setup_logging()  # (as the lora-diffusion commands log)
    out = Path(args.out)

    style, subject = train_both(out, args.steps)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_MODEL)  # (the bundled model loads in fp32)
    pipe.set_progress_bar_config(disable=True)
    load_lora(pipe, style, adapter="style")
    load_lora(pipe, subject, adapter="subject")
    columns = {"base": {}, "style": {"style": 1.0}, "subject": {"subject": 1.0}, "blend": {"style": 0.5, "subject": 0.5}}
    metrics, seeds = {}, [seed for _, seed in PROMPTS] * 2
    cells = []  # per column: one [shape image over heart image] cell per row
    for column, weights in columns.items():
        set_adapters(pipe, weights)
        suffix = STYLE_SUFFIX if "style" in weights else ""
        images = generate(pipe, [p + suffix for p, _ in PROMPTS] + [p + suffix for p in SUBJECT_PROMPTS], seeds)
        shapes, hearts = images[:len(PROMPTS)], images[len(PROMPTS):]
        metrics[column] = {"stripe_energy": [stripe_energy(image) for image in shapes],
                           "heart_iou": [shape_iou(image, "heart") for image in hearts]}
        cells.append([np.concatenate(pair, axis=0) for pair in zip(shapes, hearts)])
    grid = np.concatenate([np.concatenate(row, axis=1) for row in zip(*cells)], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "grid.png")
    summary = {c: {k: round(float(np.mean(v)), 4) for k, v in m.items()} for c, m in metrics.items()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print("columns: base | style | subject | style 0.5 + subject 0.5 (each cell: shape prompt over heart prompt)")
    for column, values in summary.items():
        print(f"  {column:8s} stripe energy {values['stripe_energy']:.3f}   heart IoU {values['heart_iou']:.3f}")
    print("wrote", out / "grid.png", "and", out / "metrics.json")


if __name__ == "__main__":
    main()
