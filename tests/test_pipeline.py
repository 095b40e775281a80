"""Pipeline-level invariants and bad input: load, weights, disable, fuse/unfuse."""

import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_diffusion import (
    LoraFormatError,
    LoraLayer,
    delete_adapter,
    disable_lora,
    enable_lora,
    fuse,
    inject_lora,
    list_adapters,
    load_lora,
    save_lora,
    set_adapters,
    unfuse,
)
from lora_diffusion.inject import lora_layers
from lora_diffusion.testing import tiny_pipeline

from conftest import generate, randomize_lora


def _lora_file(path, seed, rank=4, alpha=None, te=True, std=0.3, targets=None):
    pipe = tiny_pipeline(0)
    inject_lora(pipe.unet, rank=rank, alpha=alpha, targets=targets)
    randomize_lora(pipe.unet, seed=seed, std=std)
    if te:
        inject_lora(pipe.text_encoder, rank=2, alpha=alpha)
        randomize_lora(pipe.text_encoder, seed=seed + 100)
    return save_lora(path, unet=pipe.unet, text_encoder=pipe.text_encoder if te else None, dtype=torch.float32)


@pytest.fixture
def two_files(tmp_path):
    return _lora_file(tmp_path / "style.safetensors", 1, rank=4, alpha=8), _lora_file(tmp_path / "subject.safetensors", 2, rank=2)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_disabled_equals_base_and_enable_restores(two_files):
    base = generate(tiny_pipeline(0))
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    with_lora = generate(pipe)
    assert abs(with_lora - base).max() > 0.05
    disable_lora(pipe)
    assert abs(generate(pipe) - base).max() == 0
    enable_lora(pipe)
    assert abs(generate(pipe) - with_lora).max() == 0


def test_fused_equals_unfused_with_zero_overhead_and_unfuse_is_exact(two_files):
    pipe = tiny_pipeline(0)
    original = {"unet": _weights(pipe.unet), "te": _weights(pipe.text_encoder)}
    load_lora(pipe, two_files[0])
    load_lora(pipe, two_files[1], weight=-0.6)
    assert list_adapters(pipe) == {"unet": ["style", "subject"], "text_encoder": ["style", "subject"]}
    unfused = generate(pipe)
    fuse(pipe)
    assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())  # generation runs the base modules
    assert not any(isinstance(m, LoraLayer) for m in pipe.text_encoder.modules())
    assert abs(generate(pipe) - unfused).max() < 1e-4
    unfuse(pipe)
    for key, model in (("unet", pipe.unet), ("te", pipe.text_encoder)):
        now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert now.keys() == original[key].keys()
        assert all(torch.equal(now[k], original[key][k]) for k in now), "unfuse must restore the base bit for bit"
    assert abs(generate(pipe) - unfused).max() == 0


def test_two_adapters_equal_sum_of_weighted_deltas(two_files):
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    load_lora(pipe, two_files[1])
    set_adapters(pipe, {"style": 0.3, "subject": 0.9})
    layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_v")
    d_style = layer.delta_weight(["style"], {"style": 1.0})
    d_subject = layer.delta_weight(["subject"], {"subject": 1.0})
    torch.testing.assert_close(layer.delta_weight(), 0.3 * d_style + 0.9 * d_subject)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(
        layer(x), torch.nn.functional.linear(x, layer.base_layer.weight + 0.3 * d_style + 0.9 * d_subject, layer.base_layer.bias),
        rtol=1e-5, atol=1e-5,
    )


def test_reweight_while_fused_equals_fusing_afresh(two_files):
    a = tiny_pipeline(0)
    for f in two_files:
        load_lora(a, f)
    fuse(a)
    set_adapters(a, {"style": -0.5, "subject": 1.7})
    b = tiny_pipeline(0)
    for f in two_files:
        load_lora(b, f)
    set_adapters(b, {"style": -0.5, "subject": 1.7})
    fuse(b)
    wa, wb = _weights(a.unet), _weights(b.unet)
    assert all(torch.equal(wa[k], wb[k]) for k in wb)
    assert abs(generate(a) - generate(b)).max() == 0


def test_disable_while_fused_gives_base(two_files):
    base = generate(tiny_pipeline(0))
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    fused = (fuse(pipe), generate(pipe))[1]
    disable_lora(pipe)
    assert abs(generate(pipe) - base).max() == 0
    enable_lora(pipe)
    assert abs(generate(pipe) - fused).max() == 0


def _fused(model) -> bool:
    return any(layer.fused for _, layer in lora_layers(model))


def test_fuse_while_disabled_waits_for_enable_and_new_adapters_stay_off(two_files, tmp_path):
    """As in diffusers, a disabled model runs its base weights whatever is fused or loaded meanwhile: ``fuse``
    waits for ``enable_lora``, and an adapter loaded on layers not wrapped before starts disabled too."""
    base = generate(tiny_pipeline(0))
    mlp = _lora_file(tmp_path / "mlp.safetensors", 3, targets="attn-mlp", te=False)
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    disable_lora(pipe)
    fuse(pipe)
    assert not _fused(pipe.unet) and abs(generate(pipe) - base).max() == 0
    load_lora(pipe, mlp)  # its feed-forward layers were not wrapped before
    assert abs(generate(pipe) - base).max() == 0
    enable_lora(pipe)
    assert _fused(pipe.unet) and _fused(pipe.text_encoder)
    ref = tiny_pipeline(0)
    load_lora(ref, two_files[0]), load_lora(ref, mlp), fuse(ref)
    assert abs(generate(pipe) - generate(ref)).max() == 0


def test_unfuse_while_disabled_is_not_undone_by_enable(two_files):
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    unfused = generate(pipe)
    fuse(pipe)
    disable_lora(pipe)
    unfuse(pipe)
    enable_lora(pipe)
    assert not _fused(pipe.unet) and not _fused(pipe.text_encoder)
    assert abs(generate(pipe) - unfused).max() == 0


def test_refused_load_into_a_fused_pipeline_changes_no_component(two_files, tmp_path):
    """The text encoder takes a file's adapter before the UNet does: when the UNet's fuse refuses it (here a
    factor that overflows fp16 once fused), the text encoder gives it back too, and no wrapper is left behind."""
    tensors, header = load_file(two_files[1]), safe_open(two_files[1], "pt").metadata()
    key = next(k for k in tensors if k.startswith("unet.") and "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], 6e4)  # (an fp16 number)
    bad = tmp_path / "overflow.safetensors"
    save_file(tensors, bad, metadata=header)
    pipe = tiny_pipeline(0, dtype=torch.float16)
    load_lora(pipe, two_files[0])
    fuse(pipe)
    before = {c: (_weights(getattr(pipe, c)), [n for n, _ in getattr(pipe, c).named_modules()]) for c in ("unet", "text_encoder")}
    with pytest.raises(ValueError, match="refusing to fuse"):
        load_lora(pipe, bad)
    assert list_adapters(pipe) == {"unet": ["style"], "text_encoder": ["style"]}
    for c, (weights, modules) in before.items():
        model = getattr(pipe, c)
        assert [n for n, _ in model.named_modules()] == modules
        assert all(torch.equal(weights[k], v) for k, v in _weights(model).items())


def test_a_fuse_refused_in_one_component_fuses_none(two_files, tmp_path):
    """``fuse`` goes component by component (the UNet first): when the text encoder refuses, the UNet is
    unfused again, bit for bit."""
    tensors, header = load_file(two_files[1]), safe_open(two_files[1], "pt").metadata()
    key = next(k for k in tensors if k.startswith("text_encoder.") and "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], 6e4)  # (an fp16 number; the fused fp16 weight overflows)
    tensors[key.replace("lora_B", "lora_A")].fill_(1.0)
    bad = tmp_path / "te_overflow.safetensors"
    save_file(tensors, bad, metadata=header)
    pipe = tiny_pipeline(0, dtype=torch.float16)
    load_lora(pipe, bad)
    before = {c: _weights(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    with pytest.raises(ValueError, match="refusing to fuse"):
        fuse(pipe)
    assert not _fused(pipe.unet) and not _fused(pipe.text_encoder)
    for c, weights in before.items():
        assert all(torch.equal(weights[k], v) for k, v in _weights(getattr(pipe, c)).items())


def test_huge_finite_weights_fuse_and_non_finite_ones_are_refused(two_files):
    """The fuse check is exact: weights whose squares overflow an fp32 norm but are finite fuse (this raised an
    IndexError), an infinite scale is refused with every weight and setting as it was."""
    pipe = tiny_pipeline(0)
    original = _weights(pipe.unet)
    load_lora(pipe, two_files[0])
    fuse(pipe)
    fused = _weights(pipe.unet)
    with pytest.raises(ValueError, match="refusing to fuse: .* would get NaN or Inf"):
        set_adapters(pipe, {"style": 1e300})  # inf once the scales are fp32
    assert all(torch.equal(fused[k], v) for k, v in _weights(pipe.unet).items())
    assert {layer.weights["style"] for _, layer in lora_layers(pipe.unet)} == {1.0}
    set_adapters(pipe, {"style": 1e20})
    weights = torch.cat([w.flatten() for w in _weights(pipe.unet).values()])
    assert weights.isfinite().all() and not torch.linalg.vector_norm(weights).isfinite()
    unfuse(pipe)
    assert all(torch.equal(layer.base_layer.weight, original[f"{path}.weight"]) for path, layer in lora_layers(pipe.unet))


def test_adapter_names_may_hold_dots(two_files, tmp_path):
    """A1111 names a LoRA after its file (``detail_v1.5``); torch's parameter names can't hold a dot, so the
    layers keep such a name escaped, and every function takes the name as it is."""
    dotted = tmp_path / "detail_v1.5.safetensors"
    shutil.copy(two_files[0], dotted)
    pipe, ref = tiny_pipeline(0), tiny_pipeline(0)
    assert load_lora(pipe, dotted) == "detail_v1.5"
    assert load_lora(pipe, dotted, adapter="a%2Eb.c") == "a%2Eb.c"  # ('%' escaped too: no two names collide)
    load_lora(ref, two_files[0]), load_lora(ref, two_files[0], adapter="other")
    assert list_adapters(pipe)["unet"] == ["detail_v1.5", "a%2Eb.c"]
    for weights in ({"detail_v1.5": 0.5}, {"detail_v1.5": 0.5, "a%2Eb.c": -1.0}):
        set_adapters(pipe, weights)
        set_adapters(ref, {{"detail_v1.5": "style", "a%2Eb.c": "other"}[k]: w for k, w in weights.items()})
        assert abs(generate(pipe) - generate(ref)).max() == 0
        fuse(pipe), fuse(ref)
        assert abs(generate(pipe) - generate(ref)).max() == 0
        unfuse(pipe), unfuse(ref)
    out = save_lora(tmp_path / "out.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, adapter="detail_v1.5",
                   dtype=torch.float32)
    saved, source = load_file(out), load_file(two_files[0])
    assert saved.keys() == source.keys() and all(torch.equal(saved[k].float(), source[k]) for k in source)
    delete_adapter(pipe, "detail_v1.5")
    assert list_adapters(pipe)["unet"] == ["a%2Eb.c"]


def test_a_learned_token_comes_with_its_lora(tmp_path, caplog):
    """A pivotal-tuning LoRA names its ``embeddings.safetensors`` in its metadata: ``load_lora`` adds the token
    to the tokenizer and its vector to the text encoder (which holds LoRA layers too), once."""
    pipe = tiny_pipeline(0)
    inject_lora(pipe.unet, rank=2), inject_lora(pipe.text_encoder, rank=2)
    randomize_lora(pipe.unet, seed=1), randomize_lora(pipe.text_encoder, seed=2)
    folder = tmp_path / "pti"
    save_lora(folder / "pytorch_lora_weights.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder,
              metadata={"embedding_file": "embeddings.safetensors", "trigger_words": ["<strp>"]})
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    save_file({"<strp>": vector}, folder / "embeddings.safetensors")
    fresh = tiny_pipeline(0)
    size = len(fresh.tokenizer)
    load_lora(fresh, folder)
    token = fresh.tokenizer.convert_tokens_to_ids("<strp>")
    assert len(fresh.tokenizer) == size + 1 and torch.equal(fresh.text_encoder.get_input_embeddings().weight[token], vector)
    assert fresh.tokenizer("a <strp> circle").input_ids.count(token) == 1
    load_lora(fresh, folder, adapter="again")
    assert len(fresh.tokenizer) == size + 1
    (folder / "embeddings.safetensors").unlink()
    with caplog.at_level("WARNING", logger="lora_diffusion.pipeline"):
        load_lora(tiny_pipeline(0), folder)
    assert "trained with a learned token, but embeddings.safetensors is not beside it" in caplog.text


def test_a_bad_learned_token_refuses_the_whole_load(tmp_path):
    """A vector of the wrong width, or an ``embedding_file`` that is a path out of the LoRA's folder, refuses the
    load before anything changes."""
    pipe = tiny_pipeline(0)
    inject_lora(pipe.unet, rank=2)
    randomize_lora(pipe.unet, seed=1)
    save_file({"<outside>": torch.ones(32)}, tmp_path / "secret.safetensors")
    for name, embedding_file, vector in (("wide", "embeddings.safetensors", torch.ones(35)),
                                         ("escape", "../secret.safetensors", None),
                                         ("absolute", str(tmp_path / "secret.safetensors"), None)):
        folder = tmp_path / name
        save_lora(folder / "pytorch_lora_weights.safetensors", unet=pipe.unet, metadata={"embedding_file": embedding_file})
        if vector is not None:
            save_file({"<tok>": vector}, folder / "embeddings.safetensors")
        fresh = tiny_pipeline(0)
        before, size = _weights(fresh.unet), len(fresh.tokenizer)
        with pytest.raises(LoraFormatError, match=r"shape \(35,\); this text encoder needs finite vectors 32 wide|must be a file name beside the LoRA"):
            load_lora(fresh, folder)
        assert list_adapters(fresh) == {} and len(fresh.tokenizer) == size
        assert all(torch.equal(before[k], v) for k, v in _weights(fresh.unet).items())


def test_a_refused_enable_leaves_the_pipeline_disabled(two_files, tmp_path):
    """Enabling fuses what was fused (or asked to fuse) while disabled; when that fuse is refused (here a text
    encoder factor loaded while disabled overflows fp16 once fused), every component stays disabled, unfused,
    with its fuse still waiting."""
    tensors, header = load_file(two_files[1]), safe_open(two_files[1], "pt").metadata()
    key = next(k for k in tensors if k.startswith("text_encoder.") and "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], 6e4)
    tensors[key.replace("lora_B", "lora_A")].fill_(1.0)
    bad = tmp_path / "te_overflow.safetensors"
    save_file(tensors, bad, metadata=header)
    base = generate(tiny_pipeline(0, dtype=torch.float16))
    pipe = tiny_pipeline(0, dtype=torch.float16)
    load_lora(pipe, two_files[0])
    fuse(pipe)
    disable_lora(pipe)
    load_lora(pipe, bad)
    before = {c: _weights(getattr(pipe, c)) for c in ("unet", "text_encoder")}
    with pytest.raises(ValueError, match="refusing to fuse"):
        enable_lora(pipe)
    assert not _fused(pipe.unet) and not _fused(pipe.text_encoder)
    assert all(layer.disabled for c in ("unet", "text_encoder") for _, layer in lora_layers(getattr(pipe, c)))
    for c, weights in before.items():
        assert all(torch.equal(weights[k], v) for k, v in _weights(getattr(pipe, c)).items())
    assert abs(generate(pipe) - base).max() == 0
    delete_adapter(pipe, "te_overflow")
    enable_lora(pipe)  # the fuse still waits: enabling now fuses the rest
    assert _fused(pipe.unet) and _fused(pipe.text_encoder)


def test_pickled_files_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("lora.pt", "lora.ckpt", "lora.bin", "disguised.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(LoraFormatError, match="pickle"):
            load_lora(tiny_pipeline(0), path)
    assert not marker.exists()


def test_unmatched_keys_name_the_keys_and_the_architecture(tmp_path):
    sd15 = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.zeros(4, 768),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.zeros(320, 4),
    }
    path = tmp_path / "sd15.safetensors"
    save_file(sd15, path)
    pipe = tiny_pipeline(0)
    with pytest.raises(LoraFormatError, match=r"sd15\.safetensors: 1 of 1 unet keys match no layer.*down_blocks\.0\.attentions\.0.*SD 1\.x"):
        load_lora(pipe, path)
    assert list_adapters(pipe) == {}


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    bad = {f"{key}.lora_A.weight": torch.zeros(4, 48), f"{key}.lora_B.weight": torch.zeros(64, 4)}
    path = tmp_path / "bad.safetensors"
    save_file(bad, path)
    pipe = tiny_pipeline(0)
    with pytest.raises(LoraFormatError, match=r"attn1\.to_q: file has down \(4, 48\) / up \(64, 4\).*\(64, 64\) needs \(4, 64\) / \(64, 4\)"):
        load_lora(pipe, path)
    assert list_adapters(pipe) == {}  # nothing half-loaded


def test_strict_false_loads_what_matches(tmp_path, caplog):
    ok = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    sd = {f"{ok}.lora_A.weight": torch.ones(2, 64), f"{ok}.lora_B.weight": torch.ones(64, 2),
          "unet.nowhere.to_q.lora_A.weight": torch.ones(2, 64), "unet.nowhere.to_q.lora_B.weight": torch.ones(64, 2)}
    path = tmp_path / "partial.safetensors"
    save_file(sd, path)
    with pytest.raises(LoraFormatError, match="unet.nowhere.to_q"):
        load_lora(tiny_pipeline(0), path)
    pipe = tiny_pipeline(0)
    with caplog.at_level("WARNING"):
        load_lora(pipe, path, strict=False)
    assert "Loaded the other 1 layers" in caplog.text
    assert list_adapters(pipe) == {"unet": ["partial"]}


def test_a_load_walks_each_model_a_fixed_number_of_times_not_once_per_key(two_files, monkeypatch):
    """Matching a file's keys to modules looks each up in one listing: walking the whole model per key made a load
    quadratic (SD1.5's 176 layers: ~0.5 s an adapter, growing with each adapter loaded)."""
    pipe = tiny_pipeline(0)
    roots = {id(pipe.unet), id(pipe.text_encoder)}
    walks = []
    named_modules = torch.nn.Module.named_modules

    def counting(self, *args, **kwargs):
        if id(self) in roots:
            walks.append(type(self).__name__)
        return named_modules(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    for name, file in zip(("a", "b"), two_files):
        walks.clear()
        load_lora(pipe, file, adapter=name)
        layers = sum(1 for model in (pipe.unet, pipe.text_encoder) for _ in lora_layers(model))
        assert layers > 40 and len(walks) <= 6, (layers, walks)


def test_nan_in_file_is_refused_and_a_nan_adapter_refuses_to_fuse(tmp_path):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    b = torch.ones(64, 2)
    b[0, 0] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 64), f"{key}.lora_B.weight": b}, path)
    pipe = tiny_pipeline(0)
    with pytest.raises(LoraFormatError, match=rf"nan.safetensors: {key}.lora_B.weight holds NaN or Inf"):
        load_lora(pipe, path)
    assert list_adapters(pipe) == {}
    save_file({f"{key}.lora_A.weight": torch.ones(2, 64), f"{key}.lora_B.weight": torch.ones(64, 2)}, path)
    load_lora(pipe, path)
    with torch.no_grad():  # an Inf that training put there
        pipe.unet.get_submodule(key.removeprefix("unet.")).lora_B["nan"][0, 0] = float("inf")
    before = _weights(pipe.unet)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fuse(pipe)
    after = _weights(pipe.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_lora_leaves_out_a_model_without_the_adapter(two_files, tmp_path):
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    unet_only = _lora_file(tmp_path / "unet_only.safetensors", 3, te=False)
    load_lora(pipe, unet_only)
    out = save_lora(tmp_path / "out.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, adapter="unet_only",
                    dtype=torch.float32)
    saved, source = load_file(out), load_file(unet_only)
    assert saved.keys() == source.keys() and all(k.startswith("unet.") for k in saved)
    with pytest.raises(ValueError, match=r"no adapter 'nope' to save: unet has \['style', 'unet_only'\]; text_encoder has \['style'\]"):
        save_lora(tmp_path / "none.safetensors", unet=pipe.unet, text_encoder=pipe.text_encoder, adapter="nope")
    assert not (tmp_path / "none.safetensors").exists()


def test_deleting_an_unknown_adapter_is_an_error(two_files):
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    with pytest.raises(KeyError, match=r"no adapter named 'styl'; loaded adapters: \['style'\]"):
        delete_adapter(pipe, "styl")
    assert list_adapters(pipe) == {"unet": ["style"], "text_encoder": ["style"]}


def test_a_weight_that_is_not_a_finite_number_is_refused_naming_the_adapter(two_files):
    pipe = tiny_pipeline(0)
    with pytest.raises(ValueError, match="adapter 'style': the weight must be a finite number, got nan"):
        load_lora(pipe, two_files[0], weight=float("nan"))
    assert not any(list_adapters(pipe).values())  # (refused before anything loads)
    load_lora(pipe, two_files[0], weight=0.5)
    for weights, text_encoder, match in (({"style": float("inf")}, None, "the weight must be a finite number, got inf"),
                                         ({"style": "x"}, None, "the weight must be a number, got 'x'"),
                                         ({"style": 1.0}, float("nan"), "the weight in the text encoder must be a finite number"),
                                         ({"style": 1.0}, {"style": None}, "the weight in the text encoder must be a number, got None")):
        with pytest.raises(ValueError, match=f"adapter 'style': {match}"):
            set_adapters(pipe, weights, text_encoder=text_encoder)
    layers = [layer for model in (pipe.unet, pipe.text_encoder) for _, layer in lora_layers(model)]
    assert layers and all(layer.weights == {"style": 0.5} for layer in layers)  # (refused before any layer changed)


def test_same_name_twice_is_refused(two_files):
    pipe = tiny_pipeline(0)
    load_lora(pipe, two_files[0])
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(pipe, two_files[0])
    assert load_lora(pipe, two_files[0], adapter="style2") == "style2"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_pipelines(tmp_path, dtype):
    # a moderate LoRA: large random deltas on q/k saturate the attention softmax, where fp16 rounding explodes
    path = _lora_file(tmp_path / "style.safetensors", 1, rank=4, alpha=8, te=False, std=0.1)
    g = torch.Generator().manual_seed(0)
    sample, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    reference = tiny_pipeline(0)
    load_lora(reference, path)
    with torch.no_grad():
        expected = reference.unet(sample, 10, encoder_hidden_states=cond).sample
    pipe = tiny_pipeline(0, dtype=dtype)
    load_lora(pipe, path)
    layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.lora_A["style"].dtype == dtype
    sample, cond = sample.to(dtype), cond.to(dtype)
    with torch.no_grad():
        unfused = pipe.unet(sample, 10, encoder_hidden_states=cond).sample
        w0 = layer.base_layer.weight.detach().clone()
        fuse(pipe)
        fused = pipe.unet(sample, 10, encoder_hidden_states=cond).sample
        unfuse(pipe)
    assert unfused.dtype == dtype and torch.isfinite(unfused).all()
    tol = 5e-3 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(unfused.float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(fused.float(), expected, rtol=tol, atol=tol)
    assert torch.equal(layer.base_layer.weight, w0)
