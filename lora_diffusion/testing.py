"""Tiny Stable Diffusion pipelines built entirely offline, for tests, examples and benchmarks.

Example:
    >>> pipe = tiny_pipeline(seed=0)          # same seed, same weights; builds in well under a second
    >>> image = pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0]
"""

from __future__ import annotations

import copy
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["tiny_pipeline", "tiny_sdxl_pipeline", "tiny_components", "byte_tokenizer_dir", "random_lora", "OpCounter"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def byte_tokenizer_dir() -> str:
    """A folder with a byte-level CLIP ``vocab.json`` and an empty ``merges.txt`` (no downloads)."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="lora_diffusion_tok_"))
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder)


# the tiny UNet's layout: SD's block structure (layers_per_block 2, attention in the lower level) at 32/64 wide
_TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=32)


def tiny_components(seed: int = 0, *, v_prediction: bool = False, cross_attention_dim: int = 32) -> dict:
    """The modules of a tiny SD-1.x-shaped pipeline, deterministically initialised from ``seed``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(
        str(Path(byte_tokenizer_dir()) / "vocab.json"), str(Path(byte_tokenizer_dir()) / "merges.txt"), model_max_length=77
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_TINY_UNET, cross_attention_dim=cross_attention_dim, attention_head_dim=8)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_pipeline(seed: int = 0, *, v_prediction: bool = False, dtype: torch.dtype = torch.float32):
    """A tiny ``StableDiffusionPipeline`` built offline; the same ``seed`` always gives the same weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components(seed, v_prediction=v_prediction), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny ``StableDiffusionXLPipeline`` built offline: two text encoders (the second with a projection, as
    SDXL's OpenCLIP-G), a UNet with SDXL's ``text_time`` conditioning and 1 / 2 transformer layers per block;
    the same ``seed`` always gives the same weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    parts = tiny_components(seed)
    tokenizer = parts["tokenizer"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel(
            **_TINY_UNET,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 size/crop numbers x 8 + the pooled text (32)
            cross_attention_dim=80,  # both encoders' hidden states side by side (32 + 48)
        )
        torch.manual_seed(seed + 4)
        config = parts["text_encoder"].config.to_dict()
        # wider than the first, as OpenCLIP-G (1280) is than CLIP-L (768): diffusers' single-file loader tells them apart so
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**config, "hidden_size": 48, "projection_dim": 32}))
    for model in (unet, text_encoder_2):
        model.eval()
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=copy.deepcopy(tokenizer),  # (two objects, as loaded)
                                     unet=unet, scheduler=parts["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(
    pipe,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float | None = None,
    unet_targets="attn",
    text_encoder_targets="attn",
    std: float = 0.1,
) -> dict:
    """A canonical LoRA (``{"<component>.<path>": LoraWeights}``) with random non-zero factors for ``pipe``'s
    layers (SDXL's second text encoder too), without touching ``pipe``; ``text_encoder_targets=None`` leaves the
    text encoders out.

    Example:
        >>> write_lora_file("style.safetensors", random_lora(pipe, seed=1, rank=4, alpha=8), dtype=torch.float32)
    """
    from .formats import LoraWeights, with_text_model
    from .inject import resolve_targets
    from .layers import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component, targets in (("unet", unet_targets), ("text_encoder", text_encoder_targets), ("text_encoder_2", text_encoder_targets)):
        model = getattr(pipe, component, None)
        if model is None or targets is None:
            continue
        for path in resolve_targets(model, targets):
            base = model.get_submodule(path)
            base = base.base_layer if isinstance(base, LoraLayer) else base
            w = base.weight
            a_shape = (rank, *w.shape[1:])
            b_shape = (w.shape[0], rank) + ((1, 1) if w.dim() == 4 else ())
            a = torch.randn(a_shape, generator=gen) * std
            b = torch.randn(b_shape, generator=gen) * std
            key_path = with_text_model(path) if component.startswith("text_encoder") else path
            out[f"{component}.{key_path}"] = LoraWeights(a, b, float(rank if alpha is None else alpha))
    return out


class OpCounter:
    """Count the aten ops run inside ``with OpCounter() as ops:`` (a ``TorchDispatchMode``): on a GPU each is at
    least one kernel launch, so the count predicts launch-bound cost on any machine. ``ops.counts`` maps op
    names to calls; ``_local_scalar_dense`` is a tensor read on the host (on a GPU, a sync).

    Example:
        >>> with OpCounter() as ops:
        ...     set_adapters(pipe, {"style": 0.5})
        >>> ops.total, ops.counts["_local_scalar_dense"]
    """

    def __init__(self) -> None:
        import collections

        from torch.utils._python_dispatch import TorchDispatchMode

        counts: collections.Counter = collections.Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self.counts, self._mode = counts, _Mode()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "OpCounter":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
