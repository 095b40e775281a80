"""``cache_merged_weights``: unfused inference through a kept merged weight ``W + sum w s B A``.

* a call served from the kept weight is the uncached merged call bit for bit, and runs the base layer's ops alone;
* the kept weight follows every change (an optimizer step, a replaced parameter, a re-weight, an alpha edit, the
  base weight edited, a dtype cast, a deleted adapter), and is never used where autograd records;
* on a pipeline: the UNet's output equals the uncached merged call's, layers loaded later keep weights too, fusing
  and turning the cache off free them; a model compiled by hand never reads or writes them, while a compiled
  wrapper that ``cache_merged_weights`` hooked runs its graph on them, re-merged in place after each change.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lora_diffusion import cache_merged_weights, delete_adapter, fuse, load_lora, set_adapters, unfuse
from lora_diffusion.formats import write_lora_file
from lora_diffusion.inject import lora_layers
from lora_diffusion.layers import AdapterSpec, LoraConv2d, LoraLinear
from lora_diffusion.testing import OpCounter, random_lora, tiny_pipeline

from conftest import compile_pipeline


def _layer(kind: str, n: int, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = LoraLinear(nn.Linear(16, 12)), torch.randn(3, 5, 16)
    else:
        layer, x = LoraConv2d(nn.Conv2d(6, 8, 3, padding=1)), torch.randn(2, 6, 7, 7)
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        layer.add_adapter(f"a{i}", rank=i + 1, alpha=2.0 * i + 1.5)
        with torch.no_grad():
            for p in (layer.lora_A[f"a{i}"], layer.lora_B[f"a{i}"]):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    layer.set_weights({f"a{i}": (0.7, -1.2, 0.4)[i] for i in range(n)})
    return layer, x


def _uncached_merged(layer, x) -> torch.Tensor:
    """The uncached merged call on a copy of ``layer`` (merged whatever the input's size)."""
    twin = copy.deepcopy(layer)
    twin.merge_cache, twin._merged_key, twin._merged = False, None, None
    twin._merge_min = (0, 0)
    with torch.no_grad():
        return twin(x)


def _definition(layer, x) -> torch.Tensor:
    out = layer.base_layer(x)
    for n in layer._live():
        out = out + layer._low_rank(x, layer.lora_A[n], layer.lora_B[n]) * (layer.weights[n] * layer.specs[n].scale)
    return out.detach()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kept_weight_is_the_uncached_merged_call_and_the_base_layers_ops(kind, n):
    layer, x = _layer(kind, n)
    expect = _uncached_merged(layer, x)
    assert not torch.equal(expect, layer.base_layer(x).detach())
    layer.merge_cache = True
    with torch.no_grad():
        first = layer(x)  # makes the merged weight
        kept = layer._merged
        with OpCounter() as ops:
            again = layer(x)
        with OpCounter() as base_ops:
            layer.base_layer(x)
    assert kept is not None and layer._merged is kept and kept.shape == layer.base_layer.weight.shape
    assert torch.equal(first, expect) and torch.equal(again, expect)
    assert ops.total == base_ops.total, (dict(ops.counts), dict(base_ops.counts))
    torch.testing.assert_close(again, _definition(layer, x), rtol=1e-5, atol=1e-5)


def _optimizer_step(layer):
    with torch.no_grad():
        layer.lora_B["a1"].mul_(3.0)


def _replace_parameter(layer):
    layer.lora_A["a0"] = nn.Parameter(torch.randn_like(layer.lora_A["a0"]))


def _reweight(layer):
    layer.set_weights({"a0": 0.7, "a1": 2.0})


def _alpha_edit(layer):
    layer.specs["a0"] = AdapterSpec(rank=layer.specs["a0"].rank, alpha=7.0)  # (no _changed: the key holds the scale)


def _replace_data(layer):
    b = layer.lora_B["a1"]
    b.data = b.data * 3.0  # new storage, the same parameter object and version counter


def _replace_base_weight(layer):
    layer.base_layer.weight = nn.Parameter(layer.base_layer.weight.detach() * 0.5, requires_grad=False)


def _deactivate_in_place(layer):
    layer.active.remove("a1")  # Python state edited without _changed


def _weight_edit_in_place(layer):
    layer.weights["a0"] = 0.1


def _base_edit(layer):
    with torch.no_grad():
        layer.base_layer.weight.mul_(0.5)


def _to_double(layer):
    layer.double()


def _delete(layer):
    layer.delete_adapter("a1")


@pytest.mark.parametrize("change", [_optimizer_step, _replace_parameter, _replace_data, _reweight, _alpha_edit,
                                    _weight_edit_in_place, _deactivate_in_place, _base_edit, _replace_base_weight,
                                    _to_double, _delete], ids=lambda f: f.__name__.strip("_"))
def test_kept_weight_follows_every_change(change):
    layer, x = _layer("linear", 2)
    layer.merge_cache = True
    with torch.no_grad():
        before = layer(x)
        assert layer._merged is not None and torch.equal(layer(x), before)  # (the second call: the fast check)
    change(layer)
    x = x.to(layer.base_layer.weight.dtype)
    with torch.no_grad():
        after = layer(x)
    assert after.dtype != before.dtype or not torch.allclose(after, before)  # (a cast changes only the dtype)
    assert torch.equal(after, _uncached_merged(layer, x))
    torch.testing.assert_close(after, _definition(layer, x), rtol=1e-5, atol=1e-5)


def test_a_repeated_call_checks_the_kept_weight_without_rebuilding_its_key(monkeypatch):
    """The call after the first is served by ``_kept_valid`` (identity, versions and storage of what the weight was
    made from): ``_kept_merged`` and its key are not reached, and each adapter count returns the same bits."""
    for n in (1, 3):
        layer, x = _layer("linear", n)
        layer.merge_cache = True
        with torch.no_grad():
            first = layer(x)
            monkeypatch.setattr(LoraLinear, "_kept_merged", lambda *a: pytest.fail("the fast check was not used"))
            assert torch.equal(layer(x), first)
            monkeypatch.undo()


def test_spec_is_frozen():
    """Hyper-parameters change by replacing the spec (``set_lora_weights(alpha=...)``): the kept weight's check
    compares specs by identity."""
    layer, _ = _layer("linear", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.specs["a0"].alpha = 2.0
    a, b = layer.lora_A["a0"].detach().clone(), layer.lora_B["a0"].detach().clone()
    layer.set_lora_weights("a0", a, b, alpha=3.0)
    assert layer.specs["a0"] == AdapterSpec(rank=1, alpha=3.0)


def test_training_dropout_is_not_served_from_the_kept_weight():
    """Kept in eval; back in training mode an adapter with dropout runs adapter by adapter, with its dropout."""
    layer, x = _layer("linear", 1)
    layer.lora_dropout["a0"] = nn.Dropout(0.5)
    layer.merge_cache = True
    layer.eval()
    with torch.no_grad():
        kept = layer(x)
        assert layer._merged is not None
        layer.train()
        torch.manual_seed(0)
        dropped = layer(x)
    assert not torch.allclose(dropped, kept)
    twin = copy.deepcopy(layer)
    twin.merge_cache, twin._merged_key, twin._merged = False, None, None
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(dropped, twin(x))


def test_autograd_never_reads_the_kept_weight():
    """Training through a layer that keeps a merged weight: PEFT's ops and gradients, bit for bit as without it;
    a frozen call without ``no_grad`` (nothing requires grad) may use it."""
    layer, x = _layer("linear", 1)
    twin = copy.deepcopy(layer)
    layer.merge_cache = True
    with torch.no_grad():
        layer(x)
    kept = layer._merged
    for model in (layer, twin):
        model(x).square().sum().backward()
    assert layer._merged is kept
    for name in ("lora_A", "lora_B"):
        assert torch.equal(getattr(layer, name)["a0"].grad, getattr(twin, name)["a0"].grad)
    for p in layer.parameters():
        p.requires_grad_(False)
    out = layer(x)
    assert out.grad_fn is None and torch.equal(out, _uncached_merged(layer, x))


def test_factors_made_under_inference_mode_are_merged_each_call():
    with torch.inference_mode():
        layer, x = _layer("linear", 2)
        layer.merge_cache = True
        out = layer(x)
    assert layer._merged is None  # no version counters to tell a change by: never kept
    torch.testing.assert_close(out, _definition(layer, x), rtol=1e-5, atol=1e-5)


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.tensor(10), torch.randn(2, 77, 32, generator=gen)


def _unet_out(pipe, uncached: bool = False):
    if uncached:
        for _, layer in lora_layers(pipe.unet):
            layer._merge_min, saved = (0, 0), layer.merge_cache
            layer.merge_cache = False
    with torch.no_grad():
        out = pipe.unet(*_inputs()).sample
    if uncached:
        for _, layer in lora_layers(pipe.unet):
            layer.merge_cache = saved
    return out


def _kept(pipe) -> int:
    return sum(layer._merged is not None for component in (pipe.unet, pipe.text_encoder)
               for _, layer in lora_layers(component))


def test_pipeline_keeps_merged_weights_until_fused_or_turned_off(tmp_path):
    pipe = tiny_pipeline()
    for i, targets in enumerate(("cross", "attn-mlp")):
        lora = random_lora(pipe, seed=i, alpha=4 + i, unet_targets=targets)
        write_lora_file(tmp_path / f"a{i}.safetensors", lora, dtype=torch.float32)
    load_lora(pipe, tmp_path / "a0.safetensors")
    before = len(list(lora_layers(pipe.unet)))
    cache_merged_weights(pipe)
    load_lora(pipe, tmp_path / "a1.safetensors")  # layers made after the call keep weights too
    assert len(list(lora_layers(pipe.unet))) > before
    set_adapters(pipe, {"a0": 0.6, "a1": -0.8})
    layers = [layer for component in (pipe.unet, pipe.text_encoder) for _, layer in lora_layers(component)]
    assert layers and all(layer.merge_cache for layer in layers)
    with torch.no_grad():
        pipe.text_encoder(torch.arange(8)[None])
    cached = _unet_out(pipe)
    assert _kept(pipe) == len(layers)
    assert torch.equal(cached, _unet_out(pipe, uncached=True))
    fuse(pipe)
    assert _kept(pipe) == 0  # fusing frees them (the fused weights serve instead)
    torch.testing.assert_close(_unet_out(pipe), cached, rtol=1e-5, atol=1e-5)
    unfuse(pipe)
    set_adapters(pipe, {"a0": 0.6, "a1": 0.5})
    reweighted = _unet_out(pipe)
    assert not torch.allclose(reweighted, cached)
    assert torch.equal(reweighted, _unet_out(pipe, uncached=True))
    delete_adapter(pipe, "a1")
    assert torch.equal(_unet_out(pipe), _unet_out(pipe, uncached=True))
    cache_merged_weights(pipe, enabled=False)
    assert _kept(pipe) == 0 and not any(layer.merge_cache for layer in layers)


def test_dropout_set_after_the_kept_weight_is_followed():
    layer, x = _layer("linear", 1)
    layer.merge_cache = True
    with torch.no_grad():
        kept = layer(x)  # training mode, no dropout: kept
        assert layer._merged is not None
        layer.lora_dropout["a0"] = nn.Dropout(0.5)
        torch.manual_seed(0)
        dropped = layer(x)
    assert not torch.allclose(dropped, kept)


def test_compiled_graphs_read_kept_weights_only_through_a_hooked_wrapper(tmp_path):
    """A UNet compiled by hand (fullgraph) neither reads nor writes the kept weights of eager calls: it computes the
    same from the factors and leaves them as they were. ``cache_merged_weights`` on a pipeline holding a compiled
    wrapper hooks it: its graph runs the base ops on each layer's ``lora_kept`` (the eager kept weight's bits, one
    tensor with it), which the hook re-merges in place before a call after a change (a re-weight or a factor's
    step: no recompile); the wrapper compiled by hand still never reads them, even while they are stale."""
    from torch._dynamo.utils import counters

    import lora_diffusion.layers as layers_module

    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    pipe = compile_pipeline()
    with torch.no_grad():
        plain = pipe.unet(*_inputs()).sample
    for i in range(2):
        write_lora_file(tmp_path / f"a{i}.safetensors", random_lora(pipe, seed=i, alpha=3 + i), dtype=torch.float32)
        load_lora(pipe, tmp_path / f"a{i}.safetensors")
    set_adapters(pipe, {"a0": 0.7, "a1": -0.5})
    unet = pipe.unet
    cache_merged_weights(unet)
    layers = [layer for _, layer in lora_layers(unet)]
    assert all(layer.merge_cache for layer in layers)
    assert not any(layer.merge_cache for _, layer in lora_layers(pipe.text_encoder))
    eager = _unet_out(pipe)  # the eager kept weights
    kept = [layer._merged for layer in layers]
    assert all(w is not None for w in kept)
    by_hand = torch.compile(unet, backend="aot_eager", fullgraph=True)  # (fullgraph: a graph break fails)
    try:
        with torch.no_grad():
            hand = by_hand(*_inputs()).sample
        torch.testing.assert_close(hand, eager, rtol=1e-5, atol=1e-5)
        assert all(layer._merged is w for layer, w in zip(layers, kept)) and torch.equal(_unet_out(pipe), eager)
        graphs = counters["stats"]["unique_graphs"]
        cache_merged_weights(unet, enabled=False)
        cache_merged_weights(unet)
        with torch.no_grad():
            torch.testing.assert_close(by_hand(*_inputs()).sample, eager, rtol=1e-5, atol=1e-5)
        assert _kept(pipe) == 0  # nor made any
        assert counters["stats"]["unique_graphs"] == graphs  # (nor guarded on them: their going cost no recompile)
        eager = _unet_out(pipe)

        compiled = pipe.unet = torch.compile(unet, backend="aot_eager", fullgraph=True)
        cache_merged_weights(pipe)
        assert torch.equal(_unet_out(pipe), eager)  # aot_eager: the eager kept path's ops on the same tensors
        assert all(layer._merged is layer.lora_kept for layer in layers)  # one copy, shared with eager calls
        assert not layers_module._KEPT_IN_GRAPH
        graphs = counters["stats"]["unique_graphs"]
        with torch.no_grad():  # the graph reads the buffers: spoiled ones show in its output
            layers[0].lora_kept.zero_()
        assert not torch.allclose(_unet_out(pipe), eager)
        set_adapters(pipe, {"a0": 0.0, "a1": 0.0})  # every weight 0: the base weights, copied before each call
        torch.testing.assert_close(_unet_out(pipe), plain, rtol=1e-5, atol=1e-5)
        set_adapters(pipe, {"a0": 0.3, "a1": 0.9})  # the hook re-merges: no recompile, the eager output
        reweighted = _unet_out(pipe)
        assert not torch.allclose(reweighted, eager)
        pipe.unet = unet
        assert torch.equal(_unet_out(pipe), reweighted)
        with torch.no_grad():  # an optimizer-like step on a factor: followed too
            layers[-1].lora_B["a1"].add_(0.05)
        pipe.unet = compiled
        stepped = _unet_out(pipe)
        pipe.unet = unet
        assert not torch.equal(stepped, reweighted) and torch.equal(_unet_out(pipe), stepped)
        assert counters["stats"]["unique_graphs"] == graphs
        # a base weight and a factor replaced by new tensors, not edited in place: followed too
        replaced = stepped
        for replace in (lambda: layers[2].lora_A.__setitem__("a0", nn.Parameter(layers[2].lora_A["a0"].detach() * -2.0)),
                        lambda: setattr(layers[1].base_layer, "weight", nn.Parameter(layers[1].base_layer.weight.detach() * 1.5))):
            replace()
            pipe.unet, before = compiled, replaced
            replaced = _unet_out(pipe)
            pipe.unet = unet
            assert not torch.allclose(replaced, before) and torch.equal(_unet_out(pipe), replaced)
        # the wrapper compiled by hand, called while every kept buffer is stale: its own graph, from the factors
        stale = layers[0].lora_kept.clone()
        set_adapters(pipe, {"a0": -0.4, "a1": 0.2})
        with torch.no_grad():
            hand = by_hand(*_inputs()).sample
        assert torch.equal(layers[0].lora_kept, stale)  # (not re-merged by that call: stale while it ran)
        pipe.unet = compiled
        now = _unet_out(pipe)
        torch.testing.assert_close(hand, now, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(now, replaced)
        with pytest.raises(Exception, match="bind arguments"):  # a call that raises (after the hook ran) leaves the flag down
            compiled(torch.zeros(1, 4, 16, 16))
        assert not layers_module._KEPT_IN_GRAPH
        fuse(pipe)  # fused, the kept buffers are freed (a graph of the fused model reads its base weights)
        assert not any("lora_kept" in layer._buffers for layer in layers)
        unfuse(pipe)
        assert torch.equal(_unet_out(pipe), now) and all("lora_kept" in layer._buffers for layer in layers)
        cache_merged_weights(pipe, enabled=False)  # unhooked, freed: the graph from the factors again
        assert not compiled._forward_pre_hooks and not any("lora_kept" in layer._buffers for layer in layers)
        torch.testing.assert_close(_unet_out(pipe), now, rtol=1e-5, atol=1e-5)
        assert _kept(pipe) == 0
    finally:
        dynamo.reset()


def test_a_hooked_wrapper_keeps_an_fp8_layers_weight_only_under_autocast():
    """An fp8-stored layer takes its kept weight under autocast only (outside it the adapters run beside the base),
    so the hook's bulk check holds only while autocast is as it was: under autocast, a re-weight made between
    calls without it is followed."""
    from lora_diffusion.fp8 import store_fp8

    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    layer, x = _layer("linear", 2)
    model = nn.Sequential(layer).eval()
    store_fp8([("unet", model)], torch.bfloat16)
    reference = copy.deepcopy(model)  # eager, no kept weights
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    cache_merged_weights(compiled)

    def agrees(autocast: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, expect = compiled(x), reference(x)
        torch.testing.assert_close(out, expect, rtol=1e-2, atol=1e-2)
        return out

    try:
        first = agrees(True)
        assert layer.lora_kept.dtype == torch.bfloat16
        for m in (model, reference):
            m[0].set_weights({"a0": -0.9, "a1": 1.3})
        agrees(False)
        assert not torch.allclose(agrees(True), first, rtol=1e-2, atol=1e-2)
    finally:
        dynamo.reset()
