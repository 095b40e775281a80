"""Damaged files, systematically: every tensor mutation a truncated download, a wrong export or a hand edit makes
(a key dropped or renamed, a tensor transposed, cut, reshaped, emptied, made a number or an integer, NaN or Inf),
applied to a diffusers, a kohya, a LyCORIS LoHa and a ComfyUI-extraction file, either loads or is refused with a
LoraFormatError naming the file, from inspect and from load_lora alike; a refused load leaves the pipeline
computing exactly what it did, and a load that is accepted is taken out again by delete_adapter, bit for bit."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_diffusion import LoraFormatError, delete_adapter, list_adapters, load_lora
from lora_diffusion.formats import write_lora_file
from lora_diffusion.testing import random_lora, tiny_pipeline
from lora_diffusion.tools import convert_lora, inspect_lora

from conftest import comfyui_extraction, move_weights

MUTATIONS = {
    "drop": lambda t: None,
    "transpose": lambda t: t.transpose(0, 1).contiguous() if t.dim() >= 2 else t.reshape(-1, 1),
    "cut": lambda t: t[:-1].contiguous() if t.dim() and t.shape[0] > 1 else t.reshape(1, -1),
    "unsqueeze": lambda t: t.unsqueeze(0).contiguous(),
    "empty": lambda t: torch.zeros(0),
    "number": lambda t: torch.tensor(1.5),
    "int": lambda t: torch.ones(t.shape, dtype=torch.int32),
    "nan": lambda t: torch.full_like(t, float("nan")),
    "inf": lambda t: torch.full_like(t, float("inf")),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sources")
    diffusers = folder / "diffusers.safetensors"
    write_lora_file(diffusers, random_lora(tiny_pipeline(0), seed=1, rank=2, unet_targets="full"), dtype=torch.float32)
    kohya = convert_lora(diffusers, folder / "kohya.safetensors", to="kohya")
    loha = {}  # LyCORIS LoHa on the kohya file's Linear modules (its convs stay plain LoCon)
    with safe_open(str(kohya), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            module, up = key.removesuffix(".lora_down.weight"), state[key.replace("lora_down", "lora_up")]
            if down.dim() == 2:
                loha.update({f"{module}.hada_w1_a": up, f"{module}.hada_w1_b": down, f"{module}.hada_w2_a": up.flip(0),
                             f"{module}.hada_w2_b": down.clone(), f"{module}.alpha": torch.tensor(2.0)})
            else:
                loha.update({f"{module}.lora_down.weight": down, f"{module}.lora_up.weight": up})
    save_file(loha, str(folder / "loha.safetensors"))
    save_file(comfyui_extraction(tiny_pipeline(0), move_weights(tiny_pipeline(0), 0.05)), str(folder / "comfyui.safetensors"))
    return {"diffusers": diffusers, "kohya": kohya, "loha": folder / "loha.safetensors",
            "comfyui": folder / "comfyui.safetensors"}


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return (pipe.unet(torch.randn(1, 4, 8, 8, generator=g), 10, torch.randn(1, 77, 32, generator=g)).sample,
                pipe.text_encoder(torch.arange(2, 14)[None])[0])


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "loha", "comfyui"])
def test_every_damaged_file_loads_or_is_refused_naming_it(tmp_path, sources, fmt):
    with safe_open(str(sources[fmt]), "pt") as f:
        state, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    keys = sorted(state)
    targets = [keys[len(keys) // 2], next((k for k in keys if k.endswith(".alpha")), keys[0])]  # a factor, an alpha
    pipe = tiny_pipeline(0)
    base = _outputs(pipe)
    outcomes = set()
    for i, (what, mutate) in enumerate(MUTATIONS.items()):
        for key in targets:
            bad = dict(state)
            changed = mutate(state[key])
            if changed is None:
                del bad[key]
            else:
                bad[key] = changed
            path = tmp_path / f"{what}_{i}.safetensors"
            save_file(bad, str(path), metadata=header)
            case = f"{fmt}: {what} {key}"
            try:
                inspect_lora(path)
            except LoraFormatError as e:
                assert str(path) in str(e), (case, str(e))
            try:
                name = load_lora(pipe, path)
            except LoraFormatError as e:
                assert str(path) in str(e), (case, str(e))
                outcomes.add("refused")
            else:
                delete_adapter(pipe, name)
                outcomes.add("loaded")
            for got, want in zip(_outputs(pipe), base):
                assert torch.equal(got, want), case
    assert outcomes == {"refused", "loaded"}  # (a dropped alpha, say, loads: the rank stands in)


@pytest.mark.parametrize("keys, family", [
    (["transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight", "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight"], "FLUX.1"),
    (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight", "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"], "FLUX.1"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], "FLUX.1"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"], "SD3 / SD3.5"),
    (["transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight", "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"], "diffusion-transformer"),
    (["diffusion_model.blocks.0.self_attn.q.lora_A.weight", "diffusion_model.blocks.0.self_attn.q.lora_B.weight"], "video diffusion-transformer"),
])
def test_a_lora_for_another_model_family_says_which(tmp_path, keys, family):
    """FLUX / SD3 / other DiT LoRAs (the commonest wrong file) are named as such, whichever naming they use; the
    pipeline is left as it was."""
    down, up = keys
    save_file({down: torch.zeros(4, 64), up: torch.zeros(64, 4)}, str(tmp_path / "other.safetensors"))
    pipe = tiny_pipeline(0)
    with pytest.raises(LoraFormatError, match=rf"other.safetensors: .*{re.escape(family)}.*loads LoRAs for Stable Diffusion 1.x / 2.x and SDXL"):
        load_lora(pipe, tmp_path / "other.safetensors")
    assert not list_adapters(pipe)
