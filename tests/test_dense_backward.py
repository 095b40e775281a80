"""The dense backward (``set_backward(model, "dense")``, the default on CUDA): a single adapter on a frozen Linear
differentiated through ``W + s B A``.

* the forward is untouched (bit for bit the low-rank one, so the loss is PEFT's);
* the gradients equal the low-rank ones (fp32: to rounding; bf16: as close to the exact gradients of the same
  bf16 inputs as the low-rank ones are), with fewer ops;
* everything it cannot do (dropout in training, several adapters, a trainable base, convolutions) falls back to
  the low-rank path; it traces under torch.compile in one graph and trains there as eagerly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_diffusion import inject_lora
from lora_diffusion.inject import lora_layers, set_backward
from lora_diffusion.layers import LoraConv2d, LoraLinear
from lora_diffusion.testing import OpCounter, tiny_pipeline


def _linear(alpha: float = 3.0, weight: float = 0.7, dtype=torch.float32, shape=(16, 12), seed: int = 0):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(*shape).to(dtype).requires_grad_(False))
    layer.add_adapter("a", rank=2, alpha=alpha, weight=weight)
    with torch.no_grad():
        layer.lora_B["a"].normal_(std=0.5)
    return layer


def _grads(layer, x, mode: str, autocast: bool = False):
    """Output, and the gradients of x, A and B under a fixed random output gradient, with ``mode``."""
    set_backward(layer, mode)
    layer.zero_grad()
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(g)
    return y.detach(), g, [x.grad, layer.lora_A["a"].grad.clone(), layer.lora_B["a"].grad.clone()], y.grad_fn


def _is_dense(grad_fn) -> bool:
    return type(grad_fn).__name__.startswith("_DenseBackward")


@pytest.mark.parametrize("alpha,weight", [(2.0, 1.0), (4.0, 1.0), (3.0, 0.7)], ids=["scale 1", "scale 2", "scale 1.05"])
def test_dense_backward_equals_lowrank(alpha, weight):
    layer, x = _linear(alpha, weight), torch.randn(3, 5, 16)
    y_low, _, grads_low, fn_low = _grads(layer, x, "lowrank")
    y_dense, _, grads_dense, fn_dense = _grads(layer, x, "dense")
    assert _is_dense(fn_dense) and not _is_dense(fn_low)
    assert torch.equal(y_dense, y_low)  # the forward is the low-rank one
    for name, dense, low in zip(("x", "A", "B"), grads_dense, grads_low):
        assert low.abs().max() > 0
        assert dense.shape == low.shape and dense.dtype == low.dtype
        torch.testing.assert_close(dense, low, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", [(64, 48), (48, 96)])
def test_dense_backward_is_as_accurate_as_lowrank_in_bf16(shape):
    """bf16 base, fp32 factors, bf16 autocast: each gradient is within 1.25x the low-rank path's error of the exact
    (fp64) gradient of the same bf16 inputs, factors and output gradient."""
    layer = _linear(4.0, 0.8, torch.bfloat16, shape)
    with torch.no_grad():
        layer.lora_B["a"].mul_(0.05)
    x = torch.randn(2, 256, shape[0]).bfloat16()
    y_low, g, grads_low, _ = _grads(layer, x, "lowrank", autocast=True)
    y_dense, _, grads_dense, _ = _grads(layer, x, "dense", autocast=True)
    assert torch.equal(y_dense, y_low)
    s = 0.8 * 4.0 / 2
    a, b = (layer.lora_A["a"].detach().bfloat16().double(), layer.lora_B["a"].detach().bfloat16().double())
    x64, g64, w64 = x.double().reshape(-1, shape[0]), g.double().reshape(-1, shape[1]), layer.base_layer.weight.double()
    gw = g64.t() @ x64
    exact = [(g64 @ (w64 + s * b @ a)).view(x.shape), s * b.t() @ gw, s * gw @ a.t()]
    for name, dense, low, ref in zip(("x", "A", "B"), grads_dense, grads_low, exact):
        err = lambda t: ((t.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(low) < 1e-2, name
        assert err(dense) <= 1.25 * err(low), (name, err(dense), err(low))


class _ScaledLinear(nn.Linear):
    """A Linear subclass computing something else than ``x W^T + b`` (as quantized Linears do)."""

    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("case", ["dropout", "two adapters", "trainable base", "trainable bias", "conv", "no grad",
                                  "Linear subclass"])
def test_what_dense_cannot_do_falls_back_to_lowrank(case):
    layer, x = _linear(), torch.randn(3, 5, 16)
    if case == "dropout":
        layer = LoraLinear(nn.Linear(16, 12).requires_grad_(False))
        layer.add_adapter("a", rank=2, dropout=0.5)
    elif case == "two adapters":
        layer.add_adapter("b", rank=3)
    elif case == "trainable base":
        layer.base_layer.weight.requires_grad_(True)
    elif case == "trainable bias":
        layer.base_layer.bias.requires_grad_(True)
    elif case == "Linear subclass":
        layer = LoraLinear(_ScaledLinear(16, 12).requires_grad_(False))
        layer.add_adapter("a", rank=2)
    elif case == "conv":
        layer, x = LoraConv2d(nn.Conv2d(6, 8, 3, padding=1).requires_grad_(False)), torch.randn(2, 6, 7, 7)
        layer.add_adapter("a", rank=2)
    set_backward(layer, "dense")
    x.requires_grad_(True)
    with torch.set_grad_enabled(case != "no grad"):
        y = layer(x)
    assert not _is_dense(y.grad_fn)
    if case == "dropout":  # in eval mode dropout is off: dense again
        assert _is_dense(layer.eval()(x).grad_fn)


def test_auto_is_lowrank_on_a_cpu_and_modes_are_checked():
    import dataclasses

    from lora_diffusion.layers import BACKWARD_MODES
    from lora_diffusion.training import TrainConfig

    layer, x = _linear(), torch.randn(3, 16, requires_grad=True)
    assert layer.backward_mode == "auto" and not _is_dense(layer(x).grad_fn)
    with pytest.raises(ValueError, match="backward mode 'fast': choose one of auto, dense, lowrank, merged"):
        set_backward(layer, "fast")
    # the training config (torch-free, so it spells the modes out) offers exactly these
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lora_backward")
    assert tuple(field.metadata["choices"]) == BACKWARD_MODES and field.default == "auto"


def test_unet_step_dense_equals_lowrank_with_fewer_ops():
    """A bf16 UNet step under autocast (the GPU recipe): the same loss bit for bit, the same LoRA gradients to
    bf16 rounding, in fewer ops (kernel launches on a GPU)."""
    unet = tiny_pipeline(0, dtype=torch.bfloat16).unet
    inject_lora(unet, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(unet):
            layer.lora_B["default"].normal_(std=0.05, generator=gen)
    x, cond = torch.randn(2, 4, 16, 16, generator=gen).bfloat16(), torch.randn(2, 77, 32, generator=gen).bfloat16()
    results = {}
    for mode in ("lowrank", "dense"):
        model = copy.deepcopy(unet).train()
        set_backward(model, mode)
        with OpCounter() as ops:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, torch.tensor([10, 500]), cond).sample.float().pow(2).mean()
            loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad])
        results[mode] = (loss.detach(), grads, ops.total)
    (loss_l, grads_l, ops_l), (loss_d, grads_d, ops_d) = results["lowrank"], results["dense"]
    assert torch.equal(loss_d, loss_l)
    assert grads_l.abs().max() > 0
    assert ((grads_d - grads_l).norm() / grads_l.norm()).item() < 2e-2
    n_layers = sum(1 for _ in lora_layers(unet))
    assert ops_d <= ops_l - n_layers, (ops_d, ops_l, n_layers)  # >= 1 op fewer per layer


def test_an_fp32_input_under_autocast_is_cast_once_and_saved_in_bf16():
    """A LayerNorm's output reaches q/k/v in fp32 under autocast. The dense path casts it once (not once per matmul
    and again in the backward) and saves the bf16 copy; the bits are the low-rank path's, and x's gradient is fp32."""
    layer = _linear(dtype=torch.bfloat16, shape=(64, 48))
    x = torch.randn(2, 9, 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y_dense, _, grads_dense, fn = _grads(layer, x, "dense", autocast=True)
    assert _is_dense(fn)
    activations = [t for t in saved if t.numel() == x.numel()]
    assert len(activations) == 1 and activations[0].dtype == torch.bfloat16
    y_low, _, grads_low, _ = _grads(layer, x, "lowrank", autocast=True)
    assert torch.equal(y_dense, y_low) and grads_dense[0].dtype == torch.float32
    set_backward(layer, "dense")
    x, g = x.requires_grad_(True), torch.ones(2, 9, 48, dtype=torch.bfloat16)
    with OpCounter() as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.backward(g)
    # the input once, A and B once each, dx back to fp32, the weight gradient G to fp32 (CPU: a cast after the mm)
    assert ops.counts["_to_copy"] == 5, ops.counts


def test_layers_reading_one_fp32_input_share_its_cast():
    """q, k and v read one LayerNorm output: one cast of it for the three, one bf16 copy saved for their backward;
    outputs and gradients are the bits of three separate casts."""
    layers = [_linear(dtype=torch.bfloat16, shape=(64, 48), seed=i) for i in range(3)]
    for layer in layers:
        set_backward(layer, "dense")
    x = torch.randn(2, 9, 64)
    g = torch.randn(2, 9, 48).bfloat16()

    def run(share: bool):
        for layer in layers:
            layer.zero_grad()
        leaf = x.detach().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with OpCounter() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
                h = leaf * 1.0  # a non-leaf fp32 activation, as a LayerNorm's output under CUDA autocast
                outs = [layer(h if share else h.clone()) for layer in layers]
        sum((o.float() * g.float()).sum() for o in outs).backward()
        activations = {t.data_ptr() for t in saved if t.numel() == x.numel() and t.dtype == torch.bfloat16}
        grads = [leaf.grad] + [p.grad for layer in layers for p in (layer.lora_A["a"], layer.lora_B["a"])]
        return outs, grads, len(activations), ops.counts["_to_copy"]

    outs_s, grads_s, saved_s, casts_s = run(share=True)
    outs_c, grads_c, saved_c, casts_c = run(share=False)
    assert all(_is_dense(o.grad_fn) for o in outs_s)
    assert (saved_s, saved_c) == (1, 3)
    assert (casts_s, casts_c) == (1 + 6, 3 + 6)  # the input(s), then A and B of each layer
    assert all(torch.equal(a, b) for a, b in zip(outs_s, outs_c))
    assert all(a.abs().max() > 0 and torch.equal(a, b) for a, b in zip(grads_s, grads_c))


def test_a_shared_cast_is_never_stale():
    from lora_diffusion.layers import _cast_shared

    x = torch.randn(4, 8)
    first = _cast_shared(x, torch.bfloat16)
    assert _cast_shared(x, torch.bfloat16) is first  # the same x, unchanged: shared
    x.add_(1.0)  # changed in place: a new cast with the new values
    second = _cast_shared(x, torch.bfloat16)
    assert second is not first and torch.equal(second, x.bfloat16())
    assert _cast_shared(x.clone(), torch.bfloat16) is not second  # another tensor
    assert _cast_shared(x, torch.float16).dtype == torch.float16
    with torch.inference_mode():
        y = torch.randn(4, 8)
    assert torch.equal(_cast_shared(y, torch.bfloat16), y.bfloat16())  # no version counter: cast, never shared


@pytest.mark.parametrize("mode", ["dense", "merged"])
def test_compiled_dense_backward_traces_in_one_graph_and_trains_as_eager(mode):
    layer = _linear(3.0, 0.7)
    for p in (layer.lora_A["a"], layer.lora_B["a"]):
        p.requires_grad_(True)
    set_backward(layer, mode)
    traced = copy.deepcopy(layer)
    compiled = torch.compile(traced, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 16)
    outs = [model(x) for model in (layer, compiled)]
    assert _is_dense(outs[0].grad_fn)
    for out in outs:
        out.square().mean().backward()
    # (merged: the compiled graph scales B by a tensor before the GEMM, eager passes the scale as addmm's alpha)
    torch.testing.assert_close(outs[0], outs[1], rtol=0 if mode == "dense" else 1e-6, atol=0 if mode == "dense" else 1e-6)
    for store in ("lora_A", "lora_B"):
        grad = getattr(layer, store)["a"].grad
        assert grad.abs().max() > 0
        tol = {"rtol": 1e-6, "atol": 0} if mode == "dense" else {"rtol": 1e-5, "atol": 1e-6}  # (the loss, to rounding)
        torch.testing.assert_close(getattr(traced, store)["a"].grad, grad, **tol, msg=store)


def test_auto_takes_dense_for_sd_sized_layers_only():
    from lora_diffusion.layers import dense_backward_pays

    sd = [(320, 320), (640, 640), (1280, 1280), (768, 320), (768, 1280), (1280, 5120), (2048, 2048), (768, 3072)]
    assert all(dense_backward_pays(i, o) for i, o in sd)
    assert not any(dense_backward_pays(i, o) for i, o in [(3072, 3072), (4096, 4096), (5120, 5120), (3072, 12288)])


@pytest.mark.parametrize("alpha,weight", [(2.0, 1.0), (3.0, 0.7)], ids=["scale 1", "scale 1.05"])
def test_merged_forward_trains_as_dense_with_the_loss_to_rounding(alpha, weight):
    """``"merged"``: the forward through ``W + s B A`` as well. The output equals the low-rank forward to fp32
    rounding, and under the same output gradient the gradients are the dense backward's bit for bit."""
    layer, x = _linear(alpha, weight), torch.randn(3, 5, 16)
    y_dense, _, grads_dense, _ = _grads(layer, x, "dense")
    y_merged, _, grads_merged, fn = _grads(layer, x, "merged")
    assert _is_dense(fn)
    assert not torch.equal(y_merged, y_dense)  # another forward (rounded otherwise)...
    torch.testing.assert_close(y_merged, y_dense, rtol=1e-5, atol=1e-6)  # ...of the same maths
    for name, merged, dense in zip(("x", "A", "B"), grads_merged, grads_dense):
        assert merged.abs().max() > 0 and torch.equal(merged, dense), name


def test_merged_forward_in_bf16_is_one_rounding_of_the_merged_weight():
    """Under bf16 autocast the merged forward is ``F.linear`` on ``W + s B A`` accumulated in fp32 and rounded once
    to bf16: no more ops than the frozen layer's besides that one GEMM (and the factor casts)."""
    layer, x = _linear(3.0, 0.7, shape=(64, 48)), torch.randn(4, 64)
    set_backward(layer, "merged")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b, w = (t.detach().bfloat16() for t in (layer.lora_A["a"], layer.lora_B["a"], layer.base_layer.weight))
        merged = (w.float() + 0.7 * 1.5 * (b.float() @ a.float())).bfloat16()
        expect = torch.nn.functional.linear(x.bfloat16(), merged, layer.base_layer.bias.bfloat16())
        with OpCounter() as ops:
            y = layer(x.requires_grad_(True))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expect.float(), rtol=0, atol=2 ** -7 * expect.abs().max().item())
    assert ops.counts["addmm"] + ops.counts["mm"] + ops.counts["linear"] <= 3, dict(ops.counts)


def test_unet_trains_with_the_merged_forward_like_lowrank():
    """A few optimizer steps of the tiny UNet with ``"merged"`` follow ``"lowrank"`` (PEFT's ops): in fp64, where
    only the maths can differ, to 1e-10 (in fp32 this random UNet grows last-bit differences ~1e4 fold)."""
    base = tiny_pipeline(0).unet.requires_grad_(False).double()
    runs = {}
    for mode in ("lowrank", "merged"):
        unet = copy.deepcopy(base)
        torch.manual_seed(0)  # the same A
        params = inject_lora(unet, rank=4, alpha=4)
        unet.double()  # (the adapters too)
        params = [p for p in unet.parameters() if p.requires_grad]
        set_backward(unet, mode)
        with torch.no_grad():
            for p in params:
                if p.abs().max() == 0:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(p.numel()))
        opt = torch.optim.SGD(params, lr=0.1)  # (AdamW would blow up rounding in near-zero gradients)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(3):
            x, ehs = torch.randn(2, 4, 16, 16, generator=g).double(), torch.randn(2, 77, 32, generator=g).double()
            loss = unet(x, 10, encoder_hidden_states=ehs).sample.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[mode] = (losses, [p.detach().clone() for p in params])
    assert runs["merged"][0] != runs["lowrank"][0]  # not the same ops...
    torch.testing.assert_close(runs["merged"][0], runs["lowrank"][0], rtol=1e-10, atol=0)  # ...the same training
    for merged, low in zip(runs["merged"][1], runs["lowrank"][1]):
        assert not torch.equal(merged, low)
        torch.testing.assert_close(merged, low, rtol=1e-9, atol=1e-10)
