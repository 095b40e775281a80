"""Blending: runtime weights (per adapter, text encoder, per block) against diffusers+PEFT, fused vs unfused,
re-weighting while fused, merged files (concat exact, SVD error as reported), prompt tags, baking."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_diffusion import fuse, load_lora, set_adapters, unfuse
from lora_diffusion.blend import LBW_SD1, PromptWeight, apply_prompt_loras, block_factor, lbw_block, merge_loras, parse_prompt
from lora_diffusion.cli import main as cli_main
from lora_diffusion.formats import our_metadata, read_lora_file, read_safetensors, write_lora_file
from lora_diffusion.inject import lora_layers
from lora_diffusion.layers import LoraLinear
from lora_diffusion.testing import random_lora, tiny_pipeline
from lora_diffusion.tools import bake

logging.getLogger("diffusers").setLevel(logging.ERROR)


def generate(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=g, output_type="np").images


def weights_of(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a: rank 4, alpha 8, UNet attention + text encoder; b: rank 2, alpha 1, UNet attention + MLP, text encoder."""
    d = tmp_path_factory.mktemp("loras")
    pipe = tiny_pipeline(0)
    write_lora_file(d / "a.safetensors", random_lora(pipe, seed=1, rank=4, alpha=8), dtype=torch.float32)
    write_lora_file(d / "b.safetensors", random_lora(pipe, seed=2, rank=2, alpha=1, unet_targets="attn-mlp"), dtype=torch.float32)
    return d


def loaded(files, *names, **weights):
    pipe = tiny_pipeline(0)
    for n in names:
        load_lora(pipe, files / f"{n}.safetensors")
    if weights:
        set_adapters(pipe, weights)
    return pipe


# ---------------------------------------------------------------------------------------------- against diffusers
@pytest.fixture(scope="module")
def reference(files):
    pytest.importorskip("peft")
    ref = tiny_pipeline(0)
    ref.load_lora_weights(str(files / "a.safetensors"), adapter_name="a")
    ref.load_lora_weights(str(files / "b.safetensors"), adapter_name="b")
    return ref


def test_runtime_blend_equals_diffusers_set_adapters(files, reference):
    reference.set_adapters(["a", "b"], adapter_weights=[0.3, 0.9])
    ours = loaded(files, "a", "b", a=0.3, b=0.9)
    expected = generate(reference)
    assert np.abs(expected - generate(tiny_pipeline(0))).max() > 1e-2
    np.testing.assert_allclose(generate(ours), expected, atol=1e-5)


def test_per_block_and_text_encoder_weights_equal_diffusers(files, reference):
    unet_blocks = {"down": 0.5, "mid": 0, "up": {"block_0": [1.0, 0.5, -1.0]}}
    reference.set_adapters(["a", "b"], adapter_weights=[{"unet": unet_blocks, "text_encoder": 0.2}, 0.9])
    ours = loaded(files, "a", "b")
    set_adapters(ours, {"a": 1.0, "b": 0.9}, text_encoder={"a": 0.2}, blocks={"a": unet_blocks})
    np.testing.assert_allclose(generate(ours), generate(reference), atol=1e-5)


# ---------------------------------------------------------------------------------------------- block weights
def test_lbw_block_names():
    assert lbw_block("unet", "down_blocks.0.attentions.0.proj_in") == "IN01"
    assert lbw_block("unet", "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q") == "IN08"
    assert lbw_block("unet", "down_blocks.0.downsamplers.0.conv") == "IN03"
    assert lbw_block("unet", "mid_block.resnets.1.conv1") == "MID"
    assert lbw_block("unet", "up_blocks.1.attentions.0.proj_out") == "OUT03"
    assert lbw_block("unet", "up_blocks.3.attentions.2.proj_out") == "OUT11"
    assert lbw_block("unet", "up_blocks.0.upsamplers.0.conv") == "OUT02"
    assert lbw_block("text_encoder", "encoder.layers.0.self_attn.q_proj") == "BASE"
    assert lbw_block("unet", "conv_in") == "IN00" and lbw_block("unet", "conv_out") is None
    # every SD1 attention block of the vector is reached by some layer
    attention_blocks = {lbw_block("unet", f"{s}_blocks.{b}.attentions.{j}.proj_in") for s, bs, js in (("down", range(3), range(2)), ("up", range(1, 4), range(3))) for b in bs for j in js}
    assert attention_blocks | {"BASE", "MID"} == set(LBW_SD1)


@pytest.mark.parametrize("vector", [
    [0.0] + [1] * 12 + [0.0] + [1] * 12,  # the 26 blocks: BASE (text encoder) and MID off, IN04 / IN05 too below
    [0.0] + [1, 1, 0, 0, 1, 1] + [0.0] + [1] * 9,  # the 17: OUT00-OUT02 are not among them, so they are off too
])
def test_lbw_vector_zero_equals_leaving_those_layers_out(files, vector):
    """tiny UNet: down_blocks.1 = IN04 / IN05, mid = MID, up_blocks.0 = OUT00-OUT02, up_blocks.1 = OUT03-OUT05 (no
    LoRA layers there). A block the vector leaves out gets 0, as in the LBW extension (a 17-value vector on a LoCon
    drops IN03, IN06, IN09-IN11 and OUT00-OUT02)."""
    if len(vector) == 26:
        vector = [*vector[:5], 0, 0, *vector[7:]]  # IN04, IN05 off: the up_blocks.0 layers alone stay on
    else:
        vector = [*vector[:8], 1, 1, 1, *vector[11:]]  # OUT03-OUT05 on: nothing there, so every layer is off
    ours = loaded(files, "a")
    set_adapters(ours, {"a": 0.7}, blocks=vector)
    lora, _ = read_lora_file(files / "a.safetensors")
    kept = {k: w for k, w in lora.items() if k.startswith("unet.up_blocks.")} if len(vector) == 26 else {}
    assert len(kept) < len(lora) and (kept or len(vector) == 17)
    ref = tiny_pipeline(0)
    if kept:
        write_lora_file(files / "a_up.safetensors", kept, dtype=torch.float32)
        load_lora(ref, files / "a_up.safetensors", weight=0.7)
    np.testing.assert_array_equal(generate(ours), generate(ref))
    assert block_factor(vector, "unet", "up_blocks.0.attentions.1.proj_in") == (1.0 if kept else 0.0)
    assert block_factor(vector, "unet", "time_embedding.linear_1") == 1.0  # outside every block


def test_text_encoder_weight_zero_equals_unet_only(files):
    ours = loaded(files, "a")
    set_adapters(ours, {"a": 0.6}, text_encoder={"a": 0.0})
    lora, _ = read_lora_file(files / "a.safetensors")
    write_lora_file(files / "a_unet.safetensors", {k: w for k, w in lora.items() if k.startswith("unet.")}, dtype=torch.float32)
    ref = tiny_pipeline(0)
    load_lora(ref, files / "a_unet.safetensors", weight=0.6)
    np.testing.assert_array_equal(generate(ours), generate(ref))


def test_bad_block_specs_raise(files):
    pipe = loaded(files, "a")
    with pytest.raises(ValueError, match="17 values"):
        set_adapters(pipe, {"a": 1}, blocks=[1, 0, 1])
    with pytest.raises(ValueError, match="'down', 'mid', 'up'"):
        set_adapters(pipe, {"a": 1}, blocks={"middle": 0})
    # per-layer lists as diffusers counts them (layers_per_block 2: 2 down, 3 up, 1 mid; one value: whole block)
    for spec, where in (({"up": {"block_0": [1, 0]}}, "3 values for up.block_0"), ({"up": {"block_0": [1, 0.5, 0, 7]}}, "3 values for up.block_0"),
                        ({"down": [1, 0, 1]}, "2 values for down"), ({"mid": [0.5, 2]}, "1 values for mid")):
        with pytest.raises(ValueError, match=f"expected {where} .one per layer., got"):
            set_adapters(pipe, {"a": 1}, blocks=spec)
    set_adapters(pipe, {"a": 1}, blocks={"down": [0.5], "mid": [0.2], "up": {"block_1": [1, 0.5, 0]}})
    with pytest.raises(KeyError, match="nope"):
        set_adapters(pipe, {"nope": 1})


# ---------------------------------------------------------------------------------------------- unfused forward
@pytest.mark.parametrize("grad", [False, True])
def test_several_adapters_run_as_one_low_rank_matmul_pair(files, monkeypatch, grad):
    """Two adapters (ranks 4 and 2): one down-projection over the 6 stacked ranks; outside autograd the up-
    projection adds into the base output (addmm_), with autograd it is a plain matmul and an add."""
    import torch.nn.functional as F

    downs = []
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: downs.append(w.shape[0]) or original(x, w, b))
    pipe = loaded(files, "a", "b", a=0.3, b=-0.9)
    layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    x = torch.randn(1, 3, layer.in_features, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    ranks = [n for n in downs if n < layer.out_features]
    assert ranks == [4 + 2], downs  # one call over the concatenated ranks, not one per adapter
    assert len(downs) == (3 if grad else 2), downs  # base, A; + B with autograd (else addmm_ into the base output)
    expected = layer.base_layer(x) + sum(w * layer.specs[n].scale * (x @ layer.lora_A[n].T @ layer.lora_B[n].T)
                                         for n, w in (("a", 0.3), ("b", -0.9)))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- fused
@pytest.mark.parametrize("wa, wb", [(0.3, 0.9), (-0.5, 1.7)])
def test_fused_equals_unfused_and_unfuse_restores(files, wa, wb):
    pipe = loaded(files, "a", "b", a=wa, b=wb)
    unfused = generate(pipe)
    before = weights_of(tiny_pipeline(0))
    fuse(pipe)
    assert not any(isinstance(m, LoraLinear) for m in pipe.unet.modules())  # wrappers swapped out
    np.testing.assert_allclose(generate(pipe), unfused, atol=1e-5)
    unfuse(pipe)
    after = {k.replace(".base_layer", ""): v for k, v in weights_of(pipe).items() if ".lora_" not in k}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_reweighting_while_fused_equals_fusing_afresh(files):
    pipe = loaded(files, "a", "b", a=0.3, b=0.9)
    fuse(pipe)
    set_adapters(pipe, {"a": -0.4, "b": 1.2}, text_encoder={"b": 0.5}, blocks={"a": {"mid": 0}})
    fresh = loaded(files, "a", "b")
    set_adapters(fresh, {"a": -0.4, "b": 1.2}, text_encoder={"b": 0.5}, blocks={"a": {"mid": 0}})
    fuse(fresh)
    w1, w2 = weights_of(pipe), weights_of(fresh)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)  # bit for bit


# ---------------------------------------------------------------------------------------------- merging files
def test_concat_merge_equals_runtime_blend(files, tmp_path):
    report = merge_loras({files / "a.safetensors": 0.3, files / "b.safetensors": -0.9}, tmp_path / "ab.safetensors", dtype=torch.float32)
    assert report.mode == "concat" and report.error == 0.0
    assert len(repr(report)) < 300  # (not every merged tensor)
    merged = tiny_pipeline(0)
    load_lora(merged, tmp_path / "ab.safetensors")
    assert merged.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q").specs["ab"].rank == 6
    blended = loaded(files, "a", "b", a=0.3, b=-0.9)
    np.testing.assert_allclose(generate(merged), generate(blended), atol=1e-5)


def test_merges_and_bakes_with_block_weights_equal_the_runtime_blend(files, tmp_path):
    """Per-block weights in a merge (an LBW vector, a diffusers block dict; the API and ``merge a:1:OUTD``) and in a
    bake give what ``set_adapters(blocks=...)`` gives at run time; layers every block weight zeroes are left out."""
    from diffusers import StableDiffusionPipeline

    from lora_diffusion.blend import LBW_PRESETS

    a, b = files / "a.safetensors", files / "b.safetensors"
    outd, dicts = list(LBW_PRESETS["OUTD"]), {"down": 0.2, "mid": 1.0, "up": {"block_1": [0.5, 0.0, 1.5]}}
    blended = loaded(files, "a", "b")
    set_adapters(blended, {"a": 0.8, "b": -0.6}, blocks={"a": outd, "b": dicts})
    merge_loras([(a, 0.8, outd), (b, -0.6, dicts)], tmp_path / "api.safetensors", dtype=torch.float32)
    assert cli_main(["merge", f"{a}:0.8:OUTD", f"{b}:-0.6", "-o", str(tmp_path / "cli.safetensors"), "--dtype", "fp32"]) == 0
    merged = tiny_pipeline(0)
    load_lora(merged, tmp_path / "api.safetensors")
    np.testing.assert_allclose(generate(merged), generate(blended), atol=1e-5)
    cli = read_lora_file(tmp_path / "cli.safetensors")[0]
    same = merge_loras([(a, 0.8, outd), (b, -0.6)], dtype=torch.float32).lora
    assert cli.keys() == same.keys()
    for key, w in same.items():  # (the command line's preset name is the API's vector)
        assert torch.equal(cli[key].A, w.A) and torch.equal(cli[key].B, w.B), key
    meta = our_metadata(read_lora_file(tmp_path / "api.safetensors")[1])
    assert meta["merged_from"][0]["blocks"] == outd and meta["merged_from"][1]["blocks"] == dicts
    # OUTD keeps BASE (the text encoder) and OUT03-OUT06, none of which the tiny UNet has: only a's text encoder is left
    alone = merge_loras([(a, 1.0, outd)]).lora
    assert set(alone) == {k for k in read_lora_file(a)[0] if k.startswith("text_encoder.")}
    for bad in (f"{a}:1:1,0,1", f"{a}:1:NONE"):  # (a vector of 3 values; every block at 0)
        assert cli_main(["merge", bad, "-o", str(tmp_path / "bad.safetensors")]) == 2
        assert not (tmp_path / "bad.safetensors").exists()
    base = tiny_pipeline(0)
    base.save_pretrained(tmp_path / "base")
    assert cli_main(["bake", str(tmp_path / "base"), f"{a}:0.8:OUTD", "-o", str(tmp_path / "baked")]) == 0
    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked", safety_checker=None, requires_safety_checker=False)
    baked.set_progress_bar_config(disable=True)
    one = loaded(files, "a")
    set_adapters(one, {"a": 0.8}, blocks={"a": outd})
    np.testing.assert_allclose(generate(baked), generate(one), atol=1e-5)


def _file_deltas(path, weights=None) -> dict[str, torch.Tensor]:
    lora, _ = read_lora_file(path)
    return {k: (w.B.float().flatten(1) @ w.A.float().flatten(1)) * (w.alpha / w.rank) for k, w in lora.items()}


def test_svd_merge_full_rank_exact_and_low_rank_error_as_reported(files, tmp_path):
    inputs = {files / "a.safetensors": 0.7, files / "b.safetensors": 0.4}
    exact = {}
    for path, w in inputs.items():
        for k, d in _file_deltas(path).items():
            exact[k] = exact.get(k, 0) + w * d
    full = merge_loras(inputs, tmp_path / "full.safetensors", mode="svd", dtype=torch.float32)
    got = _file_deltas(tmp_path / "full.safetensors")
    assert full.error < 1e-5
    assert all(torch.allclose(got[k], exact[k], atol=1e-6) for k in exact)

    low = merge_loras(inputs, tmp_path / "r1.safetensors", mode="svd", rank=1, format="kohya")
    got = _file_deltas(tmp_path / "r1.safetensors")
    assert set(low.ranks) == {1} and low.error > 0.1
    per_layer = {k: float((exact[k] - got[k]).norm() / exact[k].norm()) for k in exact}
    overall = (sum(float((exact[k] - got[k]).pow(2).sum()) for k in exact) / sum(float(exact[k].pow(2).sum()) for k in exact)) ** 0.5
    assert low.error == pytest.approx(overall, rel=1e-4)
    assert all(low.errors[k] == pytest.approx(per_layer[k], rel=1e-3, abs=1e-6) for k in exact)
    assert read_lora_file(tmp_path / "r1.safetensors")[1]["_format"] == "kohya"


def test_resize_keeps_per_layer_the_fewest_singular_values_for_a_share_of_the_norm(files, tmp_path, capsys):
    """``resize --rank R --fro P`` (kohya's ``resize_lora.py --dynamic_method sv_fro``): each layer keeps the fewest
    singular values whose norm reaches the share P of its change's (at least one, at most R); P = 1 keeps them all."""
    src = files / "a.safetensors"
    exact = _file_deltas(src)
    out = tmp_path / "dyn.safetensors"
    assert cli_main(["resize", str(src), "-o", str(out), "--rank", "3", "--fro", "0.8", "--dtype", "fp32"]) == 0
    assert "relative Frobenius error" in capsys.readouterr().out
    lora, header = read_lora_file(out)
    for key, delta in exact.items():
        s = torch.linalg.svdvals(delta.double())
        share = (s.pow(2).cumsum(0) / s.pow(2).sum()).sqrt()
        expect = min(3, int((share < 0.8).sum()) + 1)
        assert lora[key].rank == expect, key
    assert len({w.rank for w in lora.values()}) > 1  # the ranks do differ per layer
    assert '"merge_fro": 0.8' in header["lora_diffusion"]
    full = merge_loras({src: 1.0}, tmp_path / "all.safetensors", mode="svd", fro=1.0, dtype=torch.float32)
    assert full.error < 1e-5 and full.ranks == [4]
    with pytest.raises(ValueError, match=r"fro=1.5 needs mode='svd' and a share in \(0, 1\]"):
        merge_loras({src: 1.0}, tmp_path / "bad.safetensors", mode="svd", fro=1.5)


def test_resize_by_kohyas_other_dynamic_methods_and_a_conv_rank(files, tmp_path, capsys):
    """kohya's ``sv_cumulative`` (the fewest singular values whose sum reaches a share of the total) and ``sv_ratio``
    (those above the largest / ratio), at most the rank; ``--conv-rank`` (kohya's ``--new_conv_rank``) caps the 3x3
    convolutions' layers and ``--rank`` the others."""
    src = files / "a.safetensors"
    exact = _file_deltas(src)
    svals = {k: torch.linalg.svdvals(d.double()) for k, d in exact.items()}
    for flag, value in (("--sv-cumulative", 0.6), ("--sv-ratio", 1.5)):
        out = tmp_path / f"{flag}.safetensors"
        assert cli_main(["resize", str(src), "-o", str(out), "--rank", "3", flag, str(value), "--dtype", "fp32"]) == 0
        lora, header = read_lora_file(out)
        for key, s in svals.items():
            expect = int((s.cumsum(0) / s.sum() < value).sum()) + 1 if flag == "--sv-cumulative" else int((s > s[0] / value).sum())
            assert lora[key].rank == min(3, max(1, expect)), (flag, key)
        assert len({w.rank for w in lora.values()}) > 1, flag
        assert f'"merge_{flag[2:].replace("-", "_")}": {value}' in header["lora_diffusion"]
    with pytest.raises(SystemExit):  # (argparse: one dynamic method at a time)
        cli_main(["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "3", "--fro", "0.9", "--sv-ratio", "2"])
    with pytest.raises(ValueError, match="give one of fro, sv_ratio and sv_cumulative"):
        merge_loras({src: 1.0}, None, mode="svd", fro=0.9, sv_ratio=2.0)
    with pytest.raises(ValueError, match=r"sv_ratio=0.5 needs mode='svd' and a ratio of at least 1"):
        merge_loras({src: 1.0}, None, mode="svd", sv_ratio=0.5)
    assert cli_main(["merge", str(src), "-o", str(tmp_path / "y.safetensors"), "--conv-rank", "2"]) == 2
    assert "--conv-rank 2 needs --mode svd" in capsys.readouterr().err

    locon = tmp_path / "locon.safetensors"
    write_lora_file(locon, random_lora(tiny_pipeline(0), seed=3, rank=4, unet_targets="full", text_encoder_targets=None),
                    dtype=torch.float32)
    report = merge_loras({locon: 1.0}, tmp_path / "r.safetensors", mode="svd", rank=3, conv_rank=2, dtype=torch.float32)
    lora, _ = read_lora_file(locon)
    conv3 = {k for k, w in lora.items() if w.A.dim() == 4 and w.A.shape[2:] != (1, 1)}
    assert conv3 and len(conv3) < len(lora)
    assert {k: w.rank for k, w in report.lora.items()} == {k: 2 if k in conv3 else 3 for k in lora}


def test_merge_cli(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert cli_main(["merge", f"{files / 'a.safetensors'}:0.7", f"{files / 'b.safetensors'}:0.3", "-o", str(out), "--mode", "svd", "--rank", "2"]) == 0
    text = capsys.readouterr().out
    assert "relative Frobenius error" in text
    _, header = read_lora_file(out)
    assert '"merge_mode": "svd"' in header["lora_diffusion"] and '"weight": 0.7' in header["lora_diffusion"]


# ---------------------------------------------------------------------------------------------- prompt syntax
def test_parse_prompt(caplog):
    """Tags come out as A1111 takes them out (modules/extra_networks.py: each ``<kind:...>`` by nothing), whitespace
    runs as CLIP's tokenizer folds them: the text gives A1111's tokens (``a cat , on`` is not ``a cat, on`` to CLIP)."""
    clean, w = parse_prompt("a cat <lora:style:0.7>, <lora:subject:1:0.8> on a mat <lora:neg:-0.5> <lora:plain>")
    assert clean == "a cat , on a mat"
    with caplog.at_level("WARNING", logger="lora_diffusion.blend"):
        assert parse_prompt("<lora:n:0.5>, a cat<lora:n>on a mat <hypernet:h:1>\n") == (", a caton a mat", {"n": PromptWeight(1.0, 1.0)})
    assert "<hypernet:h:1>: <hypernet:...> tags are not supported here" in caplog.text and "tagged twice" in caplog.text
    with pytest.raises(ValueError, match="no name"):
        parse_prompt("<lora: :1>")
    assert w == {"style": PromptWeight(0.7, 0.7), "subject": PromptWeight(1.0, 0.8), "neg": PromptWeight(-0.5, -0.5), "plain": PromptWeight(1.0, 1.0)}
    assert parse_prompt("<lora:x:te=0.2:unet=0.9> dog")[1] == {"x": PromptWeight(0.2, 0.9)}
    with pytest.raises(ValueError, match="bad LoRA tag"):
        parse_prompt("<lora:x:strong>")


def test_parse_prompt_names_what_it_ignores(caplog):
    with caplog.at_level("WARNING", logger="lora_diffusion.blend"):
        # (lbw= is read since the LBW syntax came in: test_block_weights_in_tags_as_the_lbw_extension_writes_them)
        assert parse_prompt("<lora:a:1:start=10> <lora:b:1:1:16>")[1] == {"a": PromptWeight(1.0, 1.0), "b": PromptWeight(1.0, 1.0)}
    assert "<lora:a:1:start=10>: start= not supported" in caplog.text and "<lora:b:1:1:16>: dyn not supported" in caplog.text


def test_apply_prompt_loras(files):
    pipe = tiny_pipeline(0)
    clean = apply_prompt_loras(pipe, "a red circle <lora:a:0.3> <lora:b:1:0.9>", files)
    assert clean == "a red circle"
    ref = loaded(files, "a", "b")
    set_adapters(ref, {"a": 0.3, "b": 0.9}, text_encoder={"a": 0.3, "b": 1.0})
    np.testing.assert_array_equal(generate(pipe), generate(ref))
    apply_prompt_loras(pipe, "a red circle <lora:b:0.5>", files)  # a is untagged now: off
    layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.active == ["b"] and layer.weights["b"] == 0.5


def test_block_weights_in_tags_as_the_lbw_extension_writes_them(files):
    """``<lora:a:0.8:IND>`` / ``lbw=`` (the LBW extension's syntax): a preset or a vector, the UNet weight the text
    encoder's; the same image as ``set_adapters(blocks=...)``; bad vectors are named."""
    from lora_diffusion.blend import LBW_PRESETS

    clean, tags = parse_prompt("x <lora:a:0.8:IND> <lora:b:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1> <lora:c:0.5:0.7>")
    assert clean == "x" and tags["a"] == PromptWeight(0.8, 0.8, tuple(map(float, LBW_PRESETS["IND"])))
    assert tags["b"].blocks == (1.0,) + (0.0,) * 7 + (1.0,) * 9 and tags["c"] == PromptWeight(0.5, 0.7)
    assert parse_prompt("<lora:a:1:w=OUTS>")[1]["a"].blocks == tuple(map(float, LBW_PRESETS["OUTS"]))
    for bad, match in (("<lora:a:1:lbw=1,0,0>", "a LoRA Block Weight vector has 17 values"),
                       ("<lora:a:1:lbw=MYPRESET>", "lbw=MYPRESET is neither a block weight preset"),
                       ("<lora:a:1:lbw=R,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R>", "random R / U and inherited X values are not supported")):
        with pytest.raises(ValueError, match=match):
            parse_prompt(bad)
    pipe = tiny_pipeline(0)
    apply_prompt_loras(pipe, "a red circle <lora:a:0.8:IND> <lora:b:0.6>", files)
    ref = loaded(files, "a", "b")
    set_adapters(ref, {"a": 0.8, "b": 0.6}, blocks={"a": list(LBW_PRESETS["IND"])})
    np.testing.assert_array_equal(generate(pipe), generate(ref))
    plain = loaded(files, "a", "b", a=0.8, b=0.6)
    assert not np.array_equal(generate(pipe), generate(plain))  # the blocks did something


def test_tags_find_files_as_a1111_does(files, tmp_path):
    """``<lora:name>``: ``name.safetensors`` in the folder, else in a subfolder, else the file whose alias
    (``ss_output_name``, which A1111's cards insert, and which ``save_lora`` / ``convert`` write as the file's
    name) is ``name``; an unknown name is refused naming the folder."""
    from lora_diffusion.tools import convert_lora

    root = tmp_path / "loras"
    (root / "styles" / "v2").mkdir(parents=True)
    (root / "styles" / "v2" / "deep.safetensors").write_bytes((files / "a.safetensors").read_bytes())
    convert_lora(files / "b.safetensors", root / "styles" / "b_kohya.safetensors", to="kohya")
    header = read_safetensors(root / "styles" / "b_kohya.safetensors")[1]
    assert header["ss_output_name"] == "b_kohya"
    header["ss_output_name"] = "my b"
    save_file(read_safetensors(root / "styles" / "b_kohya.safetensors")[0], str(root / "styles" / "b_kohya.safetensors"), metadata=header)
    pipe = tiny_pipeline(0)
    assert apply_prompt_loras(pipe, "a red circle <lora:deep:0.3> <lora:my b:1:0.9>", root) == "a red circle"
    ref = loaded(files, "a", "b")
    set_adapters(ref, {"a": 0.3, "b": 0.9}, text_encoder={"a": 0.3, "b": 1.0})
    np.testing.assert_array_equal(generate(pipe), generate(ref))
    with pytest.raises(FileNotFoundError, match="nor one of that name or alias in its subfolders"):
        apply_prompt_loras(pipe, "a <lora:b:1>", root)


def test_a_refused_prompt_changes_nothing(files, tmp_path):
    """Every tag is checked before anything loads, a failure later takes out what this call loaded, and a tag
    can't name a file outside the LoRA folder."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.safetensors").write_bytes((files / "b.safetensors").read_bytes())
    (files / "sub").mkdir(exist_ok=True)
    for prompt, error in (("cat <lora:b:0.5> <lora:nope:1>", FileNotFoundError),
                          (f"cat <lora:b:1> <lora:{outside / 'evil'}:1>", ValueError),
                          ("cat <lora:b:1> <lora:../outside/evil:1>", ValueError),
                          ("cat <lora:b:1> <lora:sub/../../outside/evil:1>", ValueError),
                          ("cat <lora:b:2> <lora:a:1e300>", ValueError)):  # loads b, then the fused re-weight is refused
        pipe = tiny_pipeline(0)
        apply_prompt_loras(pipe, "cat <lora:a:0.7>", files)
        fuse(pipe)
        before = weights_of(pipe), generate(pipe)
        with pytest.raises(error):
            apply_prompt_loras(pipe, prompt, files)
        assert list(dict(lora_layers(pipe.unet))["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"].specs) == ["a"], prompt
        after = weights_of(pipe), generate(pipe)
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and np.array_equal(before[1], after[1]), prompt


# ---------------------------------------------------------------------------------------------- baking
def test_bake_writes_a_model_with_the_blend_fused_in(files, tmp_path):
    from diffusers import StableDiffusionPipeline

    base = tiny_pipeline(0)
    base.save_pretrained(tmp_path / "base")
    args = ["bake", str(tmp_path / "base"), f"{files / 'a.safetensors'}:0.3", f"{files / 'b.safetensors'}:-0.9", "-o", str(tmp_path / "baked")]
    assert cli_main([*args, "--single-file", str(tmp_path / "baked.safetensors")]) == 0
    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked", safety_checker=None, requires_safety_checker=False)
    baked.set_progress_bar_config(disable=True)
    assert not any(isinstance(m, LoraLinear) for m in baked.unet.modules())
    blended = loaded(files, "a", "b", a=0.3, b=-0.9)
    fuse(blended)
    np.testing.assert_allclose(generate(baked), generate(blended), atol=1e-6)
    # the single-file checkpoint holds the same weights in the original layout: diffusers' own converters agree
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "baked.safetensors"))
    te = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    for back, model in ((convert_ldm_unet_checkpoint(ckpt, dict(baked.unet.config)), baked.unet),
                        (convert_ldm_vae_checkpoint(ckpt, dict(baked.vae.config)), baked.vae), (te, baked.text_encoder)):  # fmt: skip
        ref = model.state_dict()
        assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)
    # a pipeline object is left as it was
    before = weights_of(base)
    bake(base, {files / "a.safetensors": 1.0}, tmp_path / "baked2")
    after = weights_of(base)
    assert not list(lora_layers(base.unet)) and all(torch.equal(before[k], after[k]) for k in before)


def test_bake_merges_a_lora_into_a_single_file_checkpoint(files, tmp_path, capsys):
    """kohya's merge_lora / A1111's workflow: a single-file checkpoint in, the LoRA fused in, a single file out (its
    configs from --base-config, offline): the same weights as baking the folder it was written from."""
    from safetensors.torch import load_file

    from lora_diffusion.formats import atomic_save
    from lora_diffusion.tools import to_ldm_checkpoint

    tiny_pipeline(0).save_pretrained(tmp_path / "base")
    atomic_save(to_ldm_checkpoint(tiny_pipeline(0)), tmp_path / "model.safetensors", {"format": "pt"})
    lora = f"{files / 'a.safetensors'}:0.7"
    for base, name, extra in ((tmp_path / "model.safetensors", "file", ["--base-config", str(tmp_path / "base")]), (tmp_path / "base", "folder", [])):
        args = ["bake", str(base), lora, "-o", str(tmp_path / f"from_{name}"), "--single-file", str(tmp_path / f"{name}.safetensors")]
        assert cli_main([*args, *extra]) == 0
    merged, ref = load_file(str(tmp_path / "file.safetensors")), load_file(str(tmp_path / "folder.safetensors"))
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    before = load_file(str(tmp_path / "model.safetensors"))
    assert any(not torch.equal(before[k], merged[k]) for k in before)  # the LoRA is in
    assert cli_main(["bake", str(tmp_path / "base"), lora, "-o", str(tmp_path / "x"), "--base-config", str(tmp_path / "base")]) == 2
    assert "--base-config" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_single_file_sd2_checkpoint_holds_openclip_in_open_clip_layout():
    """SD 2.x's text encoder (OpenCLIP, ``gelu``) goes under ``cond_stage_model.model.`` in open_clip's layout (q/k/v
    packed), as SD 2.x checkpoints hold it: diffusers' own converter reads every weight back exactly."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_diffusion.formats import with_text_model
    from lora_diffusion.tools import to_ldm_checkpoint

    pipe = tiny_pipeline(0)
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**{**pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    ckpt = to_ldm_checkpoint(pipe)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in ckpt)
    back = convert_open_clip_checkpoint(pipe.text_encoder, ckpt, prefix="cond_stage_model.model.")
    ref = {with_text_model(k): v for k, v in pipe.text_encoder.state_dict().items()}
    assert back.keys() == ref.keys() and all(torch.equal(back[k], ref[k]) for k in ref)


def test_adapters_loaded_under_inference_mode_blend(files):
    """Factors created inside torch.inference_mode() have no version counter; the concatenated path still runs."""
    with torch.inference_mode():
        pipe = loaded(files, "a", "b", a=0.3, b=0.9)
        image = generate(pipe)
    np.testing.assert_array_equal(image, generate(loaded(files, "a", "b", a=0.3, b=0.9)))
