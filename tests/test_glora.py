"""LyCORIS GLoRA (both layouts, Tucker convs) and (IA)^3 files load as the exact delta they make on the model's own
weights: against the formulas written out here (a weight that interpolates, fused equals unfused, unfuse restores,
disabled is the base), and errors that name the module and the shapes. (LyCORIS', ComfyUI's and A1111's own code:
``interop/glora/``.)"""

import pytest
import torch
from test_oft import CONV, TE_Q, TO_K, TO_Q, _blocks, _write, check_file_loads_as, check_refused

from lora_diffusion import load_lora
from lora_diffusion.blend import merge_loras
from lora_diffusion.formats import LoraFormatError, read_lora_file
from lora_diffusion.glora import Glora, Ia3
from lora_diffusion.testing import tiny_pipeline
from lora_diffusion.tools import convert_lora, inspect_lora

PROJ = "unet.down_blocks.1.attentions.0.proj_in"  # Conv2d 64 -> 64, 1x1
TE_FC = "text_encoder.text_model.encoder.layers.1.mlp.fc1"  # Linear 32 -> 37


def _contract_input(weight: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W A`` over the input channels: ``(W A)[o, j, ...] = sum_i W[o, i, ...] A[i, j]``, by moving the input axis last."""
    moved = weight.movedim(1, -1)
    return (moved @ a).movedim(-1, 1)


def _glora_reference(roles: dict, weight: torch.Tensor) -> torch.Tensor:
    """``W' = W + s (W A + B)`` (fp64), read by the layout the test wrote it in (``roles["layout"]``)."""
    w = weight.double()
    a1, a2, b1, b2 = (roles[k].double().reshape(roles[k].shape[0], -1) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    if roles["layout"] == "old":  # a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]
        a, b, rank = a2 @ a1, b2 @ b1, a1.shape[0]
    else:
        a, b, rank = a1 @ a2, b1 @ b2, a2.shape[0]
    scale = float(roles["alpha"]) / rank if "alpha" in roles else 1.0
    return w + scale * (_contract_input(w, a) + b.reshape(w.shape))


def _glora_roles(layout: str, out: int, cols: int, rank: int, seed: int, kernel=None, alpha=None) -> dict:
    k = tuple(kernel or ())
    if layout == "old":
        shapes = {"a1.weight": (rank, cols), "a2.weight": (cols, rank), "b1.weight": (rank, cols), "b2.weight": (out, rank)}
    else:
        one = (1, 1) if k else ()
        shapes = {"a1.weight": (cols, rank, *one), "a2.weight": (rank, cols, *one), "b1.weight": (out, rank, *one),
                  "b2.weight": (rank, cols, *k)}
    roles = {name: _blocks(shape, seed + i, 0.3) for i, (name, shape) in enumerate(shapes.items())}
    if alpha is not None:
        roles["alpha"] = torch.tensor(float(alpha))
    return {**roles, "layout": layout}


def _ia3_reference(roles: dict, weight: torch.Tensor) -> torch.Tensor:
    w, v = weight.double(), roles["weight"].double().reshape(-1)
    if int(roles["on_input"]):
        return torch.stack([w[:, i] * (1 + v[i]) for i in range(w.shape[1])], 1)
    return torch.stack([w[o] * (1 + v[o]) for o in range(w.shape[0])], 0)


def _module(roles: dict) -> Glora:
    get = {k: v for k, v in roles.items() if k != "layout"}
    return Glora(get["a1.weight"], get["a2.weight"], get["b1.weight"], get["b2.weight"],
                 float(get["alpha"]) if "alpha" in get else None)


@pytest.mark.parametrize("case", ["new-square", "new-wide", "old-square", "old-wide", "new-conv3", "new-conv1"])
def test_glora_delta_equals_the_formula(case):
    layout, kind = case.split("-")
    out, cols = (64, 64) if kind in ("square", "conv1") else (64, 24) if kind == "wide" else (32, 8)
    kernel = (3, 3) if kind == "conv3" else (1, 1) if kind == "conv1" else None
    weight = _blocks((out, cols, *(kernel or ())), 0, 1.0)
    roles = _glora_roles(layout, out, cols, 4, 1, kernel, alpha=2.0)
    module = _module(roles)
    assert module.old_layout == (layout == "old") and module.rank == 4
    delta = module.delta(weight)
    assert delta.dtype == torch.float64 and delta.shape == weight.shape
    torch.testing.assert_close(weight + delta, _glora_reference(roles, weight), rtol=0, atol=1e-12)


@pytest.mark.parametrize("on_input, conv", [(False, False), (True, False), (False, True), (True, True)])
def test_ia3_delta_scales_rows_or_columns(on_input, conv):
    weight = _blocks((32, 8, 3, 3) if conv else (64, 24), 0, 1.0)
    n = weight.shape[1] if on_input else weight.shape[0]
    roles = {"weight": _blocks((1, n, 1, 1) if conv else (n,), 1, 0.5), "on_input": torch.tensor(int(on_input))}
    delta = Ia3(roles["weight"], on_input).delta(weight)
    torch.testing.assert_close(weight + delta, _ia3_reference(roles, weight), rtol=0, atol=1e-12)


def _glora_file_modules() -> dict:
    return {
        TO_Q: _glora_roles("new", 64, 64, 4, 10, alpha=2.0),  # square: both layouts' shapes fit; a2 [r, in] is the new
        TO_K: _glora_roles("new", 64, 32, 4, 20),  # (no alpha: scale 1)
        CONV: _glora_roles("new", 32, 32, 4, 30, (3, 3), alpha=8.0),
        PROJ: {k: v.reshape(*v.shape, 1, 1) if k.endswith("weight") else v  # LyCORIS 2's layout on a 1x1 conv
               for k, v in _glora_roles("old", 64, 64, 2, 40, alpha=1.0).items()},
        TE_Q: _glora_roles("old", 32, 32, 4, 50, alpha=4.0),  # LyCORIS 2's layout, the one A1111 reads
    }


def _ia3_file_modules() -> dict:
    return {
        TO_Q: {"weight": _blocks((64,), 60, 0.5), "on_input": torch.tensor(0)},
        TO_K: {"weight": _blocks((32,), 61, 0.5), "on_input": torch.tensor(1)},  # (input columns: 32 of them)
        CONV: {"weight": _blocks((1, 32, 1, 1), 62, 0.5), "on_input": torch.tensor(0)},
        TE_FC: {"weight": _blocks((37,), 63, 0.5), "on_input": torch.tensor(0)},
    }


def _strip(modules: dict) -> dict:
    return {key: {k: v for k, v in roles.items() if k != "layout"} for key, roles in modules.items()}


@pytest.mark.parametrize("kind", ["GLoRA", "(IA)^3"])
def test_a_file_loads_as_the_weights_it_makes(tmp_path, kind):
    modules = _glora_file_modules() if kind == "GLoRA" else _ia3_file_modules()
    reference = _glora_reference if kind == "GLoRA" else _ia3_reference
    path = _write(tmp_path / "lyco.safetensors", _strip(modules))
    lora, header = read_lora_file(path)
    assert header["_format"] == "lycoris" and {w.oft.kind for w in lora.values()} == {kind}
    check_file_loads_as(path, list(modules), lambda key, weight: reference(modules[key], weight))


def test_glora_and_ia3_files_inspect_and_refuse_what_needs_the_base_weights(tmp_path):
    path = _write(tmp_path / "glora.safetensors", _strip(_glora_file_modules()))
    info = inspect_lora(path)
    assert info["module_kinds"] == {"GLoRA": 5} and info["ranks"] == {}
    assert info["params"] == sum(t.numel() for roles in _strip(_glora_file_modules()).values() for k, t in roles.items() if k != "alpha")
    from ui.library import LoraLibrary

    assert LoraLibrary(tmp_path).info("glora").rank == "GLoRA"
    with pytest.raises(ValueError, match=r"is a GLoRA module, whose delta depends on the base model's weights"):
        merge_loras({str(path): 1.0}, str(tmp_path / "merged.safetensors"))
    ia3 = _write(tmp_path / "ia3.safetensors", _strip(_ia3_file_modules()))
    for source in (path, ia3):
        with pytest.raises(LoraFormatError, match=r"is (a GLoRA|an \(IA\)\^3) module, which acts on the base model's weights"):
            convert_lora(source, tmp_path / "as_kohya.safetensors", to="kohya")
        assert not (tmp_path / "as_kohya.safetensors").exists()


@pytest.mark.parametrize("roles, match", [
    (_glora_roles("new", 64, 32, 4, 1), r"to_q has GLoRA factors for a \[64, 32, \.\.\.\] weight; the layer's is \[64, 64\]"),
    ({**_glora_roles("new", 64, 64, 4, 1), "b2.weight": torch.zeros(3, 5)}, r"to_q has GLoRA factors that do not fit together: a1 \[64, 4\], .* b2 \[3, 5\]"),
    ({k: v for k, v in _glora_roles("new", 64, 64, 4, 1).items() if k != "b1.weight"}, "to_q has GLoRA keys without b1.weight"),
    ({**_glora_roles("new", 64, 64, 4, 1), "dora_scale": torch.ones(64, 1)}, "GLoRA factors and a DoRA magnitude"),
    ({**_glora_roles("new", 64, 64, 4, 1), "bm.weight": torch.ones(4, 4, 1, 1)}, r"GLoRA Tucker core \(bm.weight\)"),
    ({**_glora_roles("new", 64, 64, 4, 1), "b2.weight": torch.ones(4, 64, 3, 3)},
     r"to_q has a GLoRA b2 of shape \[4, 64, 3, 3\]; the layer's weight \[64, 64\] needs 64 values per row"),
    ({"weight": torch.zeros(32), "on_input": torch.tensor(0)}, r"to_q has an \(IA\)\^3 weight of 32 values for the layer's output rows \(64"),
    ({"weight": torch.zeros(4, 4), "on_input": torch.tensor(0)}, r"has an \(IA\)\^3 weight of shape \[4, 4\]; it needs \[n\]"),
    ({"weight": torch.zeros(64), "on_input": torch.tensor(2)}, r"has on_input \[?2\]?; it is 0 or 1"),
    ({"weight": torch.zeros(64)}, r"an \(IA\)\^3 module has weight and on_input"),
])
def test_modules_that_do_not_fit_name_the_module_and_shapes(tmp_path, roles, match):
    modules = {CONV: _glora_roles("new", 32, 32, 4, 30, (3, 3)), TO_Q: roles} if "a1.weight" in roles else \
        {TO_K: {"weight": _blocks((64,), 2), "on_input": torch.tensor(0)}, TO_Q: roles}  # (one fits)
    check_refused(_write(tmp_path / "bad.safetensors", _strip(modules)), match)


def test_the_first_glora_layout_on_a_3x3_conv_is_refused(tmp_path):
    roles = {k: v.reshape(*v.shape, 1, 1) if k.endswith("weight") else v for k, v in _glora_roles("old", 32, 32, 4, 3).items()}
    path = _write(tmp_path / "old_conv.safetensors", _strip({CONV: roles}))
    with pytest.raises(LoraFormatError, match=r"conv1 has GLoRA factors in LyCORIS' first layout, which is for Linear "
                                              r"and 1x1 conv layers; the layer's weight is \[32, 32, 3, 3\]"):
        load_lora(tiny_pipeline(0), path)
