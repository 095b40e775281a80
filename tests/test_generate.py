"""`lora-diffusion generate` and `txt2img`: A1111 prompts with LoRA tags, its samplers by name, its infotext in the
PNG, and the image made again from that infotext."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_diffusion import inject_lora, load_lora, save_lora, set_adapters
from lora_diffusion.cli import main
from lora_diffusion.data import TINY_MODEL
from lora_diffusion.generate import (SAMPLERS, infotext, lora_hash, model_hash, parse_infotext, set_sampler,
                                     txt2img)
from lora_diffusion.prompts import prompt_embeds
from lora_diffusion.testing import tiny_pipeline

from conftest import randomize_lora


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """A LoRA for the bundled model, strong enough to change its images."""
    from diffusers import StableDiffusionPipeline

    folder = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(TINY_MODEL)
    inject_lora(pipe.unet, rank=4)
    randomize_lora(pipe.unet, std=0.5)
    save_lora(folder / "style.safetensors", unet=pipe.unet)
    return folder


@pytest.fixture
def pipe():
    p = tiny_pipeline(0)
    p.set_progress_bar_config(disable=True)
    return p


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_writes_a1111_infotext_and_makes_the_image_again_from_it(tmp_path, lora_dir):
    prompt = "a (red:1.3) circle, [blue] square <lora:style:0.7>"
    out = tmp_path / "out"
    assert main(["generate", str(TINY_MODEL), prompt, "-n", "blurry, dark", "--lora-dir", str(lora_dir), "--seed", "5",
                 "--steps", "3", "--sampler", "Euler a", "-o", str(out)]) == 0
    first = out / "00000-5.png"
    with Image.open(first) as im:
        text = im.info["parameters"]
    got_prompt, negative, params = parse_infotext(text)
    assert (got_prompt, negative) == (prompt, "blurry, dark")  # the tags stay in the prompt, as A1111 writes it
    assert params["Steps"] == "3" and params["Sampler"] == "Euler a" and params["Seed"] == "5"
    assert params["Size"] == "64x64" and params["Model"] == Path(TINY_MODEL).name
    assert params["Lora hashes"] == f"style: {lora_hash(lora_dir / 'style.safetensors')[:12]}"
    # the same settings from the PNG alone give the same pixels
    again = tmp_path / "again.png"
    assert main(["generate", str(TINY_MODEL), "--from-png", str(first), "--lora-dir", str(lora_dir),
                 "-o", str(again)]) == 0
    assert np.array_equal(_pixels(first), _pixels(again))
    # a flag overrides the PNG's setting, and a folder numbers on
    assert main(["generate", str(TINY_MODEL), "--from-png", str(first), "--lora-dir", str(lora_dir), "--seed", "6",
                 "-o", str(out)]) == 0
    assert not np.array_equal(_pixels(first), _pixels(out / "00001-6.png"))
    # without the LoRA the image differs: the tag did apply
    bare = tmp_path / "bare.png"
    assert main(["generate", str(TINY_MODEL), prompt.replace(" <lora:style:0.7>", ""), "-n", "blurry, dark",
                 "--seed", "5", "--steps", "3", "--sampler", "Euler a", "-o", str(bare)]) == 0
    assert not np.array_equal(_pixels(first), _pixels(bare))
    assert main(["generate", str(TINY_MODEL), "x", "--steps", "1", "-o", str(bare)]) == 2  # no silent overwrite


def test_cli_fp8_weight_generates_with_the_unet_weights_in_fp8(tmp_path, lora_dir, monkeypatch):
    """A1111's FP8 weight: the UNet's Linear / Conv2d weights are float8 while the images are made, the LoRA
    factors are not; each image is txt2img's on the model after ``fp8.store_fp8`` (unfused and fused), and nearer
    the full-precision one than the LoRA's own effect."""
    from diffusers import StableDiffusionPipeline

    import lora_diffusion.generate as generate_module
    from lora_diffusion.fp8 import store_fp8

    seen = []
    real = generate_module.txt2img

    def spy(pipe, *args, **kwargs):
        def record(unet, inputs):  # (at the first UNet call: the LoRAs of the prompt's tags are in by then)
            layers = [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            seen.append(({m.weight.dtype for m in layers}, {p.dtype for n, p in unet.named_parameters() if "lora_" in n}))
            handle.remove()

        handle = pipe.unet.register_forward_pre_hook(record)
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(generate_module, "txt2img", spy)
    prompt = "a red circle <lora:style:0.2>"  # (at 0.7 the random LoRA makes the tiny model chaotic: any rounding moves
    common = [prompt, "--lora-dir", str(lora_dir), "--seed", "5", "--steps", "3"]  # its image far)
    images = {}
    for name, flags in (("full", []), ("fp8", ["--fp8-weight"]), ("fused", ["--fp8-weight", "--fuse"])):
        assert main(["generate", str(TINY_MODEL), *common, *flags, "-o", str(tmp_path / f"{name}.png")]) == 0
        images[name] = _pixels(tmp_path / f"{name}.png").astype(np.int16)
    assert [dtypes for dtypes, _ in seen] == [{torch.float32}, {torch.float8_e4m3fn}, {torch.float8_e4m3fn}]
    assert seen[1][1] == {torch.float32}  # (the LoRA, unfused: in the compute dtype; fused, its wrappers are out)
    monkeypatch.setattr(generate_module, "txt2img", real)
    for name, fused in (("fp8", False), ("fused", True)):
        pipe = StableDiffusionPipeline.from_pretrained(TINY_MODEL)
        store_fp8([("unet", pipe.unet)], torch.float32)
        (image,) = txt2img(pipe, prompt, lora_dir=lora_dir, seed=5, steps=3, sampler="DPM++ 2M", fused=fused)
        assert np.array_equal(np.asarray(image.image.convert("RGB")), images[name]), name
    assert main(["generate", str(TINY_MODEL), "a red circle", "--seed", "5", "--steps", "3", "-o", str(tmp_path / "none.png")]) == 0
    effect = np.abs(_pixels(tmp_path / "none.png").astype(np.int16) - images["full"]).mean()
    for name in ("fp8", "fused"):
        assert 0 < np.abs(images[name] - images["full"]).mean() < effect / 3, name


def test_cli_errors_are_one_line(tmp_path, lora_dir, capsys):
    assert main(["generate", str(TINY_MODEL), "a <lora:nope:1>", "--lora-dir", str(lora_dir), "-o", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["generate", str(TINY_MODEL), "a", "--sampler", "Euler z", "-o", str(tmp_path)]) == 2
    assert "unknown sampler 'Euler z'" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["generate", str(TINY_MODEL), "--from-png", str(plain), "-o", str(tmp_path)]) == 2
    assert "no A1111 'parameters' text" in capsys.readouterr().err
    assert main(["generate", "/no/such/model", "a", "--batch-count", "2", "-o", str(tmp_path / "one.png")]) == 2
    assert "2 images need a folder" in capsys.readouterr().err  # (checked before the model loads)
    # a NaN guidance made NaN latents, saved as an image with "CFG scale: nan" in its infotext
    for flag, label in (("--cfg-scale", "CFG scale"), ("--hr-cfg-scale", "hires CFG scale"), ("--hr-scale", "hires scale")):
        assert main(["generate", str(TINY_MODEL), "a", flag, "nan", "--steps", "1", "-o", str(tmp_path / "nan.png")]) == 2
        assert f"{label} must be a finite number, got nan" in capsys.readouterr().err
    assert not (tmp_path / "nan.png").exists()


def test_tags_weigh_the_loras_as_load_lora_and_set_adapters_do(pipe, tmp_path):
    inject_lora(pipe.unet, rank=4)
    randomize_lora(pipe.unet, std=0.5)
    save_lora(tmp_path / "ink.safetensors", unet=pipe.unet)
    fresh = tiny_pipeline(0)
    fresh.set_progress_bar_config(disable=True)
    load_lora(fresh, tmp_path / "ink.safetensors")
    set_adapters(fresh, {"ink": 0.6})
    texts = prompt_embeds(fresh, ["a (red:1.2) cat"], ["dark"])
    expect = fresh(**texts, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
    other = tiny_pipeline(0)
    other.set_progress_bar_config(disable=True)
    for fused in (False, True):
        (got,) = txt2img(other, "a (red:1.2) cat <lora:ink:0.6>", "dark", lora_dir=tmp_path, steps=2, cfg_scale=5.0,
                         seed=3, width=32, height=32, fused=fused)
        diff = np.abs(np.asarray(got.image, dtype=np.float64) - np.round(expect * 255)).max()
        assert diff <= (0 if not fused else 1), (fused, diff)  # fused: the same up to one level of rounding
    assert "Lora hashes: \"ink: " in got.infotext


def test_batch_count_counts_seeds_as_a1111(pipe):
    images = txt2img(pipe, "a cat", steps=2, seed=10, batch_count=2, width=32, height=32)
    assert [g.seed for g in images] == [10, 11]
    (second,) = txt2img(pipe, "a cat", steps=2, seed=11, width=32, height=32)
    assert np.array_equal(np.asarray(images[1].image), np.asarray(second.image))
    assert "Seed: 11" in images[1].infotext and "Seed: 10" in images[0].infotext


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in ("DPM++ SDE", "LMS")])
def test_samplers_by_a1111_name(pipe, name):
    sampler, schedule = set_sampler(pipe, name)
    class_name, settings, automatic = SAMPLERS[name]
    assert type(pipe.scheduler).__name__ == class_name and (sampler, schedule) == (name, automatic)
    for key, value in settings.items():
        assert pipe.scheduler.config[key] == value
    assert pipe.scheduler.config.get("use_karras_sigmas", False) == (automatic == "Karras")
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.beta_end == \
        tiny_pipeline(0).scheduler.config.beta_end  # the model's own noise schedule


def test_sampler_names_with_a_schedule_and_refusals(pipe):
    assert set_sampler(pipe, "DPM++ 2M Karras") == ("DPM++ 2M", "Karras")  # A1111's old names
    assert set_sampler(pipe, "Euler", "Karras") == ("Euler", "Karras") and pipe.scheduler.config.use_karras_sigmas
    assert set_sampler(pipe, "Euler") == ("Euler", "Automatic") and not pipe.scheduler.config.use_karras_sigmas
    assert set_sampler(pipe, "UniPC", "SGM Uniform")[1] == "SGM Uniform"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert set_sampler(pipe, "HeunDiscreteScheduler") == ("HeunDiscreteScheduler", "Automatic")
    with pytest.raises(ValueError, match="'Euler a' .* has no Karras schedule"):
        set_sampler(pipe, "Euler a", "Karras")
    with pytest.raises(ValueError, match="unknown schedule type 'Polyexponential'"):
        set_sampler(pipe, "Euler", "Polyexponential")
    import diffusers

    if getattr(diffusers.LMSDiscreteScheduler, "_backends", None):
        with pytest.raises(ValueError, match="'LMS' .* needs scipy"):
            set_sampler(pipe, "LMS")


def test_infotext_quotes_and_reads_back_as_a1111_does():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1,
              "Size": "512x768", "Model": "a, b: c", "Clip skip": None, "Lora hashes": "x: 0123456789ab, y: ba9876543210"}
    text = infotext("line one\n(line two:1.2)", "ugly\nbad hands", params)
    assert 'Model: "a, b: c"' in text and "Clip skip" not in text
    prompt, negative, got = parse_infotext(text)
    assert (prompt, negative) == ("line one\n(line two:1.2)", "ugly\nbad hands")
    assert got == {k: str(v) for k, v in params.items() if v is not None}
    # A1111's own example (modules/infotext_utils.py)
    prompt, negative, got = parse_infotext("girl, ((eyeshadow))\nNegative prompt: ugly, (deformed)\nSteps: 20, "
                                           "Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
                                           "Model hash: 45dee52b")
    assert (prompt, negative) == ("girl, ((eyeshadow))", "ugly, (deformed)")
    assert got["Seed"] == "965400086" and got["Model hash"] == "45dee52b" and got["Sampler"] == "Euler a"
    assert parse_infotext("just a prompt, no settings") == ("just a prompt, no settings", "", {})


def test_lora_hash_is_a1111s_and_ignores_the_metadata(tmp_path):
    tensors = {"a.lora_down.weight": torch.randn(4, 8), "a.lora_up.weight": torch.randn(8, 4)}
    save_file(tensors, tmp_path / "one.safetensors", metadata={"ss_output_name": "one"})
    save_file(load_file(tmp_path / "one.safetensors"), tmp_path / "two.safetensors", metadata={"x": "a longer header"})
    raw = (tmp_path / "one.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert lora_hash(tmp_path / "one.safetensors") == hashlib.sha256(raw[8 + header:]).hexdigest()  # kohya/A1111's
    assert lora_hash(tmp_path / "one.safetensors") == lora_hash(tmp_path / "two.safetensors")
    assert model_hash(tmp_path / "one.safetensors") == hashlib.sha256(raw).hexdigest()
    assert model_hash(tmp_path / "one.safetensors") != model_hash(tmp_path / "two.safetensors")
    assert json.loads(raw[8:8 + header])["__metadata__"]["ss_output_name"] == "one"


def test_embeddings_the_prompts_name_load_and_go_into_the_infotext(pipe, tmp_path):
    from lora_diffusion import load_embedding

    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(4)) * 3},
              folder / "sub" / "BadThing.safetensors")
    save_file({"emb_params": torch.randn(1, width)}, folder / "unused.safetensors")
    settings = dict(steps=2, seed=1, width=32, height=32)
    (got,) = txt2img(pipe, "a cat", "badthing, dark", embeddings_dir=folder, **settings)
    assert "unused" not in pipe.tokenizer.get_vocab()  # only what the prompts name
    sha = hashlib.sha256((folder / "sub" / "BadThing.safetensors").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "BadThing: {sha}", Version' in got.infotext
    fresh = tiny_pipeline(0)
    fresh.set_progress_bar_config(disable=True)
    (bare,) = txt2img(fresh, "a cat", "badthing, dark", **settings)
    assert not np.array_equal(np.asarray(got.image), np.asarray(bare.image))
    load_embedding(fresh, folder / "sub" / "BadThing.safetensors")
    (manual,) = txt2img(fresh, "a cat", "badthing, dark", **settings)
    assert np.array_equal(np.asarray(got.image), np.asarray(manual.image))


def test_img2img_is_diffusers_img2img_and_keeps_the_pipelines_dtype(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    start = Image.fromarray((np.random.default_rng(0).random((40, 36, 3)) * 255).astype(np.uint8))
    (got,) = txt2img(pipe, "a cat", init_image=start, denoising_strength=0.5, steps=4, seed=2, cfg_scale=6.0)
    assert got.image.size == (32, 40) and "Denoising strength: 0.5" in got.infotext  # its size, to a multiple of 8
    reference = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    expect = reference("a cat", image=start.resize((32, 40), Image.Resampling.LANCZOS), strength=0.5,
                       num_inference_steps=4, guidance_scale=6.0, generator=torch.Generator().manual_seed(2)).images[0]
    assert np.array_equal(np.asarray(got.image), np.asarray(expect))
    pipe.to(torch.bfloat16)  # (diffusers' from_pipe would cast the shared modules to float32)
    txt2img(pipe, "a cat", init_image=start, denoising_strength=0.5, steps=2, seed=2)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16


def test_inpainting_repaints_the_mask_as_diffusers_inpaint_pipeline_and_keeps_the_rest(pipe, tmp_path, capsys):
    """A1111's inpainting ("original" content, whole picture) on a text-to-image model: diffusers' inpaint pipeline
    on the same modules, pasted over the start through the blurred mask, so the pixels outside it are the start's;
    the infotext's Mask blur; the command line makes the image again from the PNG, its start and its mask."""
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import ImageFilter

    start = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 12, 24, 28))
    (got,) = txt2img(pipe, "a cat", init_image=start, mask_image=mask, denoising_strength=0.8, steps=4, seed=2, cfg_scale=6.0)
    assert "Denoising strength: 0.8, Mask blur: 4," in got.infotext
    soft = mask.filter(ImageFilter.GaussianBlur(4))
    reference = StableDiffusionInpaintPipeline(**pipe.components, requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    made = reference("a cat", image=start, mask_image=soft, strength=0.8, num_inference_steps=4, guidance_scale=6.0,
                     width=32, height=32, generator=torch.Generator().manual_seed(2)).images[0]
    overlay = soft.point(lambda v: min(255, 2 * v))  # A1111's overlay: the blurred mask doubled
    assert np.array_equal(np.asarray(got.image), np.asarray(Image.composite(made, start, overlay)))
    assert not np.array_equal(np.asarray(got.image), np.asarray(Image.composite(made, start, soft)))
    outside = np.asarray(soft) == 0
    assert outside.any() and np.array_equal(np.asarray(got.image)[outside], np.asarray(start)[outside])
    inside = np.asarray(mask) == 255
    assert np.abs(np.asarray(got.image, dtype=int)[inside] - np.asarray(start, dtype=int)[inside]).mean() > 10

    start.save(tmp_path / "start.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(TINY_MODEL), "a cat", "--init-image", str(tmp_path / "start.png"), "--mask",
                 str(tmp_path / "mask.png"), "--mask-blur", "2", "--steps", "3", "--seed", "4", "-o", str(out)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", str(TINY_MODEL), "--from-png", str(out), "--init-image", str(tmp_path / "start.png"), "--mask",
                 str(tmp_path / "mask.png"), "-o", str(again)]) == 0
    assert "Mask blur: 2" in Image.open(again).info["parameters"]
    assert np.array_equal(_pixels(out), _pixels(again))
    capsys.readouterr()
    for args, message in ((["--from-png", str(out), "--init-image", str(tmp_path / "start.png")], "was inpainted; pass"),
                          (["a cat", "--mask", str(tmp_path / "mask.png")], "--mask needs the image it masks")):
        assert main(["generate", str(TINY_MODEL), *args, "-o", str(tmp_path / "no.png")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="mask blur must be between 0 and 64"):
        txt2img(pipe, "a cat", init_image=start, mask_image=mask, mask_blur=-1)

    # A1111's "Only masked" area: the mask's surroundings cut out, inpainted at the full size, pasted back (diffusers'
    # padding_mask_crop); far from the mask every pixel is the start's, and the PNG makes it again
    small = Image.new("L", (32, 32), 0)
    small.paste(255, (4, 4, 10, 10))
    (only,) = txt2img(pipe, "a cat", init_image=start, mask_image=small, mask_blur=1, inpaint_only_masked=True,
                      masked_padding=2, denoising_strength=0.8, steps=4, seed=2)
    assert "Mask blur: 1, Inpaint area: Only masked, Masked area padding: 2," in only.infotext
    made = reference("a cat", image=start, mask_image=small.filter(ImageFilter.GaussianBlur(1)), strength=0.8,
                     num_inference_steps=4, guidance_scale=7.0, width=32, height=32, padding_mask_crop=2,
                     generator=torch.Generator().manual_seed(2)).images[0]
    assert np.array_equal(np.asarray(only.image), np.asarray(made))
    assert np.array_equal(np.asarray(only.image)[16:], np.asarray(start)[16:])  # (the crop is the top-left corner)
    (whole,) = txt2img(pipe, "a cat", init_image=start, mask_image=small, mask_blur=1, denoising_strength=0.8, steps=4, seed=2)
    assert not np.array_equal(np.asarray(whole.image), np.asarray(only.image))
    small.save(tmp_path / "small.png")
    assert main(["generate", str(TINY_MODEL), "a cat", "--init-image", str(tmp_path / "start.png"), "--mask",
                 str(tmp_path / "small.png"), "--only-masked", "--mask-padding", "4", "--steps", "3", "--seed", "4",
                 "-o", str(tmp_path / "only.png")]) == 0
    assert main(["generate", str(TINY_MODEL), "--from-png", str(tmp_path / "only.png"), "--init-image", str(tmp_path / "start.png"),
                 "--mask", str(tmp_path / "small.png"), "-o", str(tmp_path / "only_again.png")]) == 0
    assert "Inpaint area: Only masked, Masked area padding: 4" in Image.open(tmp_path / "only_again.png").info["parameters"]
    assert np.array_equal(_pixels(tmp_path / "only.png"), _pixels(tmp_path / "only_again.png"))
    assert main(["generate", str(TINY_MODEL), "a cat", "--only-masked", "-o", str(tmp_path / "no.png")]) == 2
    assert "--only-masked, --mask-padding, --masked-content and --invert-mask are for inpainting" in capsys.readouterr().err


def test_masked_content_and_mask_mode_are_a1111s(pipe, tmp_path, capsys):
    """A1111's Masked content (fill / latent noise / latent nothing) and Mask mode (Inpaint not masked): each keeps the
    pixels outside the mask, goes into the infotext and is made again from the PNG."""
    from PIL import ImageOps

    from lora_diffusion.generate import _img2img, _start_latents, fill_masked

    start = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    outside = np.asarray(mask) == 0

    # fill: the masked square takes the colours around it; the rest is the image's own
    red = Image.new("RGB", (32, 32), (200, 10, 10))
    red.paste((0, 255, 0), (8, 8, 24, 24))
    filled = np.asarray(fill_masked(red, mask), dtype=int)
    assert np.array_equal(filled[outside], np.asarray(red, dtype=int)[outside])
    assert np.abs(filled[~outside] - [200, 10, 10]).max() <= 8  # (not the green, 255 away: the rounding of premultiplied layers)

    def made(content, strength, **kw):
        (got,) = txt2img(pipe, "a cat", init_image=start, mask_image=mask, mask_blur=0, masked_content=content,
                         denoising_strength=strength, steps=4, seed=3, **kw)
        return got

    images = {(c, s): np.asarray(made(c, s).image) for c in ("fill", "original", "latent noise", "latent nothing")
              for s in (0.6, 1.0)}
    for image in images.values():
        assert np.array_equal(image[outside], np.asarray(start)[outside])
    half = [images[c, 0.6] for c in ("fill", "original", "latent noise", "latent nothing")]
    assert all(not np.array_equal(a, b) for i, a in enumerate(half) for b in half[i + 1 :])
    # at denoising 1 the start under the mask is noise whatever it was: the latent ones are fill's, bit for bit (their
    # latents changed only where the pipeline repaints)
    assert np.array_equal(images["latent noise", 1.0], images["fill", 1.0])
    assert np.array_equal(images["latent nothing", 1.0], images["fill", 1.0])

    # the latents the pipeline starts from: zeros / the seed's noise under its latent mask, the encoding elsewhere
    inpainter = _img2img(pipe, "inpaint")
    pixels = inpainter.image_processor.preprocess(start)
    with torch.no_grad():
        plain = inpainter._encode_vae_image(pixels, torch.Generator().manual_seed(1))
    under = torch.zeros_like(plain, dtype=torch.bool)
    f = 32 // plain.shape[-1]
    under[..., 8 // f : 24 // f, 8 // f : 24 // f] = True  # (the square, at the latents' size)
    for content in ("latent nothing", "latent noise"):
        inpainter = _img2img(pipe, "inpaint")
        _start_latents(inpainter, content, mask, 32, 32, None, 9)
        with torch.no_grad():
            got = inpainter._encode_vae_image(pixels, torch.Generator().manual_seed(1))
        assert torch.equal(got[~under], plain[~under])
        expect = torch.zeros(plain.shape) if content == "latent nothing" else \
            torch.randn(plain.shape, generator=torch.Generator().manual_seed(9))
        assert torch.equal(got[under], expect[under])

    # Inpaint not masked: the mask inverted, bit for bit
    (inverted,) = txt2img(pipe, "a cat", init_image=start, mask_image=mask, inpaint_not_masked=True,
                          denoising_strength=0.7, steps=3, seed=4)
    (by_hand,) = txt2img(pipe, "a cat", init_image=start, mask_image=ImageOps.invert(mask), denoising_strength=0.7,
                         steps=3, seed=4)
    assert np.array_equal(np.asarray(inverted.image), np.asarray(by_hand.image))
    assert "Denoising strength: 0.7, Mask mode: Inpaint not masked, Mask blur: 4, Version" in inverted.infotext
    assert "Mask mode" not in by_hand.infotext
    assert "Mask blur: 0, Masked content: latent noise, Version" in made("latent noise", 0.6).infotext
    with pytest.raises(ValueError, match="unknown masked content 'noise'; choose from fill, original, latent noise"):
        txt2img(pipe, "a cat", init_image=start, mask_image=mask, masked_content="noise")

    # the command line: --masked-content (its spaces may be dashes) and --invert-mask, made again from the PNG
    start.save(tmp_path / "start.png")
    mask.save(tmp_path / "mask.png")
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    inputs = ["--init-image", str(tmp_path / "start.png"), "--mask", str(tmp_path / "mask.png")]
    assert main(["generate", str(TINY_MODEL), "a cat", *inputs, "--masked-content", "latent-nothing", "--invert-mask",
                 "--steps", "3", "--seed", "4", "-o", str(first)]) == 0
    assert main(["generate", str(TINY_MODEL), "--from-png", str(first), *inputs, "-o", str(again)]) == 0
    text = Image.open(again).info["parameters"]
    assert "Mask mode: Inpaint not masked, Mask blur: 4, Masked content: latent nothing," in text
    assert np.array_equal(_pixels(first), _pixels(again))
    capsys.readouterr()
    assert main(["generate", str(TINY_MODEL), "a cat", "--masked-content", "fill", "-o", str(tmp_path / "no.png")]) == 2
    assert "--masked-content and --invert-mask are for inpainting: give --mask" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (argparse's own refusal)
        main(["generate", str(TINY_MODEL), "a cat", *inputs, "--masked-content", "blank", "-o", str(tmp_path / "no.png")])

    # SDXL's inpaint pipeline encodes its start alike: the latent ones with "Only masked" keep the rest too
    from PIL import ImageFilter

    from lora_diffusion.testing import tiny_sdxl_pipeline

    xl = tiny_sdxl_pipeline(0)
    xl.set_progress_bar_config(disable=True)
    beyond = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))) == 0
    for content in ("original", "latent noise"):
        (got,) = txt2img(xl, "a cat", init_image=start, mask_image=mask, masked_content=content, inpaint_only_masked=True,
                         masked_padding=4, denoising_strength=0.6, steps=2, seed=1)
        assert np.array_equal(np.asarray(got.image)[beyond], np.asarray(start)[beyond])
        if content == "original":
            original = np.asarray(got.image)
    assert not np.array_equal(np.asarray(got.image), original)
    assert "invalid choice: 'blank'" in capsys.readouterr().err


def test_transparent_starts_and_masks_read_as_a1111_reads_them(pipe, tmp_path):
    """A start with alpha is laid over white; a mask with transparency is its alpha (strokes on a clear layer
    repaint), one without any its grey levels: each makes what its plain equivalent makes, bit for bit, from Python
    and from files on the command line."""
    rng = np.random.default_rng(1)
    rgba = Image.fromarray((rng.random((32, 32, 4)) * 255).astype(np.uint8), "RGBA")
    white = Image.new("RGBA", (32, 32), (255, 255, 255, 255))
    white.alpha_composite(rgba)
    flat = white.convert("RGB")
    strokes = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # black, and opaque only in the square
    strokes.paste((0, 0, 0, 255), (8, 12, 24, 28))
    square = Image.new("L", (32, 32), 0)
    square.paste(255, (8, 12, 24, 28))
    opaque = Image.merge("RGBA", (*Image.new("RGB", (32, 32), (0, 0, 0)).split(), Image.new("L", (32, 32), 255)))
    opaque.paste((255, 255, 255, 255), (8, 12, 24, 28))  # no transparency: its grey levels, white in the square

    def image(start, mask=None):
        (got,) = txt2img(pipe, "a cat", init_image=start, mask_image=mask, denoising_strength=0.7, steps=3, seed=2)
        return np.asarray(got.image)

    assert np.array_equal(image(rgba), image(flat)) and not np.array_equal(image(flat), image(rgba.convert("RGB")))
    assert np.array_equal(image(rgba, strokes), image(flat, square))
    assert np.array_equal(image(flat, opaque), image(flat, square))
    assert np.array_equal(image(flat, strokes.convert("LA")), image(flat, square))

    for name, im in (("rgba", rgba), ("flat", flat), ("strokes", strokes), ("square", square)):
        im.save(tmp_path / f"{name}.png")
    for start, mask in (("rgba", "strokes"), ("flat", "square")):
        assert main(["generate", str(TINY_MODEL), "a cat", "--init-image", str(tmp_path / f"{start}.png"), "--mask",
                     str(tmp_path / f"{mask}.png"), "--steps", "3", "--seed", "2", "-o", str(tmp_path / f"{start}-out.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "rgba-out.png"), _pixels(tmp_path / "flat-out.png"))


def test_variation_seeds_and_resize_seed_from_are_a1111s(pipe, tmp_path):
    """A1111's variation seed: the starting noise slerped toward the variation seed's (all the way: that seed's
    image, bit for bit, with a sampler that draws no more noise); Resize seed from: the seed's noise at that size,
    centred over its full-size noise. Both in the infotext, read back by --from-png."""
    from lora_diffusion.generate import slerp, variation_noise

    kw = dict(steps=3, sampler="Euler", width=32, height=32)
    (five,) = txt2img(pipe, "a cat", seed=5, **kw)
    (toward,) = txt2img(pipe, "a cat", seed=1, subseed=5, subseed_strength=1.0, **kw)
    assert np.array_equal(np.asarray(toward.image), np.asarray(five.image))
    assert "Seed: 1, Size: 32x32, Variation seed: 5, Variation seed strength: 1.0, Version" in toward.infotext
    (one,) = txt2img(pipe, "a cat", seed=1, **kw)
    batch = txt2img(pipe, "a cat", seed=1, subseed=5, subseed_strength=0.3, batch_count=2, **kw)
    assert [(parse_infotext(g.infotext)[2]["Seed"], parse_infotext(g.infotext)[2]["Variation seed"]) for g in batch] == \
        [("1", "5"), ("2", "6")]  # (both count on through a batch)
    between = np.asarray(batch[0].image, dtype=int)
    assert 0 < np.abs(between - np.asarray(one.image, dtype=int)).mean() < np.abs(between - np.asarray(five.image, dtype=int)).mean()

    # the noise itself: the seed's draw (the generator left where the pipeline's draw leaves it), slerped along dim 1
    g = torch.Generator().manual_seed(1)
    noise = variation_noise(pipe, g, 32, 32, subseed=5, strength=0.3)
    own, sub = (torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (1, 5))
    torch.testing.assert_close(noise[0], slerp(0.3, own, sub), rtol=0, atol=0)
    cos = (own / own.norm(dim=1, keepdim=True) * sub / sub.norm(dim=1, keepdim=True)).sum(1, keepdim=True).acos()
    torch.testing.assert_close(noise[0], (0.7 * cos).sin() / cos.sin() * own + (0.3 * cos).sin() / cos.sin() * sub)
    after = torch.Generator().manual_seed(1)
    torch.randn(4, 16, 16, generator=after)
    assert torch.equal(torch.randn(8, generator=g), torch.randn(8, generator=after))

    # Resize seed from 16x40 (latents 8 wide, 20 high) onto 32x32 (16 x 16): centred, cut where it is larger
    g = torch.Generator().manual_seed(3)
    resized = variation_noise(pipe, g, 32, 32, resize_from=(16, 40))[0]
    small = torch.randn(4, 20, 8, generator=torch.Generator().manual_seed(3))
    full = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(3))
    full[:, 0:16, 4:12] = small[:, 2:18, 0:8]
    assert torch.equal(resized, full)
    (moved,) = txt2img(pipe, "a cat", seed=3, seed_resize_from=(16, 40), **kw)
    assert "Size: 32x32, Seed resize from: 16x40, Version" in moved.infotext
    with pytest.raises(ValueError, match="variation strength must be between 0 and 1, got 1.5"):
        txt2img(pipe, "a cat", subseed_strength=1.5)
    with pytest.raises(ValueError, match="are for text-to-image"):
        txt2img(pipe, "a cat", init_image=five.image, subseed_strength=0.5)

    # the command line, and --from-png with them
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(["generate", str(TINY_MODEL), "a cat", "--seed", "2", "--variation-seed", "-1", "--variation-strength",
                 "0.4", "--seed-resize-from", "24x24", "--steps", "2", "-o", str(first)]) == 0
    assert main(["generate", str(TINY_MODEL), "--from-png", str(first), "-o", str(again)]) == 0
    assert np.array_equal(_pixels(first), _pixels(again))
    text = Image.open(again).info["parameters"]
    assert Image.open(first).info["parameters"] == text and "Variation seed strength: 0.4, Seed resize from: 24x24" in text
    with pytest.raises(SystemExit):  # (argparse's own refusal)
        main(["generate", str(TINY_MODEL), "a cat", "--seed-resize-from", "24", "-o", str(tmp_path / "no.png")])


def test_a_hires_pass_takes_its_own_sampler_and_prompt_as_a1111(pipe, tmp_path):
    """A1111's Hires sampler / schedule type and Hires prompt / negative prompt: the second pass is diffusers' img2img
    pipeline with that scheduler and those prompts (bit for bit), each in the infotext where it differs, read back by
    --from-png; LoRA tags in the hires prompt must be the prompt's."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionImg2ImgPipeline

    settings = dict(steps=4, seed=5, width=32, height=32, cfg_scale=6.0, sampler="Euler", hires_scale=1.5, hires_steps=3,
                    denoising_strength=0.6)
    (got,) = txt2img(pipe, "a red cat", hires_sampler="DPM++ 2M", hires_schedule_type="Karras", hires_prompt="a red cat, detailed",
                     hires_negative_prompt="blurry", **settings)
    assert ("Denoising strength: 0.6, Hires sampler: DPM++ 2M, Hires prompt: a red cat, detailed, Hires negative prompt: "
            "blurry, Hires schedule type: Karras, Hires upscale: 1.5, Hires steps: 3") in got.infotext.replace('"', "")
    g = torch.Generator().manual_seed(5)
    set_sampler(pipe, "Euler")
    first = pipe("a red cat", num_inference_steps=4, guidance_scale=6.0, width=32, height=32, generator=g, output_type="latent").images
    start = F.interpolate(first, size=(24, 24), mode="bilinear")
    second = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    set_sampler(second, "DPM++ 2M", "Karras")
    second.set_progress_bar_config(disable=True)
    expect = second("a red cat, detailed", negative_prompt="blurry", image=start, strength=0.6, num_inference_steps=3,
                    guidance_scale=6.0, generator=g).images[0]
    assert np.array_equal(np.asarray(got.image), np.asarray(expect))
    (plain,) = txt2img(pipe, "a red cat", **settings)
    assert "Hires sampler" not in plain.infotext and not np.array_equal(np.asarray(plain.image), np.asarray(got.image))
    (same,) = txt2img(pipe, "a red cat", hires_sampler="Euler", hires_prompt="a red cat", **settings)  # (as the first's)
    assert np.array_equal(np.asarray(same.image), np.asarray(plain.image)) and same.infotext == plain.infotext

    path, again = tmp_path / "hires.png", tmp_path / "again.png"
    got.image.save(path, pnginfo=got.pnginfo())
    assert main(["generate", str(TINY_MODEL), "--from-png", str(path), "-o", str(again)]) == 0  # (the bundled model)
    remade = Image.open(again).info["parameters"]
    assert "Hires sampler: DPM++ 2M" in remade and "Hires schedule type: Karras" in remade
    assert main(["generate", str(TINY_MODEL), "--from-png", str(again), "-o", str(tmp_path / "third.png")]) == 0
    assert np.array_equal(_pixels(again), _pixels(tmp_path / "third.png"))
    with pytest.raises(ValueError, match="LoRA tags in the hires prompt must be the prompt's"):
        txt2img(pipe, "a red cat", hires_prompt="a red cat <lora:style:1>", **settings)


def test_hires_cfg_scale_guides_the_second_pass_as_forges(pipe, tmp_path):
    """Forge's Hires CFG Scale: the second pass's guidance (the pipelines run by hand), in the infotext where it is
    not the first pass's CFG scale, and read back."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionImg2ImgPipeline

    from lora_diffusion.generate import infotext_settings

    settings = dict(steps=3, seed=5, width=32, height=32, cfg_scale=6.0, sampler="Euler", hires_resize=(48, 48),
                    hires_steps=2, denoising_strength=0.6)
    (plain,) = txt2img(pipe, "a red cat", **settings)
    (same,) = txt2img(pipe, "a red cat", hires_cfg_scale=6.0, **settings)
    (low,) = txt2img(pipe, "a red cat", hires_cfg_scale=2, **settings)
    assert np.array_equal(np.asarray(plain.image), np.asarray(same.image)) and plain.infotext == same.infotext
    assert "Hires CFG Scale" not in plain.infotext and parse_infotext(low.infotext)[2]["Hires CFG Scale"] == "2.0"
    g = torch.Generator().manual_seed(5)
    set_sampler(pipe, "Euler")
    first = pipe("a red cat", num_inference_steps=3, guidance_scale=6.0, width=32, height=32, generator=g, output_type="latent").images
    second = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    second.set_progress_bar_config(disable=True)
    expect = second("a red cat", image=F.interpolate(first, size=(24, 24), mode="bilinear"), strength=0.6,
                    num_inference_steps=2, guidance_scale=2.0, generator=g).images[0]  # (latents at 1/2)
    assert np.array_equal(np.asarray(low.image), np.asarray(expect))
    assert not np.array_equal(np.asarray(low.image), np.asarray(plain.image))
    assert infotext_settings(low.infotext)["hires_cfg_scale"] == 2.0
    (again,) = txt2img(pipe, **infotext_settings(low.infotext))
    assert np.array_equal(np.asarray(again.image), np.asarray(low.image)) and again.infotext == low.infotext
    # a Hires resize without an upscale factor is a Hires. fix too: its sampler is the second pass's (2 steps of 4: on
    # 1, Euler a ends as Euler does)
    (euler,) = txt2img(pipe, "a red cat", **dict(settings, hires_steps=4))
    (euler_a,) = txt2img(pipe, "a red cat", hires_sampler="Euler a", **dict(settings, hires_steps=4))
    assert "Hires sampler: Euler a" in euler_a.infotext and not np.array_equal(np.asarray(euler_a.image), np.asarray(euler.image))
    (again,) = txt2img(pipe, **infotext_settings(euler_a.infotext))
    assert np.array_equal(np.asarray(again.image), np.asarray(euler_a.image)) and again.infotext == euler_a.infotext


def test_hires_resize_covers_the_size_and_cuts_its_middle_as_a1111(pipe, tmp_path):
    """A1111's Hires resize: one side given, the other follows the aspect ratio; both, the image is upscaled to cover
    them and the middle cut out of the latents; the image equals the pipelines run by hand, its infotext says Hires
    resize (not Hires upscale), and --from-png makes it again."""
    import torch.nn.functional as F
    from diffusers import StableDiffusionImg2ImgPipeline

    from lora_diffusion.generate import hires_size

    assert hires_size(64, 32, 1.0, (96, 0)) == (96, 48) and hires_size(64, 32, 1.0, (0, 96)) == (192, 96)
    assert hires_size(64, 32, 1.0, (96, 96)) == (192, 96) and hires_size(32, 64, 1.0, (96, 96)) == (96, 192)
    settings = dict(steps=4, seed=5, width=32, height=24, cfg_scale=6.0, sampler="Euler", hires_steps=3, denoising_strength=0.6)
    (got,) = txt2img(pipe, "a red cat", hires_resize=(48, 48), **settings)
    assert got.image.size == (48, 48)
    assert "Denoising strength: 0.6, Hires resize: 48x48, Hires steps: 3, Hires upscaler: Latent" in got.infotext
    assert "Hires upscale:" not in got.infotext
    g = torch.Generator().manual_seed(5)
    set_sampler(pipe, "Euler")
    first = pipe("a red cat", num_inference_steps=4, guidance_scale=6.0, width=32, height=24, generator=g, output_type="latent").images
    big = F.interpolate(first, size=(48 // 2, 64 // 2), mode="bilinear")  # (covers 48 x 48: 64 x 48; latents at 1/2)
    start = big[..., :, 4:28]  # (64 - 48 = 16 px = 8 latents: 4 off each side)
    second = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    second.set_progress_bar_config(disable=True)
    expect = second("a red cat", image=start, strength=0.6, num_inference_steps=3, guidance_scale=6.0, generator=g).images[0]
    assert np.array_equal(np.asarray(got.image), np.asarray(expect))
    (lanczos,) = txt2img(pipe, "a red cat", hires_resize=(0, 40), hires_upscaler="Lanczos", **settings)
    assert lanczos.image.size == (48, 40) and "Hires resize: 0x40" in lanczos.infotext  # (the width follows: 32 * 40 / 24)
    path, again = tmp_path / "resized.png", tmp_path / "again.png"
    got.image.save(path, pnginfo=got.pnginfo())
    assert main(["generate", str(TINY_MODEL), "--from-png", str(path), "-o", str(again)]) == 0
    assert "Hires resize: 48x48" in Image.open(again).info["parameters"] and Image.open(again).size == (48, 48)
    assert main(["generate", str(TINY_MODEL), "--from-png", str(again), "-o", str(tmp_path / "third.png")]) == 0
    assert np.array_equal(_pixels(again), _pixels(tmp_path / "third.png"))
    with pytest.raises(ValueError, match="hires resize must be a width and a height"):
        txt2img(pipe, "a red cat", hires_resize=(0, 0), **settings)


def test_every_setting_we_write_is_read_back_and_others_are_named(pipe, tmp_path, capsys):
    """Each infotext key txt2img writes (hires, inpainting, variation, LoRA hashes, emphasis, clip skip, an X/Y/Z
    grid's) is one --from-png reads; an A1111 image's other settings (a Hires sampler, ADetailer's) are named in a
    warning, and the image is still made."""
    from lora_diffusion.generate import unread_settings
    from lora_diffusion.xyplot import xy_plot

    start = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    kw = dict(steps=2, seed=1, width=32, height=32)
    own = tiny_pipeline(0)  # (a LoRA of this model)
    inject_lora(own.unet, rank=2)
    save_lora(tmp_path / "loras" / "style.safetensors", unet=own.unet)
    texts = [txt2img(pipe, "a (red:1.2) cat <lora:style:0.5>", "ugly", lora_dir=tmp_path / "loras", clip_skip=2, emphasis="No norm",
                     hires_scale=1.5, hires_steps=2, subseed=3, subseed_strength=0.2, seed_resize_from=(24, 24), sampler="Euler a",
                     model_name="m", model_sha256="ab" * 32, noise_schedule="Zero Terminal SNR", hires_cfg_scale=4, **kw)[0].infotext,
             txt2img(pipe, "a cat", init_image=start, mask_image=mask, masked_content="latent noise", inpaint_not_masked=True,
                     inpaint_only_masked=True, **kw)[0].infotext,
             xy_plot(pipe, "a cat", x="Seed: 1, -1", y="Steps: 1, 2", z="CFG Scale: 3, 7", width=32, height=32).infotext]
    assert "Noise Schedule: Zero Terminal SNR" in texts[0] and "Hires CFG Scale: 4.0" in texts[0]
    for text in texts:
        assert unread_settings(text) == [], text
    a1111 = ("a cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 32x32, Denoising strength: 0.5, Hires upscale: 1.5, "
             "Hires CFG Scale: 5, Hires checkpoint: other.safetensors, ADetailer model: face_yolov8n.pt, Version: v1.10.1")
    assert unread_settings(a1111) == ["Hires checkpoint", "ADetailer model"]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", a1111)
    Image.new("RGB", (32, 32)).save(tmp_path / "a1111.png", pnginfo=info)
    capsys.readouterr()
    assert main(["generate", str(TINY_MODEL), "--from-png", str(tmp_path / "a1111.png"), "-o", str(tmp_path / "again.png")]) == 0
    assert "settings not made again here: Hires checkpoint, ADetailer model; the image will differ" in capsys.readouterr().err
    assert (tmp_path / "again.png").is_file()
    for bad in (dict(init_image=start, denoising_strength=0.5, steps=1), dict(hires_scale=2.0, hires_steps=1, denoising_strength=0.5)):
        with pytest.raises(ValueError, match="at denoising strength 0.5 run no denoising step"):  # (diffusers: a crash)
            txt2img(pipe, "a cat", **{**kw, **bad})


def test_zero_terminal_snr_noise_schedule_is_a1111s(pipe):
    """A1111's "Noise schedule for sampling: Zero Terminal SNR": sqrt(alpha-bar) shifted so that the last is 0 and
    scaled so that the first is kept (Lin et al. 2023), then the last alpha-bar set to 4.9e-8; for the images of that
    call only. The infotext names it, and its settings make the image again."""
    from lora_diffusion.generate import infotext_settings, zero_terminal_snr

    for name in ("Euler a", "DPM++ 2M", "DDIM", "UniPC"):
        set_sampler(pipe, name)
        base, rescaled = pipe.scheduler, zero_terminal_snr(pipe.scheduler)
        assert type(rescaled) is type(base)
        assert {k: v for k, v in rescaled.config.items() if k != "trained_betas" and not k.startswith("_")} == \
            {k: v for k, v in base.config.items() if k != "trained_betas" and not k.startswith("_")}
        old, new = base.alphas_cumprod.double().sqrt(), rescaled.alphas_cumprod.double().sqrt()
        expect = (old - old[-1]) * (old[0] / (old[0] - old[-1]))
        torch.testing.assert_close(new[:-1], expect[:-1], rtol=1e-5, atol=1e-7)
        assert rescaled.alphas_cumprod[-1].item() == pytest.approx(4.8973451890853435e-08, rel=1e-4)
        assert base.alphas_cumprod[-1] > 1000 * rescaled.alphas_cumprod[-1]  # (SD's own: 0.0047)

    kw = dict(steps=3, seed=2, width=32, height=32, sampler="Euler")
    default = txt2img(pipe, "a red circle", **kw)[0]
    ztsnr = txt2img(pipe, "a red circle", noise_schedule="Zero Terminal SNR", **kw)[0]
    assert pipe.scheduler.config.get("trained_betas") is None  # the pipeline's own schedule again
    assert torch.equal(pipe.scheduler.alphas_cumprod, base.alphas_cumprod)
    assert "Noise Schedule" not in parse_infotext(default.infotext)[2]
    assert parse_infotext(ztsnr.infotext)[2]["Noise Schedule"] == "Zero Terminal SNR"
    assert not np.array_equal(np.asarray(default.image), np.asarray(ztsnr.image))
    again = txt2img(pipe, **infotext_settings(ztsnr.infotext))[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(ztsnr.image)) and again.infotext == ztsnr.infotext
    with pytest.raises(ValueError, match="unknown noise schedule 'ZTSNR'; choose from Default, Zero Terminal SNR"):
        txt2img(pipe, "a red circle", noise_schedule="ZTSNR", **kw)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_upscales_the_first_pass_and_denoises_it_again(pipe, upscaler, tmp_path):
    import torch.nn.functional as F
    from diffusers import StableDiffusionImg2ImgPipeline

    from lora_diffusion.generate import _from_png

    settings = dict(steps=4, seed=5, width=32, height=32, cfg_scale=6.0)
    (got,) = txt2img(pipe, "a red cat", hires_scale=1.5, hires_steps=3, hires_upscaler=upscaler,
                     denoising_strength=0.6, **settings)
    assert got.image.size == (48, 48)
    assert f"Hires upscale: 1.5, Hires steps: 3, Hires upscaler: {upscaler}" in got.infotext
    g = torch.Generator().manual_seed(5)
    kind = "latent" if upscaler == "Latent" else "pil"
    first = pipe("a red cat", num_inference_steps=4, width=32, height=32, guidance_scale=6.0, generator=g,
                 output_type=kind).images
    side = 48 // pipe.vae_scale_factor
    start = F.interpolate(first, size=(side, side), mode="bilinear", antialias=False) if kind == "latent" else \
        first[0].resize((48, 48), Image.Resampling.LANCZOS)
    second = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    second.set_progress_bar_config(disable=True)
    expect = second("a red cat", image=start, strength=0.6, num_inference_steps=3, guidance_scale=6.0,
                    generator=g).images[0]
    assert np.array_equal(np.asarray(got.image), np.asarray(expect))
    path = tmp_path / "hires.png"
    got.image.save(path, pnginfo=got.pnginfo())
    settings = _from_png(str(path))
    (again,) = txt2img(pipe, settings.pop("prompt"), settings.pop("negative_prompt"), **settings)
    assert np.array_equal(np.asarray(got.image), np.asarray(again.image))


def test_kohya_files_carry_kohyas_hash_of_their_tensors_and_never_a_stale_one(pipe, tmp_path):
    from safetensors import safe_open

    from lora_diffusion.tools import convert_lora

    inject_lora(pipe.unet, rank=4)
    randomize_lora(pipe.unet, std=0.5)
    save_lora(tmp_path / "a.safetensors", unet=pipe.unet, format="kohya", metadata={"trigger_words": ["x"]})

    def header(path):
        with safe_open(str(path), "pt") as f:
            return f.metadata()

    assert header(tmp_path / "a.safetensors")["sshs_model_hash"] == lora_hash(tmp_path / "a.safetensors")  # A1111 takes it
    stale = load_file(tmp_path / "a.safetensors")
    save_file(stale, tmp_path / "stale.safetensors", metadata={**header(tmp_path / "a.safetensors"),
                                                                "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8})
    convert_lora(tmp_path / "stale.safetensors", tmp_path / "b.safetensors", to="kohya", dtype=torch.float32)
    convert_lora(tmp_path / "stale.safetensors", tmp_path / "c.safetensors", to="diffusers")
    assert header(tmp_path / "b.safetensors")["sshs_model_hash"] == lora_hash(tmp_path / "b.safetensors") != "0" * 64
    assert "sshs_legacy_hash" not in header(tmp_path / "b.safetensors")
    assert not {"sshs_model_hash", "sshs_legacy_hash"} & set(header(tmp_path / "c.safetensors"))


def test_sdxl_hires_and_img2img_run_at_their_sizes():
    from lora_diffusion.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(steps=3, seed=1, width=32, height=32, denoising_strength=0.5)
    (plain,) = txt2img(pipe, "a [red:blue:0.5] (cat:1.2)", "dark", **settings)
    (hires,) = txt2img(pipe, "a [red:blue:0.5] (cat:1.2)", "dark", hires_scale=1.5, **settings)
    (again,) = txt2img(pipe, "a cat", init_image=plain.image, **settings)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    (patched,) = txt2img(pipe, "a cat", init_image=plain.image, mask_image=mask, mask_blur=0, **settings)
    assert (plain.image.size, hires.image.size, again.image.size) == ((32, 32), (48, 48), (32, 32))
    outside = np.asarray(mask) == 0  # (SDXL's inpaint pipeline on the same modules; outside the mask: the original)
    assert np.array_equal(np.asarray(patched.image)[outside], np.asarray(plain.image)[outside])
    assert not np.array_equal(np.asarray(patched.image), np.asarray(plain.image))
    assert not np.array_equal(np.asarray(hires.image.resize((32, 32))), np.asarray(plain.image))


def test_emphasis_modes_go_into_the_infotext_and_come_back(pipe, tmp_path):
    from lora_diffusion.generate import _from_png

    settings = dict(steps=2, seed=4, width=32, height=32)
    images = {mode: txt2img(pipe, "a (red:1.5) cat", emphasis=mode, **settings)[0] for mode in ("Original", "No norm", "None")}
    assert "Emphasis" not in images["Original"].infotext
    for mode in ("No norm", "None"):
        assert f"Emphasis: {mode}," in images[mode].infotext
        assert not np.array_equal(np.asarray(images[mode].image), np.asarray(images["Original"].image))
        path = tmp_path / f"{mode}.png"
        images[mode].image.save(path, pnginfo=images[mode].pnginfo())
        again = _from_png(str(path))
        assert again["emphasis"] == mode
        (remade,) = txt2img(pipe, again.pop("prompt"), again.pop("negative_prompt"), **again)
        assert np.array_equal(np.asarray(remade.image), np.asarray(images[mode].image))
    assert "Emphasis" not in txt2img(pipe, "a red cat", emphasis="None", **settings)[0].infotext  # no brackets: moot


def test_cli_vae_writes_a1111s_vae_keys_and_from_png_finds_it_again(tmp_path, capsys):
    """--vae FILE (A1111's SD VAE) decodes with that VAE and writes A1111's "VAE hash" / "VAE"; --from-png finds the
    named VAE in --vae-dir and makes the image again, pixel for pixel; where it is missing, a warning says so."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from lora_diffusion.tools import to_ldm_checkpoint

    model = StableDiffusionPipeline.from_pretrained(TINY_MODEL)
    with torch.no_grad():
        model.vae.decoder.conv_out.bias += 0.3
    vaes = tmp_path / "vaes"
    vaes.mkdir()
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in to_ldm_checkpoint(model).items()
               if k.startswith("first_stage_model.")}, vaes / "bright.safetensors")
    common = ["generate", str(TINY_MODEL), "a red circle", "--seed", "3", "--steps", "2"]
    assert main(common + ["--vae", str(vaes / "bright.safetensors"), "-o", str(tmp_path / "vae.png")]) == 0
    assert main(common + ["-o", str(tmp_path / "plain.png")]) == 0
    params = parse_infotext(Image.open(tmp_path / "vae.png").info["parameters"])[2]
    assert (params["VAE"], params["VAE hash"]) == ("bright.safetensors", model_hash(vaes / "bright.safetensors")[:10])
    assert _pixels(tmp_path / "vae.png").mean() > _pixels(tmp_path / "plain.png").mean() + 5  # (the brighter decoder)
    assert main(["generate", str(TINY_MODEL), "--from-png", str(tmp_path / "vae.png"), "--vae-dir", str(vaes),
                 "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(_pixels(tmp_path / "vae.png"), _pixels(tmp_path / "again.png"))
    capsys.readouterr()
    assert main(["generate", str(TINY_MODEL), "--from-png", str(tmp_path / "vae.png"), "-o", str(tmp_path / "no.png")]) == 0
    assert "made with the VAE bright.safetensors, not found" in capsys.readouterr().err
    assert np.array_equal(_pixels(tmp_path / "plain.png"), _pixels(tmp_path / "no.png"))
    assert main(common + ["--vae", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.png")]) == 2
    assert "--vae " in capsys.readouterr().err
