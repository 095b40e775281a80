"""Training settings: one dataclass, loadable from TOML/YAML, and the argparse flags built from it.

The flags, the config-file keys and the dataclass fields share one set of names (those of diffusers' example
scripts), so a setting means the same thing everywhere. Precedence: dataclass default < config file < flag.

Example:
    >>> config = TrainConfig(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5",
    ...                      train_data_dir="data/style", output_dir="out", token="<my-style>")
    >>> config = load_config("style.toml", output_dir="out2")      # a file, then overrides
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import difflib
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainConfig", "load_config", "add_config_arguments", "config_from_args", "settings_from_flags", "ConfigError",
           "read_text"]

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "piecewise_constant", "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the setting."""


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field carrying its flag help (and optional ``choices``) as metadata."""
    return field(default=default, metadata={"help": help, **extra})


# kohya's --sample_sampler names -> (diffusers scheduler class, its settings), as sd-scripts' get_my_scheduler
KOHYA_SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
}  # fmt: skip


@dataclass
class TrainConfig:
    """Every setting of a LoRA training run (style or DreamBooth subject); see ``docs/TRAINING.md``."""

    # ------------------------------------------------------------------ model, data, output
    pretrained_model_name_or_path: str = _f("", "base model: a local diffusers folder, a hub id, or a single .safetensors/.ckpt file")
    single_file_config: str = _f("", "for a single-file base model: a diffusers folder or hub id of the same architecture "
                                 "whose configs and tokenizer(s) to use (default: diffusers fetches those of the matching base model)")
    vae: str = _f("", "a VAE in place of the model's (kohya's --vae): a diffusers folder, or a .safetensors/.ckpt file in "
                      "the original layout (a VAE alone, e.g. vae-ft-mse-840000-ema-pruned, or a whole checkpoint's)")
    train_data_dir: str = _f("", "folder of training images (captions beside them or in metadata.jsonl); "
                             "--instance_data_dir (DreamBooth's name) is the same setting")
    in_json: str = _f("", "kohya's fine-tuning metadata (.json or .jsonl, as its merge_captions_to_metadata.py writes it): "
                          "the images it names, in --train_data_dir, with its captions and tags")
    dataset_config: str = _f("", "kohya's dataset config: a TOML file whose [[datasets.subsets]] give the image folders "
                                 "(image_dir, num_repeats, class_tokens, is_reg), each with its own caption and "
                                 "augmentation settings; in place of --train_data_dir and --reg_data_dir")
    output_dir: str = _f("lora-output", "where the LoRA, checkpoints/, samples/, log.csv and loss.png go")
    overwrite: bool = _f(False, "allow writing into an output folder that holds a previous run")
    masked_loss: bool = _f(False, "kohya's masked loss: each image's loss weighed, pixel by pixel, by its mask (black 0, "
                                  "white 1): a same-named image in --conditioning_data_dir (its red channel), or with "
                                  "--alpha_mask the image's transparency")
    alpha_mask: bool = _f(False, "kohya's: each image's alpha channel is its loss mask (opaque 1, transparent 0; an "
                                 "image without one: all 1); implies --masked_loss")
    conditioning_data_dir: str = _f("", "kohya's: a folder of loss masks for --masked_loss, one per training image under "
                                        "its name (any image extension; sub-folders mirrored)")
    caption_extension: str = _f(".txt", "extension of sidecar caption files (image.png -> image.txt)")
    caption_prefix: str = _f("", "kohya's: put before every caption (with a space), the trigger word's included")
    caption_suffix: str = _f("", "kohya's: put after every caption (with a space)")
    strict: bool = _f(False, "stop on an unreadable image instead of warning and skipping it")
    # ------------------------------------------------------------------ what to learn
    mode: str = _f("style", "style: the token is appended to captions; subject (DreamBooth): prompts name the subject", choices=("style", "subject"))
    token: str = _f("", "trigger word added to every caption, e.g. '<my-style>' or 'sks'")
    instance_prompt: str = _f("", "caption for images without one (default: built from --mode and --token)")
    class_prompt: str = _f("", "prompt of the class images for prior preservation, e.g. 'a photo of a dog'")
    with_prior_preservation: bool = _f(False, "DreamBooth prior preservation: also train on class images")
    class_data_dir: str = _f("", "folder of class images (missing ones are generated with the base model)")
    num_class_images: int = _f(100, "how many class images prior preservation uses")
    prior_loss_weight: float = _f(1.0, "weight of the class-image loss")
    reg_data_dir: str = _f("", "kohya's regularisation images: a folder (kohya's <repeats>_<class> folders work) whose "
                               "images, with their own captions (else the folder's text, else --class_prompt), are "
                               "trained beside each batch at --prior_loss_weight, as prior preservation; none is generated")
    pivotal_tuning: bool = _f(False, "learn a new embedding for --token together with the LoRA (needs --token)")
    initializer_token: str = _f("", "word whose embedding starts the pivotal-tuning token (default: the mean embedding)")
    # ------------------------------------------------------------------ LoRA
    rank: int = _f(4, "LoRA rank")
    lora_alpha: float = _f(0.0, "LoRA alpha (0 means alpha = rank)")
    conv_rank: int = _f(0, "rank of the LoRA on 3x3 convolutions (kohya's conv_dim; --target_modules full reaches them; 0: --rank)")
    conv_alpha: float = _f(0.0, "alpha there (kohya's conv_alpha; 0: --conv_rank where it is given, else --lora_alpha)")
    rank_pattern: str = _f("", "per-layer ranks (PEFT's rank_pattern): comma-separated REGEX=RANK, each regex matched "
                               "against a module path or a tail of it, the first match winning (e.g. "
                               "'attn2.to_k=8,up_blocks.3.*=16'); or a JSON object. Before --conv_rank")
    alpha_pattern: str = _f("", "per-layer alphas (PEFT's alpha_pattern), as --rank_pattern; a layer it misses takes "
                                "--lora_alpha, or its own rank where that is 0")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input (PEFT's lora_dropout)")
    network_dropout: float = _f(0.0, "kohya's dropout of single values of the LoRA's rank-wide hidden A x")
    rank_dropout: float = _f(0.0, "kohya's rank dropout: the chance that each rank row of A x is dropped for a sample "
                                  "(the change scaled up to match)")
    module_dropout: float = _f(0.0, "kohya's module dropout: the chance that a layer's LoRA is left out of a step")
    use_dora: bool = _f(False, "DoRA (PEFT's use_dora): also learn a magnitude per output row of each layer")
    base_weights: str = _f("", "LoRA files merged into the model before training, FILE[:WEIGHT] each (kohya's --base_weights "
                               "with --base_weights_multiplier): the LoRA trained is the change on top of them")
    init_lora: str = _f("", "a LoRA file (any format load_lora reads) whose factors the run starts from, as kohya's "
                            "--network_weights: its modules at this run's --rank and --lora_alpha, inside --target_modules")
    dim_from_weights: bool = _f(False, "with --init_lora: each of its modules keeps the rank and alpha it has there, before "
                                       "--rank_pattern and --conv_rank (kohya's --dim_from_weights)")
    target_modules: str = _f("attn", "UNet layers: a preset (attn, cross, attn-mlp, full), a regex, or comma-separated module suffixes")
    train_text_encoder: bool = _f(False, "also train a LoRA in the text encoder")
    train_unet: bool = _f(True, "train the UNet's LoRA (--no-train_unet with --train_text_encoder: the text encoder's "
                                "alone, kohya's --network_train_text_encoder_only)")
    text_encoder_target_modules: str = _f("attn", "text encoder layers, as --target_modules")
    # ------------------------------------------------------------------ optimisation
    learning_rate: float = _f(1e-4, "learning rate of the UNet LoRA")
    text_encoder_lr: float = _f(0.0, "learning rate of the text encoder LoRA and token (0 means --learning_rate)")
    lr_scheduler: str = _f("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _f(0, "linear warm-up steps (kohya's: a number below 1 is a share of the run's steps)")
    lr_warmup_ratio: float = _f(0.0, "linear warm-up as a share of the run's steps, e.g. 0.05 (kohya's --lr_warmup_steps 0.05)")
    lr_num_cycles: int = _f(1, "hard restarts of --lr_scheduler cosine_with_restarts")
    lr_power: float = _f(1.0, "power of --lr_scheduler polynomial")
    lr_scheduler_min_lr_ratio: float = _f(0.0, "kohya's: the lowest rate of cosine_with_min_lr and warmup_stable_decay, "
                                               "as a share of the learning rate")
    lr_decay_steps: float = _f(0.0, "kohya's: the decay steps of warmup_stable_decay (below 1: a share of the run's steps)")
    lr_scheduler_timescale: int = _f(0, "kohya's: the timescale of inverse_sqrt (0: its warm-up steps, else 10000)")
    lr_scheduler_args: str = _f("", "the schedule's own settings as KEY=VALUE, each value a Python literal (kohya's), "
                                    "e.g. step_rules='1:100,0.1:200,0.01' for piecewise_constant")
    lr_scheduler_type: str = _f("", "kohya's: a schedule of torch.optim.lr_scheduler by name (e.g. CosineAnnealingLR), its "
                                    "settings in --lr_scheduler_args (T_max=1000); in place of --lr_scheduler")
    max_train_steps: int = _f(0, "optimizer steps (0 means --num_train_epochs epochs)")
    num_train_epochs: int = _f(1, "epochs, used when --max_train_steps is 0")
    train_batch_size: int = _f(1, "images per device per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-08, "AdamW epsilon")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay (LoRA parameters only)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    scale_weight_norms: float = _f(0.0, "kohya's max-norm regularisation: after each step, a layer whose LoRA change "
                                        "(alpha/r * B A) has a larger Frobenius norm has both factors scaled down to it, "
                                        "e.g. 1.0 (0: off)")
    use_8bit_adam: bool = _f(False, "bitsandbytes 8-bit AdamW (pip install bitsandbytes; CUDA only); = --optimizer adamw8bit")
    optimizer: str = _f("adamw", "adamw (torch's), adamw8bit (bitsandbytes, CUDA only) or prodigy (pip install prodigyopt: "
                        "it finds its own step size; use --learning_rate 1, as kohya's users do); the betas, epsilon and "
                        "weight decay are the --adam_* settings", choices=("adamw", "adamw8bit", "prodigy"))
    optimizer_args: str = _f("", "the optimizer's settings as KEY=VALUE, each value a Python literal (kohya's "
                                 "--optimizer_args): weight_decay=0.01 betas=0.9,0.99 eps=1e-8 (these win over --adam_*) "
                                 "and the optimizer's own, e.g. Prodigy's d_coef=2 decouple=True use_bias_correction=True")
    snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma, e.g. 5.0 (0 disables)")
    debiased_estimation_loss: bool = _f(False, "kohya's: weigh each sample's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), "
                                               "its SNR capped at 1000; after --snr_gamma's weight where both are given")
    scale_v_pred_loss_like_noise_pred: bool = _f(False, "kohya's, for v-prediction models: weigh each sample's loss by "
                                                        "SNR/(SNR+1) (SNR capped at 1000), as an epsilon model's is weighted")
    v_pred_like_loss: float = _f(0.0, "kohya's: add this share of a v-prediction-like loss, each sample's loss times "
                                      "1 + v (SNR+1)/SNR (SNR capped at 1000), e.g. 0.1 (0: off)")
    zero_terminal_snr: bool = _f(False, "kohya's: rescale the training noise schedule so that its last timestep is pure noise "
                                        "(zero terminal SNR, Lin et al. 2023); for v-prediction models")
    noise_offset: float = _f(0.0, "noise offset, e.g. 0.05 (helps very dark/bright images)")
    multires_noise_iterations: int = _f(0, "kohya's multires (pyramid) noise: this many coarser noises added to the noise, "
                                           "e.g. 6 (0: off)")
    multires_noise_discount: float = _f(0.3, "the weight of each coarser noise is this to its level's power (kohya's)")
    noise_offset_random_strength: bool = _f(False, "kohya's: each batch's noise offset a random share of --noise_offset")
    adaptive_noise_scale: float = _f(0.0, "kohya's: add this times each channel's absolute mean latent to --noise_offset, "
                                          "e.g. 0.01 (0: off; needs --noise_offset)")
    ip_noise_gamma_random_strength: bool = _f(False, "kohya's: each batch's --ip_noise_gamma a random share of it")
    ip_noise_gamma: float = _f(0.0, "input perturbation (kohya's --ip_noise_gamma): the latents are noised with the noise "
                                    "plus this times fresh noise, the target keeping the noise, e.g. 0.1 (0: off)")
    min_timestep: int = _f(0, "the smallest timestep trained (kohya's)")
    max_timestep: int = _f(0, "train timesteps below this (kohya's; 0: the scheduler's num_train_timesteps)")
    loss_type: str = _f("l2", "kohya's --loss_type: l2 (MSE), l1, huber or smooth_l1 (pseudo-Huber, its threshold set by "
                              "--huber_schedule / --huber_c)", choices=("l2", "l1", "huber", "smooth_l1"))
    huber_schedule: str = _f("snr", "the Huber threshold by timestep (kohya's): snr, exponential or constant",
                             choices=("snr", "exponential", "constant"))
    huber_c: float = _f(0.1, "the Huber threshold (kohya's --huber_c)")
    huber_scale: float = _f(1.0, "scales the exponential and constant Huber thresholds (kohya's --huber_scale)")
    shuffle_caption: bool = _f(False, "shuffle each caption's comma-separated tags every time it is used (kohya's; for tag captions)")
    keep_tokens: int = _f(0, "with --shuffle_caption / --caption_tag_dropout_rate: leave the first N tags in place (e.g. 1 for a trigger word put first)")
    caption_dropout_rate: float = _f(0.0, "the share of samples trained with an empty caption (kohya's; helps classifier-free guidance)")
    caption_tag_dropout_rate: float = _f(0.0, "the chance that each tag after --keep_tokens is left out of a sample's caption")
    caption_dropout_every_n_epochs: int = _f(0, "kohya's: every Nth epoch (counted from 1) trains on empty captions (0: never)")
    caption_separator: str = _f(",", "kohya's: what separates a caption's tags for --shuffle_caption, --keep_tokens and "
                                     "--caption_tag_dropout_rate (they are joined again with ', ')")
    keep_tokens_separator: str = _f("", "kohya's: in a caption holding it (e.g. '|||'), the tags before it stay in place, "
                                        "those after it are shuffled / dropped, and those after a second one stay at the end")
    secondary_separator: str = _f("", "kohya's: tags joined by this (e.g. ';;;') are shuffled and dropped as one, then "
                                      "written with a comma")
    enable_wildcard: bool = _f(False, "kohya's: each sample takes one line of a caption of several and one choice of each "
                                      "{a|b|c} in it")
    weighted_captions: bool = _f(False, "kohya's: read each caption's A1111 emphasis, (word:1.2) / (word) / [word], and "
                                        "weigh those tokens' text-encoder states by it (no mean restored, as kohya's)")
    max_token_length: int = _f(75, "kohya's: captions are read up to this many tokens (75, 150 or 225; the rest is cut); past "
                                    "75 each 75-token chunk is encoded alone and the states joined, as kohya trains",
                               choices=(75, 150, 225))
    clip_skip: int = _f(1, "condition on the text encoder's Nth layer from the end, as kohya's and A1111's CLIP skip "
                        "(2 for SD 1.x models trained so, e.g. NovelAI-derived anime models; generate with diffusers' "
                        "pipe(..., clip_skip=N-1)); SD 1.x / 2.x only")
    # ------------------------------------------------------------------ images
    resolution: int = _f(512, "training resolution, a multiple of 8 (side of the square, or the area of buckets); "
                              "kohya's WIDTH,HEIGHT (512,768) too")
    resolution_height: int = _f(0, "the training height where it is not --resolution (kohya's --resolution WIDTH,HEIGHT: "
                                   "images cropped to that size, or buckets of that area; 0: square)")
    center_crop: bool = _f(False, "crop the centre instead of a random crop")
    resize_interpolation: str = _f("", "kohya's: how images are resized, lanczos, area, bilinear, bicubic, nearest or box; "
                                       "auto: kohya's default, area when shrinking and lanczos when enlarging (a kohya run's "
                                       "default); empty: bicubic", choices=("", "auto", "lanczos", "area", "bilinear", "bicubic",
                                                                            "nearest", "box"))
    random_flip: bool = _f(False, "flip images horizontally at random (kohya's --flip_aug)")
    color_aug: bool = _f(False, "kohya's colour augmentation: a third of the samples get a hue shift of up to 8 degrees "
                                "of OpenCV's 180 or a gamma of 0.95-1.05 (not with --cache_latents)")
    enable_bucket: bool = _f(False, "aspect-ratio buckets: train non-square images without cropping them square")
    min_bucket_reso: int = _f(0, "with --enable_bucket, kohya's buckets: their shortest side (0: kohya's 256 where a kohya "
                                 "bucket setting or --network_module is given, else this trainer's buckets)")
    max_bucket_reso: int = _f(0, "kohya's buckets: their longest side (0: kohya's 1024)")
    bucket_reso_steps: int = _f(0, "kohya's buckets: their sides are multiples of this (0: kohya's 64)")
    bucket_no_upscale: bool = _f(False, "kohya's: each image its own bucket, its size cut down to --bucket_reso_steps (and "
                                        "shrunk to the area of --resolution if larger): no image is enlarged")
    cache_latents: bool = _f(False, "encode every image once with the VAE (random crop then stays fixed)")
    # ------------------------------------------------------------------ speed, memory
    mixed_precision: str = _f("no", "compute dtype of the frozen model and the forward: bf16 on recent GPUs and CPUs; "
                                    "fp16 with loss scaling", choices=("no", "fp16", "bf16"))
    fp8_base: bool = _f(False, "keep the frozen model's Linear and Conv2d weights in float8 (e4m3fn), cast to the compute "
                               "dtype at each call: about half the weights' memory, the weights rounded to fp8 "
                               "(kohya's; needs --mixed_precision fp16 or bf16)")
    fp8_base_unet: bool = _f(False, "--fp8_base for the UNet only; the text encoders stay in the compute dtype (kohya's)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, about a third slower)")
    dataloader_num_workers: int = _f(0, "worker processes loading images")
    compile: str = _f("none", "torch.compile the UNet's training step: default, reduce-overhead (CUDA graphs: for small "
                      "batches on a GPU), max-autotune; the first steps compile (minutes)", choices=COMPILE_MODES)
    compile_backend: str = _f("inductor", "torch.compile backend: inductor generates fused kernels; aot_eager only traces (a quick check)")
    channels_last: bool = _f(False, "UNet in channels_last memory format (faster convolutions on recent GPUs)")
    lora_backward: str = _f("auto", "how the LoRA gradients are computed: dense (through W + s*B*A: one GEMM in place of four "
                            "rank-r matmuls, faster on a GPU), lowrank (PEFT's ops, its gradients bit for bit), auto "
                            "(dense on CUDA for layers up to 2048 wide, low-rank under --compile), merged (dense, and "
                            "the forward through W + s*B*A too: the loss PEFT's to rounding, not bit for bit)",
                            choices=("auto", "dense", "lowrank", "merged"))  # = layers.BACKWARD_MODES (config stays torch-free)
    # ------------------------------------------------------------------ checkpoints, samples
    checkpointing_steps: int = _f(500, "save a resumable checkpoint every N steps (0: only at the end)")
    save_every_n_steps: int = _f(0, "also write the LoRA as it is every N steps, as <output folder>-step00000200.safetensors "
                                    "(kohya's; kohya format with --save_kohya), to compare them, e.g. in an X/Y plot (0: none)")
    save_every_n_epochs: int = _f(0, "the same every N epochs, as <output folder>-000002.safetensors (kohya's; 0: none)")
    save_n_epoch_ratio: int = _f(0, "kohya's: about N epoch LoRAs over the run, one every (epochs // N) epochs (at least "
                                    "1); it wins over --save_every_n_epochs (0: off)")
    save_last_n_steps: int = _f(0, "with --save_every_n_steps: delete the step LoRAs older than N steps (kohya's; 0 keeps all)")
    save_last_n_epochs: int = _f(0, "with --save_every_n_epochs: keep only the newest N epoch LoRAs (kohya's; 0 keeps all)")
    save_state: bool = _f(False, "also write a resumable checkpoint with each --save_every_n_steps / _epochs LoRA (kohya's)")
    save_last_n_steps_state: int = _f(0, "with --save_state: delete the step LoRAs' checkpoints older than N steps, as "
                                         "kohya deletes its step states (0: by --save_last_n_steps)")
    save_last_n_epochs_state: int = _f(0, "with --save_state: keep only the newest N epoch LoRAs' checkpoints, as kohya "
                                          "keeps its epoch states (0: by --save_last_n_epochs)")
    checkpoints_total_limit: int = _f(0, "keep only the newest N checkpoints (0 keeps all)")
    resume_from_checkpoint: str = _f("", "'latest' or a checkpoint folder to continue from")
    sample_prompts: str = _f("", "kohya's sample prompts: a .txt file of one prompt a line, each with kohya's options "
                                 "(--n negative, --w/--h size, --d seed, --l guidance, --s steps, --ss sampler), or its "
                                 ".toml / .json; each image goes to sample/, at the points the next settings give")
    sample_every_n_steps: int = _f(0, "with --sample_prompts: sample every N steps (kohya's)")
    sample_every_n_epochs: int = _f(0, "with --sample_prompts: sample at the end of every N epochs (kohya's; it wins "
                                       "over --sample_every_n_steps)")
    sample_at_first: bool = _f(False, "with --sample_prompts: also sample before the first step (kohya's)")
    sample_sampler: str = _f("ddim", "kohya's sampler of the sample prompts (a prompt's --ss wins)",
                             choices=tuple(KOHYA_SAMPLERS))
    validation_prompt: str = _f("", "prompt of the sample grids written to samples/ (default: the first caption)")
    validation_steps: int = _f(100, "write a sample grid every N steps (0: only at the end)")
    validation_split: float = _f(0.0, "the share of the training images held out to measure a validation loss (kohya's), "
                                      "e.g. 0.1 (0: none)")
    validate_every_n_steps: int = _f(0, "measure the validation loss every N steps, and at the end (kohya's; 0: every "
                                        "--validation_steps)")
    validation_seed: int = _f(-1, "seed of the held-out images and of the validation noise (kohya's; -1: --seed's)")
    num_validation_images: int = _f(4, "images per sample grid (0 disables samples)")
    validation_inference_steps: int = _f(25, "denoising steps of the sample images")
    save_precision: str = _f("fp16", "dtype of the final LoRA file", choices=("fp16", "bf16", "fp32"))
    save_kohya: bool = _f(False, "also write the LoRA as a kohya file for A1111 and ComfyUI, named after the output folder "
                          "(<output_dir>/<its name>.safetensors); ComfyUI reads a diffusers file's UNet attention only partly, "
                          "and not its alpha")
    output_name: str = _f("", "kohya's: the file name (without .safetensors) of the kohya copy, which it implies "
                              "(default: the output folder's name)")
    v_parameterization: bool = _f(False, "kohya's: train the model as a v-prediction model whatever its scheduler config "
                                         "says (an SD 2.x 768 single-file checkpoint), its sample images too")
    no_metadata: bool = _f(False, "kohya's: the files keep no training settings, data set summary, comment or base model "
                                  "path (what a LoRA needs to load, and its title, author and trigger words, stay)")
    training_comment: str = _f("", "kohya's: a comment written into the LoRA file (ss_training_comment)")
    metadata_title: str = _f("", "kohya's: the title in the file's model card (modelspec.title; default: the file's name)")
    metadata_author: str = _f("", "kohya's: the author in the file's model card (modelspec.author)")
    metadata_description: str = _f("", "kohya's: the description in the file's model card (modelspec.description)")
    metadata_license: str = _f("", "kohya's: the license in the file's model card (modelspec.license)")
    metadata_tags: str = _f("", "kohya's: comma-separated tags in the file's model card (modelspec.tags)")
    seed: int = _f(-1, "seed of everything random (-1: pick one and record it)")

    # ------------------------------------------------------------------ derived values and checks
    @property
    def alpha(self) -> float:
        return float(self.lora_alpha or self.rank)

    def patterns(self) -> tuple[dict[str, int], dict[str, float]]:
        """``--rank_pattern`` and ``--alpha_pattern`` as ``inject_lora``'s dicts."""
        return parse_pattern(self.rank_pattern, "--rank_pattern", int), parse_pattern(self.alpha_pattern, "--alpha_pattern", float)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the training images: ``resolution`` square, or ``resolution`` x ``resolution_height``."""
        return self.resolution, self.resolution_height or self.resolution

    @property
    def uses_kohya_buckets(self) -> bool:
        """Whether ``--enable_bucket`` makes kohya's buckets (a kohya bucket setting is given) rather than ours."""
        return self.enable_bucket and bool(self.min_bucket_reso or self.max_bucket_reso or self.bucket_reso_steps
                                           or self.bucket_no_upscale)

    def optimizer_settings(self) -> dict[str, Any]:
        """``--optimizer_args`` as keyword arguments, read as kohya reads them (``ast.literal_eval`` of each value)."""
        return _literal_settings(self.optimizer_args, "--optimizer_args", "weight_decay=0.01, betas=0.9,0.99, decouple=True")

    def lr_scheduler_settings(self) -> dict[str, Any]:
        """``--lr_scheduler_args`` as keyword arguments, read as ``--optimizer_args``."""
        return _literal_settings(self.lr_scheduler_args, "--lr_scheduler_args", "T_max=1000, step_rules='1:10,0.1'")

    @property
    def te_lr(self) -> float:
        return float(self.text_encoder_lr or self.learning_rate)

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first setting that cannot work."""
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required (a diffusers folder or a hub id)")
        if not self.train_data_dir and not self.dataset_config:
            raise ConfigError("--train_data_dir (or kohya's --dataset_config) is required")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{f.name} {getattr(self, f.name)!r}: choose one of {', '.join(map(str, choices))}")
        types = _field_types()
        for f in dataclasses.fields(self):
            if types[f.name] is float and not math.isfinite(getattr(self, f.name)):
                raise ConfigError(f"--{f.name} must be a finite number, got {getattr(self, f.name)}")
        positive = ("rank", "train_batch_size", "gradient_accumulation_steps", "resolution", "num_train_epochs", "clip_skip")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("max_train_steps", "lr_warmup_steps", "checkpointing_steps", "checkpoints_total_limit",
                        "save_last_n_steps_state", "save_last_n_epochs_state",
                        "validation_steps", "num_validation_images", "num_class_images", "noise_offset", "snr_gamma",
                        "learning_rate", "text_encoder_lr", "max_grad_norm", "dataloader_num_workers", "adam_weight_decay",
                        "prior_loss_weight", "lora_alpha", "adam_epsilon", "lr_power", "keep_tokens", "caption_dropout_every_n_epochs", "v_pred_like_loss", "save_n_epoch_ratio", "lr_scheduler_min_lr_ratio", "lr_decay_steps", "lr_scheduler_timescale", "conv_rank", "conv_alpha", "multires_noise_iterations", "ip_noise_gamma", "min_timestep",
                        "max_timestep", "validate_every_n_steps", "save_every_n_steps", "save_every_n_epochs", "scale_weight_norms")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ("resolution", "resolution_height"):
            side = getattr(self, name)
            if side % 8 or side < 0:
                near = sorted({max(8, side // 8 * 8), side // 8 * 8 + 8})
                raise ConfigError(f"--{name} must be a multiple of 8 (the VAE's downscaling factor), got {side}; "
                                  f"try {' or '.join(map(str, near))}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.validation_split < 1:
            raise ConfigError(f"--validation_split must be in [0, 1), got {self.validation_split}")
        if not 0 <= self.multires_noise_discount <= 1:
            raise ConfigError(f"--multires_noise_discount must be in [0, 1], got {self.multires_noise_discount}")
        if self.max_timestep and self.min_timestep >= self.max_timestep:
            raise ConfigError(f"--min_timestep {self.min_timestep} must be below --max_timestep {self.max_timestep}")
        if self.loss_type in ("huber", "smooth_l1") and not (0 < self.huber_c <= 1 and self.huber_scale > 0):
            raise ConfigError(f"--huber_c must be in (0, 1] and --huber_scale positive, got {self.huber_c} and {self.huber_scale}")
        if self.lr_scheduler_type:  # (kohya's: a class by name, its settings in --lr_scheduler_args)
            import torch

            if not isinstance(getattr(torch.optim.lr_scheduler, self.lr_scheduler_type, None), type):
                raise ConfigError(f"--lr_scheduler_type {self.lr_scheduler_type!r}: give a class of torch.optim.lr_scheduler "
                                  "by name (e.g. CosineAnnealingLR); other modules are not imported")
            if self.lr_warmup_steps or self.lr_warmup_ratio:
                raise ConfigError(f"--lr_scheduler_type {self.lr_scheduler_type} takes no --lr_warmup_steps (as kohya's)")
        self.lr_scheduler_settings()
        if not 0 <= self.lr_warmup_ratio < 1 or self.lr_warmup_ratio and self.lr_warmup_steps:
            raise ConfigError(f"--lr_warmup_ratio must be in [0, 1) and not beside --lr_warmup_steps, got {self.lr_warmup_ratio}")
        if self.lr_num_cycles < 1:
            raise ConfigError(f"--lr_num_cycles must be at least 1, got {self.lr_num_cycles}")
        if self.bucket_reso_steps % 8 or self.bucket_reso_steps < 0:
            raise ConfigError(f"--bucket_reso_steps must be a multiple of 8 (the VAE's downscaling factor), got {self.bucket_reso_steps}")
        low, high = self.min_bucket_reso or 256, self.max_bucket_reso or 1024
        if self.uses_kohya_buckets and min(self.size) < (self.bucket_reso_steps or 64):
            raise ConfigError(f"--resolution {self.resolution} is below --bucket_reso_steps ({self.bucket_reso_steps or 64}): "
                              "kohya's buckets would be empty; give a smaller --bucket_reso_steps")
        if self.uses_kohya_buckets and not (0 < low <= high and high >= max(self.size)):
            raise ConfigError(f"kohya's buckets need 0 < --min_bucket_reso ({low}) <= --max_bucket_reso ({high}) and "
                              f"--max_bucket_reso >= --resolution ({max(self.size)})")
        if (self.sample_every_n_steps or self.sample_every_n_epochs or self.sample_at_first) and not self.sample_prompts:
            raise ConfigError("--sample_every_n_steps / --sample_every_n_epochs / --sample_at_first sample the prompts of "
                              "--sample_prompts: give that file")
        if self.sample_prompts:
            from .samples import read_sample_prompts

            read_sample_prompts(self.sample_prompts)  # (a bad file is named now, not at the first sample)
        self.optimizer_settings()
        if self.adaptive_noise_scale and not self.noise_offset:
            raise ConfigError("--adaptive_noise_scale adds to --noise_offset: give that too (as kohya requires)")
        if (self.fp8_base or self.fp8_base_unet) and self.mixed_precision == "no":
            flag = "--fp8_base" if self.fp8_base else "--fp8_base_unet"
            raise ConfigError(f"{flag} computes in the mixed precision: give --mixed_precision bf16 (or fp16), as kohya requires")
        if self.color_aug and self.cache_latents:
            raise ConfigError("--color_aug changes every sample's colours: it cannot go with --cache_latents (as in kohya)")
        for name in ("lora_dropout", "network_dropout", "rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.use_dora and (self.network_dropout or self.rank_dropout or self.module_dropout):
            raise ConfigError("--use_dora takes --lora_dropout (on the input), not kohya's network / rank / module dropout")
        if self.use_8bit_adam and self.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"--use_8bit_adam is --optimizer adamw8bit; it does not go with --optimizer {self.optimizer}")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.caption_separator:
            raise ConfigError("--caption_separator must not be empty (kohya's is ',')")
        if not self.train_unet and not self.train_text_encoder:
            raise ConfigError("--no-train_unet trains the text encoder's LoRA alone: give --train_text_encoder")
        if self.reg_data_dir and self.with_prior_preservation:
            raise ConfigError("give --reg_data_dir (kohya's: its images as they are) or --with_prior_preservation "
                              "--class_data_dir (diffusers': the class prompt's images, made where missing), not both")
        if self.with_prior_preservation:
            if not self.class_data_dir:
                raise ConfigError("--with_prior_preservation needs --class_data_dir")
            if not self.class_prompt:
                raise ConfigError("--with_prior_preservation needs --class_prompt (e.g. 'a photo of a dog')")
            if self.num_class_images < 1:
                raise ConfigError("--with_prior_preservation needs --num_class_images of at least 1")
        if self.pivotal_tuning and not self.token:
            raise ConfigError("--pivotal_tuning needs --token (the new word to learn, e.g. '<my-style>')")
        if self.mode == "subject" and not (self.token or self.instance_prompt):
            raise ConfigError("--mode subject needs --token or --instance_prompt naming the subject (e.g. 'a photo of sks dog')")
        if self.init_lora and not Path(self.init_lora).expanduser().is_file():
            raise ConfigError(f"--init_lora {self.init_lora}: no such file")
        if self.dim_from_weights and not self.init_lora:
            raise ConfigError("--dim_from_weights takes the ranks of --init_lora's file; give --init_lora")
        self.patterns()
        if self.output_name and (Path(self.output_name).name != self.output_name or self.output_name.startswith(".")):
            raise ConfigError(f"--output_name {self.output_name!r}: a file name without folders (the kohya copy goes "
                              "into --output_dir)")
        if self.output_name and not self.save_kohya:
            raise ConfigError("--output_name names the kohya copy: give --save_kohya too")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"--caption_extension should start with a dot, e.g. '.txt', got {self.caption_extension!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping; keys may use dashes; unknown keys raise naming the closest known one."""
        return cls(**_coerce(values, source))


def parse_pattern(text: str, flag: str, kind: type) -> dict:
    """``"REGEX=VALUE,REGEX=VALUE"`` (or a JSON object) -> ``{regex: value}`` in order; ``ConfigError`` naming
    ``flag`` and the entry that is no regex, or whose value is no positive ``kind``."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            items = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{flag}: not a JSON object of regex: value ({e})") from None
    else:
        items = []
        for entry in filter(None, (e.strip() for e in text.split(","))):
            key, eq, value = entry.rpartition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{flag}: {entry!r} is not REGEX=VALUE (e.g. 'attn2.to_k=8')")
            items.append((key.strip(), value.strip()))
    out = {}
    for key, value in items:
        try:
            re.compile(key)
        except re.error as e:
            raise ConfigError(f"{flag}: {key!r} is not a valid regex ({e})") from None
        try:
            number = kind(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and isinstance(value, float) and value != number) or not math.isfinite(number) or number <= 0:
            raise ConfigError(f"{flag}: {key}={value!r}: the value must be a positive {'integer' if kind is int else 'number'}")
        out[key] = number
    return out


def _literal_settings(text: str, flag: str, example: str) -> dict[str, Any]:
    """``KEY=VALUE`` words as keyword arguments, each value a Python literal (as kohya reads its ``*_args``)."""
    import ast

    out: dict[str, Any] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        try:
            if not (key.isidentifier() and eq):
                raise ValueError
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{flag} {item!r}: give KEY=VALUE, the value a Python literal (e.g. {example})") from None
    return out


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


ALIASES = {"instance_data_dir": "train_data_dir",  # diffusers' DreamBooth scripts' name -> ours
           # kohya's sd-scripts names -> ours (the same setting, read the same way)
           "network_dim": "rank", "network_alpha": "lora_alpha",
           "min_snr_gamma": "snr_gamma", "max_train_epochs": "num_train_epochs", "network_weights": "init_lora",
           "max_data_loader_n_workers": "dataloader_num_workers", "lr_scheduler_num_cycles": "lr_num_cycles",
           "lr_scheduler_power": "lr_power", "optimizer_type": "optimizer", "flip_aug": "random_flip"}
# kohya's settings that change nothing here (SDPA attention is torch's own; the model's config says SD 2; logging is ours)
KOHYA_IGNORED = ("xformers", "sdpa", "mem_eff_attn", "persistent_data_loader_workers", "v2", "no_half_vae", "lowram",
                 "highvram", "logging_dir", "log_with", "log_prefix", "save_state_on_train_end", "log_tracker_name",
                 "wandb_api_key", "wandb_run_name", "console_log_simple", "skip_cache_check", "vae_batch_size", "ddp_timeout",
                 "tokenizer_cache_dir", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk")
# kohya's settings read into ours by ``_from_kohya`` (their values differ)
KOHYA_TRANSLATED = ("unet_lr", "network_train_unet_only", "network_train_text_encoder_only", "network_module",
                    "network_args", "save_model_as", "random_crop", "cache_latents_to_disk", "base_weights_multiplier",
                    "full_fp16", "full_bf16")
# kohya's settings this trainer does not build: named, with what to do instead, rather than "unknown setting"
KOHYA_REFUSED = {
    "no_token_padding": "captions are always padded to the text encoder's length, as diffusers' pipelines condition",
    "face_crop_aug_range": "face crop augmentation is not built",
    "initial_epoch": "continue a run with --resume_from_checkpoint latest", "initial_step": "continue a run with --resume_from_checkpoint latest",
    "huggingface_repo_id": "uploading is not built; push the output folder with huggingface_hub",
}
_KOHYA_VALUED = ("face_crop_aug_range", "initial_epoch", "initial_step", "huggingface_repo_id")  # (the refused flags that take a value)


def _from_kohya(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` (keys as ``_coerce`` reads them) with kohya's settings that are not plain aliases read into ours:
    ``unet_lr`` (the UNet's rate; ``learning_rate`` then the text encoder's where it has none), ``resolution`` as
    ``"512,512"``, ``network_args`` (``conv_dim`` / ``conv_alpha``, ``rank_dropout`` / ``module_dropout``), ``network_train_unet_only``, the module and file
    type (only LoRA and safetensors), ``output_name`` (the kohya copy: ``save_kohya``), and those that change nothing
    (``KOHYA_IGNORED``) left out. ``ConfigError`` names what this trainer cannot do as kohya does."""
    for name, reason in KOHYA_REFUSED.items():
        if values.get(name) not in (None, False):
            raise ConfigError(f"{source}: {name}: {reason}")
    out = {k: v for k, v in values.items() if k not in KOHYA_IGNORED + KOHYA_TRANSLATED + tuple(KOHYA_REFUSED)}
    for name, precision in (("full_fp16", "fp16"), ("full_bf16", "bf16")):  # (kohya's: the LoRA in that precision too;
        if values.get(name) and values.get("mixed_precision") != precision:  # here it stays fp32: a few MB more)
            raise ConfigError(f"{source}: {name} needs --mixed_precision {precision}, as kohya's")
    if values.get("cache_latents_to_disk"):
        out.setdefault("cache_latents", True)  # (kept in memory here: the same latents)
    if values.get("random_crop"):
        if out.get("center_crop"):
            raise ConfigError(f"{source}: random_crop and center_crop contradict each other")
        out["center_crop"] = False
    warmup = out.get("lr_warmup_steps")
    if isinstance(warmup, (str, float)) and not isinstance(warmup, bool):  # (kohya's: below 1, a share of the steps)
        try:
            number = float(warmup)
        except ValueError:
            raise ConfigError(f"{source}: lr_warmup_steps must be a number, got {warmup!r}") from None
        if 0 < number < 1:
            out.pop("lr_warmup_steps")
            out["lr_warmup_ratio"] = number
        elif number.is_integer():
            out["lr_warmup_steps"] = int(number)
    multipliers = values.get("base_weights_multiplier")
    if multipliers is not None:  # (kohya's: one weight per --base_weights file)
        files = out.get("base_weights") or []
        files = files.split("\n") if isinstance(files, str) else list(files)
        multipliers = multipliers if isinstance(multipliers, (list, tuple)) else [multipliers]
        if len(multipliers) != len(files):
            raise ConfigError(f"{source}: base_weights_multiplier gives {len(multipliers)} weights for {len(files)} base_weights files")
        out["base_weights"] = [f"{f}:{float(m)}" for f, m in zip(files, multipliers)]
    if values.get("unet_lr") is not None:
        if out.get("learning_rate") is not None and out.get("text_encoder_lr") is None:
            out["text_encoder_lr"] = out["learning_rate"]  # (kohya: the text encoder's rate where it has none)
        out["learning_rate"] = values["unet_lr"]
    if isinstance(out.get("resolution"), str):  # (kohya's "512,768": width, height)
        sides = [side.strip() for side in out["resolution"].split(",")]
        if len(sides) not in (1, 2) or not all(side.isdigit() for side in sides):
            raise ConfigError(f"{source}: resolution {out['resolution']!r}: give one side (512) or WIDTH,HEIGHT (512,768)")
        out["resolution"] = int(sides[0])
        if len(sides) == 2 and sides[1] != sides[0]:
            if out.get("resolution_height"):
                raise ConfigError(f"{source}: give the height in resolution or in resolution_height, not both")
            out["resolution_height"] = int(sides[1])
    if values.get("network_train_text_encoder_only"):
        if values.get("network_train_unet_only"):
            raise ConfigError(f"{source}: network_train_unet_only and network_train_text_encoder_only contradict each other")
        out["train_unet"], out["train_text_encoder"] = False, True
    if values.get("network_train_unet_only"):
        if out.get("train_text_encoder"):
            raise ConfigError(f"{source}: network_train_unet_only and train_text_encoder contradict each other")
        out["train_text_encoder"] = False
    module = values.get("network_module")
    if module is not None and module not in ("networks.lora", "lycoris.kohya"):
        raise ConfigError(f"{source}: network_module {module!r}: this trainer trains LoRA (networks.lora) and LoCon")
    if module is not None:  # a kohya run: its layers (attention and MLP; with conv_dim the convolutions too), and
        # the text encoder's LoRA unless network_train_unet_only
        out.setdefault("target_modules", "attn-mlp")
        out.setdefault("text_encoder_target_modules", "attn-mlp")
        out.setdefault("train_text_encoder", True)
        out.setdefault("bucket_reso_steps", 64)  # (kohya's buckets, with its defaults where none is given)
        out.setdefault("center_crop", True)  # (kohya crops the centre unless --random_crop)
        out.setdefault("resize_interpolation", "auto")  # (and resizes with area / lanczos)
        out.setdefault("num_validation_images", 0)  # (kohya writes no sample grid: its samples are --sample_prompts')
        out.setdefault("checkpointing_steps", 0)  # (kohya writes a resumable state only with --save_state; ours at the end)
    if values.get("save_model_as") not in (None, "safetensors"):
        raise ConfigError(f"{source}: save_model_as {values['save_model_as']!r}: LoRAs are written as safetensors")
    args = values.get("network_args") or []
    for item in [args] if isinstance(args, str) else args:
        key, eq, value = str(item).partition("=")
        key, value = key.strip(), value.strip()
        if key in ("conv_dim", "conv_alpha", "rank_dropout", "module_dropout") and eq:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{source}: network_args {item!r}: {key} must be a number") from None
            out[{"conv_dim": "conv_rank"}.get(key, key)] = int(number) if key == "conv_dim" else number
            if key == "conv_dim" and out.get("target_modules", "attn-mlp") == "attn-mlp":
                out["target_modules"] = "full"  # (kohya's LoCon: the ResNet convolutions too)
        elif key == "algo" and value in ("lora", "locon"):
            continue
        else:
            raise ConfigError(f"{source}: network_args {item!r}: this trainer takes conv_dim, conv_alpha, rank_dropout, "
                              "module_dropout and algo=locon")
    if out.get("output_name"):
        out["output_name"] = str(out["output_name"]).removesuffix(".safetensors")
        out.setdefault("save_kohya", True)
    return out


def _coerce(values: dict[str, Any], source: str) -> dict[str, Any]:
    types = _field_types()
    out: dict[str, Any] = {}
    values = _from_kohya({str(k).replace("-", "_").lstrip("_"): v for k, v in values.items()}, source)
    for raw_key, value in values.items():
        key = str(raw_key)
        if key in ALIASES:
            if ALIASES[key] in out or any(str(k).replace("-", "_").lstrip("_") == ALIASES[key] for k in values):
                raise ConfigError(f"{source}: give {key} or {ALIASES[key]}, not both (they are the same setting)")
            key = ALIASES[key]
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown setting {raw_key!r}{hint}")
        kind = types[key]
        if value is None:
            continue
        if key in ("rank_pattern", "alpha_pattern") and isinstance(value, dict):  # a table in a config file
            value = json.dumps(value)
        if key in ("optimizer_args", "lr_scheduler_args") and isinstance(value, (list, tuple)):  # (kohya's list of KEY=VALUE)
            value = " ".join(map(str, value))
        if key == "base_weights" and isinstance(value, (list, tuple)):  # (one FILE[:WEIGHT] a line)
            value = "\n".join(map(str, value))
        if key == "optimizer" and isinstance(value, str):  # (kohya writes AdamW8bit, Prodigy)
            value = value.lower()
        if kind is bool and not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif kind is float and isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 1e-4 as a string
            except ValueError:
                raise ConfigError(f"{source}: {key} must be a number, got {value!r}") from None
        if kind in (int, str) and not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{source}: {key} must be {kind.__name__}, got {value!r}")
        out[key] = value
    return out


def read_text(path: str | os.PathLike, error: type[Exception] = ConfigError, what: str = "") -> str:
    """A text file's contents: UTF-8 (a byte-order mark is dropped) or UTF-16 with its byte-order mark. Other bytes
    raise ``error`` naming the file (after ``what``, e.g. ``"--config "``) and the line.

    Example:
        >>> read_text("captions/cat.txt")
        'a cat on a sofa'
    """
    data = Path(path).read_bytes()
    encoding = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        name = "UTF-16" if encoding == "utf-16" else "UTF-8"
        raise error(f"{what}{path}:{line}: not {name} text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file (a table of the flag names; tables in it, as
    kohya's config files group their settings, are read as one)."""
    path = Path(path)
    if not path.suffix and not path.is_file() and path.with_name(path.name + ".toml").is_file():
        path = path.with_name(path.name + ".toml")  # (kohya's --config_file: ".toml" added)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"--config {path}: use a .toml, .yaml or .json file")
    text = read_text(path, ConfigError, "--config ")
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # the message ends "(at line L, column C)"
            raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path}{where}: not valid YAML: {problem}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of settings, got {type(data).__name__}")
    flat = {}  # (kohya's config files group their settings in tables: [model_arguments], [training_arguments], ...)
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("rank_pattern", "alpha_pattern"):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the file at ``path`` (if any), then ``overrides``."""
    values = read_config_file(path) if path else {}
    return TrainConfig.from_dict({**values, **overrides}, source=str(path or "overrides"))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per ``TrainConfig`` field (same name); unset flags stay out of the namespace."""
    parser.add_argument("--config", "--config_file", dest="config", metavar="FILE", default=argparse.SUPPRESS,
                        help="TOML or YAML file with the same keys as these flags; flags override it (kohya's "
                             "--config_file: a name without .toml gets it)")
    types = _field_types()
    for f in dataclasses.fields(TrainConfig):
        kind = types[f.name]
        help_text = f.metadata["help"]
        if "(default:" not in help_text:  # (a help that explains its default says it once)
            help_text += f" (default: {f.default!r})"
        flags = [f"--{f.name}"] + [f"--{alias}" for alias, name in ALIASES.items() if name == f.name]
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif f.name == "lr_warmup_steps":  # (kohya's share of the steps too: ``_from_kohya`` reads it)
            parser.add_argument(*flags, type=str, default=argparse.SUPPRESS, metavar="INT", help=help_text)
        elif f.name == "base_weights":  # (several files)
            parser.add_argument(*flags, nargs="*", default=argparse.SUPPRESS, metavar="FILE[:WEIGHT]", help=help_text)
        elif f.name in ("optimizer_args", "lr_scheduler_args"):  # (kohya's: several KEY=VALUE words)
            parser.add_argument(*flags, nargs="*", default=argparse.SUPPRESS, metavar="KEY=VALUE", help=help_text)
        elif f.name == "resolution":  # (kohya's "512,512" too: ``_from_kohya`` reads it)
            parser.add_argument(*flags, type=str, default=argparse.SUPPRESS, metavar="INT", help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(*flags, type=str.lower if f.name == "optimizer" else kind, default=argparse.SUPPRESS,
                                choices=choices, metavar=None if choices else kind.__name__.upper(), help=help_text)
    kohya = parser.add_argument_group("kohya's sd-scripts flags", "read as kohya reads them (their aliases are above)")
    kohya.add_argument("--unet_lr", type=float, default=argparse.SUPPRESS, help="the UNet's learning rate (--learning_rate "
                       "is then the text encoder's, where --text_encoder_lr is not given)")
    for name in ("network_train_unet_only", "network_train_text_encoder_only"):
        kohya.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help="as kohya's")
    kohya.add_argument("--network_module", default=argparse.SUPPRESS, help="networks.lora (or lycoris.kohya with "
                       "algo=locon): a kohya run, its layers and the text encoder's LoRA as kohya trains them")
    kohya.add_argument("--network_args", nargs="*", default=argparse.SUPPRESS, metavar="KEY=VALUE",
                       help="conv_dim=N conv_alpha=A (LoCon), algo=locon")
    kohya.add_argument("--save_model_as", default=argparse.SUPPRESS, help="safetensors")
    kohya.add_argument("--random_crop", action="store_true", default=argparse.SUPPRESS, help="a random crop (kohya "
                       "crops the centre otherwise: a kohya command line gets --center_crop unless this is given)")
    kohya.add_argument("--base_weights_multiplier", nargs="*", type=float, default=argparse.SUPPRESS,
                       help="the weight of each --base_weights file (kohya's)")
    kohya.add_argument("--cache_latents_to_disk", action="store_true", default=argparse.SUPPRESS,
                       help="= --cache_latents (the latents are kept in memory)")
    for name in ("full_fp16", "full_bf16"):
        kohya.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help="with --mixed_precision "
                           f"{name[-4:]}, as kohya's (the LoRA's own weights stay fp32)")
    kohya.add_argument("--output_config", action="store_true", default=argparse.SUPPRESS,
                       help="write the settings given (those unlike the defaults) into --config's file, a new TOML that "
                            "--config reads back, and stop (kohya's)")
    for name in KOHYA_REFUSED:  # (named by the refusal, not as unknown)
        kohya.add_argument(f"--{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                           **({"nargs": "*"} if name in _KOHYA_VALUED else {"action": "store_true"}))
    for name in KOHYA_IGNORED:  # (accepted, so that a kohya command runs; they change nothing here)
        if name in ("logging_dir", "log_with", "log_prefix", "log_tracker_name", "wandb_api_key", "wandb_run_name", "vae_batch_size",
                    "ddp_timeout", "tokenizer_cache_dir"):
            kohya.add_argument(f"--{name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            kohya.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors raise ``ConfigError`` instead of exiting (``settings_from_flags``)."""

    def error(self, message: str):
        raise ConfigError(f"{self.prog}: {message}")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a parsed command line gives (``add_config_arguments`` leaves the others out), kohya's included."""
    names = [f.name for f in dataclasses.fields(TrainConfig)] + list(KOHYA_TRANSLATED + KOHYA_IGNORED) + list(KOHYA_REFUSED)
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def settings_from_flags(flags: list[str], source: str = "the flags") -> dict[str, Any]:
    """The settings a list of command-line flags gives (ours and kohya's, as ``lora-diffusion train`` reads them),
    only those given, as ``TrainConfig`` field values; ``ConfigError`` for a flag or value it cannot read. For a front
    end's "additional parameters", as kohya_ss's GUI has them.

    Example:
        >>> settings_from_flags(["--network_dropout", "0.1", "--color_aug"])
        {'network_dropout': 0.1, 'color_aug': True}
    """
    parser = _RaisingParser(add_help=False, allow_abbrev=False, prog=source)
    add_config_arguments(parser)
    args = parser.parse_args(flags)
    if hasattr(args, "config") or hasattr(args, "output_config"):
        raise ConfigError(f"{source}: --config / --output_config read or write a whole file; give its settings as flags")
    return _coerce(_given(args), source)


def write_config_file(config: TrainConfig, path: str | os.PathLike) -> Path:
    """``config``'s settings that are not the defaults, as a new TOML file that ``--config`` reads back into the same
    ``TrainConfig`` (kohya's ``--output_config``); ``ConfigError`` where the file exists."""
    path = Path(path)
    path = path if path.suffix else path.with_name(path.name + ".toml")
    if path.exists():
        raise ConfigError(f"--output_config: {path} exists; give --config a new file's name")
    defaults = TrainConfig()
    lines = []
    for f in dataclasses.fields(TrainConfig):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name):
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value, ensure_ascii=False) \
            if isinstance(value, str) else repr(value)
        lines.append(f"{f.name} = {text}")
    path.write_text("# lora-diffusion train --config " + path.name + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of a parsed command line: defaults < ``--config`` file < flags given."""
    return load_config(getattr(args, "config", None), **_given(args))
