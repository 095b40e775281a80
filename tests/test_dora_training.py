"""DoRA trained here (``inject_lora(use_dora=True)``, ``--use_dora``): a fresh adapter changes nothing; the forward
and every gradient are PEFT's ``use_dora`` bit for bit (Linear and Conv2d); only the factors and magnitudes train;
the saved file (``lora_magnitude_vector``) loads, in ours and in stock diffusers, to the outputs of the adapter
that made it; a weight scales the whole change (0: the base bit for bit); fusing is refused by name; a resumed run
keeps its magnitudes."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

from lora_diffusion import delete_adapter, fuse, inject_lora, load_lora, save_lora, set_adapters  # noqa: E402
from lora_diffusion.formats import read_lora_file, read_safetensors  # noqa: E402
from lora_diffusion.inject import lora_layers, lora_parameters  # noqa: E402
from lora_diffusion.testing import tiny_pipeline  # noqa: E402
from lora_diffusion.training import ConfigError, TrainConfig, train  # noqa: E402

from training_support import base_state, flat_images  # noqa: E402

TARGETS = ["to_q", "to_v", "conv1"]  # Linear (self and cross attention) and 3x3 Conv2d


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 32, generator=g)


def _randomize(unet, seed: int = 1) -> None:
    """Non-trivial B and magnitudes (B = 0 and m = ||W|| at the start would make every comparison vacuous)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(unet):
            for name in layer._dora:
                layer.lora_B[name].normal_(generator=g, std=0.3)
                m = layer.lora_magnitude[name]
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))


def _dora_pipe(seed: int = 1):
    pipe = tiny_pipeline(0)
    torch.manual_seed(seed)
    inject_lora(pipe.unet, rank=2, alpha=3, targets=TARGETS, use_dora=True)
    _randomize(pipe.unet, seed)
    return pipe


def test_a_fresh_dora_adapter_changes_nothing_and_weight_zero_is_the_base():
    pipe = tiny_pipeline(0)
    x, t, ehs = _inputs()
    with torch.no_grad():
        plain = pipe.unet(x, t, ehs).sample
    params = inject_lora(pipe.unet, rank=2, targets=TARGETS, use_dora=True)
    layers = [layer for _, layer in lora_layers(pipe.unet)]
    assert len(params) == 3 * len(layers) and all(p.requires_grad for p in params)
    assert {type(layer).__name__ for layer in layers} == {"LoraLinear", "LoraConv2d"}
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ehs).sample, plain)
        _randomize(pipe.unet)
        assert (pipe.unet(x, t, ehs).sample - plain).abs().max() > 1e-2
        set_adapters(pipe, {"default": 0.0})
        assert torch.equal(pipe.unet(x, t, ehs).sample, plain)


@pytest.mark.parametrize("dropout, bf16", [(0.0, False), (0.1, False), (0.1, True)], ids=["fp32", "dropout", "bf16-autocast"])
def test_forward_and_gradients_are_peft_use_dora_bit_for_bit(dropout, bf16):
    """With dropout, PEFT's DoRA runs the bias-free base op on the dropped input: so does ours, drawing the same
    masks in the same order. Under bf16 autocast (a bf16 UNet, fp32 adapters: diffusers' recipe) PEFT takes the
    Linear norm in the input's fp32 and the conv norm in bf16: so does ours."""
    from diffusers.training_utils import cast_training_params

    pipe = tiny_pipeline(0)
    if bf16:
        pipe.unet.to(torch.bfloat16)
    ref = copy.deepcopy(pipe.unet)
    torch.manual_seed(1)
    inject_lora(pipe.unet, rank=2, alpha=3, targets=TARGETS, use_dora=True, dropout=dropout)
    _randomize(pipe.unet)
    ref.add_adapter(LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True, lora_dropout=dropout))
    cast_training_params(ref, dtype=torch.float32)
    theirs = dict(ref.named_parameters())
    pairs = []
    with torch.no_grad():
        for path, layer in lora_layers(pipe.unet):
            for mine, key in ((layer.lora_A["default"], "lora_A.default.weight"), (layer.lora_B["default"], "lora_B.default.weight"),
                              (layer.lora_magnitude["default"], "lora_magnitude_vector.default.weight")):
                other = theirs[f"{path}.{key}"]
                other.copy_(mine.reshape(other.shape))
                pairs.append((mine, other))
    pipe.unet.train(), ref.train()
    x, t, ehs = (v.to(torch.bfloat16) if bf16 and v.is_floating_point() else v for v in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        torch.manual_seed(5)
        ours = pipe.unet(x, t, ehs).sample
        torch.manual_seed(5)
        peft_out = ref(x, t, ehs).sample
    assert ours.dtype == peft_out.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(ours, peft_out)
    ours.float().square().mean().backward()
    peft_out.float().square().mean().backward()
    for mine, other in pairs:
        assert torch.equal(mine.grad.reshape(other.grad.shape), other.grad)
    trained = {id(p) for p in lora_parameters(pipe.unet)}
    assert all(p.grad is None for p in pipe.unet.parameters() if id(p) not in trained)


def test_the_saved_file_loads_to_the_same_outputs_in_ours_and_stock_diffusers(tmp_path):
    pipe = _dora_pipe()
    x, t, ehs = _inputs()
    with torch.no_grad():
        want = pipe.unet(x, t, ehs).sample
        set_adapters(pipe, {"default": 0.5})
        half = pipe.unet(x, t, ehs).sample
    path = save_lora(tmp_path / "dora.safetensors", unet=pipe.unet, dtype=torch.float32)
    assert sum(k.endswith(".lora_magnitude_vector") for k in read_safetensors(path)[0]) == len(list(lora_layers(pipe.unet)))
    ours = tiny_pipeline(0)
    name = load_lora(ours, path)
    stock = tiny_pipeline(0)
    stock.load_lora_weights(str(path), adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, t, ehs).sample, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stock.unet(x, t, ehs).sample, want, rtol=1e-5, atol=1e-5)
        set_adapters(ours, {name: 0.5})  # a weight scales the whole change, in the adapter and in its file alike
        torch.testing.assert_close(ours.unet(x, t, ehs).sample, half, rtol=1e-5, atol=1e-5)
        fuse(ours)  # the loaded file fuses
        torch.testing.assert_close(ours.unet(x, t, ehs).sample, half, rtol=1e-5, atol=1e-5)


def test_fusing_a_dora_adapter_trained_here_is_refused_and_delete_removes_it():
    pipe = _dora_pipe()
    x, t, ehs = _inputs()
    with torch.no_grad():
        before = pipe.unet(x, t, ehs).sample
    with pytest.raises(ValueError, match=r"DoRA adapter\(s\) \['default'\].*save_lora"):
        fuse(pipe)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ehs).sample, before)  # nothing changed
    delete_adapter(pipe, "default")
    assert all(not layer._dora and "default" not in layer.lora_magnitude for _, layer in lora_layers(pipe.unet))
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, ehs).sample, tiny_pipeline(0).unet(x, t, ehs).sample)


def _config(base: str, tmp_path, **overrides) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        flat_images(data)
    values = dict(pretrained_model_name_or_path=base, train_data_dir=str(data), output_dir=str(tmp_path / "out"),
                  resolution=32, max_train_steps=4, seed=0, token="<s>", num_validation_images=0, checkpointing_steps=0,
                  use_dora=True, train_text_encoder=True, learning_rate=1e-2, save_precision="fp32")
    return TrainConfig(**{**values, **overrides})


def test_use_dora_trains_only_the_adapters_and_resumes_exactly(tmp_path):
    base = tmp_path / "tiny"
    tiny_pipeline(0).save_pretrained(base)
    straight = train(_config(str(base), tmp_path / "a"))
    fresh = tiny_pipeline(0)
    for name in ("unet", "text_encoder"):
        trained, original = base_state(getattr(straight.pipeline, name)), getattr(fresh, name).state_dict()
        assert all(torch.equal(trained[k], v) for k, v in original.items()), name
    lora, _ = read_lora_file(straight.lora_path)
    assert lora and all(w.magnitude is not None for w in lora.values())
    assert any(k.startswith("text_encoder.") for k in lora)
    moved = [w for w in lora.values() if w.B.abs().max() > 0]
    assert moved, "nothing was trained"

    cancelled = train(_config(str(base), tmp_path / "b", checkpointing_steps=2), progress=lambda p: p["step"] < 2)
    assert cancelled.status == "cancelled"
    with pytest.raises(ConfigError, match="use_dora"):
        train(_config(str(base), tmp_path / "b", checkpointing_steps=2, use_dora=False, resume_from_checkpoint="latest"))
    resumed = train(_config(str(base), tmp_path / "b", checkpointing_steps=2, resume_from_checkpoint="latest"))
    a, b = read_safetensors(straight.lora_path)[0], read_safetensors(resumed.lora_path)[0]
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_compiled_dora_step_traces_whole_and_equals_eager():
    """``--compile``: the DoRA forward (Linear and Conv2d) traces into one graph (``fullgraph``) and gives eager's
    output and gradients."""
    from torch import nn

    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Flatten(2), nn.Linear(25, 7)).train()
        inject_lora(model, rank=2, alpha=3, targets=["0", "2"], use_dora=True, dropout=0.1)
        assert sorted(type(layer).__name__ for _, layer in lora_layers(model)) == ["LoraConv2d", "LoraLinear"]
        _randomize(model)
        twin = copy.deepcopy(model)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break anywhere fails
        x = torch.randn(2, 4, 5, 5)
        torch.manual_seed(3)
        out = compiled(x)
        torch.manual_seed(3)
        want = twin(x)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        out.square().mean().backward()
        want.square().mean().backward()
        for mine, theirs in zip(lora_parameters(model), lora_parameters(twin)):
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    finally:
        dynamo.reset()


def test_each_adapter_beside_a_dora_one_adds_its_own_change():
    """A layer with a LoRA and a DoRA adapter adds each one's change to the base output (A1111's sum, and what the
    two files loaded give); the DoRA term scales the base output, never the other adapter's change."""
    from torch import nn

    from lora_diffusion.layers import LoraLinear

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6))
    layer.add_adapter("plain", 2)
    layer.add_adapter("dora", 2, dora=True)
    with torch.no_grad():
        for name in ("plain", "dora"):
            layer.lora_B[name].normal_(std=0.5)
        layer.lora_magnitude["dora"].mul_(1.5)
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = {}
        for key, weights in (("both", {"plain": 1.0, "dora": 1.0}), ("plain", {"plain": 1.0}), ("dora", {"dora": 1.0}), ("none", {})):
            layer.set_weights(weights)
            out[key] = layer(x)
    change = {k: out[k] - out["none"] for k in ("both", "plain", "dora")}
    assert change["dora"].abs().max() > 0.1 and change["plain"].abs().max() > 0.1
    torch.testing.assert_close(change["both"], change["plain"] + change["dora"], rtol=1e-5, atol=1e-6)
