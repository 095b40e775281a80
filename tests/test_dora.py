"""DoRA files (PEFT's ``lora_magnitude_vector``, LyCORIS' ``dora_scale``) and full deltas (``diff``) load as the exact
delta they make on the model's own weights: PEFT's DoRA outputs, the A1111 / LyCORIS formula per input column, a
multiplier that interpolates, the unfused weights while fused, and errors that name the module."""

import pytest
import torch
from safetensors.torch import save_file

peft = pytest.importorskip("peft")
from peft import LoraConfig, inject_adapter_in_model  # noqa: E402

from lora_diffusion import cache_merged_weights, fuse, load_lora, set_adapters, unfuse  # noqa: E402
from lora_diffusion.blend import merge_loras  # noqa: E402
from lora_diffusion.formats import LoraFormatError, read_lora_file, read_safetensors, write_lora_file  # noqa: E402
from lora_diffusion.formats_kohya import kohya_name  # noqa: E402
from lora_diffusion.testing import random_lora, tiny_pipeline  # noqa: E402
from lora_diffusion.tools import convert_lora, inspect_lora  # noqa: E402

from conftest import save_peft_lora  # noqa: E402

TO_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64
TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 64 (cross-attention)
CONV = "unet.down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3


def _module(pipe, key):
    return pipe.unet.get_submodule(key.split(".", 1)[1])


def _weight(pipe, key) -> torch.Tensor:
    """The weight a layer computes with: fused, or W0 + its active adapters' delta."""
    layer = _module(pipe, key)
    if hasattr(layer, "delta_weight"):
        return layer.base_layer.weight.detach().double() + layer.delta_weight().double()
    return layer.weight.detach().double()


def _outputs(pipe, text=None):
    """(text encoder output, UNet output on it, or on ``text``) for a fixed prompt, latents and timestep."""
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0] if text is None else text
        return text, pipe.unet(latents, t, encoder_hidden_states=text).sample


def _peft_dora_file(tmp_path, seed: int = 3):
    """The tiny pipeline with PEFT DoRA adapters (UNet q / v projections and resnet convs, text-encoder q / v) of
    random factors and magnitudes, and the diffusers file of them (``save_lora_weights``, as diffusers writes it)."""
    ref = tiny_pipeline(0)
    unet_cfg = LoraConfig(r=2, lora_alpha=3, target_modules=["to_q", "to_v", "conv1"], use_dora=True)
    te_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj"], use_dora=True)
    ref.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, ref.text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(ref.unet.named_parameters()) + list(ref.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return ref, save_peft_lora(ref, tmp_path, unet_cfg, te_cfg)


def test_peft_dora_file_gives_peft_outputs(tmp_path):
    """A diffusers / PEFT DoRA file gives PEFT's outputs (UNet linears and convs, text encoder), unfused, fused and
    with merged weights cached; converted to kohya it is a LyCORIS DoRA file with the same outputs, and back to
    diffusers a file that stock diffusers loads to the same outputs."""
    ref, path = _peft_dora_file(tmp_path / "peft")
    text_ref, unet_ref = _outputs(ref)
    pipe = tiny_pipeline(0)
    base_text, base_unet = _outputs(pipe)
    name = load_lora(pipe, path)
    assert (text_ref - base_text).abs().max() > 1e-2 and (unet_ref - base_unet).abs().max() > 1e-2  # it does something
    for mode in ("unfused", "cached", "fused"):
        if mode == "cached":
            cache_merged_weights(pipe)
        if mode == "fused":
            cache_merged_weights(pipe, enabled=False)
            fuse(pipe)
        text, unet = _outputs(pipe)
        torch.testing.assert_close(text, text_ref, rtol=1e-4, atol=1e-4, msg=mode)
        torch.testing.assert_close(unet, unet_ref, rtol=1e-4, atol=1e-4, msg=mode)
    unfuse(pipe)
    set_adapters(pipe, {name: 0.0})
    torch.testing.assert_close(_outputs(pipe)[1], base_unet, rtol=0, atol=1e-5)  # weight 0 is the base model

    info = inspect_lora(path)
    assert info["module_kinds"] == {"LoRA+DoRA": len(read_lora_file(path)[0])}
    kohya = convert_lora(path, tmp_path / "kohya.safetensors", to="kohya", dtype=torch.float32)
    state, header = read_safetensors(kohya)
    assert state[f"{kohya_name(CONV)}.dora_scale"].shape == (32, 1, 1, 1)  # per output row, as LyCORIS' wd_on_output
    assert read_lora_file(kohya)[1]["_format"] == "lycoris" and '"dora_wd": "True"' in header["ss_network_args"]
    back = convert_lora(kohya, tmp_path / "back.safetensors", to="diffusers", dtype=torch.float32)
    for file in (kohya, back):
        pipe = tiny_pipeline(0)
        load_lora(pipe, file)
        text, unet = _outputs(pipe)
        torch.testing.assert_close(text, text_ref, rtol=1e-4, atol=1e-4, msg=str(file))
        torch.testing.assert_close(unet, unet_ref, rtol=1e-4, atol=1e-4, msg=str(file))
    # stock diffusers loads the UNet's part (transformers 5.23's PEFT loader misnames a text encoder's DoRA
    # magnitudes, lora_magnitude_vector.default_0, in diffusers' own files as in ours, and leaves them at their init)
    stock = tiny_pipeline(0)
    stock.load_lora_weights(str(back))
    torch.testing.assert_close(_outputs(stock, text=text_ref)[1], unet_ref, rtol=1e-4, atol=1e-4)


def _lycoris_dora(pipe, seed: int, per_column: bool) -> dict[str, torch.Tensor]:
    """A LyCORIS DoRA state dict for TO_Q, TO_K and CONV: random factors, alpha 3 over rank 2, and a magnitude per
    input column (``[1, in, ...]``, A1111's reading) or per output row (``[out, 1, ...]``, ``wd_on_output``)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key in (TO_Q, TO_K, CONV):
        w = _module(pipe, key).weight
        kernel = w.shape[2:]
        name = kohya_name(key)
        state[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1], *kernel, generator=g) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, *[1] * len(kernel), generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(3.0)
        shape = (1, w.shape[1], *[1] * len(kernel)) if per_column else (w.shape[0], 1, *[1] * len(kernel))
        state[f"{name}.dora_scale"] = 1 + torch.rand(shape, generator=g)
    return state


def _a1111_weight(w0: torch.Tensor, state: dict, key: str, multiplier: float) -> torch.Tensor:
    """A1111's DoRA (``apply_weight_decompose``), written as it is there: each input column of ``V = W0 + s B A``
    scaled to the magnitude's length, then ``W0 + multiplier * (V' - W0)``."""
    name = kohya_name(key)
    down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
    delta = (up.flatten(1) @ down.flatten(1)).reshape(w0.shape) * 1.5
    v = w0.double() + delta
    norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1, keepdim=True).reshape(v.shape[1], *[1] * (v.dim() - 1)).transpose(0, 1)
    return w0.double() + multiplier * (v * (state[f"{name}.dora_scale"].double() / norm) - w0.double())


def test_lycoris_dora_per_column_is_a1111s(tmp_path):
    """A LyCORIS DoRA file with magnitudes per input column makes A1111's weights (linear and 3x3 conv) at weight 1
    and, interpolated, at 0.5; unfused and fused outputs agree; it is the same adapter converted to kohya, and a
    diffusers file, whose PEFT has no such DoRA, is refused naming the module."""
    pipe = tiny_pipeline(0)
    w0 = {key: _module(pipe, key).weight.detach().clone() for key in (TO_Q, TO_K, CONV)}
    state = _lycoris_dora(pipe, seed=1, per_column=True)
    path = tmp_path / "dora.safetensors"
    save_file(state, str(path))
    assert inspect_lora(path)["module_kinds"] == {"LoRA+DoRA": 3}
    name = load_lora(pipe, path)
    for weight in (1.0, 0.5):
        set_adapters(pipe, {name: weight})
        unfused = _outputs(pipe)[1]
        for key in w0:
            torch.testing.assert_close(_weight(pipe, key), _a1111_weight(w0[key], state, key, weight), rtol=1e-5, atol=1e-6)
        fuse(pipe)
        for key in w0:
            torch.testing.assert_close(_weight(pipe, key), _a1111_weight(w0[key], state, key, weight), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(_outputs(pipe)[1], unfused, rtol=1e-4, atol=1e-5)
        unfuse(pipe)
    out = convert_lora(path, tmp_path / "again.safetensors", to="kohya", dtype=torch.float32)
    again = read_safetensors(out)[0]
    assert all(torch.equal(again[k], state[k]) for k in state)
    with pytest.raises(LoraFormatError, match=rf"{CONV.split('.', 1)[1]}: a DoRA magnitude per input column .* convert --to kohya"):
        convert_lora(path, tmp_path / "as_diffusers.safetensors", to="diffusers")
    assert not (tmp_path / "as_diffusers.safetensors").exists()


def test_lycoris_dora_per_row_equals_peft_file(tmp_path):
    """LyCORIS' ``wd_on_output`` DoRA ([out, 1, ...]) is PEFT's: the same factors and magnitudes as a diffusers file
    make the same weights."""
    pipe = tiny_pipeline(0)
    state = _lycoris_dora(pipe, seed=2, per_column=False)
    save_file(state, str(tmp_path / "rows.safetensors"))
    lora = read_lora_file(tmp_path / "rows.safetensors")[0]
    write_lora_file(tmp_path / "rows_peft.safetensors", lora, format="diffusers", dtype=torch.float32)
    assert read_safetensors(tmp_path / "rows_peft.safetensors")[0][f"{TO_Q}.lora_magnitude_vector"].shape == (64,)
    weights = []
    for file in ("rows.safetensors", "rows_peft.safetensors"):
        pipe = tiny_pipeline(0)
        load_lora(pipe, tmp_path / file)
        weights.append([_weight(pipe, key) for key in (TO_Q, TO_K, CONV)])
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ref = tiny_pipeline(0)  # and stock diffusers (PEFT's DoRA) on the diffusers file
    ref.load_lora_weights(str(tmp_path / "rows_peft.safetensors"))
    torch.testing.assert_close(_outputs(pipe)[1], _outputs(ref)[1], rtol=1e-4, atol=1e-4)


def test_dora_loaded_into_a_fused_pipeline_uses_the_unfused_weights(tmp_path):
    """DoRA's delta depends on the weight: loaded while another adapter is fused, it is computed from the model's own
    weights, not the fused ones: the same weights as loading both first and fusing."""
    pipe = tiny_pipeline(0)
    write_lora_file(tmp_path / "style.safetensors", random_lora(pipe, seed=5, std=0.3), dtype=torch.float32)
    save_file(_lycoris_dora(pipe, seed=3, per_column=True), str(tmp_path / "dora.safetensors"))
    first = tiny_pipeline(0)
    load_lora(first, tmp_path / "style.safetensors")
    fuse(first)
    load_lora(first, tmp_path / "dora.safetensors")  # joins the fuse
    second = tiny_pipeline(0)
    load_lora(second, tmp_path / "dora.safetensors")
    load_lora(second, tmp_path / "style.safetensors")
    fuse(second)
    for key in (TO_Q, TO_K, CONV):
        torch.testing.assert_close(_weight(first, key), _weight(second, key), rtol=0, atol=1e-6)
    unfuse(first)
    set_adapters(first, {"style": 0.0, "dora": 0.0})
    torch.testing.assert_close(_outputs(first)[1], _outputs(tiny_pipeline(0))[1], rtol=0, atol=0)


def test_full_deltas_and_errors(tmp_path):
    """A1111's full deltas (``diff``) add themselves exactly (a Linear and a 3x3 conv); a DoRA magnitude that fits
    neither axis, a merge of a DoRA file and a LyCORIS norm delta are refused, naming the file and module."""
    pipe = tiny_pipeline(0)
    g = torch.Generator().manual_seed(0)
    diffs = {key: torch.randn(_module(pipe, key).weight.shape, generator=g) * 0.05 for key in (TO_K, CONV)}
    path = tmp_path / "full.safetensors"
    save_file({f"{kohya_name(key)}.diff": d for key, d in diffs.items()}, str(path))
    assert inspect_lora(path)["module_kinds"] == {"full": 2}
    w0 = {key: _module(pipe, key).weight.detach().clone() for key in diffs}
    load_lora(pipe, path)
    unfused = _outputs(pipe)[1]
    fuse(pipe)
    for key, d in diffs.items():
        torch.testing.assert_close(_weight(pipe, key), (w0[key] + d).double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(_outputs(pipe)[1], unfused, rtol=1e-4, atol=1e-5)

    dora = _lycoris_dora(pipe, seed=4, per_column=True)
    save_file(dora, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match=r"dora.safetensors: unet\.\S+ is a DoRA module, .* cannot be merged"):
        merge_loras({tmp_path / "dora.safetensors": 1.0}, tmp_path / "merged.safetensors")
    bad = {**dora, f"{kohya_name(TO_Q)}.dora_scale": torch.ones(65, 1)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraFormatError, match=rf"bad.safetensors: {TO_Q} has a DoRA magnitude of shape \[65, 1\]; .*\[64, 64\]"):
        load_lora(tiny_pipeline(0), tmp_path / "bad.safetensors")
    # (LyCORIS' norm deltas load into norms, tests/test_param_deltas.py; on a Linear its shape is wrong)
    save_file({**dora, f"{kohya_name(TO_Q)}.w_norm": torch.zeros(64)}, str(tmp_path / "norm.safetensors"))
    with pytest.raises(LoraFormatError, match=rf"norm.safetensors: {TO_Q}.weight: the file's delta has shape \[64\], the model's parameter \[64, 64\]"):
        load_lora(tiny_pipeline(0), tmp_path / "norm.safetensors")


def test_loha_with_dora():
    """LyCORIS DoRA on a LoHa module: the magnitude applies to ``W0 +`` the LoHa's delta (the LoRA it equals)."""
    pipe = tiny_pipeline(0)
    g = torch.Generator().manual_seed(0)
    name = kohya_name(TO_Q)
    parts = {"hada_w1_a": torch.randn(64, 2, generator=g), "hada_w1_b": torch.randn(2, 64, generator=g),
             "hada_w2_a": torch.randn(64, 2, generator=g), "hada_w2_b": torch.randn(2, 64, generator=g),
             "alpha": torch.tensor(1.0), "dora_scale": 1 + torch.rand(64, 1, generator=g)}  # fmt: skip
    w0 = _module(pipe, TO_Q).weight.detach().double()
    v = w0 + 0.5 * (parts["hada_w1_a"] @ parts["hada_w1_b"]).double() * (parts["hada_w2_a"] @ parts["hada_w2_b"]).double()
    expected = v * (parts["dora_scale"].double() / v.norm(dim=1, keepdim=True))
    from lora_diffusion.formats import from_lycoris

    (w,) = from_lycoris({f"{name}.{role}": t for role, t in parts.items()}).values()
    assert w.magnitude is not None and w.rank == 4
    from lora_diffusion.pipeline import apply_lora

    apply_lora(pipe.unet, "unet", {TO_Q: w}, "loha_dora")
    torch.testing.assert_close(_weight(pipe, TO_Q), expected, rtol=1e-5, atol=1e-5)
