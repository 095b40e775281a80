"""The file tools and their command line: outputs never replace inputs or existing files unasked, errors are one
line, a loaded pipeline comes back from ``bake`` as it was. Tiny offline pipelines."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch

from lora_diffusion.cli import main as cli_main
from lora_diffusion.formats import read_lora_file, write_lora_file
from lora_diffusion.testing import random_lora, tiny_pipeline

logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """a.safetensors (diffusers), b.safetensors (kohya), base/ (a diffusers model folder)."""
    d = tmp_path_factory.mktemp("tools")
    pipe = tiny_pipeline(0)
    write_lora_file(d / "a.safetensors", random_lora(pipe, seed=1, rank=4, alpha=8), dtype=torch.float32)
    write_lora_file(d / "b.safetensors", random_lora(pipe, seed=2, rank=2, alpha=1), format="kohya", dtype=torch.float32)
    pipe.save_pretrained(d / "base")
    return d


def digest(path: Path) -> str:
    """A hash of a file, or of every file in a folder (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


def refused(capsys, args: list[str], match: str) -> str:
    """Run the CLI, expecting a refusal: exit status 2 and one ``error: ...`` line on stderr matching ``match``."""
    try:
        rc = cli_main([str(a) for a in args])
    except (ValueError, OSError) as e:
        pytest.fail(f"the CLI raised {type(e).__name__}: {e}")
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- outputs
def test_lora_outputs_must_be_safetensors_files(files, capsys, tmp_path):
    a, out = files / "a.safetensors", f"{tmp_path / 'outdir'}/"  # (-o out/ wrote a file named out)
    refused(capsys, ["merge", f"{a}:0.5", "-o", out], "LoRA files are written as .safetensors")
    refused(capsys, ["convert", a, out, "--to", "kohya"], "LoRA files are written as .safetensors")
    assert not (tmp_path / "outdir").exists()


def test_merge_and_convert_never_write_over_an_input(files, capsys):
    a, b = files / "a.safetensors", files / "b.safetensors"
    before = digest(a), digest(b)
    refused(capsys, ["merge", f"{a}:0.5", f"{b}:0.5", "-o", a], "over the input")
    refused(capsys, ["merge", f"{a}:0.5", f"{b}:0.5", "-o", b, "--overwrite"], "over the input")
    refused(capsys, ["convert", b, b, "--to", "kohya", "--overwrite"], "over the input")
    assert (digest(a), digest(b)) == before


def test_existing_outputs_need_overwrite(files, tmp_path, capsys):
    a, b = files / "a.safetensors", files / "b.safetensors"
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    refused(capsys, ["convert", a, out, "--to", "kohya"], r"exists; pass --overwrite")
    refused(capsys, ["merge", a, b, "-o", out], r"exists; pass --overwrite")
    assert out.read_bytes() == b"mine"
    assert cli_main(["convert", str(a), str(out), "--to", "kohya", "--overwrite"]) == 0
    assert cli_main(["merge", str(a), str(b), "-o", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"mine"


def test_bake_never_writes_over_the_base_or_a_lora(files, tmp_path, capsys):
    base, a = files / "base", files / "a.safetensors"
    before = digest(base), digest(a)
    refused(capsys, ["bake", base, a, "-o", base, "--overwrite"], "over the base model")
    refused(capsys, ["bake", base, a, "-o", base / "unet", "--overwrite"], "inside the base model")
    refused(capsys, ["bake", base, a, "-o", files, "--overwrite"], "holds the input")
    refused(capsys, ["bake", base, a, "-o", tmp_path / "baked", "--single-file", a, "--overwrite"], "over the input")
    assert (digest(base), digest(a)) == before
    assert not (tmp_path / "baked").exists()


def test_bake_replaces_an_existing_folder_only_with_overwrite(files, tmp_path, capsys):
    base, a = files / "base", files / "a.safetensors"
    out, ckpt = tmp_path / "baked", tmp_path / "baked.safetensors"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    ckpt.write_bytes(b"mine")
    refused(capsys, ["bake", base, a, "-o", out], r"exists; pass --overwrite")
    refused(capsys, ["bake", base, a, "-o", tmp_path / "new", "--single-file", ckpt], r"exists; pass --overwrite")
    assert (out / "model_index.json").read_text() == "{}" and ckpt.read_bytes() == b"mine"
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    refused(capsys, ["bake", base, a, "-o", mine, "--overwrite"], "not a diffusers model folder")
    assert cli_main(["bake", str(base), str(a), "-o", str(out), "--single-file", str(ckpt), "--overwrite"]) == 0
    assert (out / "unet").is_dir() and (out / "model_index.json").read_text() != "{}" and ckpt.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["baked", "baked.safetensors", "notes"]  # no temp folders left


# ---------------------------------------------------------------------------------------------- errors
def test_user_errors_are_one_line_and_exit_2(files, tmp_path, capsys):
    from safetensors.torch import save_file

    from lora_diffusion.formats import LoraWeights

    a = files / "a.safetensors"
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(a.read_bytes()[:1000])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    torch.save({"x": torch.zeros(2)}, tmp_path / "p.ckpt")
    loha = {f"lora_unet_down_blocks_1_attentions_0_proj_in.{k}": torch.zeros(4, 4) for k in ("hada_w1_a", "hada_w1_b")}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    key, w = next(iter(read_lora_file(a)[0].items()))
    odd = {key: LoraWeights(torch.zeros(2, w.A.shape[1] + 1), torch.zeros(w.B.shape[0], 2), 2.0)}
    write_lora_file(tmp_path / "odd.safetensors", odd)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out.safetensors"
    refused(capsys, ["inspect", trunc], r"trunc\.safetensors: not a readable safetensors file")
    refused(capsys, ["inspect", tmp_path / "empty.safetensors"], r"empty\.safetensors")
    refused(capsys, ["inspect", tmp_path / "p.ckpt"], r"p\.ckpt: pickled")
    refused(capsys, ["inspect", tmp_path / "missing.safetensors"], r"missing\.safetensors: no such LoRA file")
    refused(capsys, ["convert", tmp_path / "loha.safetensors", out, "--to", "kohya"], r"LoHa")
    refused(capsys, ["merge", a, tmp_path / "odd.safetensors", "-o", out], re.escape(key) + ".*shape")
    refused(capsys, ["merge", a, a, "-o", out, "--mode", "svd", "--rank", "0"], r"rank")
    refused(capsys, ["bake", tmp_path / "nonexistent", a, "-o", tmp_path / "zz"], r"nonexistent: no such model folder")
    refused(capsys, ["bake", tmp_path / "file", a, "-o", tmp_path / "zz"], r"file: a file, but not a \.safetensors checkpoint nor a diffusers model folder")
    refused(capsys, ["bake", tmp_path, a, "-o", tmp_path / "zz"], r"not a diffusers model folder")
    assert not out.exists() and not (tmp_path / "zz").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from lora_diffusion.formats import LoraFormatError

    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(LoraFormatError):
        cli_main(["inspect", str(tmp_path / "empty.safetensors"), "--debug"])
    with pytest.raises(LoraFormatError):
        cli_main(["--debug", "inspect", str(tmp_path / "empty.safetensors")])
    monkeypatch.setenv("LORA_DIFFUSION_DEBUG", "1")
    with pytest.raises(LoraFormatError):
        cli_main(["inspect", str(tmp_path / "empty.safetensors")])


def test_an_invalid_hub_id_is_named_as_such(capsys):
    from huggingface_hub.errors import HFValidationError

    from lora_diffusion.cli import error_message

    assert error_message(HFValidationError("Repo id must be in the form 'repo_name'")).startswith("not a diffusers folder or hub id")


def test_baked_files_get_the_umask_mode(files, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        assert cli_main(["bake", str(files / "base"), str(files / "a.safetensors"), "-o", str(tmp_path / "baked"), "--single-file", str(tmp_path / "m.safetensors")]) == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    assert modes["baked"] == oct(0o755) and modes["m.safetensors"] == oct(0o644)
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {oct(0o644)}, modes


# ---------------------------------------------------------------------------------------------- bake leaves a pipeline as it was
def pipeline_state(pipe) -> tuple:
    """Adapters, each layer's active list, weights, on/off and fused set, and every weight tensor."""
    from lora_diffusion.inject import lora_layers
    from lora_diffusion.pipeline import list_adapters

    layers = {(c, p): (list(layer.active), dict(layer.weights), layer.disabled, dict(layer.fused)) for c in ("unet", "text_encoder")
              for p, layer in lora_layers(getattr(pipe, c))}  # fmt: skip
    tensors = {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}
    return list_adapters(pipe), layers, tensors


def assert_unchanged(before, after):
    assert before[:2] == after[:2]
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])


@torch.no_grad()
def outputs(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return pipe.unet(x, torch.tensor([10]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


@pytest.mark.parametrize("state", ["weighted", "fused", "disabled", "fused, disabled"])
def test_bake_leaves_a_loaded_pipeline_as_it_was(files, tmp_path, state):
    from lora_diffusion import disable_lora, enable_lora, fuse, load_lora, set_adapters
    from lora_diffusion.inject import lora_layers
    from lora_diffusion.tools import bake

    pipe = tiny_pipeline(0)
    load_lora(pipe, files / "a.safetensors", adapter="ours")
    set_adapters(pipe, {"ours": 0.5}, text_encoder={"ours": 0.2})
    for step in state.split(", "):
        {"fused": fuse, "disabled": disable_lora}.get(step, lambda p: None)(pipe)
    before, out = pipeline_state(pipe), outputs(pipe)
    bake(pipe, {files / "b.safetensors": 1.0}, tmp_path / "baked")
    assert_unchanged(before, pipeline_state(pipe))
    assert torch.equal(outputs(pipe), out)
    enable_lora(pipe)  # fused before disable_lora: enable fuses it again, bake or no bake
    assert any(layer.fused for _, layer in lora_layers(pipe.unet)) == state.startswith("fused")
    # the folder holds b alone at 1.0, whatever the pipeline had on
    ref = tiny_pipeline(0)
    load_lora(ref, files / "b.safetensors")
    fuse(ref)
    from diffusers import StableDiffusionPipeline

    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked", safety_checker=None, requires_safety_checker=False)
    torch.testing.assert_close(outputs(baked), outputs(ref), rtol=0, atol=1e-6)


def test_a_failed_bake_leaves_no_adapter_behind(files, tmp_path):
    from lora_diffusion import fuse, load_lora, set_adapters
    from lora_diffusion.formats import LoraFormatError, LoraWeights, read_lora_file
    from lora_diffusion.tools import bake

    key, w = next(iter(read_lora_file(files / "a.safetensors")[0].items()))
    write_lora_file(tmp_path / "bad.safetensors", {key: LoraWeights(torch.zeros(2, w.A.shape[1] + 1), torch.zeros(w.B.shape[0], 2), 2.0)})
    pipe = tiny_pipeline(0)
    load_lora(pipe, files / "a.safetensors", adapter="ours")
    set_adapters(pipe, {"ours": 0.5})
    fuse(pipe)
    before = pipeline_state(pipe)
    with pytest.raises(LoraFormatError, match="bad.safetensors"):
        bake(pipe, {files / "b.safetensors": 1.0, tmp_path / "bad.safetensors": 1.0}, tmp_path / "baked")
    assert_unchanged(before, pipeline_state(pipe))
    assert not (tmp_path / "baked").exists()
    plain = tiny_pipeline(0)
    with pytest.raises(LoraFormatError):
        bake(plain, {files / "b.safetensors": 1.0, tmp_path / "bad.safetensors": 1.0}, tmp_path / "baked")
    from lora_diffusion.inject import lora_layers

    assert not list(lora_layers(plain.unet)) and not list(lora_layers(plain.text_encoder))


# ---------------------------------------------------------------------------------------------- arguments
def test_merge_arguments_that_would_be_ignored_or_misread_are_refused(files, tmp_path, capsys):
    from lora_diffusion.blend import merge_lora_dicts
    from lora_diffusion.formats import read_lora_file

    a, b, out = files / "a.safetensors", files / "b.safetensors", tmp_path / "m.safetensors"
    refused(capsys, ["merge", a, b, "-o", out, "--rank", "2"], r"--rank 2 needs --mode svd")
    refused(capsys, ["merge", f"{a}:1.2.3", b, "-o", out], r"a\.safetensors:1\.2\.3: '1\.2\.3' after the last ':' is not a weight")
    refused(capsys, ["merge", f"{a}:nan", b, "-o", out], r"'nan' after the last ':' is not a weight")
    assert not out.exists()
    with pytest.raises(ValueError, match="needs mode='svd'"):
        merge_lora_dicts([(read_lora_file(a)[0], 1.0)], rank=2)
    # from Python too: a NaN weight was refused only at the write, as a float16 overflow ("lower the weights")
    from lora_diffusion.blend import merge_loras
    with pytest.raises(ValueError, match=r"a\.safetensors: the weight must be a finite number, got nan"):
        merge_loras([(a, float("nan")), (b, 1.0)], out)
    with pytest.raises(ValueError, match="merge input 1: the weight must be a number, got 'x'"):
        merge_lora_dicts([(read_lora_file(a)[0], 1.0), (read_lora_file(b)[0], "x")])
    assert not out.exists()
    assert cli_main(["merge", f"{a}:0.5", f"{b}:-1e-1", "-o", str(out)]) == 0
    assert '"weight": -0.1' in read_lora_file(out)[1]["lora_diffusion"]


def test_bake_with_a_learned_token_bakes_it_and_leaves_the_callers_tokenizer_alone(files, tmp_path):
    from safetensors.torch import save_file

    from lora_diffusion.formats import our_metadata
    from lora_diffusion.tools import bake

    lora, header = read_lora_file(files / "a.safetensors")
    folder = tmp_path / "pti"
    write_lora_file(folder / "pytorch_lora_weights.safetensors", lora, dtype=torch.float32,
                    metadata={**our_metadata(header), "embedding_file": "embeddings.safetensors"})
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    save_file({"<strp>": vector}, folder / "embeddings.safetensors")
    pipe = tiny_pipeline(0)
    size, table = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    bake(pipe, {folder / "pytorch_lora_weights.safetensors": 1.0}, tmp_path / "baked")
    assert len(pipe.tokenizer) == size and "<strp>" not in pipe.tokenizer.get_vocab()
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)
    from diffusers import StableDiffusionPipeline

    baked = StableDiffusionPipeline.from_pretrained(tmp_path / "baked", safety_checker=None, requires_safety_checker=False)
    token = baked.tokenizer.convert_tokens_to_ids("<strp>")
    assert token == size and torch.equal(baked.text_encoder.get_input_embeddings().weight[token], vector)


def test_bake_loads_the_base_in_the_dtype_asked_without_a_deprecation_warning(files, tmp_path):
    """Newer diffusers (0.42 here) warn that ``torch_dtype=`` is deprecated: bake passes the keyword the installed
    diffusers takes (``dtype=`` there), and the baked UNet is stored in that dtype."""
    import warnings

    from safetensors.torch import load_file

    from lora_diffusion.tools import bake

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        bake(files / "base", {files / "a.safetensors": 1.0}, tmp_path / "baked", dtype=torch.bfloat16)
    unet = load_file(tmp_path / "baked" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.bfloat16}
