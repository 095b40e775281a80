"""The fast paths of ``LoraLayer.forward`` compute what the plain definitions compute.

* the cached concatenated multi-adapter matmul equals the per-adapter sum, and its cache notices every way the
  factors or weights can change (in-place updates, replaced parameters, weight edits);
* the single-adapter path (the training path) is PEFT's op order, bit for bit, forward and backward, with and
  without dropout, and casts like PEFT when the adapter dtype differs from the base dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_diffusion.layers import AdapterSpec, LoraConv2d, LoraLinear


def _randomise(layer, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for store in (layer.lora_A, layer.lora_B):
            for p in store.values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _layer(kind: str, n: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x = LoraLinear(nn.Linear(16, 12)), torch.randn(3, 5, 16)
    else:
        layer, x = LoraConv2d(nn.Conv2d(6, 8, 3, padding=1)), torch.randn(2, 6, 7, 7)
    for i in range(n):
        layer.add_adapter(f"a{i}", rank=i + 1, alpha=2.0 * (i + 1) + 1)
    _randomise(layer, seed)
    return layer, x


def _per_adapter_sum(layer, x, weights: dict[str, float]) -> torch.Tensor:
    """The definition: base(x) + sum_i w_i * alpha_i / r_i * B_i(A_i(x)), one adapter at a time."""
    out = layer.base_layer(x)
    for n, w in weights.items():
        out = out + layer._low_rank(x, layer.lora_A[n], layer.lora_B[n]) * (w * layer.specs[n].scale)
    return out


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_concatenated_path_equals_per_adapter_loop(kind):
    layer, x = _layer(kind)
    weights = {"a0": 0.7, "a1": -1.2, "a3": 0.4}
    layer.set_weights(weights)
    with torch.no_grad():
        fast, again = layer(x), layer(x)  # the second call is served from the cache
    expect = _per_adapter_sum(layer, x, weights).detach()
    assert not torch.equal(expect, layer.base_layer(x))
    torch.testing.assert_close(fast, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, again)
    assert layer._cache is not None


@pytest.mark.parametrize("change", ["in_place", "replaced_parameter", "weight_edit", "alpha_edit"])
def test_cache_sees_every_change(change):
    layer, x = _layer("linear")
    weights = {"a0": 1.0, "a2": 0.5}
    layer.set_weights(weights)
    with torch.no_grad():
        before = layer(x)
    if change == "in_place":  # what an optimizer step or load_state_dict does
        with torch.no_grad():
            layer.lora_B["a2"].mul_(3.0)
    elif change == "replaced_parameter":
        layer.lora_A["a0"] = nn.Parameter(torch.randn_like(layer.lora_A["a0"]))
    elif change == "weight_edit":
        layer.weights["a2"] = -2.0
        weights = {"a0": 1.0, "a2": -2.0}
    else:  # (specs are frozen: an alpha changes by replacing the spec, without telling the layer)
        layer.specs["a0"] = AdapterSpec(rank=layer.specs["a0"].rank, alpha=7.0)
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _per_adapter_sum(layer, x, weights).detach(), rtol=1e-5, atol=1e-5)


def test_concatenated_path_trains_every_adapter():
    layer, x = _layer("linear", n=3)
    layer.set_weights({"a0": 1.0, "a1": 0.5, "a2": 2.0})
    layer(x).square().sum().backward()
    grads = {n: layer.lora_B[n].grad for n in ("a0", "a1", "a2")}
    ref = copy.deepcopy(layer)
    for p in ref.parameters():
        p.grad = None
    _per_adapter_sum(ref, x, {"a0": 1.0, "a1": 0.5, "a2": 2.0}).square().sum().backward()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref.lora_B[n].grad, rtol=1e-4, atol=1e-5)


def _peft_twin(ours: LoraLinear, dropout: float, alpha: float = 6.0):
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.proj = base

    model = Holder(copy.deepcopy(ours.base_layer))
    config = peft.LoraConfig(r=4, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    model = peft.inject_adapter_in_model(config, model, adapter_name="s")
    with torch.no_grad():
        model.proj.lora_A["s"].weight.copy_(ours.lora_A["s"])
        model.proj.lora_B["s"].weight.copy_(ours.lora_B["s"])
    return model.proj


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("alpha", [6.0, 4.0, 16.0, 1.0], ids=["scale1.5", "scale1", "scale4", "scale0.25"])
def test_single_adapter_is_peft_bit_for_bit(dropout, alpha):
    """Scale 1 skips the multiply and a power-of-two scale goes into B (exact in floating point); any other scale
    multiplies the output as PEFT does. Forward and backward equal PEFT's bit for bit in every case."""
    torch.manual_seed(0)
    ours = LoraLinear(nn.Linear(16, 12))
    ours.add_adapter("s", rank=4, alpha=alpha, dropout=dropout)
    _randomise(ours)
    theirs = _peft_twin(ours, dropout, alpha)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    y = ours(x)
    torch.manual_seed(1)
    y2 = theirs(x2)
    assert torch.equal(y, y2)
    g = torch.randn_like(y)
    y.backward(g), y2.backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(ours.lora_A["s"].grad, theirs.lora_A["s"].weight.grad)
    assert torch.equal(ours.lora_B["s"].grad, theirs.lora_B["s"].weight.grad)


def test_single_adapter_casts_between_adapter_and_base_dtype():
    torch.manual_seed(0)
    ours = LoraLinear(nn.Linear(16, 12).to(torch.bfloat16))
    ours.add_adapter("s", rank=4, alpha=8)  # fp32 factors on a bf16 base, as in mixed-precision training
    _randomise(ours)
    assert ours.lora_A["s"].dtype == torch.float32
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = ours(x)
    a, b = ours.lora_A["s"], ours.lora_B["s"]
    expect = ours.base_layer(x) + ((x.float() @ a.T @ b.T) * 2.0).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expect)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float32])
def test_inference_path_adds_into_the_base_output_or_falls_back(factor_dtype, n):
    """Adapters outside autograd (one or several): same dtypes -> the up-projection adds into the base output
    (addmm_); fp32 factors on a bf16 base -> the out-of-place path. Both equal the definition; inference_mode too."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12).to(torch.bfloat16))
    for i in range(n):
        layer.add_adapter(f"a{i}", rank=2 + i, alpha=3.0, dtype=factor_dtype)
    _randomise(layer)
    x = torch.randn(2, 5, 16).to(torch.bfloat16)
    weights = {"a0": 0.6, "a1": -1.1} if n == 2 else {"a0": 0.6}
    layer.set_weights(weights)
    with torch.no_grad():
        expect = layer.base_layer(x).float() + sum(
            w * layer.specs[n].scale * (x.float() @ layer.lora_A[n].float().T @ layer.lora_B[n].float().T) for n, w in weights.items()
        )
        got = layer(x)
    with torch.inference_mode():
        again = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, again)
    torch.testing.assert_close(got.float(), expect, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_one_adapter_outside_autograd_is_the_stacked_path_and_in_autograd_peft(kind):
    """One adapter at inference goes through the cached stacked factors (scale folded into B); with autograd
    recording, PEFT's ops (bit for bit, tested above). The two agree to rounding."""
    layer, x = _layer(kind, n=1)
    layer.set_weights({"a0": 0.7})
    with torch.no_grad():
        fast = layer(x)
    assert layer._cache is not None
    tracked = layer(x)
    assert tracked.requires_grad and not torch.equal(fast, tracked.detach())  # scale 0.7 * 3 / 1: not exact
    torch.testing.assert_close(fast, tracked.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, _per_adapter_sum(layer, x, {"a0": 0.7}).detach(), rtol=1e-5, atol=1e-5)


def test_stacked_factors_fold_the_scale_with_one_rounding():
    """bf16 B times ``w * alpha / r`` is multiplied in fp32 and rounded once (not the scale rounded to bf16 first)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12).to(torch.bfloat16))
    for i in range(2):
        layer.add_adapter(f"a{i}", rank=2, alpha=3.0, dtype=torch.bfloat16)
    _randomise(layer)
    weights = {"a0": 0.8, "a1": -0.3}
    layer.set_weights(weights)
    with torch.no_grad():
        layer(torch.randn(2, 16).bfloat16())
    expect = torch.cat([(layer.lora_B[n].float() * (w * 1.5)).bfloat16() for n, w in weights.items()], dim=1)
    twice = torch.cat([layer.lora_B[n] * torch.tensor(w * 1.5, dtype=torch.bfloat16) for n, w in weights.items()], dim=1)
    assert not torch.equal(expect, twice)  # the test can tell the two roundings apart
    assert torch.equal(layer._cache[1], expect)


def _merged_calls(layer, monkeypatch) -> list:
    calls: list = []
    original = type(layer)._merged_forward

    def spy(self, x, a, b):
        calls.append(tuple(x.shape))
        return original(self, x, a, b)

    monkeypatch.setattr(type(layer), "_merged_forward", spy)
    return calls


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_inference_through_the_merged_weight_equals_the_definition_and_fusing(kind, n, monkeypatch):
    """Outside autograd, on enough tokens, the adapters run as ``W + sum s B A`` (one small GEMM), which equals the
    definition and the fused layer to fp32 rounding; few tokens keep the low-rank pair. The choice is by traffic."""
    layer, _ = _layer(kind, n=n)
    weights = {f"a{i}": (0.7, -1.2, 0.4)[i] for i in range(n)}
    layer.set_weights(weights)
    big = torch.randn(4, 64, 16) if kind == "linear" else torch.randn(2, 6, 16, 16)
    small = torch.randn(1, 16) if kind == "linear" else torch.randn(1, 6, 2, 2)
    calls = _merged_calls(layer, monkeypatch)
    with torch.no_grad():
        merged, few = layer(big), layer(small)
    assert calls == [tuple(big.shape)]  # the small input took the stacked pair
    for x, got in ((big, merged), (small, few)):
        expect = _per_adapter_sum(layer, x, weights).detach()
        assert not torch.equal(expect, layer.base_layer(x))
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    tracked = layer(big)  # autograd records: never merged (training keeps PEFT's ops or the stacked pair)
    assert len(calls) == 1
    torch.testing.assert_close(merged, tracked.detach(), rtol=1e-5, atol=1e-5)
    layer.fuse()
    with torch.no_grad():
        torch.testing.assert_close(merged, layer(big), rtol=1e-5, atol=1e-5)
    layer.unfuse()
    with torch.no_grad():
        assert torch.equal(layer(big), merged)  # the stacked factors are cached: same bits again


def test_merged_inference_is_two_ops_for_any_number_of_adapters():
    """The merged weight costs one op (addmm) over the base layer's, for 1 or 8 adapters, once the stacked factors
    are cached; bf16 layers with fp32 factors keep the factors cast in the cache, not per call."""
    from lora_diffusion.testing import OpCounter

    torch.manual_seed(0)
    x = torch.randn(2, 64, 16).to(torch.bfloat16)
    for n in (1, 8):
        layer = LoraLinear(nn.Linear(16, 12).to(torch.bfloat16))
        for i in range(n):
            layer.add_adapter(f"a{i}", rank=2, alpha=3.0)  # fp32 factors on a bf16 base
        _randomise(layer)
        with torch.no_grad():
            layer(x)
            with OpCounter() as ops:
                y = layer(x)
            with OpCounter() as base_ops:
                layer.base_layer(x)
        assert ops.total == base_ops.total + 1, (n, dict(ops.counts))
        expect = layer.base_layer(x).float() + sum(
            1.5 * (x.float() @ layer.lora_A[f"a{i}"].T @ layer.lora_B[f"a{i}"].T) for i in range(n))
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expect, rtol=2e-2, atol=2e-2)


def test_merged_inference_on_a_bf16_layer_is_the_fused_layer_to_one_rounding():
    """bf16 base, bf16 factors: the merged weight is rounded once from an fp32 accumulation, as fusing does, so the
    outputs differ only where the factors' bf16 copies of ``s B`` differ from fusing's fp32 ones (a bf16 ulp)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 48).to(torch.bfloat16))
    for i in range(2):
        layer.add_adapter(f"a{i}", rank=4, alpha=3.0, dtype=torch.bfloat16)
    _randomise(layer)
    layer.set_weights({"a0": 0.8, "a1": -0.3})
    x = torch.randn(4, 64, 64).to(torch.bfloat16)
    with torch.no_grad():
        merged = layer(x)
        layer.fuse()
        fused = layer(x)
    diff = (merged.float() - fused.float()).abs()
    assert diff.max() <= 2 ** -6 * fused.float().abs().max(), diff.max()
    assert (diff == 0).float().mean() > 0.5  # mostly the same bits


def test_merged_weight_rule_on_sd15_shapes():
    """What ``merged_forward_pays`` documents for an SD1.5 UNet at 512 px with CFG (batch 2): the merged weight
    everywhere on a GPU but the 8x8 mid block; on a CPU not at 16x16 nor for the 77 text tokens."""
    from lora_diffusion.layers import merged_forward_pays

    cases = {  # (tokens, in, out): (cuda, cpu)
        (2 * 64 * 64, 320, 320): (True, True),
        (2 * 32 * 32, 640, 640): (True, True),
        (2 * 16 * 16, 1280, 1280): (True, False),
        (2 * 8 * 8, 1280, 1280): (False, False),
        (2 * 77, 768, 320): (True, False),
        (2 * 77, 768, 1280): (True, False),
    }
    for (tokens, n_in, n_out), expect in cases.items():
        got = tuple(merged_forward_pays(tokens, n_in, n_out, n_in * n_out, device) for device in ("cuda", "cpu"))
        assert got == expect, (tokens, n_in, n_out)


def test_each_layer_keeps_the_rules_thresholds():
    """A layer decides with thresholds kept from its base's shape (``_merge_min``, no rule call per forward): the
    same decision as ``merged_forward_pays`` at the boundary, for Linear and Conv2d; other base types never merge."""
    from lora_diffusion.layers import merged_forward_min_tokens, merged_forward_pays

    for base in (nn.Linear(768, 320, device="meta"), nn.Linear(1280, 1280, device="meta"), nn.Conv2d(32, 48, 3, device="meta")):
        layer = LoraLinear(base) if isinstance(base, nn.Linear) else LoraConv2d(base)
        n_in, n_out, numel = base.weight.shape[1], base.weight.shape[0], base.weight.numel()
        for cuda, device in ((False, "cpu"), (True, "cuda")):
            least = merged_forward_min_tokens(n_in, n_out, numel, cuda)
            assert merged_forward_pays(least, n_in, n_out, numel, device)
            assert least == 0 or not merged_forward_pays(least - 1, n_in, n_out, numel, device)
            assert layer._merge_min[cuda] == least * n_in
        assert layer._merge_min[0] > n_in  # (on a CPU each of these needs more than one row)
        least = merged_forward_min_tokens(n_in, n_out, numel, False)
        shape = (least, n_in) if isinstance(base, nn.Linear) else (1, n_in, least, 1)
        assert layer._merge_pays(torch.empty(shape, device="meta"))
        smaller = (least - 1, n_in) if isinstance(base, nn.Linear) else (1, n_in, least - 1, 1)
        assert not layer._merge_pays(torch.empty(smaller, device="meta"))

    class Quantized(nn.Linear):  # a subclass computes its own way: never merged
        pass

    assert LoraLinear(Quantized(16, 16))._merge_min is None
