"""UI handlers without a browser or gradio: library safety, blends, generation, concurrency, training queue."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_diffusion import list_adapters, load_lora
from lora_diffusion.formats import read_lora_file
from lora_diffusion.inject import lora_layers
from lora_diffusion.testing import tiny_pipeline

from ui.handlers import (
    BLOCK_PRESETS,
    Backend,
    GenerateRequest,
    TrainJob,
    UIError,
    apply_blend,
    parse_lora_tags,
    prepare_dataset,
)
from ui.library import LoraLibrary, check_name
from ui_support import SIZE, STEPS, make_foreign_lora, make_images, make_lora, pixels, tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    return {
        "style": make_lora(folder / "style.safetensors", 1),
        "ink": make_lora(folder / "ink.safetensors", 2, rank=2),
        "foreign": make_foreign_lora(folder / "foreign.safetensors"),
    }


@pytest.fixture(scope="module")
def backend(tmp_path_factory, model_dir, lora_files):
    lib = tmp_path_factory.mktemp("loras")
    for name, path in lora_files.items():
        shutil.copy(path, lib / f"{name}.safetensors")
    return Backend(model_dir, lib)


def gen(backend, prompt="a red circle", **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("guidance", 5.0)
    return backend.generate(GenerateRequest(prompt, **kw))


def made_again_from_png(backend, model_dir, result, out) -> Path:
    """The saved PNG of a tab's ``result``: ``lora-diffusion generate --from-png`` on it makes the same image."""
    from PIL import Image

    from lora_diffusion.cli import main

    saved = backend.save_image(result)
    assert main(["generate", str(model_dir), "--from-png", saved, "--lora-dir", str(backend.library.root),
                 "-o", str(out)]) == 0
    assert np.array_equal(pixels(Image.open(out)), pixels(result.image))
    return saved


# ---------------------------------------------------------------------------------------------- import hygiene
def test_importing_the_ui_loads_no_gradio_and_no_model():
    code = (
        "import sys, ui, ui.handlers, ui.library, ui.cli, lora_diffusion.cli as c; c.build_parser();"
        "bad = [m for m in ('gradio', 'diffusers', 'transformers') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_defaults_bind_loopback_without_share():
    import argparse

    from ui.cli import add_arguments, launch_kwargs, parse_auth

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    kw = launch_kwargs(parser.parse_args([]))
    assert kw["server_name"] == "127.0.0.1" and kw["server_port"] == 7860
    assert kw["share"] is False and kw["auth"] is None
    kw = launch_kwargs(parser.parse_args(["--host", "0.0.0.0", "--auth", "me:a:b", "--port", "9000"]))
    assert kw["server_name"] == "0.0.0.0" and kw["auth"] == ("me", "a:b") and kw["server_port"] == 9000
    with pytest.raises(ValueError, match="--auth expects USER:PASS"):
        parse_auth("nopassword")
    for bad in ("0", "-5", "nan"):
        with pytest.raises(ValueError, match=f"--max-upload-mb must be a positive number, got {float(bad)}"):
            launch_kwargs(parser.parse_args(["--max-upload-mb", bad]))


def test_ui_command_errors_are_one_line_and_exit_2(tmp_path, capsys):
    from lora_diffusion.cli import main as cli_main

    (tmp_path / "file").write_text("")
    for args, message in ((["--auth", "nopassword"], "error: --auth expects USER:PASS"),
                          (["--lora-dir", str(tmp_path / "file")], "a file, not a folder")):
        assert cli_main(["ui", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_ui_command_without_gradio_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    from lora_diffusion.cli import main as cli_main

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if the `ui` extra were not installed
    monkeypatch.delitem(sys.modules, "ui.app", raising=False)
    assert cli_main(["ui", "--lora-dir", str(tmp_path / "loras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the UI needs gradio: pip install 'lora-diffusion[ui]'"], err


def test_dispatcher_has_the_ui_command():
    from lora_diffusion.cli import build_parser

    args = build_parser().parse_args(["ui", "--lora-dir", "x"])
    assert args.lora_dir == "x" and args.host == "127.0.0.1" and callable(args.func)


# ---------------------------------------------------------------------------------------------- library safety
@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/etc/passwd", "a/b", "..", ".", "a..b", "a.", ".a", "", "x\\y", "C:\\x", " ", "-x"])
def test_names_cannot_escape_the_library(tmp_path, name):
    lib = LoraLibrary(tmp_path / "loras")
    with pytest.raises(UIError):
        lib.path_for(name)
    with pytest.raises(UIError):
        check_name(name)


def test_valid_names_stay_inside(tmp_path):
    lib = LoraLibrary(tmp_path / "loras")
    for name in ("style", "my_style-2", "A1.safetensors".replace(".safetensors", ""), "x.safetensors", "a.b", "detail_v1.5"):
        assert lib.path_for(name).parent == lib.root


def test_names_with_dots_work_end_to_end(tmp_path, model_dir, lora_files):
    """A1111 names LoRAs after files such as ``detail_v1.5``: listed, uploaded, tagged, merged and deleted as such."""
    lib = tmp_path / "loras"
    lib.mkdir()
    shutil.copy(lora_files["style"], lib / "detail_v1.5.safetensors")
    backend = Backend(model_dir, lib)
    assert backend.library.names() == ["detail_v1.5"]
    assert backend.upload(lora_files["ink"], "ink.v2").name == "ink.v2"
    tagged = gen(backend, "a red circle <lora:detail_v1.5:0.7> <lora:ink.v2:0.5>")
    slid = gen(backend, loras={"detail_v1.5": (0.7, None), "ink.v2": (0.5, None)})
    assert np.array_equal(pixels(tagged.image), pixels(slid.image))
    scope: dict = {}
    exec(tagged.snippet, scope)  # noqa: S102 - stock diffusers takes no '.' in adapter names: the snippet maps them
    assert 'adapter_name="detail_v1_5"' in tagged.snippet
    assert np.abs(pixels(scope["image"]) - pixels(tagged.image)).max() <= 2
    info, _ = backend.merge({"detail_v1.5": 0.5, "ink.v2": 0.5}, "merged.v2")
    assert info.name == "merged.v2" and backend.library.names() == ["detail_v1.5", "ink.v2", "merged.v2"]
    backend.delete("detail_v1.5")
    assert backend.library.names() == ["ink.v2", "merged.v2"]


def test_upload_checks(tmp_path, lora_files):
    lib = LoraLibrary(tmp_path / "loras", max_upload_mb=1)
    info = lib.add_file(lora_files["style"])
    assert info.name == "style" and info.path.parent == lib.root and info.format == "diffusers"
    assert info.rank == "2, 4" and info.trigger_words == ["<s1>"] and info.base_model == "tiny"
    with pytest.raises(UIError, match="already exists"):
        lib.add_file(lora_files["style"])
    with pytest.raises(UIError, match="invalid LoRA name"):
        lib.add_file(lora_files["style"], "../../evil")
    with pytest.raises(UIError, match="invalid LoRA name"):
        lib.add_file(lora_files["style"], str(tmp_path / "abs"))
    assert not (tmp_path / "evil.safetensors").exists() and not (tmp_path / "abs.safetensors").exists()
    # an uploaded file's own odd name is turned into a plain name inside the library
    odd = tmp_path / "up" / "..my style!.safetensors"
    odd.parent.mkdir()
    shutil.copy(lora_files["ink"], odd)
    assert lib.add_file(odd).path.parent == lib.root
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"whatever")
    with pytest.raises(UIError, match="only .safetensors"):
        lib.add_file(ckpt)
    big = tmp_path / "big.safetensors"
    shutil.copy(lora_files["style"], big)
    with open(big, "ab") as f:
        f.write(b"\0" * (1024 * 1024))
    with pytest.raises(UIError, match="upload limit is 1 MB"):
        lib.add_file(big)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(UIError, match="junk.safetensors"):
        lib.add_file(junk)
    assert sorted(lib.names()) == ["my_style", "style"]
    lib.delete("style")
    assert lib.names() == ["my_style"]
    with pytest.raises(UIError):
        lib.delete("../my_style")


class _Boom:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_are_never_loaded(tmp_path, backend):
    marker = tmp_path / "unpickled"
    for name in ("evil.safetensors", "evil.ckpt", "evil.pt"):
        torch.save({"w": torch.zeros(1), "x": _Boom(marker)}, tmp_path / name)
        with pytest.raises(UIError):
            backend.library.add_file(tmp_path / name, "evil")
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(UIError):
        backend.library.add_file(raw, "evil")
    # a pickle dropped straight into the library folder is refused when used, too
    shutil.copy(tmp_path / "evil.safetensors", backend.library.root / "evil.safetensors")
    try:
        with pytest.raises(UIError, match="pickle"):
            gen(backend, "x <lora:evil:1>")
    finally:
        (backend.library.root / "evil.safetensors").unlink()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- prompts and blends
def test_parse_lora_tags():
    assert parse_lora_tags("a cat <lora:style:0.5>, <lora:ink:0.2:1> <lora:x>") == (
        "a cat ,", {"style": (0.5, 0.5), "ink": (1.0, 0.2), "x": (1.0, 1.0)}, {})  # (A1111's text: the tags out, no more)
    with pytest.raises(UIError):
        parse_lora_tags("<lora:../x:1>")
    with pytest.raises(UIError, match="number"):
        parse_lora_tags("<lora:x:heavy>")
    assert parse_lora_tags("<lora:x:0.8:IND> <lora:y:0.5:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>") == (
        "", {"x": (0.8, 0.8), "y": (1.0, 0.5)}, {"x": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10, "y": (1,) + (0,) * 7 + (1,) * 4 + (0,) * 5})
    with pytest.raises(UIError, match="a LoRA Block Weight vector has 17 values"):
        parse_lora_tags("<lora:x:1:lbw=1,0,1>")


def test_apply_blend_sets_per_component_and_per_block_weights(lora_files):
    pipe = tiny_pipeline(0)
    load_lora(pipe, lora_files["style"], adapter="style")
    load_lora(pipe, lora_files["ink"], adapter="ink")
    apply_blend(pipe, {"style": (0.8, 0.3), "ink": (-0.5, 0.0)}, BLOCK_PRESETS["OUT half"])
    seen = set()
    for path, layer in lora_layers(pipe.unet):
        factor = 0.5 if path.startswith("up_blocks.") else 1.0
        assert layer.active == ["style", "ink"]
        assert layer.weights["style"] == pytest.approx(0.8 * factor) and layer.weights["ink"] == pytest.approx(-0.5 * factor)
        seen.add(path.split(".")[0])
    assert seen == {"down_blocks", "mid_block", "up_blocks"}
    for _, layer in lora_layers(pipe.text_encoder):
        assert layer.weights["style"] == 0.3 and layer.weights["ink"] == 0.0
    apply_blend(pipe, {"ink": (1.0, 1.0)})
    assert all(layer.active == ["ink"] for _, layer in lora_layers(pipe.unet))


# ---------------------------------------------------------------------------------------------- generation
def test_generation_follows_the_blend(backend):
    base = pixels(gen(backend).image)
    one = gen(backend, loras={"style": (1.0, None)})
    half = gen(backend, loras={"style": (0.5, None), "ink": (1.0, None)})
    assert np.array_equal(pixels(gen(backend, loras={"style": (1.0, None)}).image), pixels(one.image))  # deterministic
    for a, b in ((base, pixels(one.image)), (pixels(one.image), pixels(half.image)), (base, pixels(half.image))):
        assert np.abs(a - b).mean() > 1.0
    # tags are the same as the sliders, and they leave the prompt
    tagged = gen(backend, "a red circle <lora:style:0.5> <lora:ink:1>")
    assert tagged.prompt == "a red circle" and tagged.loras == half.loras
    assert np.array_equal(pixels(tagged.image), pixels(half.image))
    assert half.caption.startswith("style 0.5 + ink 1 |")
    # zero weight is the base model
    assert np.array_equal(pixels(gen(backend, loras={"style": (0.0, 0.0)}).image), base)


def test_saved_images_are_new_files_carrying_their_blend(backend):
    from PIL import Image

    result = gen(backend, loras={"style": (0.5, None)})
    first, second = backend.save_image(result), backend.save_image(result)
    assert first != second  # never rewritten in place (a download of the first may be under way)
    with Image.open(first) as im:
        assert im.text["lora_diffusion_snippet"] == result.snippet and im.text["parameters"] == result.infotext
        assert np.array_equal(pixels(im), pixels(result.image))


def test_saved_images_carry_a1111_infotext_that_makes_them_again(backend, model_dir, tmp_path):
    from PIL import Image

    from lora_diffusion.cli import main
    from lora_diffusion.generate import lora_hash, parse_infotext

    result = gen(backend, "a red circle", loras={"style": (0.5, None), "ink": (1.0, 0.25)}, seed=3, clip_skip=2)
    saved = backend.save_image(result)
    prompt, negative, params = parse_infotext(Image.open(saved).text["parameters"])
    assert prompt == "a red circle <lora:style:0.5> <lora:ink:0.25:1>"  # A1111's tags: <lora:name:te:unet>
    assert params["Seed"] == "3" and params["Clip skip"] == "2" and params["Size"] == f"{SIZE}x{SIZE}"
    assert params["Lora hashes"] == ", ".join(f"{n}: {lora_hash(backend.library.path_for(n))[:12]}"
                                              for n in ("style", "ink"))
    again = tmp_path / "again.png"
    assert main(["generate", str(model_dir), "--from-png", saved, "--lora-dir", str(backend.library.root),
                 "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(result.image))


def test_hires_fix_in_the_tab_is_the_command_lines_and_its_png_makes_it_again(backend, model_dir, tmp_path):
    """The Generate tab's Hires. fix is ``txt2img``'s: the saved PNG's infotext, run by ``lora-diffusion generate
    --from-png``, makes the same image; the tab's own PNG Info takes every setting back."""
    from ui.handlers import png_info

    kw = dict(loras={"style": (0.6, None)}, seed=4, hires_scale=1.5, hires_steps=2, hires_upscaler="Latent (bicubic)",
              denoising_strength=0.55, hires_cfg_scale=2.5, noise_schedule="Zero Terminal SNR")
    result = gen(backend, "a (red:1.2) circle", **kw)
    assert result.image.size == (48, 48) and "Zero Terminal SNR, hires 48x48 (Latent (bicubic) 1.5x, 2 steps, denoise 0.55, cfg 2.5)" in result.caption
    assert f"Size: {SIZE}x{SIZE}" in result.infotext and "Denoising strength: 0.55" in result.infotext
    assert "Hires CFG Scale: 2.5, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic)" in result.infotext
    same_cfg = gen(backend, "a (red:1.2) circle", **dict(kw, hires_cfg_scale=7.0, guidance=7.0))
    assert "Hires CFG Scale" not in same_cfg.infotext
    assert np.array_equal(pixels(same_cfg.image), pixels(gen(backend, "a (red:1.2) circle", **dict(kw, hires_cfg_scale=0, guidance=7.0)).image))
    plain = gen(backend, "a (red:1.2) circle", **dict(kw, hires_scale=1))
    assert plain.image.size == (SIZE, SIZE) and "Hires" not in plain.infotext and "Denoising" not in plain.infotext
    saved = made_again_from_png(backend, model_dir, result, tmp_path / "again.png")
    fields, note = png_info(saved)
    assert note == "" and (fields["hires_scale"], fields["hires_steps"], fields["hires_upscaler"],
                           fields["denoising_strength"], fields["hires_cfg_scale"], fields["noise_schedule"]) == \
        (1.5, 2, "Latent (bicubic)", 0.55, 2.5, "Zero Terminal SNR")
    for bad, match in (({"hires_scale": 5}, "between 1 \\(off\\) and 4"), ({"hires_upscaler": "ESRGAN"}, "unknown hires upscaler"),
                       ({"noise_schedule": "ZTSNR"}, "unknown noise schedule 'ZTSNR'; choose from Default, Zero Terminal SNR"),
                       ({"denoising_strength": 0}, "denoising strength must be in"), ({"hires_steps": -1}, "hires steps"),
                       ({"hires_cfg_scale": float("nan")}, "the hires CFG scale must be a finite number"),
                       ({"width": 2048, "height": 2048}, "upscaled 1.5x is 3072x3072, past 2048")):
        with pytest.raises(UIError, match=match):
            gen(backend, **{**kw, **bad})


def test_hires_sampler_and_prompts_in_the_tab_are_the_command_lines_and_its_png_makes_them_again(backend, model_dir, tmp_path):
    """A1111's Hires sampler, schedule type, prompt and negative prompt: the second pass's, each in the infotext
    where it differs from the first pass's; ``--from-png`` makes the same image and PNG Info takes them back."""
    from ui.handlers import png_info

    kw = dict(loras={"style": (0.6, None)}, seed=4, hires_scale=1.5, hires_steps=4, denoising_strength=0.55,
              noise_schedule="Zero Terminal SNR", negative_prompt="dark")  # (2 hires steps: 1 would end any schedule alike)
    plain = gen(backend, "a red circle", **kw)
    hires = dict(hires_sampler="DPM++ 2M", hires_schedule_type="Exponential", hires_prompt="a (blue:1.2) square",
                 hires_negative_prompt="blurry")
    result = gen(backend, "a red circle", **kw, **hires)
    assert 'Hires sampler: DPM++ 2M, Hires prompt: "a (blue:1.2) square", Hires negative prompt: blurry, Hires schedule ' \
           'type: Exponential, Hires upscale: 1.5' in result.infotext and "hires sampler DPM++ 2M Exponential, hires prompt" in result.caption
    assert result.settings["hires"]["prompt"] == "a (blue:1.2) square" and result.settings["hires"]["sampler"] == "DPM++ 2M"
    sampler_only = gen(backend, "a red circle", **kw, hires_sampler="DPM++ 2M")  # (its Automatic schedule: Karras)
    for one, before in (("hires_sampler", plain), ("hires_schedule_type", sampler_only), ("hires_prompt", plain),
                        ("hires_negative_prompt", plain)):  # each reaches the second pass
        changed = sampler_only if one == "hires_sampler" else gen(backend, "a red circle", **kw, **{
            one: hires[one], **({"hires_sampler": "DPM++ 2M"} if one == "hires_schedule_type" else {})})
        assert not np.array_equal(pixels(changed.image), pixels(before.image)), one
    saved = made_again_from_png(backend, model_dir, result, tmp_path / "again.png")
    fields, note = png_info(saved)
    assert note == "" and {k: fields[k] for k in hires} == hires
    resized = gen(backend, "a red circle", **dict(kw, hires_scale=1, hires_resize=(48, 40)), **hires)
    assert resized.image.size == (48, 40) and "Hires resize: 48x40" in resized.infotext and "Hires upscale:" not in resized.infotext
    fields, note = png_info(made_again_from_png(backend, model_dir, resized, tmp_path / "resized.png"))
    assert note == "" and (fields["hires_resize"], fields["hires_scale"]) == ((48, 40), 1.0)
    with pytest.raises(UIError, match="hires resize must be a width and a height from 0 \\(by the other\\) to 2048"):
        gen(backend, "a red circle", **dict(kw, hires_resize=(4096, 0)))
    # the first pass's, as A1111's "Use same" and an empty hires prompt: nothing in the infotext, the same image
    same = gen(backend, "a red circle", **kw, hires_prompt="a red circle", hires_negative_prompt="dark")
    assert "Hires prompt" not in same.infotext and "Hires negative" not in same.infotext
    assert np.array_equal(pixels(same.image), pixels(plain.image))
    fields, note = png_info(backend.save_image(plain))
    assert note == "" and (fields["hires_sampler"], fields["hires_schedule_type"], fields["hires_prompt"]) == (None, None, "")
    for bad, match in (({"hires_sampler": "Heun++"}, "Heun\\+\\+"), ({"hires_schedule_type": "Cubic"}, "unknown schedule type 'Cubic'"),
                       ({"hires_schedule_type": "Karras"}, "'DDIM' \\(DDIMScheduler\\) has no Karras schedule"),  # ("Use same": DDIM)
                       ({"hires_prompt": "a square <lora:ink:1>"}, "LoRA tags in the hires prompt must be the prompt's"),
                       ({"hires_negative_prompt": "<lora:ink:1>"}, "not the hires negative prompt")):
        with pytest.raises(UIError, match=match):
            gen(backend, "a red circle", **kw, **bad)


def test_img2img_in_the_tab_is_the_command_lines_and_its_snippet_makes_it_in_stock_diffusers(backend, model_dir, tmp_path):
    pytest.importorskip("peft", reason="stock diffusers needs peft for load_lora_weights/set_adapters")
    from PIL import Image

    from lora_diffusion.cli import main
    from ui.handlers import png_info

    start = tmp_path / "start.png"
    gen(backend, "a blue square", seed=1).image.resize((44, 37)).save(start)
    kw = dict(loras={"ink": (0.8, 0.5)}, seed=6, init_image=str(start), denoising_strength=0.6, width=None, height=None)
    result = gen(backend, "a (red:1.3) circle", **kw)
    assert result.image.size == (40, 32)  # its own size, down to multiples of 8
    assert "img2img, denoise 0.6" in result.caption and "Size: 40x32" in result.infotext
    assert "Denoising strength: 0.6" in result.infotext and "Hires" not in result.infotext
    assert not np.array_equal(pixels(gen(backend, "a (red:1.3) circle", **{**kw, "init_image": None}).image.resize((40, 32))),
                              pixels(result.image))
    scope: dict = {}
    exec(result.snippet, scope)  # noqa: S102 - our own generated code
    assert np.abs(pixels(scope["image"]) - pixels(result.image)).max() <= 2, result.snippet
    assert str(start) not in result.snippet  # (a copy the backend keeps: gradio's upload may be cleaned away)
    saved, again = backend.save_image(result), tmp_path / "again.png"
    assert main(["generate", str(model_dir), "--from-png", saved, "--init-image", str(start), "--lora-dir",
                 str(backend.library.root), "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(result.image))
    assert "img2img: put the image it started from under img2img" in png_info(saved)[1]
    with pytest.raises(UIError, match="Hires. fix is for text-to-image"):
        gen(backend, **kw, hires_scale=2)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UIError, match="init image bad.png: cannot read it as an image"):
        gen(backend, **{**kw, "init_image": str(tmp_path / "bad.png")})
    with pytest.raises(UIError, match="denoising strength must be in"):
        gen(backend, **{**kw, "denoising_strength": 1.5})


def test_inpainting_in_the_tab_is_the_command_lines_and_its_snippet_makes_it_in_stock_diffusers(backend, model_dir, tmp_path):
    """An init image and a mask: the pixels outside the blurred mask are the start's; the snippet (diffusers' inpaint
    pipeline) and ``--from-png`` with the start and the mask make the same image; bad masks are refused."""
    pytest.importorskip("peft", reason="stock diffusers needs peft for load_lora_weights/set_adapters")
    from PIL import Image, ImageFilter

    from lora_diffusion.cli import main
    from ui.handlers import png_info

    start, mask = tmp_path / "start.png", tmp_path / "mask.png"
    gen(backend, "a blue square", seed=1).image.save(start)
    with Image.open(start) as im:
        size = im.size
    shape = Image.new("L", size, 0)
    shape.paste(255, (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    shape.save(mask)
    kw = dict(loras={"ink": (0.8, 0.5)}, seed=6, init_image=str(start), mask_image=str(mask), mask_blur=2,
              denoising_strength=0.9, width=None, height=None)
    result = gen(backend, "a (red:1.3) circle", **kw)
    assert "inpaint, denoise 0.9, mask blur 2" in result.caption and "Denoising strength: 0.9, Mask blur: 2," in result.infotext
    outside = np.asarray(shape.filter(ImageFilter.GaussianBlur(2))) == 0
    assert outside.any() and np.array_equal(pixels(result.image)[outside], pixels(Image.open(start))[outside])
    assert np.abs(pixels(result.image) - pixels(Image.open(start))).mean() > 1.0
    scope: dict = {}
    exec(result.snippet, scope)  # noqa: S102 - our own generated code
    assert np.abs(pixels(scope["image"]) - pixels(result.image)).max() <= 2, result.snippet
    assert str(mask) not in result.snippet  # (copies the backend keeps)
    saved, again = backend.save_image(result), tmp_path / "again.png"
    assert main(["generate", str(model_dir), "--from-png", saved, "--init-image", str(start), "--mask", str(mask),
                 "--lora-dir", str(backend.library.root), "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(result.image))
    assert "it was inpainted: put the image it started from and its mask" in png_info(saved)[1]
    only = gen(backend, "a (red:1.3) circle", **kw, inpaint_only_masked=True, masked_padding=4)  # A1111's "Only masked"
    assert "only masked (padding 4)" in only.caption and "Inpaint area: Only masked, Masked area padding: 4" in only.infotext
    assert not np.array_equal(pixels(only.image), pixels(result.image)) and "padding_mask_crop=4" in only.snippet
    scope = {}
    exec(only.snippet, scope)  # noqa: S102 - our own generated code
    assert np.abs(pixels(scope["image"]) - pixels(only.image)).max() <= 2, only.snippet
    assert main(["generate", str(model_dir), "--from-png", backend.save_image(only), "--init-image", str(start), "--mask",
                 str(mask), "--lora-dir", str(backend.library.root), "-o", str(tmp_path / "only.png")]) == 0
    assert np.array_equal(pixels(Image.open(tmp_path / "only.png")), pixels(only.image))
    assert png_info(saved)[0]["inpaint"] == {"mask_blur": 2, "inpaint_only_masked": False, "masked_padding": 32,
                                             "masked_content": "original", "inpaint_not_masked": False}
    strokes = Image.new("RGBA", size, (0, 0, 0, 0))  # a mask drawn on a clear layer: its alpha, as A1111 reads it
    strokes.paste((0, 0, 0, 255), (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    strokes.save(tmp_path / "strokes.png")
    drawn = gen(backend, "a (red:1.3) circle", **{**kw, "mask_image": str(tmp_path / "strokes.png")})
    assert np.array_equal(pixels(drawn.image), pixels(result.image))
    scope = {}
    exec(drawn.snippet, scope)  # noqa: S102 - our own generated code (it opens the mask as it was read)
    assert np.abs(pixels(scope["image"]) - pixels(drawn.image)).max() <= 2, drawn.snippet
    # A1111's Masked content and Mask mode: the snippet (the original content in stock diffusers, the others by
    # lora_diffusion's inpaint) and --from-png make each image again; PNG Info gives the settings back
    for content, invert, prompt in (("original", True, "a (red:1.3) circle"), ("latent noise", True, "a (red:1.3) circle"),
                                    ("fill", False, "a red circle")):  # (a plain prompt: the pipeline's own embeddings)
        made = gen(backend, prompt, **kw, masked_content=content, inpaint_not_masked=invert)
        assert ("inpaint not masked" in made.caption) is invert and ("Mask mode: Inpaint not masked" in made.infotext) is invert
        assert (f"masked content {content}" in made.caption) is (content != "original")
        assert not np.array_equal(pixels(made.image), pixels(result.image))
        scope = {}
        exec(made.snippet, scope)  # noqa: S102 - our own generated code
        assert np.abs(pixels(scope["image"]) - pixels(made.image)).max() <= 2, made.snippet
        assert ("StableDiffusionInpaintPipeline" in made.snippet) is (content == "original")
        saved = backend.save_image(made)
        assert png_info(saved)[0]["inpaint"] == {"mask_blur": 2, "inpaint_only_masked": False, "masked_padding": 32,
                                                 "masked_content": content, "inpaint_not_masked": invert}
        assert main(["generate", str(model_dir), "--from-png", saved, "--init-image", str(start), "--mask", str(mask),
                     "--lora-dir", str(backend.library.root), "-o", str(tmp_path / f"{content}.png")]) == 0
        assert np.array_equal(pixels(Image.open(tmp_path / f"{content}.png")), pixels(made.image))
    assert png_info(backend.save_image(gen(backend, "a circle", seed=1)))[0]["inpaint"] is None
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for bad, match in (({"init_image": None}, "an inpainting mask needs the image it masks"),
                       ({"mask_image": str(tmp_path / "bad.png")}, "inpaint mask bad.png: cannot read it as an image"),
                       ({"mask_blur": 65}, "mask blur must be a whole number of px between 0 and 64"),
                       ({"masked_padding": -1}, "masked area padding must be a whole number of px between 0 and 256"),
                       ({"masked_content": "blank"}, "unknown masked content 'blank'; choose from fill, original")):
        with pytest.raises(UIError, match=match):
            gen(backend, **{**kw, **bad})


def test_a_variation_seed_moves_the_noise_and_its_snippet_and_png_make_it_again(backend, model_dir, tmp_path):
    """A1111's variation seed on the tab: strength 1 is the variation seed's own image (a sampler that draws no more
    noise); part of the way, the caption and infotext say so, and the snippet (with and without a Hires. fix) and
    ``--from-png`` make the same image; PNG Info gives it back; img2img and bad strengths are refused."""
    pytest.importorskip("peft", reason="stock diffusers needs peft for load_lora_weights/set_adapters")
    from PIL import Image

    from lora_diffusion.cli import main
    from ui.handlers import png_info

    other = gen(backend, seed=8, sampler="Euler")
    full = gen(backend, seed=3, sampler="Euler", subseed=8, subseed_strength=1.0)
    assert np.array_equal(pixels(full.image), pixels(other.image))
    _, cells = backend.xy_plot(GenerateRequest("a red circle", seed=3, sampler="Euler", steps=STEPS, width=SIZE, height=SIZE,
                                               guidance=5.0, subseed=8), "Var. strength: 0, 1", None)  # (the plot's axis)
    assert np.array_equal(pixels(cells[1].image), pixels(other.image)) and not np.array_equal(pixels(cells[0].image),
                                                                                              pixels(other.image))
    with pytest.raises(UIError, match="X/Y plot: the tab plots Prompt S/R"):  # (the command line's: a model per value)
        backend.xy_plot(GenerateRequest("a red circle"), "Checkpoint name: a, b", None)
    plain = gen(backend, seed=3, loras={"ink": (0.8, 0.5)})
    for hires in (1.0, 1.5):
        made = gen(backend, seed=3, loras={"ink": (0.8, 0.5)}, subseed=8, subseed_strength=0.4, hires_scale=hires)
        assert "variation seed 8 (0.4)" in made.caption and "Variation seed: 8, Variation seed strength: 0.4" in made.infotext
        scope: dict = {}
        exec(made.snippet, scope)  # noqa: S102 - our own generated code
        assert np.abs(pixels(scope["image"]) - pixels(made.image)).max() <= 2, made.snippet
    half = gen(backend, seed=3, loras={"ink": (0.8, 0.5)}, subseed=8, subseed_strength=0.4)
    assert np.abs(pixels(half.image) - pixels(plain.image)).mean() > 1.0
    saved, again = backend.save_image(half), tmp_path / "again.png"
    assert main(["generate", str(model_dir), "--from-png", saved, "--lora-dir", str(backend.library.root), "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(half.image))
    assert (png_info(saved)[0]["subseed"], png_info(saved)[0]["subseed_strength"]) == (8, 0.4)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()  # an A1111 image's settings the tab does not make: named in the note
    info.add_text("parameters", "a fox\nSteps: 12, Seed: 42, Size: 40x48, ADetailer model: face_yolov8n.pt, VAE: x.pt")
    Image.new("RGB", (8, 8)).save(tmp_path / "adetailer.png", pnginfo=info)
    assert "its ADetailer model, VAE are not made again here" in png_info(tmp_path / "adetailer.png")[1]
    for bad, match in (({"subseed_strength": 1.5}, "variation strength must be between 0 and 1, got 1.5"),
                       ({"subseed_strength": 0.5, "init_image": saved}, "a variation seed is for text-to-image")):
        with pytest.raises(UIError, match=match):
            gen(backend, **bad)


def test_lbw_tags_weigh_blocks_and_their_png_and_snippet_make_the_image_again(backend, model_dir, tmp_path):
    """The LBW extension's tags in the prompt (a preset name, a vector): the image differs from the plain tag's; the
    saved PNG's infotext carries them, and ``lora-diffusion generate --from-png`` (``apply_prompt_loras``) makes the
    same image; the snippet, which blends with ``lora_diffusion`` for them, too."""
    from PIL import Image

    from lora_diffusion.cli import main

    plain = gen(backend, "a red circle <lora:style:1> <lora:ink:0.7:0.4>", seed=2)
    tagged = gen(backend, "a red circle <lora:style:1:OUTD> <lora:ink:0.7:0.4:lbw=1,1,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1>", seed=2)
    assert np.abs(pixels(tagged.image) - pixels(plain.image)).mean() > 0.5
    assert "style 1 (lbw) + ink 0.4 (te 0.7) (lbw)" in tagged.caption
    assert "<lora:style:1:lbw=1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0>" in tagged.infotext
    saved, again = backend.save_image(tagged), tmp_path / "again.png"
    assert main(["generate", str(model_dir), "--from-png", saved, "--lora-dir", str(backend.library.root),
                 "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(tagged.image))
    preset = gen(backend, "a red circle <lora:style:1:OUTD> <lora:ink:0.7:0.4>", seed=2, block_preset="OUT half")
    for result in (tagged, preset):
        assert "load_lora(pipe" in result.snippet and "load_lora_weights" not in result.snippet
        scope: dict = {}
        exec(result.snippet, scope)  # noqa: S102 - our own generated code
        assert np.abs(pixels(scope["image"]) - pixels(result.image)).max() <= 2, result.snippet
    # the vector replaces the preset for its LoRA; the other keeps the preset
    assert "blocks={'style': [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], " \
           "'ink': {'down': 1.0, 'mid': 1.0, 'up': 0.5}}" in preset.snippet


def test_text_encoder_weight_and_block_presets_change_the_image(backend):
    same = pixels(gen(backend, loras={"style": (1.0, None)}).image)
    no_te = gen(backend, loras={"style": (1.0, 0.0)})
    assert "(te 0)" in no_te.caption
    assert np.abs(same - pixels(no_te.image)).mean() > 0.5
    out_only = gen(backend, loras={"style": (1.0, None)}, block_preset="OUT (up) only")
    assert np.abs(same - pixels(out_only.image)).mean() > 0.5
    with pytest.raises(UIError, match="block preset"):
        gen(backend, block_preset="nope")


def test_fused_generation_matches_unfused_and_restores_the_base(backend):
    pipe = backend.pipe
    gen(backend, loras={"style": (1.0, None)})  # loaded
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    unfused = pixels(gen(backend, loras={"style": (0.7, None), "ink": (0.6, None)}).image)
    fused = gen(backend, loras={"style": (0.7, None), "ink": (0.6, None)}, fuse=True)
    assert fused.caption.endswith("fused")
    assert np.abs(unfused - pixels(fused.image)).max() <= 2
    after = dict(pipe.unet.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_lora_for_another_model_gives_the_loaders_message(backend):
    with pytest.raises(UIError) as err:
        gen(backend, loras={"foreign": (1.0, None)})
    msg = str(err.value)
    assert "foreign" in msg and "match no layer" in msg and "SD 1.x" in msg and "Traceback" not in msg
    assert "foreign" not in {n for names in list_adapters(backend.pipe).values() for n in names}
    gen(backend, loras={"style": (1.0, None)})  # the pipeline still works


def test_missing_and_invalid_loras_are_refused(backend):
    with pytest.raises(UIError, match="no LoRA named 'ghost'"):
        gen(backend, loras={"ghost": (1.0, None)})
    with pytest.raises(UIError, match="invalid LoRA name"):
        gen(backend, "x <lora:../../etc/passwd:1>")
    with pytest.raises(UIError, match="multiples of 8"):
        gen(backend, width=30)


def test_snippet_reproduces_the_image_in_stock_diffusers(backend):
    pytest.importorskip("peft", reason="stock diffusers needs peft for load_lora_weights/set_adapters")
    for kw in ({"loras": {"style": (0.8, None), "ink": (0.5, None)}},
               {"loras": {"style": (1.0, 0.3)}, "block_preset": "OUT half", "negative_prompt": "blurry"},
               {"loras": {"style": (1.0, 0.6)}, "negative_prompt": "blurry", "clip_skip": 2},  # (embeddings from that layer)
               {"loras": {"style": (0.7, None)}, "sampler": "Euler a"},
               {"loras": {"style": (0.7, None)}, "noise_schedule": "Zero Terminal SNR"},  # (on the model's own scheduler)
               {"loras": {"ink": (0.9, None)}, "sampler": "DPM++ 2M", "schedule_type": "Karras",
                "prompt": "a (red:1.4) circle, [blue] BREAK square", "negative_prompt": "(blurry:1.2)", "clip_skip": 2},
               {"prompt": "a [red:blue:1] [circle|square]", "negative_prompt": "[dark::2]", "loras": {"ink": (0.5, None)}},
               # Hires. fix: latents upscaled, then the pixels (Lanczos) with prompt editing and CLIP skip in both passes
               {"loras": {"style": (0.8, None)}, "hires_scale": 1.5, "hires_steps": 2, "denoising_strength": 0.6,
                "hires_cfg_scale": 3.0},
               {"prompt": "a [red:blue:2] (circle:1.2)", "loras": {"ink": (0.7, 0.4)}, "clip_skip": 2, "sampler": "Euler a",
                "hires_scale": 2, "hires_upscaler": "Lanczos", "denoising_strength": 0.5},
               # A1111's Hires sampler and prompts: plain prompts, then CLIP skip's embeddings, then A1111's syntax
               {"loras": {"style": (0.8, None)}, "hires_scale": 1.5, "hires_steps": 6, "denoising_strength": 0.6,
                "hires_sampler": "Euler a", "hires_prompt": "a blue square", "hires_negative_prompt": "blurry",
                "noise_schedule": "Zero Terminal SNR"},
               {"loras": {"style": (0.8, None)}, "clip_skip": 2, "negative_prompt": "dark", "hires_scale": 1.5,
                "denoising_strength": 0.6, "hires_prompt": "a blue square"},
               {"prompt": "a [red:blue:2] circle", "loras": {"ink": (0.7, None)}, "sampler": "DPM++ 2M", "hires_scale": 1.5,
                "hires_steps": 6, "denoising_strength": 0.6, "hires_schedule_type": "Exponential", "hires_prompt": "a (square:1.3)"},
               # A1111's Hires resize: the upscale covers it and its middle is kept, in latents and in pixels
               {"loras": {"style": (0.8, None)}, "hires_resize": (48, 40), "denoising_strength": 0.6},
               {"loras": {"style": (0.8, None)}, "hires_resize": (40, 0), "hires_upscaler": "Lanczos", "denoising_strength": 0.6},
               {"loras": {"style": (0.8, None)}, "hires_resize": (56, 40), "hires_upscaler": "Lanczos", "denoising_strength": 0.6}):
        result = gen(backend, **kw)
        assert "load_lora_weights" in result.snippet and "set_adapters" in result.snippet
        scope: dict = {}
        exec(result.snippet, scope)  # noqa: S102 - our own generated code
        theirs = pixels(scope["image"])
        ours = pixels(result.image)
        assert np.abs(theirs - ours).max() <= 2, result.snippet
        base = gen(backend, **{k: v for k, v in kw.items() if k != "loras"})
        assert np.abs(pixels(base.image) - ours).mean() > 1.0  # the LoRAs mattered
        assert ("scheduled_prompt_kwargs(pipe" in result.snippet) == ("[" in kw.get("prompt", ""))  # plain: plain code
        size = kw.get("hires_resize") or (int(SIZE * kw.get("hires_scale", 1)),) * 2
        assert scope["image"].size == tuple(v or size[0] for v in size)
    skipped = gen(backend, loras={"style": (1.0, 0.6)}, clip_skip=2)
    assert np.abs(pixels(skipped.image) - pixels(gen(backend, loras={"style": (1.0, 0.6)}).image)).mean() > 1.0
    assert skipped.settings["clip_skip"] == 2 and "clip skip 2" in skipped.caption
    with pytest.raises(UIError, match=r"CLIP skip 40: the text encoder has \d+ layers"):
        gen(backend, clip_skip=40)


def test_fp8_weight_generates_on_fp8_weights_and_its_snippet_makes_the_image_again(model_dir, lora_files, tmp_path):
    """``Backend(fp8_weight=True)`` (``lora-diffusion ui --fp8-weight``): the UNet's weights are fp8, the LoRAs blend on
    them (unfused and fused), the caption says so, and the snippet (``store_fp8``, then ``lora_diffusion``'s loader:
    diffusers' cannot load onto fp8 weights) makes the same image; the image differs from the full-precision one."""
    for name, path in lora_files.items():
        shutil.copy(path, tmp_path / f"{name}.safetensors")
    fp8, full = Backend(model_dir, tmp_path, fp8_weight=True), Backend(model_dir, tmp_path)
    assert {m.weight.dtype for m in fp8.pipe.unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))} == {torch.float8_e4m3fn}
    for kw in ({"loras": {"style": (0.8, None), "ink": (0.5, None)}}, {"loras": {"style": (0.6, 0.3)}, "fuse": True}):
        result = gen(fp8, **kw)
        assert ", fp8 weight" in result.caption and "store_fp8" in result.snippet and "load_lora(pipe" in result.snippet
        assert result.snippet.index("store_fp8([") < result.snippet.index("load_lora(pipe")
        scope: dict = {}
        exec(result.snippet, scope)  # noqa: S102 - our own generated code
        assert np.abs(pixels(scope["image"]) - pixels(result.image)).max() <= 2, result.snippet
        assert np.abs(pixels(gen(full, **kw).image) - pixels(result.image)).mean() > 0.5  # (1.5-2.3 here: fp8 rounding)


def test_samplers_and_a1111_prompt_syntax_per_request(backend):
    own = pixels(gen(backend).image)
    euler = gen(backend, sampler="Euler a")
    assert np.abs(pixels(euler.image) - own).mean() > 1.0 and "Sampler: Euler a" in euler.infotext
    assert np.array_equal(pixels(gen(backend).image), own)  # the next request without one: the model's own again
    weighted = pixels(gen(backend, "a (red:1.5) circle").image)
    literal = gen(backend, "a (red:1.5) circle", emphasis=False)
    assert np.abs(weighted - pixels(literal.image)).mean() > 1.0 and "Emphasis: None" in literal.infotext
    assert np.array_equal(pixels(gen(backend, "a red circle", emphasis=False).image), own)  # plain: the same
    with pytest.raises(UIError, match="unknown sampler 'Euler z'"):
        gen(backend, sampler="Euler z")
    with pytest.raises(UIError, match=r"prompt emphasis ':\.\)': '\.' is not a number"):  # (A1111 refuses it too)
        gen(backend, "a (red:.) circle")


def test_an_sdxl_model_generates_and_its_snippet_weights_both_text_encoders(tmp_path):
    pytest.importorskip("peft", reason="stock diffusers needs peft for load_lora_weights/set_adapters")
    from lora_diffusion.formats import write_lora_file
    from lora_diffusion.testing import random_lora, tiny_sdxl_pipeline

    tiny_sdxl_pipeline(0).save_pretrained(tmp_path / "xl")
    (tmp_path / "loras").mkdir()
    write_lora_file(tmp_path / "loras" / "xlstyle.safetensors", random_lora(tiny_sdxl_pipeline(0), seed=5, std=0.3),
                    dtype=torch.float32)
    backend = Backend(str(tmp_path / "xl"), tmp_path / "loras")
    plain = pixels(gen(backend).image)
    result = gen(backend, loras={"xlstyle": (1.0, 0.3)})
    assert type(backend.pipe).__name__ == "StableDiffusionXLPipeline"
    assert "'text_encoder_2': 0.3" in result.snippet, result.snippet
    scope: dict = {}
    exec(result.snippet, scope)  # noqa: S102 - our own generated code
    ours = pixels(result.image)
    assert np.abs(pixels(scope["image"]) - ours).max() <= 2, result.snippet
    assert np.abs(plain - ours).mean() > 1.0  # the LoRA mattered
    start = tmp_path / "start.png"
    result.image.save(start)
    for kw in ({"hires_scale": 1.5, "hires_steps": 2, "denoising_strength": 0.6},  # SDXL's img2img pipeline in both
               {"init_image": str(start), "denoising_strength": 0.5, "negative_prompt": "dark"}):
        second = gen(backend, loras={"xlstyle": (0.8, 0.5)}, **kw)
        assert "StableDiffusionXLImg2ImgPipeline" in second.snippet
        scope = {}
        exec(second.snippet, scope)  # noqa: S102 - our own generated code
        assert np.abs(pixels(scope["image"]) - pixels(second.image)).max() <= 2, second.snippet


def test_a_backend_keeps_the_newest_images_on_disk(backend, monkeypatch):
    import ui.handlers

    monkeypatch.setattr(ui.handlers, "KEEP_IMAGES", 3)
    result = gen(backend)
    paths = [Path(backend.save_image(result)) for _ in range(5)]
    assert [p.exists() for p in paths] == [False, False, True, True, True]


# ---------------------------------------------------------------------------------------------- merge
def test_a_merge_that_overflows_float16_writes_nothing(backend):
    with pytest.raises(UIError, match="merge failed: .* is not finite in torch.float16 .NaN, Inf or too large.: nothing was written"):
        backend.merge({"style": 1e6}, "too_big")
    assert not backend.library.exists("too_big")


def test_concat_merge_generates_the_blend_it_was_made_from(backend):
    blend = {"style": (0.7, None), "ink": (-0.5, None)}
    info, report = backend.merge({"style": 0.7, "ink": -0.5, "foreign": 0.0}, "merged_concat")
    try:
        assert info.name == "merged_concat" and info.rank == "4, 6" and "concat" in report  # ranks add up
        merged = pixels(gen(backend, loras={"merged_concat": (1.0, None)}).image)
        assert np.abs(merged - pixels(gen(backend, loras=blend).image)).max() <= 2  # exact (up to fp16 storage)
        assert np.abs(merged - pixels(gen(backend).image)).mean() > 1.0
        with pytest.raises(UIError, match="already exists"):
            backend.merge({"style": 1.0}, "merged_concat")
        info, report = backend.merge({"style": 0.7, "ink": -0.5}, "merged_svd", mode="svd", rank=1, format="kohya")
        assert info.format == "kohya" and info.rank == "1"
        error = float(re.search(r"^error: ([\d.e-]+)", report, re.M).group(1))
        assert 0.01 < error < 1.0
        with pytest.raises(UIError, match="needs a rank"):
            backend.merge({"style": 1.0}, "x", mode="svd")
        with pytest.raises(UIError, match="invalid LoRA name"):
            backend.merge({"style": 1.0}, "../x")
        # per-block weights (the LBW tag's text): the merged LoRA generates what the tags' blend generates
        backend.merge({"style": 0.7, "ink": -0.5}, "merged_blocks", blocks={"style": "OUTD", "ink": "1,1,1,1,1,1,1,0.5,0,0,0,0,1,1,1,1,1"})
        tagged = gen(backend, "a red circle <lora:style:0.7:OUTD> <lora:ink:-0.5:lbw=1,1,1,1,1,1,1,0.5,0,0,0,0,1,1,1,1,1>")
        assert np.abs(pixels(gen(backend, loras={"merged_blocks": (1.0, None)}).image) - pixels(tagged.image)).max() <= 2
        assert np.abs(pixels(tagged.image) - merged).mean() > 0.5
        with pytest.raises(UIError, match="the blocks of style: 'OUTX' is neither a block weight preset"):
            backend.merge({"style": 1.0}, "x", blocks={"style": "OUTX"})
    finally:
        for name in ("merged_concat", "merged_svd", "merged_blocks"):
            if backend.library.exists(name):
                backend.delete(name)


# ---------------------------------------------------------------------------------------------- concurrency
def test_concurrent_generations_do_not_mix_blends(backend):
    blends = {"a": {"style": (1.0, None)}, "b": {"ink": (1.5, 0.0)}, "c": {"style": (-1.0, None), "ink": (0.5, None)}}
    reference = {k: pixels(gen(backend, loras=v, seed=3).image) for k, v in blends.items()}
    assert len({r.tobytes() for r in reference.values()}) == 3
    results: dict[str, list] = {k: [] for k in blends}
    errors = []

    def worker(key):
        try:
            for _ in range(3):
                results[key].append(pixels(gen(backend, loras=blends[key], seed=3).image))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in blends]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for key, images in results.items():
        assert len(images) == 3 and all(np.array_equal(img, reference[key]) for img in images), key


# ---------------------------------------------------------------------------------------------- training data and queue
def test_prepare_dataset_skips_unreadable_images(tmp_path):
    good = make_images(tmp_path / "src", 2, corrupt=2)
    text = tmp_path / "src" / "notes.jpg"
    text.write_text("hello")
    items = [(str(p), f"caption {p.stem}") for p in good] + [(str(text), "")]
    n, skipped = prepare_dataset(items, tmp_path / "data")
    assert n == 2
    assert sorted(s.split(":")[0] for s in skipped) == ["broken0.png", "broken1.png", "notes.jpg"]
    written = sorted(p.name for p in (tmp_path / "data").glob("*.png"))
    assert len(written) == 2 and (tmp_path / "data" / "metadata.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "data" / written[0]).with_suffix(".txt").read_text() == "caption img0"
    with pytest.raises(UIError, match="none of the 2 images"):
        prepare_dataset([(str(text), ""), (str(good[-1]), "")], tmp_path / "data2")


def _fake_train(template: Path, gate: threading.Semaphore | None = None, seen: list | None = None):
    """Stands in for lora_diffusion.training.train with its contract: progress after every step (False stops the
    run), a checkpoint folder when stopped, the final file only when completed, a result object."""

    def train(config, progress):
        out = Path(config.output_dir)
        for step in range(1, config.max_train_steps + 1):
            if gate is not None:
                assert gate.acquire(timeout=10)  # one permit per step
            keep_going = progress({"step": step, "max_steps": config.max_train_steps, "loss": 1.0 / step, "lr": 1e-4,
                                   "eta_s": 0.1, "sample_paths": []})
            if seen is not None:
                seen.append((config.name, step))
            if keep_going is False:
                ckpt = out / "checkpoints" / f"checkpoint-{step}"
                ckpt.mkdir(parents=True)
                shutil.copy(template, ckpt / "pytorch_lora_weights.safetensors")
                return SimpleNamespace(status="cancelled", lora_path=None, checkpoint=ckpt, global_step=step, sample_paths=[])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, out / "pytorch_lora_weights.safetensors")
        return SimpleNamespace(status="completed", lora_path=out / "pytorch_lora_weights.safetensors", checkpoint=None,
                               global_step=config.max_train_steps, sample_paths=[])

    return train


def _job(backend, job_id, name, steps):
    out = backend.library.root / ".train" / name / "out"
    return TrainJob(id=job_id, name=name, config=SimpleNamespace(output_dir=out, max_train_steps=steps, name=name), output_dir=out)


def test_training_queue_runs_one_job_at_a_time_and_cancel_keeps_the_checkpoint(tmp_path, lora_files, model_dir):
    gate = threading.Semaphore(0)
    seen: list = []
    backend = Backend(model_dir, tmp_path / "loras", train_fn=_fake_train(lora_files["style"], gate, seen))
    first = backend.queue.submit(_job(backend, 1, "first", 50))
    second = backend.queue.submit(_job(backend, 2, "second", 2))
    third = backend.queue.submit(_job(backend, 3, "third", 2))
    for _ in range(100):
        if first.status == "running":
            break
        threading.Event().wait(0.02)
    assert (backend.queue.position(first), backend.queue.position(second), backend.queue.position(third)) == (0, 1, 2)
    assert second.status == "queued" and not seen
    backend.queue.cancel(third)  # dropped while waiting
    assert third.finished and third.status == "cancelled" and backend.queue.position(second) == 1
    gate.release(3)
    for _ in range(500):
        if first.step >= 3:
            break
        threading.Event().wait(0.01)
    backend.cancel_training(first)
    gate.release(100)
    assert first.done_event.wait(10) and second.done_event.wait(10)
    assert first.status == "cancelled" and 3 <= first.step < 50, first.message
    assert second.status == "done" and second.step == 2
    assert [n for n, _ in seen] == ["first"] * first.step + ["second"] * 2  # strictly one after the other
    assert sorted(backend.library.names()) == ["first", "second"]
    # the cancelled job's last checkpoint is a usable LoRA
    pipe = tiny_pipeline(0)
    assert load_lora(pipe, backend.library.path_for("first")) == "first"
    assert [x for x, _ in first.losses][:3] == [1, 2, 3]


def test_training_with_the_real_trainer(tmp_path, model_dir):
    backend = Backend(model_dir, tmp_path / "loras")
    images = make_images(tmp_path / "imgs", 3, corrupt=1)
    job = backend.start_training(
        __import__("ui.handlers", fromlist=["TrainRequest"]).TrainRequest(
            name="tiny_style", images=[(str(p), "a square") for p in images], max_train_steps=3, rank=2, resolution=SIZE,
            extra={"num_validation_images": 1, "validation_inference_steps": 2})
    )
    assert job.done_event.wait(120), job.status
    assert job.status == "done", job.message
    assert job.skipped_images and job.skipped_images[0].startswith("broken0.png")
    assert "tiny_style" in backend.library.names() and len(job.losses) >= 1
    gen(backend, loras={"tiny_style": (1.0, None)})


def test_continuing_a_library_lora_trains_its_modules_from_its_factors(tmp_path, model_dir, lora_files):
    """The Train tab's "continue training" (``--init_lora``): the run takes the LoRA's modules, each at its own rank
    and alpha (the request's rank is not used), and at learning rate 0 saves the factors it started from."""
    from lora_diffusion.formats import read_lora_file
    from ui.handlers import TrainRequest

    lib = tmp_path / "loras"
    lib.mkdir()
    for name in ("ink", "style"):
        shutil.copy(lora_files[name], lib / f"{name}.safetensors")
    backend = Backend(model_dir, lib)
    images = [(str(p), "a square") for p in make_images(tmp_path / "imgs", 2)]
    job = backend.start_training(TrainRequest(
        name="ink_more", images=images, max_train_steps=1, rank=8, learning_rate=0.0, text_encoder_lr=0.0, resolution=SIZE,
        continue_from="ink", extra={"save_precision": "fp32", "num_validation_images": 0}))
    assert job.done_event.wait(120), job.status
    assert job.status == "done", job.message
    assert (job.config.rank, job.config.lora_alpha, job.config.train_text_encoder) == (2, 2.0, True)
    started, saved = read_lora_file(lib / "ink.safetensors")[0], read_lora_file(lib / "ink_more.safetensors")[0]
    assert saved.keys() == started.keys() and any(k.startswith("text_encoder.") for k in saved)
    for key, w in started.items():
        assert torch.equal(saved[key].A, w.A.float()) and torch.equal(saved[key].B, w.B.float()), key
    # a LoRA of mixed ranks ("style": rank 2 and rank 4 modules) continues with each module at its own
    job = backend.start_training(TrainRequest(
        name="style_more", images=images, max_train_steps=1, rank=8, learning_rate=0.0, text_encoder_lr=0.0, resolution=SIZE,
        continue_from="style", extra={"save_precision": "fp32", "num_validation_images": 0}))
    assert job.done_event.wait(120) and job.status == "done", job.message
    started, saved = read_lora_file(lib / "style.safetensors")[0], read_lora_file(lib / "style_more.safetensors")[0]
    assert {w.rank for w in started.values()} == {2, 4} and saved.keys() == started.keys()
    for key, w in started.items():
        assert (saved[key].rank, saved[key].alpha) == (w.rank, w.alpha) and torch.equal(saved[key].B, w.B.float()), key
    from lora_diffusion.formats import LoraWeights, write_lora_file

    half = dict(list(started.items())[:2])  # one DoRA module beside a plain one: no one --use_dora trains both
    (key, w), = list(half.items())[:1]
    half[key] = LoraWeights(w.A, w.B, w.alpha, torch.ones(w.B.shape[0], *[1] * (w.A.dim() - 1)))
    write_lora_file(lib / "half.safetensors", half, dtype=torch.float32, format="kohya")
    with pytest.raises(UIError, match="cannot continue 'half': some of its modules are DoRA and some are not"):
        backend.start_training(TrainRequest(name="half_more", images=images, continue_from="half", resolution=SIZE))
    with pytest.raises(UIError, match="no LoRA named 'ghost' in the library to continue"):
        backend.start_training(TrainRequest(name="ghost_more", images=images, continue_from="ghost", resolution=SIZE))
    assert "ghost_more" not in backend.library.names()


def test_an_sdxl_model_trains_and_generates_with_its_lora(tmp_path):
    from lora_diffusion.testing import tiny_sdxl_pipeline
    from ui.handlers import TrainRequest

    tiny_sdxl_pipeline(0).save_pretrained(tmp_path / "xl")
    backend = Backend(str(tmp_path / "xl"), tmp_path / "loras")
    images = make_images(tmp_path / "imgs", 2)
    job = backend.start_training(TrainRequest(
        name="xl_style", images=[(str(p), "a square") for p in images], max_train_steps=2, rank=2, resolution=SIZE,
        train_text_encoder=True, extra={"num_validation_images": 1, "validation_inference_steps": 2}))
    assert job.done_event.wait(120), job.status
    assert job.status == "done", job.message
    components = {k.split(".")[0] for k in read_lora_file(backend.library.path_for("xl_style"))[0]}
    assert components == {"unet", "text_encoder", "text_encoder_2"}
    result = gen(backend, loras={"xl_style": (1.0, 0.5)})
    assert type(backend.pipe).__name__ == "StableDiffusionXLPipeline" and "'text_encoder_2': 0.5" in result.snippet


def test_a_single_file_sdxl_model_generates_and_trains_like_its_folder(tmp_path):
    """--model model.safetensors --model-config DIR: an SDXL checkpoint loads as SDXL (default resolution 1024,
    read from its keys before loading), generates the folder's image, and trains with the same configs."""
    from lora_diffusion.formats import atomic_save
    from lora_diffusion.testing import tiny_sdxl_pipeline
    from lora_diffusion.tools import to_ldm_checkpoint
    from ui.handlers import TrainRequest

    tiny_sdxl_pipeline(0).save_pretrained(tmp_path / "xl")
    atomic_save(to_ldm_checkpoint(tiny_sdxl_pipeline(0)), tmp_path / "xl.safetensors", {"format": "pt"})
    single = Backend(str(tmp_path / "xl.safetensors"), tmp_path / "loras", model_config=str(tmp_path / "xl"))
    assert single._default_resolution() == 1024  # (not loaded yet)
    folder = Backend(str(tmp_path / "xl"), tmp_path / "loras2")
    result = gen(single)
    np.testing.assert_array_equal(pixels(result.image), pixels(gen(folder).image))
    assert type(single.pipe).__name__ == "StableDiffusionXLPipeline"
    scope: dict = {}
    exec(result.snippet, scope)  # noqa: S102 - our own generated code: StableDiffusionXLPipeline.from_single_file
    assert np.abs(pixels(scope["image"]) - pixels(result.image)).max() <= 2, result.snippet
    images = make_images(tmp_path / "imgs", 2)
    job = single.start_training(TrainRequest(name="xl_style", images=[(str(p), "a square") for p in images],
                                             max_train_steps=1, rank=2, resolution=SIZE))
    assert job.done_event.wait(120), job.status
    assert job.status == "done", job.message


def test_cancelling_real_training_keeps_a_usable_checkpoint(tmp_path, model_dir):
    from ui.handlers import TrainRequest

    backend = Backend(model_dir, tmp_path / "loras")
    images = make_images(tmp_path / "imgs", 2)
    job = backend.start_training(TrainRequest(
        name="stopped", images=[(str(p), "a square") for p in images], max_train_steps=200, rank=2, resolution=SIZE,
        extra={"num_validation_images": 0}))
    for _ in range(1000):
        if job.step >= 2 or job.finished:
            break
        threading.Event().wait(0.02)
    backend.cancel_training(job)
    assert job.done_event.wait(120)
    assert job.status == "cancelled" and 2 <= job.step < 200, job.message
    pipe = tiny_pipeline(0)
    assert load_lora(pipe, backend.library.path_for("stopped")) == "stopped"
    assert any(float(layer.lora_B["stopped"].abs().sum()) > 0 for _, layer in lora_layers(pipe.unet))  # it learned


def _wait(condition, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        threading.Event().wait(0.01)
    return condition()


def test_a_name_held_by_a_training_job_is_refused_to_uploads_merges_and_other_jobs(tmp_path, lora_files, model_dir):
    from ui.handlers import TrainRequest

    gate = threading.Semaphore(0)
    lib = tmp_path / "loras"
    lib.mkdir()
    shutil.copy(lora_files["style"], lib / "style.safetensors")
    backend = Backend(model_dir, lib, train_fn=_fake_train(lora_files["ink"], gate))
    images = [(str(p), "a square") for p in make_images(tmp_path / "imgs", 2)]
    job = backend.start_training(TrainRequest("jcap", images, max_train_steps=2))
    waiting = backend.start_training(TrainRequest("jwait", images, max_train_steps=2))
    assert _wait(lambda: job.status == "running") and waiting.status == "queued"
    for name in ("jcap", "jwait"):  # running, queued
        with pytest.raises(UIError, match=f"training job is making a LoRA named '{name}'"):
            backend.upload(lora_files["style"], name)
        with pytest.raises(UIError, match=f"training job is making a LoRA named '{name}'"):
            backend.merge({"style": 1.0}, name)
        with pytest.raises(UIError, match=f"training job is making a LoRA named '{name}'"):
            backend.start_training(TrainRequest(name, images, max_train_steps=2))
    # an upload named by its file ('jcap.safetensors') is refused too
    named_like_the_job = tmp_path / "up" / "jcap.safetensors"
    named_like_the_job.parent.mkdir()
    shutil.copy(lora_files["style"], named_like_the_job)
    with pytest.raises(UIError, match="training job"):
        backend.upload(named_like_the_job)
    gate.release(10)
    assert job.done_event.wait(10) and waiting.done_event.wait(10)
    assert (job.status, waiting.status) == ("done", "done"), (job.message, waiting.message)
    assert job.result.name == "jcap" and "as 'jcap'" in job.message
    assert sorted(backend.library.names()) == ["jcap", "jwait", "style"]
    assert (lib / "jcap.safetensors").read_bytes() == lora_files["ink"].read_bytes()  # the trained weights
    with pytest.raises(UIError, match="already exists"):  # and once done, the usual refusal
        backend.upload(lora_files["style"], "jcap")


def test_a_trained_lora_whose_name_was_taken_anyway_goes_in_under_a_free_name(tmp_path, lora_files, model_dir):
    from ui.handlers import TrainRequest

    gate = threading.Semaphore(0)
    lib = tmp_path / "loras"
    backend = Backend(model_dir, lib, train_fn=_fake_train(lora_files["ink"], gate))
    images = [(str(p), "a square") for p in make_images(tmp_path / "imgs", 2)]
    long_name = "x" * 64
    jobs = [backend.start_training(TrainRequest(n, images, max_train_steps=1)) for n in ("jcap", long_name)]
    assert _wait(lambda: jobs[0].status == "running")
    # someone drops files into the library folder under the jobs' names (and 'jcap-2') while they run
    for name in ("jcap", "jcap-2", long_name):
        shutil.copy(lora_files["style"], lib / f"{name}.safetensors")
    gate.release(10)
    assert all(j.done_event.wait(10) for j in jobs)
    assert [j.status for j in jobs] == ["done", "done"], [j.message for j in jobs]
    assert jobs[0].result.name == "jcap-3" and "as 'jcap-3'" in jobs[0].message and "'jcap' was taken" in jobs[0].message
    assert jobs[1].result.name == "x" * 62 + "-2" and check_name(jobs[1].result.name)
    for name in ("jcap", "jcap-2", long_name):  # what was there is kept as it was
        assert (lib / f"{name}.safetensors").read_bytes() == lora_files["style"].read_bytes()
    for j in jobs:
        assert j.result.path.read_bytes() == lora_files["ink"].read_bytes()


def test_a_kohya_training_job_puts_a_kohya_file_in_the_library(tmp_path, lora_files, model_dir):
    """Train tab's "Save as kohya": the library file is the trained LoRA in kohya's format, named (and aliased, A1111's
    ``ss_output_name``) as the library names it, for a completed run and for a cancelled one's checkpoint alike."""
    from ui.handlers import TrainRequest

    gate = threading.Semaphore(0)
    backend = Backend(model_dir, tmp_path / "loras", train_fn=_fake_train(lora_files["ink"], gate))
    images = [(str(p), "a square") for p in make_images(tmp_path / "imgs", 2)]
    with pytest.raises(UIError, match="format must be one of diffusers, kohya, got 'a1111'"):
        backend.start_training(TrainRequest("jk", images, max_train_steps=1, format="a1111"))
    done = backend.start_training(TrainRequest("jk", images, max_train_steps=1, format="kohya"))
    stopped = backend.start_training(TrainRequest("jk_stop", images, max_train_steps=50, format="kohya"))
    gate.release(3)
    assert done.done_event.wait(10) and _wait(lambda: stopped.step >= 2)
    backend.cancel_training(stopped)
    gate.release(100)
    assert stopped.done_event.wait(10)
    assert (done.status, stopped.status) == ("done", "cancelled"), (done.message, stopped.message)
    trained, _ = read_lora_file(lora_files["ink"])
    for name in ("jk", "jk_stop"):
        lora, header = read_lora_file(backend.library.path_for(name))
        assert header["_format"] == "kohya" and header["ss_output_name"] == name
        assert backend.library.info(name).format == "kohya"
        assert lora.keys() == trained.keys()
        for key, w in trained.items():
            assert torch.equal(lora[key].A, w.A) and torch.equal(lora[key].B, w.B) and lora[key].alpha == w.alpha
    card = backend.library.path_for("jk").with_suffix(".json")
    assert json.loads(card.read_text())["activation text"] == ""  # A1111's card beside it (no trigger word here)
    backend.library.delete("jk_stop")
    assert not backend.library.path_for("jk_stop").with_suffix(".json").exists()


def _overflowing_lora(src, dest, component):
    """``src`` with one layer of ``component`` (``unet`` or ``text_encoder``) whose factors are finite (a file with
    NaN is refused when read) but whose fused weight overflows fp32."""
    from lora_diffusion.formats import LoraWeights, read_lora_file, write_lora_file

    lora, _ = read_lora_file(src)
    key = next(k for k in sorted(lora) if k.startswith(component + "."))
    lora[key] = LoraWeights(torch.ones_like(lora[key].A), torch.full_like(lora[key].B, 3e38), lora[key].alpha)
    write_lora_file(dest, lora, dtype=torch.float32)


def test_a_refused_fuse_is_a_message_and_leaves_the_pipeline_as_it_was(backend, lora_files):
    blend = {"style": (0.7, None), "ink": (0.6, None)}
    reference = pixels(gen(backend, loras=blend).image)
    def base_weights(model):  # names change while a model is fused (its wrappers are swapped out)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}

    before, te_before = base_weights(backend.pipe.unet), base_weights(backend.pipe.text_encoder)
    for component in ("unet", "text_encoder"):  # text encoder: fuse refuses it after fusing the UNet
        name = f"nan_{component}"
        _overflowing_lora(lora_files["style"], backend.library.root / f"{name}.safetensors", component)
        try:
            with pytest.raises(UIError, match="cannot fuse this blend: refusing to fuse: .* NaN or Inf"):
                gen(backend, loras={name: (1.0, None), "style": (0.5, None)}, fuse=True)
            for was, now in ((before, base_weights(backend.pipe.unet)), (te_before, base_weights(backend.pipe.text_encoder))):
                assert set(now) == set(was) and all(torch.equal(was[n], now[n]) for n in was)
            assert np.array_equal(pixels(gen(backend, loras=blend).image), reference)  # later generations as before
            fused = gen(backend, loras=blend, fuse=True)  # and fusing a good blend still works
            assert np.abs(pixels(fused.image) - reference).max() <= 2
        finally:
            backend.delete(name)


def test_a_blend_the_library_refuses_to_set_is_a_message(backend, monkeypatch):
    import ui.handlers

    reference = pixels(gen(backend, loras={"style": (1.0, None)}).image)

    def refuse(*args, **kwargs):
        raise ValueError("blocks[up][block_9]: no such block")

    monkeypatch.setattr(ui.handlers, "set_adapters", refuse)
    with pytest.raises(UIError, match=r"cannot set this blend: blocks\[up\]\[block_9\]: no such block"):
        gen(backend, loras={"style": (1.0, None)})
    monkeypatch.undo()
    assert np.array_equal(pixels(gen(backend, loras={"style": (1.0, None)}).image), reference)


def test_refused_training_requests_leave_nothing_in_the_library(tmp_path, lora_files, model_dir):
    from ui.handlers import TrainRequest

    backend = Backend(model_dir, tmp_path / "loras", train_fn=_fake_train(lora_files["style"]))
    good = [(str(p), "a square") for p in make_images(tmp_path / "imgs", 2)]
    broken = [(str(p), "") for p in make_images(tmp_path / "bad", 0, corrupt=2)]
    refused = [
        (TrainRequest("j0", good, learning_rate=-1), "learning_rate must not be negative"),
        (TrainRequest("j0", good, text_encoder_lr=-1), "text_encoder_lr must not be negative"),
        (TrainRequest("j0", good, extra={"lr_scheduler": "sometimes"}), "lr_scheduler"),
        (TrainRequest("j0", good, learning_rate="fast"), "training settings"),
        (TrainRequest("j0", broken), "none of the 2 images could be read"),
        (TrainRequest("j0", broken, learning_rate=-1), "learning_rate must not be negative"),  # settings first
        (TrainRequest("j0", good, resolution=16384), "training resolution must be 8-2048"),  # (held the queue, then OOM)
        (TrainRequest("j0", good, seed=10**30), "the seed must be a whole number"),  # (failed only when it ran)
        (TrainRequest("j0", good, extra_args="--color_aug --nope"), "additional parameters: unrecognized arguments: --nope"),
        (TrainRequest("j0", good, extra_args="--output_dir /tmp/x"), "--output_dir the Train tab sets itself"),
        (TrainRequest("j0", good, extra_args="--token 'open"), "additional parameters: No closing quotation"),
        (TrainRequest("j0", good, extra_args="--rank_dropout 2"), "--rank_dropout must be in"),
    ]
    for req, message in refused:
        with pytest.raises(UIError, match=message):
            backend.start_training(req)
        left = sorted(str(p.relative_to(backend.library.root)) for p in backend.library.root.rglob("*"))
        assert left in ([], [".train"]), (message, left)
    assert not backend.queue.jobs
    job = backend.start_training(TrainRequest("j0", good, max_train_steps=1))  # the name is still free
    assert job.done_event.wait(10) and job.status == "done", job.message
    # the additional parameters (kohya_ss's GUI's): lora-diffusion train and kohya flags, over the tab's settings
    job = backend.start_training(TrainRequest("j1", good, max_train_steps=1, rank=4, extra_args=(
        "--network_dropout 0.1 --color_aug --network_args rank_dropout=0.2 --network_dim 8 --lr_warmup_steps 0.5")))
    assert job.done_event.wait(10) and job.status == "done", job.message
    assert (job.config.network_dropout, job.config.color_aug, job.config.rank_dropout, job.config.rank,
            job.config.lr_warmup_ratio) == (0.1, True, 0.2, 8, 0.5)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_weights_and_guidance_that_are_not_finite_numbers_are_refused(backend, bad):
    with pytest.raises(UIError, match=f"weight of style must be a finite number, got {bad!r}"):
        gen(backend, loras={"style": (bad, None)})
    with pytest.raises(UIError, match="text-encoder weight of style must be a finite number"):
        gen(backend, loras={"style": (1.0, float(bad))})
    with pytest.raises(UIError, match="weight of style must be a finite number"):
        gen(backend, f"a red circle <lora:style:{bad}>")
    with pytest.raises(UIError, match="guidance must be a finite number"):
        gen(backend, guidance=float(bad))
    with pytest.raises(UIError, match="weight of style must be a number, got 'heavy'"):
        gen(backend, loras={"style": ("heavy", None)})


def test_seeds_torch_cannot_take_are_refused(backend):
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(UIError, match="seed must be a whole number from"):
            gen(backend, seed=seed)
    assert gen(backend, seed=2**64 - 1).settings["seed"] == 2**64 - 1  # the ends of the range work
    gen(backend, seed=-(2**63))


def test_merge_weights_must_be_finite_numbers(backend):
    for bad, message in ((float("nan"), "must be a finite number"), (float("inf"), "must be a finite number"), ("abc", "must be a number"),
                         (None, "must be a number")):
        with pytest.raises(UIError, match=f"the weight of style {message}"):
            backend.merge({"style": bad, "ink": 1.0}, "merged_bad")
        assert not backend.library.exists("merged_bad")  # no NaN file in the library


def test_cancelled_and_failed_jobs_leave_no_copies_of_the_images(tmp_path, lora_files, model_dir):
    from ui.handlers import TrainRequest

    gate = threading.Semaphore(0)
    fake = _fake_train(lora_files["style"], gate)

    def train(config, progress):
        if Path(config.output_dir).parent.name.endswith("-boom"):
            raise RuntimeError("out of memory")
        return fake(config, progress)

    backend = Backend(model_dir, tmp_path / "loras", train_fn=train)
    images = [(str(p), "a square") for p in make_images(tmp_path / "imgs", 2)]
    running = backend.start_training(TrainRequest("first", images, max_train_steps=1))
    waiting = backend.start_training(TrainRequest("second", images, max_train_steps=1))
    boom = backend.start_training(TrainRequest("boom", images, max_train_steps=1))
    assert _wait(lambda: running.status == "running")
    jobs = {j.name: j.output_dir.parent for j in (running, waiting, boom)}
    assert all((folder / "data" / "metadata.jsonl").is_file() for folder in jobs.values())
    backend.cancel_training(waiting)
    assert waiting.status == "cancelled" and not jobs["second"].exists()
    gate.release(10)
    assert running.done_event.wait(10) and boom.done_event.wait(10)
    assert running.status == "done" and boom.status == "failed" and "out of memory" in boom.message
    assert not (jobs["first"] / "data").exists() and (jobs["first"] / "out").is_dir()  # its output stays
    assert not jobs["boom"].exists()
    assert backend.library.names() == ["first"]


def test_a_bundled_embedding_shows_as_a_trigger_word(tmp_path):
    """The library lists an embedding bundled in a LoRA file (A1111 / OneTrainer) among its trigger words: its name
    is the token a prompt uses."""
    from safetensors.torch import save_file

    from lora_diffusion.formats import to_kohya
    from lora_diffusion.testing import random_lora, tiny_pipeline

    state, header = to_kohya(random_lora(tiny_pipeline(0), seed=1))
    save_file({**state, "bundle_emb.shiny.emb_params": torch.zeros(1, 32)}, str(tmp_path / "bundled.safetensors"), metadata=header)
    info = LoraLibrary(tmp_path / "loras").add_file(tmp_path / "bundled.safetensors")
    assert info.trigger_words == ["shiny"] and info.format == "kohya"


def test_png_info_fills_the_generate_tab_from_a1111_infotext(backend, tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from ui.handlers import png_info

    result = gen(backend, "a (red:1.3) circle", loras={"style": (0.5, None)}, seed=9, clip_skip=2, sampler="Euler a")
    fields, note = png_info(backend.save_image(result))
    assert note == "" and fields["prompt"] == "a (red:1.3) circle <lora:style:0.5>"
    assert (fields["seed"], fields["steps"], fields["guidance"], fields["clip_skip"], fields["sampler"]) == (9, STEPS, 5.0, 2, "Euler a")
    again = gen(backend, fields["prompt"], seed=fields["seed"], guidance=fields["guidance"], clip_skip=fields["clip_skip"],
                sampler=fields["sampler"], schedule_type=fields["schedule_type"])
    assert np.array_equal(pixels(again.image), pixels(result.image))  # the tags pick the same blend
    info = PngInfo()
    info.add_text("parameters", "a fox\nNegative prompt: ugly\nSteps: 150, Sampler: DPM++ 2S a Karras, CFG scale: 7, "
                                "Seed: 1, Size: 512x768, Denoising strength: 0.5, Hires upscale: 2, Hires steps: 10, "
                                "Hires upscaler: R-ESRGAN 4x+, Hires CFG Scale: 4, Noise Schedule: Zero Terminal SNR")
    Image.new("RGB", (8, 8)).save(tmp_path / "civitai.png", pnginfo=info)
    fields, note = png_info(tmp_path / "civitai.png")
    assert (fields["width"], fields["height"], fields["steps"], fields["sampler"]) == (512, 768, 100, None)
    assert (fields["hires_scale"], fields["hires_steps"], fields["hires_upscaler"], fields["denoising_strength"]) == \
        (2.0, 10, "Latent", 0.5)
    assert "'DPM++ 2S a Karras' is not one of the UI's" in note and "150 steps" in note
    assert "hires upscaler 'R-ESRGAN 4x+' is not one of the UI's: Latent is set" in note and "img2img" not in note
    assert fields["noise_schedule"] == "Zero Terminal SNR" and "Noise Schedule" not in note  # (the tab has it)
    assert "Hires CFG Scale" not in note  # (the tab has it)
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(UIError, match="bare.png: the image holds no A1111 'parameters' text"):
        png_info(tmp_path / "bare.png")
