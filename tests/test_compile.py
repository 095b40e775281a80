"""torch.compile of a model holding LoRA adapters (inference and the layer's training path).

* the UNet traces to one graph (``fullgraph=True``) with one or several adapters, fused or disabled (the eager
  multi-adapter cache is not traced: it broke the graph at every layer);
* a compiled UNet follows every change with results equal to eager: re-weighting (to 0 too) costs no recompile,
  because the compiled forward reads the weights from the ``lora_scales`` tensor; fuse, disable, load and delete
  recompile once;
* a pipeline that holds the compiled wrapper (``pipe.unet = torch.compile(pipe.unet)``) loads, re-weights, saves
  (keys without ``_orig_mod.``), fuses and trains like an eager one;
* ``.to()`` keeps the scales fp32 and carries the fused base copy, also for wrappers detached by ``fuse``.

``aot_eager`` runs dynamo + AOTAutograd and then the same aten ops as eager, so it checks what is traced (and
when it recompiles) in seconds; inductor's code generation is left to the opt-in training test and the GPU bench.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lora_diffusion import delete_adapter, disable_lora, enable_lora, fuse, inject_lora, load_lora, save_lora, set_adapters, unfuse
from lora_diffusion.formats import read_lora_file, write_lora_file
from lora_diffusion.inject import lora_layers
from lora_diffusion.layers import LoraLinear
from lora_diffusion.testing import random_lora

from conftest import compile_pipeline  # (a one-block UNet: half the trace time)

dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _graphs() -> int:
    return dynamo.utils.counters["stats"]["unique_graphs"]


def _pipe_with(tmp_path, n: int):
    pipe = compile_pipeline()
    for i in range(n):
        path = tmp_path / f"a{i}.safetensors"
        write_lora_file(path, random_lora(pipe, seed=i, alpha=4 + i), dtype=torch.float32)
        load_lora(pipe, path)
    return pipe


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor(10), torch.randn(2, 77, 32, generator=gen)


def test_compiled_unet_follows_every_change(tmp_path):
    pipe = _pipe_with(tmp_path, 2)
    unet = pipe.unet
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)  # a graph break anywhere fails
    x, t, ehs = _inputs()

    def agrees() -> torch.Tensor:
        with torch.no_grad():
            out, expect = compiled(x, t, ehs).sample, unet(x, t, ehs).sample
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
        return out

    def reweighting_does_not_recompile(*blends: dict[str, float]) -> list[torch.Tensor]:
        graphs, outputs = _graphs(), []
        for weights in blends:
            set_adapters(pipe, weights)
            outputs.append(agrees())
            assert _graphs() == graphs, f"re-weighting to {weights} recompiled"
        return outputs

    agrees()
    two = reweighting_does_not_recompile({"a0": 0.7, "a1": -0.3}, {"a0": 0.0, "a1": 0.0}, {"a0": 1.5, "a1": 0.2})
    assert not torch.equal(two[0], two[1]) and not torch.equal(two[1], two[2])
    with torch.no_grad():  # weight 0 everywhere is the base model
        plain = compile_pipeline().unet(x, t, ehs).sample
    torch.testing.assert_close(two[1], plain, rtol=0, atol=1e-6)
    set_adapters(pipe, {"a1": 0.5})  # another active set: compiled once more
    agrees()
    one = reweighting_does_not_recompile({"a1": -1.0}, {"a1": 0.0}, {"a1": 2.0})
    torch.testing.assert_close(one[1], plain, rtol=0, atol=1e-6)

    for change in (lambda: set_adapters(pipe, {"a0": 0.7, "a1": 0.4}), lambda: fuse(pipe),
                   lambda: set_adapters(pipe, {"a0": 0.5, "a1": 0.5}), lambda: unfuse(pipe), lambda: disable_lora(pipe),
                   lambda: enable_lora(pipe), lambda: delete_adapter(pipe, "a1")):
        change()
        agrees()
    load_lora(pipe, tmp_path / "a1.safetensors", adapter="again", weight=-0.5)
    agrees()
    fuse(pipe)  # compiled inference at the base's speed: fused, the graph is the base tree's, and re-fusing keeps it
    agrees()
    reweighting_does_not_recompile({"a0": 0.3, "again": 0.9}, {"a0": -1.0, "again": 0.0})


def test_pipeline_holding_the_compiled_unet(tmp_path):
    """diffusers users write ``pipe.unet = torch.compile(pipe.unet)``: every entry point sees the module behind it."""
    pipe, eager = compile_pipeline(), compile_pipeline()
    path = tmp_path / "style.safetensors"
    write_lora_file(path, random_lora(pipe, seed=3, alpha=8), dtype=torch.float32)
    pipe.unet = torch.compile(pipe.unet, backend="aot_eager")
    for p in (pipe, eager):
        load_lora(p, path)
        set_adapters(p, {"style": 0.6}, blocks={"down": 0.0, "mid": 1.0, "up": 0.5})
    assert [n for n, _ in lora_layers(pipe.unet)] == [n for n, _ in lora_layers(eager.unet)]
    assert all("_orig_mod" not in n for n, _ in lora_layers(pipe.unet))
    x, t, ehs = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, eager.unet(x, t, ehs).sample, rtol=0, atol=1e-6)

    save_lora(tmp_path / "out.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, adapter="style", dtype=torch.float32)
    saved, _ = read_lora_file(tmp_path / "out.safetensors")
    original, _ = read_lora_file(path)
    assert saved.keys() == original.keys()
    for key in original:
        assert torch.equal(saved[key].B, original[key].B), key

    fuse(pipe)
    fuse(eager)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, eager.unet(x, t, ehs).sample, rtol=0, atol=1e-6)
    unfuse(pipe)
    params = inject_lora(pipe.unet, rank=2, adapter="new")
    assert params and all(p.requires_grad for p in params)
    assert all("_orig_mod" not in n for n, _ in lora_layers(pipe.unet))


@pytest.mark.parametrize("alphas", [(3.0,), (3.0, 8.0)], ids=["one adapter", "two adapters"])
def test_compiled_layer_trains_like_eager(alphas):
    """The training path under compile (scales read from ``lora_scales``): the same loss and LoRA gradients as
    eager, bit for bit."""
    import copy

    torch.manual_seed(0)
    eager = LoraLinear(nn.Linear(16, 12))
    for i, alpha in enumerate(alphas):
        eager.add_adapter(f"a{i}", rank=2, alpha=alpha)
        with torch.no_grad():
            eager.lora_B[f"a{i}"].normal_()
        eager.lora_A[f"a{i}"].requires_grad_(True)
        eager.lora_B[f"a{i}"].requires_grad_(True)
    eager.set_weights({f"a{i}": 0.9 for i in range(len(alphas))})
    traced = copy.deepcopy(eager)
    compiled = torch.compile(traced, backend="aot_eager")
    x = torch.randn(3, 5, 16)
    losses = [model(x).square().mean() for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    for name in eager.specs:
        for store in ("lora_A", "lora_B"):
            grad = getattr(eager, store)[name].grad
            assert grad.abs().max() > 0 and torch.equal(getattr(traced, store)[name].grad, grad), f"{store}[{name}]"


def test_to_keeps_scales_fp32_and_moves_the_fused_base():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6))
    layer.add_adapter("a", rank=2, alpha=1.4)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    base = layer.base_layer.weight.detach().clone()
    layer.set_weights({"a": 0.3})
    assert torch.equal(layer.lora_scales, torch.tensor([0.3 * 0.7] * 2))
    layer.fuse()
    layer.to(torch.float64)
    assert layer.lora_scales.dtype == torch.float32 and layer._base_backup.dtype == torch.float64
    layer.unfuse()
    assert torch.equal(layer.base_layer.weight, base.double())
    layer.half()
    assert torch.equal(layer.lora_scales, torch.tensor([0.3 * 0.7] * 2))


def test_a_fused_model_moved_elsewhere_takes_its_adapters_along(tmp_path):
    """While fused the wrappers are out of the module tree; ``model.to(device)`` moves only the base layers, and
    unfusing (or re-weighting) must bring the adapters and the saved base weights after them."""
    pipe = _pipe_with(tmp_path, 2)
    fuse(pipe)
    pipe.unet.to("meta")
    unfuse(pipe)
    layers = [layer for _, layer in lora_layers(pipe.unet)]
    assert layers and all(p.device.type == "meta" for layer in layers for p in layer.parameters())
    assert all(layer.lora_scales.device.type == "meta" for layer in layers)


@pytest.mark.skipif(not os.environ.get("LORA_TEST_INDUCTOR"), reason="generates C++ kernels: ~80 s on 2 cores; LORA_TEST_INDUCTOR=1")
def test_inductor_compiled_unet_matches_eager_and_reweights_without_recompiling(tmp_path):
    pipe = _pipe_with(tmp_path, 2)
    compiled = torch.compile(pipe.unet, fullgraph=True)
    x, t, ehs = _inputs()
    for weights, new_graph in (({"a0": 1.0, "a1": 1.0}, True), ({"a0": 0.7, "a1": -1.1}, False), ({"a1": 0.5}, True),
                               ({"a1": 1.5}, False)):
        graphs = _graphs()
        set_adapters(pipe, weights)
        with torch.no_grad():
            out, expect = compiled(x, t, ehs).sample, pipe.unet(x, t, ehs).sample
        torch.testing.assert_close(out, expect, rtol=0, atol=2e-5)  # inductor reorders float ops: measured 2.4e-6
        assert (_graphs() > graphs) == new_graph, weights


def test_compiled_merged_weight_is_one_graph_and_follows_reweights(tmp_path, monkeypatch):
    """The merged-weight inference path (taken on a GPU for SD1.5's layers; forced here by zeroing each layer's
    thresholds) traces without a graph break, equals eager, and re-weights without recompiling."""
    merged, calls = LoraLinear._merged_forward, []

    def counted(self, *args):  # counted in eager only (a traced list append would recompile)
        if not torch.compiler.is_compiling():
            calls.append(1)
        return merged(self, *args)

    monkeypatch.setattr(LoraLinear, "_merged_forward", counted)
    pipe = _pipe_with(tmp_path, 2)
    layers = [layer for _, layer in lora_layers(pipe.unet) if layer._merge_min is not None]
    assert layers
    for layer in layers:
        layer._merge_min = (0, 0)
    compiled = torch.compile(pipe.unet, backend="aot_eager", fullgraph=True)
    x, t, ehs = _inputs()
    graphs = None
    for weights in ({"a0": 0.7, "a1": -0.3}, {"a0": 1.5, "a1": 0.2}):
        set_adapters(pipe, weights)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, t, ehs).sample, pipe.unet(x, t, ehs).sample, rtol=0, atol=1e-5)
        graphs = _graphs() if graphs is None else graphs
        assert _graphs() == graphs, "re-weighting recompiled"
    assert calls, "the merged weight was not used"


def test_eager_cache_is_not_written_from_a_compiled_frame():
    """Where dynamo gives up on a model's frame it runs it eagerly and compiles the frames it calls one by one,
    the layer's eager ``_stacked`` too. Under CUDA graphs that frame's outputs live in the graph's memory and are
    overwritten by the next replay, so the eager cache must not keep them (torch 2.11 on an H100: "accessing
    tensor output of CUDAGraphs that has been overwritten"). Eagerly the cache still fills."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8))
    for name in ("a", "b"):
        layer.add_adapter(name, rank=2, alpha=2)
        nn.init.normal_(layer.lora_B[name])
    names = ["a", "b"]
    with torch.no_grad():
        compiled = torch.compile(layer._stacked, backend="aot_eager")
        a_cat, b_cat = compiled(names, layer._factors(names), False)
        assert layer._cache is None, "a compiled frame wrote the eager cache"
        expect = layer._stacked(names, layer._factors(names), False)
    assert layer._cache is not None
    torch.testing.assert_close((a_cat, b_cat), expect, rtol=0, atol=0)
