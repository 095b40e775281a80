"""Fusing and re-weighting a whole pipeline: one host-device sync per call, a few ops per layer, one rounding,
and a refused fuse (NaN/Inf, or a float16 overflow) leaves everything as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion import delete_adapter, fuse, list_adapters, load_lora, set_adapters, unfuse
from lora_diffusion.formats import write_lora_file
from lora_diffusion.inject import lora_layers
from lora_diffusion.testing import OpCounter, random_lora, tiny_pipeline

from conftest import generate

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def _pipe_with(tmp_path, n: int, dtype=torch.float32, **lora_kwargs):
    pipe = tiny_pipeline(0, dtype=dtype)
    for i in range(n):
        path = tmp_path / f"a{i}.safetensors"
        write_lora_file(path, random_lora(tiny_pipeline(0), seed=i, rank=2 + i, alpha=4, **lora_kwargs), dtype=torch.float32)
        load_lora(pipe, path)
    return pipe


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _factor_shapes(pipe) -> set[tuple[int, int, int]]:
    """``(out, in * k * k, total rank)`` of the fused layers: the batches of ``fuse_many``."""
    return {(w.shape[0], w.numel() // w.shape[0], sum(layer.specs[n].rank for n in layer.fused))
            for c in ("unet", "text_encoder") for _, layer in lora_layers(getattr(pipe, c)) if layer.fused
            for w in [layer.base_layer.weight]}


def test_reweighting_a_fused_pipeline_syncs_once_and_runs_few_ops_per_layer(tmp_path):
    pipe = _pipe_with(tmp_path, 4)
    names = ["a0", "a1", "a2", "a3"]
    fuse(pipe)
    n_layers = sum(1 for c in ("unet", "text_encoder") for _ in lora_layers(getattr(pipe, c)))
    with OpCounter() as counter:
        set_adapters(pipe, dict(zip(names, (0.1, 0.5, -0.3, 0.8))))
    ops = counter.counts
    assert ops["_local_scalar_dense"] == 1, ops  # one host read of all the layers' checks
    # no kernel per layer: one batched matmul per shape of factors (and a scale, two stacks and two multi-tensor
    # ops for the add and the cast); was a scale, a matmul and an add per layer, and before that ~20 ops and a
    # sync. The new weights are checked for NaN/Inf by one multi-tensor norm, not a reduction each
    n_shapes = len(_factor_shapes(pipe))
    assert 1 < n_shapes < n_layers / 4
    assert ops["bmm"] == n_shapes and not ops["mm"] and not ops["add"] and not ops["sum"], ops
    assert ops["_foreach_norm"] == 1, ops
    kernels = sum(n for op, n in ops.items() if op not in ("view", "slice", "detach", "unbind"))  # views launch nothing
    assert kernels <= 6 * n_shapes + 10, ops
    with OpCounter() as counter:
        unfuse(pipe)
    # the scales a compiled model reads come back for all layers in one host-to-device tensor per component
    assert counter.counts["lift_fresh"] <= 2 and counter.counts["copy_"] == n_layers, counter.counts
    with OpCounter() as counter:
        fuse(pipe)
    assert counter.counts["_local_scalar_dense"] == 2, counter.counts  # one per component (UNet, text encoder)


@pytest.mark.parametrize("fused", [False, True])
def test_set_adapters_walks_each_model_once(tmp_path, monkeypatch, fused):
    """A slider move is Python-bound on a GPU: walking an SD1.5 UNet costs ~0.3 ms (1 ms before lora_layers
    stopped entering the wrappers), and set_adapters used to walk each model three times (twice for the adapter
    names, once for the layers)."""
    import lora_diffusion.pipeline as pipeline_module

    pipe = _pipe_with(tmp_path, 2)
    if fused:
        fuse(pipe)
    walks = {"unet": 0, "text_encoder": 0}
    names = {id(pipe.unet): "unet", id(pipe.text_encoder): "text_encoder"}
    walk = pipeline_module.lora_layers

    def counted(model):
        walks[names[id(model)]] += 1
        return walk(model)

    monkeypatch.setattr(pipeline_module, "lora_layers", counted)
    set_adapters(pipe, {"a0": 0.3, "a1": 0.9})
    assert walks == {"unet": 1, "text_encoder": 1}
    assert list_adapters(pipe) == {"unet": ["a0", "a1"], "text_encoder": ["a0", "a1"]}
    assert walks == {"unet": 2, "text_encoder": 2}


def test_unfused_reweight_refreshes_every_layers_scales_in_one_copy(tmp_path):
    """What a compiled model reads (``lora_scales``) follows a re-weight in place: one host-to-device tensor and
    one multi-tensor copy for all layers (was a copy per layer: 176 launches for SD1.5 UNet + CLIP-L)."""
    pipe = _pipe_with(tmp_path, 3)
    set_adapters(pipe, {"a0": 0.5, "a2": 1.0})
    layers = [layer for c in ("unet", "text_encoder") for _, layer in lora_layers(getattr(pipe, c))]
    buffers = [layer.lora_scales for layer in layers]
    with OpCounter() as counter:
        set_adapters(pipe, {"a0": -0.3, "a2": 0.7})
    assert counter.counts["_foreach_copy_"] == 1 and not counter.counts["copy_"], counter.counts
    assert counter.counts["lift_fresh"] == 1, counter.counts
    for layer, buffer in zip(layers, buffers):
        assert layer.lora_scales is buffer  # in place: a captured CUDA graph reads the new values
        assert layer.lora_scales.tolist() == pytest.approx(layer.compiled_scale_row())
        assert layer.lora_scales.tolist() != pytest.approx(layer.scale_row({"a0": 0.5, "a2": 1.0}))


def test_lora_layers_lists_what_named_modules_finds(tmp_path):
    """The walk that skips the wrappers' insides finds the same layers, in the same order, fused or not."""
    from lora_diffusion.layers import LoraLayer

    pipe = _pipe_with(tmp_path, 3)
    shared = next(block for block in pipe.unet.down_blocks if hasattr(block, "attentions")).attentions[0]
    pipe.unet.add_module("shared_again", shared)  # a module reached twice is listed once, at its first path
    expected = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        expected[component] = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        assert expected[component] and list(lora_layers(model)) == expected[component]
    fuse(pipe)
    assert list(lora_layers(pipe.unet)) == expected["unet"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_weight_is_rounded_once_from_fp32(tmp_path, dtype):
    pipe = _pipe_with(tmp_path, 2, dtype=dtype)
    set_adapters(pipe, {"a0": 0.7, "a1": -1.3})
    layer = dict(lora_layers(pipe.unet))[LAYER]
    w0 = layer.base_layer.weight.detach().clone()
    expected = (w0.float() + layer.delta_weight()).to(dtype)
    fuse(pipe)
    assert torch.equal(dict(lora_layers(pipe.unet))[LAYER].base_layer.weight, expected)
    assert not torch.equal(expected, w0)


def test_float64_pipeline_fuses_in_float64(tmp_path):
    """An fp64 model fuses in fp64 (fusing in fp32 would round every weight to fp32, and the fp32 NaN check
    refused fp64 tensors): the fused weight is ``W0 + delta`` in fp64, the fused UNet equals the unfused one to
    fp64 rounding, and unfusing restores the weights bit for bit."""
    pipe = _pipe_with(tmp_path, 2, dtype=torch.float64)
    set_adapters(pipe, {"a0": 0.7, "a1": -1.3})
    before = _weights(pipe)
    layer = dict(lora_layers(pipe.unet))[LAYER]
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight()
    assert delta.dtype == torch.float64
    g = torch.Generator().manual_seed(0)
    sample, cond = torch.randn(2, 4, 16, 16, generator=g).double(), torch.randn(2, 77, 32, generator=g).double()
    with torch.no_grad():
        unfused = pipe.unet(sample, 500, encoder_hidden_states=cond).sample
        fuse(pipe)
        fused = pipe.unet(sample, 500, encoder_hidden_states=cond).sample
    assert torch.equal(dict(lora_layers(pipe.unet))[LAYER].base_layer.weight, w0 + delta)
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10 * unfused.abs().max().item())
    unfuse(pipe)
    _assert_same(_weights(pipe), before)


def test_refused_reweight_changes_nothing(tmp_path):
    pipe = _pipe_with(tmp_path, 2)
    bad = tmp_path / "bad.safetensors"
    key = f"unet.{LAYER}"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 64), f"{key}.lora_B.weight": torch.ones(64, 2)}, bad)
    load_lora(pipe, bad, weight=0.0)  # loaded but inactive: the fuse below leaves it out
    with torch.no_grad():  # a NaN that training put there (a file holding one is refused when read)
        dict(lora_layers(pipe.unet))[LAYER].lora_B["bad"][0, 0] = float("nan")
    set_adapters(pipe, {"a0": 0.5, "a1": 1.0})
    fuse(pipe)
    before, image = _weights(pipe), generate(pipe)
    states = {p: (list(layer.active), dict(layer.weights), dict(layer.fused)) for p, layer in lora_layers(pipe.unet)}
    with pytest.raises(ValueError, match=rf"refusing to fuse: {LAYER} would get NaN or Inf"):
        set_adapters(pipe, {"a0": 0.5, "a1": 1.0, "bad": 1.0})
    _assert_same(before, _weights(pipe))
    assert {p: (list(layer.active), dict(layer.weights), dict(layer.fused)) for p, layer in lora_layers(pipe.unet)} == states
    assert (generate(pipe) == image).all()  # still fused, still the same blend
    set_adapters(pipe, {"a0": 1.0})  # and it still works
    assert not (generate(pipe) == image).all()


def test_loading_a_bad_file_into_a_fused_pipeline_is_refused_whole(tmp_path):
    pipe = _pipe_with(tmp_path, 1)
    fuse(pipe)
    before = _weights(pipe)
    key = f"unet.{LAYER}"
    b = torch.ones(64, 2)
    b[3, 1] = float("inf")
    bad = tmp_path / "bad.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 64), f"{key}.lora_B.weight": b}, bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_lora(pipe, bad)
    assert list_adapters(pipe) == {"unet": ["a0"], "text_encoder": ["a0"]}
    _assert_same(before, _weights(pipe))


def test_float16_overflow_is_refused(tmp_path):
    """Finite factors whose fused weight exceeds float16's range: caught on the fused weight itself."""
    pipe = tiny_pipeline(0, dtype=torch.float16)
    key = f"unet.{LAYER}"
    huge = tmp_path / "huge.safetensors"
    save_file({f"{key}.lora_A.weight": torch.full((2, 64), 300.0), f"{key}.lora_B.weight": torch.full((64, 2), 300.0)}, huge)
    load_lora(pipe, huge)
    before = _weights(pipe)
    with pytest.raises(ValueError, match="too large for torch.float16"):
        fuse(pipe)
    _assert_same(before, _weights(pipe))


def test_deleting_an_adapter_while_fused_keeps_the_others_fused(tmp_path):
    pipe = _pipe_with(tmp_path, 2)
    fuse(pipe)
    delete_adapter(pipe, "a1")
    assert not any(True for _ in pipe.unet.modules() if hasattr(_, "lora_A"))  # still the base modules: fused
    fused_image = generate(pipe)
    unfuse(pipe)
    np.testing.assert_allclose(generate(pipe), fused_image, atol=1e-5)  # == a0 alone, unfused
    assert np.abs(generate(tiny_pipeline(0)) - fused_image).max() > 1e-2  # a0 is still in


def test_layers_without_an_active_adapter_are_left_alone(tmp_path):
    """Fusing only a cross-attention adapter while an all-attention one is inactive: the self-attention layers
    are not touched (no backup, no kernels), the cross-attention ones are fused."""
    pipe = tiny_pipeline(0)
    for name, targets, seed in (("cross", "cross", 1), ("all", "attn", 2)):
        path = tmp_path / f"{name}.safetensors"
        write_lora_file(path, random_lora(tiny_pipeline(0), seed=seed, unet_targets=targets, text_encoder_targets=None),
                        dtype=torch.float32)
        load_lora(pipe, path)
    base = {k: v for k, v in _weights(tiny_pipeline(0)).items()}
    with OpCounter() as counter:
        set_adapters(pipe, {"cross": 1.0})
        fuse(pipe)
    layers = dict(lora_layers(pipe.unet))
    cross = [p for p in layers if ".attn2." in p]
    assert cross and len(cross) < len(layers)
    # one batched matmul per shape of the fused layers' factors, none for the others
    assert counter.counts["bmm"] == len(_factor_shapes(pipe)) and not counter.counts["mm"]
    for path, layer in layers.items():
        if ".attn2." in path:
            assert layer.fused == {"cross": 1.0}
        else:
            assert not layer.fused and layer._base_backup is None
            assert torch.equal(layer.base_layer.weight, base[f"unet.{path}.weight"])


def test_fusing_in_smaller_batches_gives_the_same_weights(tmp_path, monkeypatch):
    """``fuse_many`` bounds the fp32 deltas it holds at once (``_FUSE_CHUNK``); one layer per batch fuses to the
    same bits, and so does each layer's own ``fuse``."""
    from lora_diffusion import layers as layers_module

    def fused_weights():
        return {path: layer.base_layer.weight.detach().clone() for path, layer in lora_layers(pipe.unet)}

    pipe = _pipe_with(tmp_path, 2)
    set_adapters(pipe, {"a0": 0.7, "a1": -1.3})
    before = fused_weights()
    fuse(pipe)
    batched = fused_weights()
    assert not any(torch.equal(batched[k], before[k]) for k in before)
    unfuse(pipe)
    monkeypatch.setattr(layers_module, "_FUSE_CHUNK", 1)
    fuse(pipe)
    _assert_same(fused_weights(), batched)
    unfuse(pipe)
    for _, layer in lora_layers(pipe.unet):
        layer.fuse()
    _assert_same(fused_weights(), batched)


def test_linear_and_conv_layers_sharing_a_batch_fuse_as_each_alone():
    """A Linear and a 1x1 conv of the same sizes share one batched matmul in ``fuse_many`` (their stacked factors
    have the same shapes) though only the conv's delta needs a view to its weight's shape; a 3x3 conv batches
    apart. Each comes out as its own ``fuse`` makes it, and ``delta_weight`` is what was added."""
    from torch import nn

    from lora_diffusion.layers import LoraConv2d, LoraLinear, fuse_many

    def layers():
        torch.manual_seed(0)
        made = [LoraLinear(nn.Linear(8, 6)), LoraConv2d(nn.Conv2d(8, 6, 1)), LoraConv2d(nn.Conv2d(8, 6, 3, padding=1))]
        for layer in made:
            layer.add_adapter("a", rank=3, alpha=5.0)
            with torch.no_grad():
                layer.lora_B["a"].normal_()
        return made

    together, alone = layers(), layers()
    assert together[0]._fuse_factors(["a"], cache=False)[0].shape == together[1]._fuse_factors(["a"], cache=False)[0].shape
    originals = [layer.base_layer.weight.detach().clone() for layer in together]
    fuse_many([(layer, {"a": 0.7}) for layer in together])
    for layer, each, original in zip(together, alone, originals):
        fuse_many([(each, {"a": 0.7})])
        assert layer.base_layer.weight.shape == original.shape
        assert torch.equal(layer.base_layer.weight, each.base_layer.weight)
        torch.testing.assert_close(layer.base_layer.weight, original + 0.7 * layer.delta_weight(["a"], {"a": 1.0}))
        assert not torch.equal(layer.base_layer.weight, original)


def test_what_a_compiled_forward_reads_follows_fusing_and_reweighting(tmp_path):
    """After every fuse, re-weight and unfuse each layer's ``lora_scales`` hold exactly the scale row of its
    active unfused adapters (a zero weight is not fused but stays active for a compiled forward), which a fused
    re-weight keeps without refreshing them where there is nothing unfused, before or after."""
    pipe = _pipe_with(tmp_path, 3)
    steps = [("fuse", None), ("set", {"a0": 0.5, "a1": 0.0, "a2": 1.0}), ("set", {"a0": 0.7, "a1": 0.2, "a2": 1.0}),
             ("set", {"a0": 0.7, "a2": -1.0}), ("set", {"a1": 0.0}), ("set", {"a0": 0.3, "a1": 0.4}), ("unfuse", None)]
    for what, weights in steps:
        fuse(pipe) if what == "fuse" else unfuse(pipe) if what == "unfuse" else set_adapters(pipe, weights)
        for c in ("unet", "text_encoder"):
            for path, layer in lora_layers(getattr(pipe, c)):
                assert layer._compiled_names == layer._unfused_active(), (what, weights, path)
                assert torch.equal(layer.lora_scales, torch.tensor(layer.compiled_scale_row(), dtype=torch.float32)), (what, weights, path)
        fused = what != "unfuse" and (weights is None or any(weights.values()))  # (all zero: nothing to fuse)
        assert any(layer.fused for _, layer in lora_layers(pipe.unet)) == fused, (what, weights)


@pytest.mark.parametrize("first", [{"a0": 0.0, "a1": 0.0}, {"a0": 0.0, "a1": 0.6}, {"a1": 0.6}])
def test_a_fused_pipeline_fuses_weights_raised_from_zero(tmp_path, first):
    """A fused pipeline stays fused through any re-weight: layers whose weights were all 0 (or whose adapters were
    inactive) have nothing fused in, and raising a weight again fuses it there too, to the bits of fusing afresh
    (a slider taken to 0 and back used to leave such layers at the base weights, the adapter silently gone)."""
    pipe, fresh = _pipe_with(tmp_path, 2), _pipe_with(tmp_path, 2)
    set_adapters(pipe, first)
    fuse(pipe)
    set_adapters(pipe, {"a0": 0.0, "a1": 0.0})
    set_adapters(pipe, {"a0": 0.8, "a1": -0.5})
    set_adapters(fresh, {"a0": 0.8, "a1": -0.5})
    fuse(fresh)
    _assert_same(_weights(pipe), _weights(fresh))
    unfuse(pipe)
    unfuse(fresh)
    _assert_same(_weights(pipe), _weights(fresh))
