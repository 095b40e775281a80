"""Random sequences of the public operations (load, delete, set_adapters, A1111 prompt tags, fuse, unfuse, disable,
enable, kept merged weights on and off, and calls refused for a bad name or file) leave the pipeline computing
exactly what a pipeline built afresh with the same adapters and weights computes: the invariant behind every
single-operation test, checked after each step."""

from __future__ import annotations

import os
import random

import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion import (LoraFormatError, apply_prompt_loras, cache_merged_weights, delete_adapter, disable_lora,
                            enable_lora, fuse, load_lora, set_adapters, unfuse)
from lora_diffusion.formats import write_lora_file
from lora_diffusion.testing import random_lora, tiny_pipeline, tiny_sdxl_pipeline

from conftest import comfyui_extraction, move_weights

# set_adapters' blocks: none, a number for the UNet, diffusers' dict, an LBW vector (its BASE scales the text
# encoders; SD1's 17 values, SDXL's 12), a per-layer list
_BLOCKS = [None, None, 0.5, {"down": 0.5, "mid": 0.0, "up": 1.0}, {"up": {"block_0": [1.0, 0.25, 0.0]}}]
KINDS = {"sd": (tiny_pipeline, _BLOCKS + [[0.6, 1, 0, 1, 1, 0.5, 1, 1, 0.2, 1, 1, 1, 1, 0.3, 1, 1, 1]]),
         "sdxl": (tiny_sdxl_pipeline, _BLOCKS + [[0.6, 1, 0, 1, 0.5, 1, 1, 0.2, 1, 1, 0.3, 1]])}


def _make(kind: str, seed: int = 0):
    """The pipeline in float64: fused, kept merged and low-rank calls then agree to ~1e-13, so a tight tolerance
    tells a wrong weight from rounding (in float32, large deltas round differently by up to ~1e-4)."""
    return KINDS[kind][0](seed).to(dtype=torch.float64)
# per kind, 24 steps each (~5 s), seeds from 1: seed 1 reaches a fused layer whose weights went to 0 and back (the
# bug fixed in e14e0cd) on both kinds; hunt with more (60 per kind passed)
SEQUENCES = int(os.environ.get("LORA_TEST_SEQUENCES", 1))

# adapters that reach different layers: attention of both models, UNet cross-attention only, everything (the
# UNet's convolutions and the text encoder's MLP too); and a ComfyUI extraction (every weight a full-rank LoRA, and
# deltas to biases, norms and the embedding table, which go into those parameters)
ADAPTERS = {"a0": {"rank": 2}, "a1": {"rank": 3, "alpha": 1.5, "unet_targets": "cross", "text_encoder_targets": None},
            "a2": {"rank": 2, "alpha": 6.0, "unet_targets": "full", "text_encoder_targets": "attn-mlp"}, "x3": None}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """Per kind of pipeline, a folder of the ``ADAPTERS`` files for it (and a broken one), made on first use."""
    made: dict = {}

    def folder(kind: str):
        if kind not in made:
            made[kind] = _write_files(tmp_path_factory.mktemp(f"loras_{kind}"), KINDS[kind][0])  # (files: float32)
        return made[kind]

    return folder


def _write_files(folder, make):
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        if kwargs is not None:
            write_lora_file(folder / f"{name}.safetensors", random_lora(make(0), seed=i, std=0.2, **kwargs),
                            dtype=torch.float32)
    save_file(comfyui_extraction(make(0), move_weights(make(0), 0.05)), str(folder / "x3.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return folder


def _models(pipe) -> list:
    return [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def _outputs(pipe) -> tuple[torch.Tensor, ...]:
    """The UNet's output and each text encoder's hidden states, on fixed inputs."""
    g, dtype = torch.Generator().manual_seed(0), pipe.unet.dtype
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    x, ids = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype), torch.arange(2, 14)[None]
    ehs = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g, dtype=dtype)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g, dtype=dtype),
                                   "time_ids": torch.randn(2, 6, generator=g, dtype=dtype)}} if sdxl else {}
    with torch.no_grad():
        return (pipe.unet(x, 10, ehs, **extra).sample, *(m(ids).last_hidden_state for m in _models(pipe)[1:]))


class Expected:
    """What the pipeline should hold: the adapters in load order, each model's weights, on/off."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # a key of KINDS
        self.loaded: list[str] = []
        self.unet: dict[str, float] = {}
        self.te: dict[str, float] = {}
        self.blocks: dict[str, object] = {}  # per adapter, the block spec of the last set_adapters (a load: none)
        self.disabled = False

    def outputs(self, files, base, memo: dict) -> tuple[torch.Tensor, ...]:
        """The outputs of a pipeline built afresh in this state (``memo``: by state, as many steps keep it)."""
        if self.disabled or not self.loaded:
            return base
        key = repr((self.loaded, self.unet, self.te, self.blocks))
        if key not in memo:
            memo[key] = self._fresh(files)
        return memo[key]

    def _fresh(self, files) -> tuple[torch.Tensor, ...]:
        pipe = _make(self.kind)
        for name in self.loaded:
            load_lora(pipe, files / f"{name}.safetensors")
        set_adapters(pipe, {n: self.unet.get(n, 0.0) for n in self.loaded},
                     text_encoder={n: self.te.get(n, 0.0) for n in self.loaded},
                     blocks={n: self.blocks.get(n) for n in self.loaded})
        return _outputs(pipe)


def _step(rng: random.Random, pipe, files, want: Expected, block_specs: list) -> str:
    """One random operation on ``pipe`` and ``want``; returns what it did."""
    ops = ["set", "set", "prompt", "refused", "fuse", "unfuse", "disable", "enable", "cache"]
    ops += ["load"] * (len(want.loaded) < len(ADAPTERS)) * 2 + ["delete"] * bool(want.loaded)
    op = rng.choice(ops)
    if op == "load":
        name = rng.choice([n for n in ADAPTERS if n not in want.loaded])
        weight = rng.choice([1.0, 0.0, 0.6])
        load_lora(pipe, files / f"{name}.safetensors", weight=weight)
        want.loaded.append(name)
        want.unet[name] = want.te[name] = weight
        want.blocks[name] = None
        return f"load {name} at {weight}"
    if op == "delete":
        name = rng.choice(want.loaded)
        delete_adapter(pipe, name)
        want.loaded.remove(name)
        want.unet.pop(name, None), want.te.pop(name, None), want.blocks.pop(name, None)
        return f"delete {name}"
    if op == "set":
        if not want.loaded:
            return "set (nothing loaded)"
        chosen = rng.sample(want.loaded, rng.randint(0, len(want.loaded)))
        weights = {n: rng.choice([0.0, 0.5, 1.0, -0.7]) for n in chosen}
        te = rng.choice([None, 0.3, {n: rng.choice([0.0, 0.8]) for n in rng.sample(want.loaded, 1)}])
        spec = rng.choice(block_specs)
        blocks = {n: rng.choice(block_specs) for n in chosen[:1]} if chosen and rng.random() < 0.3 else spec
        set_adapters(pipe, weights, text_encoder=te, blocks=blocks)
        want.unet = dict(weights)
        want.te = {n: float(te) for n in weights} if isinstance(te, float) else {**weights, **(te or {})}
        per_adapter = isinstance(blocks, dict) and not {"down", "mid", "up"} & set(blocks)
        want.blocks = {n: blocks.get(n) if per_adapter else blocks for n in want.loaded}
        return f"set {weights} te={te} blocks={blocks}"
    if op == "prompt":  # A1111 tags: load what is missing, weight exactly the tagged ones
        tags = {n: rng.choice([(1.0, 1.0), (0.4, 0.4), (0.0, 0.9), (1.0, -0.5)]) for n in rng.sample(list(ADAPTERS), rng.randint(0, 2))}
        prompt = "a red circle " + " ".join(f"<lora:{n}:{te}:{unet}>" for n, (te, unet) in tags.items())
        assert apply_prompt_loras(pipe, prompt, files) == "a red circle"
        want.loaded += [n for n in tags if n not in want.loaded]
        want.unet, want.te = {n: unet for n, (_, unet) in tags.items()}, {n: te for n, (te, _) in tags.items()}
        want.blocks = {n: None for n in want.loaded}
        return f"prompt {prompt!r}"
    if op == "refused":  # each refused whole, the pipeline as it was (a file loaded on the way is taken out again)
        unloaded = [n for n in ADAPTERS if n not in want.loaded]
        first = f"<lora:{unloaded[0]}:0.5> " if unloaded else ""
        calls = [(KeyError, lambda: set_adapters(pipe, {"nope": 1.0})),
                 (FileNotFoundError, lambda: apply_prompt_loras(pipe, f"a {first}<lora:missing:1>", files)),
                 (LoraFormatError, lambda: apply_prompt_loras(pipe, f"a {first}<lora:broken:1>", files)),
                 (ValueError, lambda: apply_prompt_loras(pipe, "a <lora:../a0:1>", files)),
                 (FileNotFoundError, lambda: load_lora(pipe, files / "missing.safetensors"))]
        error, call = rng.choice(calls)
        with pytest.raises(error):
            call()
        return f"refused {error.__name__}"
    if op == "cache":
        enabled = rng.random() < 0.5
        cache_merged_weights(pipe, enabled)
        return f"cache {enabled}"
    {"fuse": fuse, "unfuse": unfuse, "disable": disable_lora, "enable": enable_lora}[op](pipe)
    want.disabled = {"disable": True, "enable": False}.get(op, want.disabled)
    return op


@pytest.mark.parametrize("kind, seed", [(kind, seed) for kind in KINDS for seed in range(1, 1 + SEQUENCES)])
def test_random_sequences_compute_what_a_fresh_pipeline_does(folders, kind, seed):
    files, rng, pipe, want = folders(kind), random.Random(seed), _make(kind), Expected(kind)
    base, memo = _outputs(_make(kind)), {}
    done = []
    for _ in range(24):
        done.append(_step(rng, pipe, files, want, KINDS[kind][1]))
        got, expected = _outputs(pipe), want.outputs(files, base, memo)
        for label, g, e in zip(("unet", "text encoder", "text encoder 2"), got, expected):
            if want.disabled or not want.loaded:
                assert torch.equal(g, e), (label, done)  # the base model exactly
            else:
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{label} after {done}: {m}")
