"""OFT and BOFT files (LyCORIS' ``diag-oft`` and ``boft``, kohya's ``networks.oft``, LyCORIS' first ``oft_diag``) load
as the exact delta they make on the model's own weights: against the rotations written out as dense matrices
(block-diagonal Cayley transforms, butterfly permutations), a weight that interpolates, the unfused weights while
fused, and errors that name the module and the shapes."""

import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion import disable_lora, enable_lora, fuse, load_lora, set_adapters, unfuse
from lora_diffusion.blend import merge_loras
from lora_diffusion.formats import LoraFormatError, read_lora_file
from lora_diffusion.formats_kohya import kohya_name
from lora_diffusion.oft import Oft, oft_delta
from lora_diffusion.testing import tiny_pipeline
from lora_diffusion.tools import convert_lora, inspect_lora

TO_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64
TO_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 32 -> 64
CONV = "unet.down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"  # Linear 32 -> 32


# ------------------------------------------------------------------ the rotations as dense matrices
def _cayley(blocks: torch.Tensor, bound: float, kohya: bool = False) -> list[torch.Tensor]:
    """Each block's ``(I + Q)(I - Q)^-1``, ``Q`` its skew-symmetric part, scaled (all blocks together) to the norm
    ``bound`` where it exceeds it, by the trainer's own rule."""
    q = blocks - blocks.transpose(-1, -2)
    norm = float(q.norm())
    if bound > 0 and (kohya or norm + 1e-8 > bound):
        q = q * ((min(norm, bound) + 1e-8) / (norm + 1e-8) if kohya else bound / (norm + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return [(eye + b) @ torch.linalg.inv(eye - b) for b in q.reshape(-1, *q.shape[-2:])]


def _butterfly(rows: int, stride: int) -> torch.Tensor:
    """The permutation matrix that puts row ``c * 2k + g * k + j`` at ``c * 2k + 2j + g`` (``k = stride``): rows
    ``stride`` apart side by side."""
    p = torch.zeros(rows, rows, dtype=torch.float64)
    for r in range(rows):
        c, g, j = r // (2 * stride), (r // stride) % 2, r % stride
        p[c * 2 * stride + 2 * j + g, r] = 1
    return p


def _reference(oft: Oft, weight: torch.Tensor) -> torch.Tensor:
    """``W'`` of ``oft`` on ``weight`` (fp64), as full matrices: ``R^T W`` (OFT), ``P_i^T R_i P_i`` in turn (BOFT)."""
    w = weight.double().reshape(weight.shape[0], -1)
    rows, blocks = w.shape[0], oft.blocks.double()
    if oft.rotations:
        out = torch.block_diag(*blocks).T @ w
    elif blocks.dim() == 3:
        out = torch.block_diag(*_cayley(blocks, oft.constraint * rows, oft.kohya)).T @ w
    else:
        rs, out = _cayley(blocks, oft.constraint * rows), w
        per = blocks.shape[1]
        for i in range(blocks.shape[0]):
            p = _butterfly(rows, 2**i * blocks.shape[-1] // 2)
            out = p.T @ torch.block_diag(*rs[i * per:(i + 1) * per]) @ p @ out
    if oft.rescale is not None:
        out = oft.rescale.double().reshape(rows, 1) * out
    return out.reshape(weight.shape)


def _blocks(shape, seed, scale=0.1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


@pytest.mark.parametrize("case", ["oft", "oft-constrained", "kohya-constrained", "oft-rescaled", "oft_diag", "boft",
                                  "boft-rescaled-constrained", "oft-conv", "boft-conv"])
def test_delta_equals_the_dense_rotation(case):
    conv = case.endswith("conv")
    weight = _blocks((32, 8, 3, 3) if conv else (64, 24), 0, 1.0)
    rows = weight.shape[0]
    boft = case.startswith("boft")
    blocks = _blocks((3, rows // 4, 4, 4) if boft else (rows // 8, 8, 8), 1, 0.3)
    rescale = 1 + _blocks((rows, 1), 2) if "rescaled" in case else None
    if case == "oft_diag":  # the rotations themselves: any orthogonal blocks
        blocks = torch.linalg.qr(_blocks((rows // 8, 8, 8), 3, 1.0)).Q
    bound = float((blocks - blocks.transpose(-1, -2)).norm()) / 2 / rows if "constrained" in case else 0.0
    oft = Oft(blocks, case == "oft_diag", bound, rescale, kohya=case.startswith("kohya"))
    delta = oft_delta(oft, weight)
    assert delta.dtype == torch.float64 and delta.shape == weight.shape
    torch.testing.assert_close(weight + delta, _reference(oft, weight), rtol=0, atol=1e-12)
    if rescale is None:  # a rotation of the output rows keeps each column's norm
        cols = weight.reshape(rows, -1)
        torch.testing.assert_close((cols + delta.reshape(rows, -1)).norm(dim=0), cols.norm(dim=0), rtol=1e-12, atol=0)
    if "constrained" in case:  # the bound binds: the unconstrained rotation is another one
        free = oft_delta(oft._replace(constraint=0.0), weight)
        assert (free - delta).abs().max() > 1e-3


def test_zero_blocks_rotate_nothing_and_fp32_weights_get_fp32_deltas():
    weight = _blocks((64, 24), 0, 1.0).float()
    assert not oft_delta(Oft(torch.zeros(8, 8, 8)), weight).any()
    assert not oft_delta(Oft(torch.zeros(3, 16, 4, 4)), weight).any()
    delta = oft_delta(Oft(_blocks((8, 8, 8), 1).float()), weight)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), oft_delta(Oft(_blocks((8, 8, 8), 1)), weight.double()), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ files
def _write(path, modules: dict[str, dict[str, torch.Tensor]], prefix: str = "lora_unet_"):
    """A file of ``{canonical key: {role: tensor}}`` under kohya names (``prefix`` for the UNet's)."""
    state = {}
    for key, roles in modules.items():
        name = kohya_name(key).replace("lora_unet_", prefix, 1)
        state.update({f"{name}.{role}": t.float().contiguous() for role, t in roles.items()})
    save_file(state, str(path))
    return path


def _layer_weight(pipe, key):
    """The layer ``key`` names (a text encoder's with or without ``text_model.``: transformers 5 flattened
    CLIPTextModel, not CLIPTextModelWithProjection)."""
    component, path = key.split(".", 1)
    model = getattr(pipe, component)
    modules = dict(model.named_modules())
    return modules.get(path) or modules[path.removeprefix("text_model.")]


def _modules():
    return {
        TO_Q: {"oft_blocks": _blocks((8, 8, 8), 10, 0.3), "alpha": torch.tensor(0.0)},
        TO_K: {"oft_blocks": _blocks((3, 16, 4, 4), 11, 0.3), "alpha": torch.tensor(1e-3), "rescale": 1 + _blocks((64, 1), 12)},
        CONV: {"oft_blocks": _blocks((4, 8, 8), 13, 0.3), "alpha": torch.tensor(0.0)},
        TE_Q: {"oft_blocks": _blocks((4, 8, 8), 14, 0.3), "alpha": torch.tensor(0.0)},
    }


def _oft_of(roles, kohya=False) -> Oft:
    return Oft(roles["oft_blocks"].float(), False, float(roles["alpha"]), roles.get("rescale"), kohya)


def check_file_loads_as(path, keys: list[str], weight_of) -> None:
    """A file whose modules make their layers' weights ``weight_of(key, W)`` (fp64) loads so: every such layer
    computes with ``W'`` (fused, unfused: the same outputs); a weight interpolates ``W + w (W' - W)``; disabled is the
    base model; unfuse restores the base weights bit for bit. (Also used by tests/test_glora.py.)"""
    pipe = tiny_pipeline(0)
    base = {key: _layer_weight(pipe, key).weight.detach().clone() for key in keys}
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500])
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs():
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
            return text, pipe.unet(latents, t, encoder_hidden_states=text).sample

    before = outputs()
    adapter = load_lora(pipe, path)
    assert adapter == path.stem
    unfused = outputs()
    assert (unfused[1] - before[1]).abs().max() > 1e-3 and (unfused[0] - before[0]).abs().max() > 1e-3
    fuse(pipe)
    for key in keys:
        torch.testing.assert_close(_layer_weight(pipe, key).weight.double(), weight_of(key, base[key]), rtol=0, atol=2e-6)
    for got, want in zip(outputs(), unfused):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    set_adapters(pipe, {adapter: 0.5})
    for key in keys:
        expect = base[key].double() + 0.5 * (weight_of(key, base[key]) - base[key].double())
        torch.testing.assert_close(_layer_weight(pipe, key).weight.double(), expect, rtol=0, atol=2e-6)
    unfuse(pipe)
    for key in keys:
        assert torch.equal(_layer_weight(pipe, key).base_layer.weight, base[key])
    disable_lora(pipe)
    for got, want in zip(outputs(), before):
        assert torch.equal(got, want)
    enable_lora(pipe)
    set_adapters(pipe, {adapter: 1.0})
    for got, want in zip(outputs(), unfused):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_lycoris_oft_file_loads_as_the_rotated_weights(tmp_path):
    modules = _modules()
    path = _write(tmp_path / "oft.safetensors", modules)
    check_file_loads_as(path, list(modules), lambda key, weight: _reference(_oft_of(modules[key]), weight))


def test_kohya_oft_names_and_constraint(tmp_path):
    """kohya's ``networks.oft`` file (``oft_unet_`` names, its own constraint rule) loads onto the same layers."""
    roles = {"oft_blocks": _blocks((8, 8, 8), 20, 0.5), "alpha": torch.tensor(1e-3)}
    assert float((roles["oft_blocks"] - roles["oft_blocks"].transpose(1, 2)).norm()) > 1e-3 * 64  # it binds
    path = _write(tmp_path / "kohya_oft.safetensors", {TO_Q: roles}, prefix="oft_unet_")
    lora, header = read_lora_file(path)
    assert header["_format"] == "lycoris" and list(lora) == [TO_Q] and lora[TO_Q].oft.kohya
    pipe = tiny_pipeline(0)
    base = _layer_weight(pipe, TO_Q).weight.detach().clone()
    load_lora(pipe, path)
    fuse(pipe)
    torch.testing.assert_close(_layer_weight(pipe, TO_Q).weight.double(), _reference(_oft_of(roles, kohya=True), base),
                               rtol=0, atol=2e-6)


def test_old_lycoris_oft_diag_is_the_rotation_itself(tmp_path):
    rotations = torch.linalg.qr(_blocks((8, 8, 8), 30, 1.0)).Q
    path = _write(tmp_path / "diag.safetensors", {TO_Q: {"oft_diag": rotations}})
    pipe = tiny_pipeline(0)
    base = _layer_weight(pipe, TO_Q).weight.detach().clone()
    load_lora(pipe, path)
    fuse(pipe)
    expect = torch.block_diag(*rotations).T @ base.double()
    torch.testing.assert_close(_layer_weight(pipe, TO_Q).weight.double(), expect, rtol=0, atol=2e-6)


def test_oft_files_inspect_and_refuse_what_needs_the_base_weights(tmp_path):
    path = _write(tmp_path / "oft.safetensors", _modules())
    info = inspect_lora(path)
    assert info["module_kinds"] == {"OFT": 4} and info["ranks"] == {} and info["params"] == 512 + 768 + 256 + 256
    from ui.library import LoraLibrary

    assert LoraLibrary(tmp_path).info("oft").rank == "BOFT, OFT"  # (the UI's library table: no rank of 0)
    with pytest.raises(ValueError, match=r"q_proj is an OFT module, whose delta depends on the base model's weights"):
        merge_loras({str(path): 1.0}, str(tmp_path / "merged.safetensors"))
    for to in ("kohya", "diffusers"):
        with pytest.raises(LoraFormatError, match=rf"is (an OFT|a BOFT) module, which acts on the base model's weights: .* not written as {to}"):
            convert_lora(path, tmp_path / f"as_{to}.safetensors", to=to)
        assert not (tmp_path / f"as_{to}.safetensors").exists()


@pytest.mark.parametrize("roles, match", [
    ({"oft_blocks": torch.zeros(4, 8, 8)}, r"to_q has OFT blocks \[4, 8, 8\] for 32 output rows; the layer's weight \[64, 64\] has 64"),
    ({"oft_blocks": torch.zeros(8, 8, 4)}, r"has oft_blocks of shape \[8, 8, 4\]; it needs \[blocks, size, size\]"),
    ({"oft_blocks": torch.zeros(8, 8, 8), "rescale": torch.ones(32, 1)}, r"has a rescale of shape \[32, 1\]; .* \(64\)"),
    ({"oft_blocks": torch.zeros(6, 16, 4, 4)}, r"BOFT blocks \[6, 16, 4, 4\] whose butterfly does not divide the layer's 64"),
    ({"oft_blocks": torch.zeros(8, 8, 8), "oft_diag": torch.zeros(8, 8, 8)}, "has both oft_blocks and oft_diag"),
    ({"rescale": torch.ones(64, 1)}, r"has only \['rescale'\]: no oft_blocks"),
    ({"oft_blocks": torch.zeros(8, 8, 8), "dora_scale": torch.ones(64, 1)}, "OFT blocks and a DoRA magnitude"),
])
def test_oft_modules_that_do_not_fit_name_the_module_and_shapes(tmp_path, roles, match):
    check_refused(_write(tmp_path / "bad.safetensors", {CONV: {"oft_blocks": _blocks((4, 8, 8), 40)}, TO_Q: roles}), match)  # (one fits)


def check_refused(path, match: str) -> None:
    """Loading ``path`` raises a ``LoraFormatError`` matching ``match`` and naming the file, and changes no weight.
    (Also used by tests/test_glora.py.)"""
    pipe = tiny_pipeline(0)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(LoraFormatError, match=match) as err:
        load_lora(pipe, path)
    assert path.name in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_an_sdxl_oft_file_under_sgm_names_rotates_both_unet_and_second_text_encoder(tmp_path):
    from lora_diffusion.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    unet_key = "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_q"  # SGM: middle_block_1_..., 64 rows
    te_key = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"  # 48 rows
    blocks = {unet_key: _blocks((8, 8, 8), 50, 0.3), te_key: _blocks((6, 8, 8), 51, 0.3)}
    state = {f"{kohya_name(k, sdxl=True)}.oft_blocks": b.float() for k, b in blocks.items()}
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_q.oft_blocks" in state
    save_file(state, str(tmp_path / "xl_oft.safetensors"))
    base = {k: _layer_weight(pipe, k).weight.detach().clone() for k in blocks}
    load_lora(pipe, tmp_path / "xl_oft.safetensors")
    fuse(pipe)
    for key, b in blocks.items():
        torch.testing.assert_close(_layer_weight(pipe, key).weight.double(), _reference(Oft(b.float()), base[key]),
                                   rtol=0, atol=2e-6)
