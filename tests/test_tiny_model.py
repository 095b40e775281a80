"""The shape data generator, the image metrics, the example data sets and the bundled tiny model.

The model tests load ``lora_diffusion/assets/tiny-shapes`` offline and check that it follows prompts on
held-out seeds (colour and shape measured with ``lora_diffusion.data.metrics``). About 20 s on 2 CPU cores.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from lora_diffusion.data import (
    BACKGROUNDS,
    BASE_SHAPES,
    COLORS,
    NEW_SHAPES,
    SHAPES,
    TINY_MODEL,
    ShapeSpec,
    background_color,
    caption_for,
    classify_shape,
    dominant_color,
    foreground_mask,
    generate_dataset,
    render,
    render_array,
    render_mask,
    saturation,
    shape_iou,
    shape_scores,
    stripe_energy,
)
from lora_diffusion.data.metrics import largest_component, to_uint8
from lora_diffusion.data.shapes import with_style

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO, "examples", "data")

#: Recommended sampling settings for the tiny model (also used by the demo and training tests).
SAMPLE_STEPS = 20
GUIDANCE = 5.0

# ---------------------------------------------------------------------------------------------------------
# Generator


def test_generator_is_seeded_and_covers_every_value() -> None:
    a, caps_a, specs_a = generate_dataset(300, seed=5, shapes=SHAPES)
    b, caps_b, _ = generate_dataset(300, seed=5, shapes=SHAPES)
    c, _, _ = generate_dataset(300, seed=6, shapes=SHAPES)
    assert a.shape == (300, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b
    assert not np.array_equal(a, c)
    assert {s.shape for s in specs_a} == set(SHAPES)
    assert {s.color for s in specs_a} == set(COLORS)
    assert {s.background for s in specs_a} == set(BACKGROUNDS)
    for spec in specs_a:  # the shape lies fully inside the image: the border is pure background
        m = render_mask(spec)
        assert m[0].max() == 0 and m[-1].max() == 0 and m[:, 0].max() == 0 and m[:, -1].max() == 0


def test_captions_follow_the_template() -> None:
    _, captions, specs = generate_dataset(20, seed=1)
    for cap, s in zip(captions, specs):
        assert cap == f"a {s.color} {s.shape} on a {s.background} background"
    spec = ShapeSpec("heart", "blue", "gray", 32.0, 32.0, 16.0)
    assert caption_for(spec, "sks") == "a blue sks heart on a gray background"
    assert set(BASE_SHAPES).isdisjoint(NEW_SHAPES)


def test_exclude_and_bad_specs() -> None:
    _, _, specs = generate_dataset(200, seed=0, exclude=[("circle", "red", "white")])
    assert all((s.shape, s.color, s.background) != ("circle", "red", "white") for s in specs)
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeSpec("hexagon", "red", "white", 32.0, 32.0, 10.0)
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeSpec("circle", "pink", "white", 32.0, 32.0, 10.0)


def test_render_pixels() -> None:
    spec = ShapeSpec("square", "green", "black", 32.0, 32.0, 10.0)
    arr = render_array(spec)
    assert arr[32, 32].tolist() == list(COLORS["green"]) and arr[2, 2].tolist() == [0, 0, 0]
    assert np.array_equal(np.asarray(render(spec)), arr)
    striped = render_array(with_style(spec, "striped"))
    inside = striped[render_mask(spec) == 1.0]
    assert len(np.unique(inside, axis=0)) > 2  # two stripe colours plus their anti-aliased mix


# ---------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_classify_clean_images_perfectly() -> None:
    images, _, specs = generate_dataset(240, seed=11, shapes=SHAPES)
    for img, spec in zip(images, specs):
        assert dominant_color(img) == spec.color, spec
        assert classify_shape(img, SHAPES) == spec.shape, spec
        assert background_color(img) == spec.background, spec
        striped = render_array(with_style(spec, "striped"))
        assert dominant_color(striped) == spec.color, spec
        assert classify_shape(striped, SHAPES) == spec.shape, spec


def test_metrics_accept_pil_float_and_uint8() -> None:
    spec = ShapeSpec("triangle", "yellow", "gray", 30.0, 30.0, 18.0)
    arr = render_array(spec)
    for img in (arr, Image.fromarray(arr), arr.astype(np.float32) / 255.0):
        assert dominant_color(img) == "yellow"
        assert classify_shape(img) == "triangle"
    assert np.array_equal(to_uint8(arr.astype(np.float32) / 255.0), arr)


def test_foreground_mask_matches_the_rendered_mask() -> None:
    for spec in generate_dataset(30, seed=3, shapes=SHAPES)[2]:
        truth = render_mask(spec) > 0.5
        fg = foreground_mask(render(spec))
        assert (truth & fg).sum() / (truth | fg).sum() > 0.9


def test_shape_scores_separate_shapes() -> None:
    circle = render(ShapeSpec("circle", "red", "white", 32.0, 32.0, 20.0))
    scores = shape_scores(circle, SHAPES)
    assert scores["circle"] > 0.9
    assert max(v for k, v in scores.items() if k != "circle") < 0.85
    assert shape_iou(np.zeros((64, 64), bool), "circle") == 0.0
    # Blank and noise images have no clear shape and no colour.
    assert classify_shape(np.full((64, 64, 3), 255, np.uint8)) is None
    assert dominant_color(np.full((64, 64, 3), 128, np.uint8)) is None


def test_largest_component() -> None:
    m = np.zeros((10, 10), bool)
    m[0, 0] = m[0, 1] = True
    m[5:8, 5:9] = True
    assert largest_component(m).sum() == 12
    assert not largest_component(np.zeros((4, 4), bool)).any()


def test_stripe_energy_and_saturation() -> None:
    plain, striped = [], []
    for spec in generate_dataset(60, seed=9, shapes=SHAPES)[2]:
        plain.append(stripe_energy(render(spec)))
        striped.append(stripe_energy(render(with_style(spec, "striped"))))
    assert max(plain) < 0.005 < 0.03 < min(striped)
    # Stripes the other way ("\\") are not the style.
    arr = render_array(with_style(ShapeSpec("square", "red", "white", 32.0, 32.0, 22.0), "striped"))
    assert stripe_energy(arr[:, ::-1]) < 0.3 * stripe_energy(arr)
    assert saturation(np.full((8, 8, 3), 200, np.uint8)) == 0.0
    assert saturation(np.tile(np.array([255, 0, 0], np.uint8), (8, 8, 1))) == pytest.approx(1.0)
    red_on_white = render(ShapeSpec("circle", "red", "white", 32.0, 32.0, 20.0))
    assert 0.2 < saturation(red_on_white) < saturation(red_on_white, foreground_only=True)


# ---------------------------------------------------------------------------------------------------------
# Example data sets


@pytest.mark.parametrize("name, n_min", [("style", 10), ("subject", 6)])
def test_example_data(name: str, n_min: int) -> None:
    folder = os.path.join(EXAMPLES, name)
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert len(pngs) >= n_min
    assert os.path.exists(os.path.join(folder, "README.md"))
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) < 1_000_000
    for png in pngs:
        img = Image.open(os.path.join(folder, png))
        assert img.size == (64, 64) and img.mode == "RGB"
        with open(os.path.join(folder, png[:-4] + ".txt"), encoding="utf-8") as f:
            caption = f.read().strip()
        words = caption.split()
        assert words[0] == "a" and words[-3:-1] == ["a", words[-2]] and words[-1] == "background"
        assert dominant_color(img) == words[1]
        if name == "style":
            assert stripe_energy(img) > 0.03 and classify_shape(img) == words[2]
        else:
            assert words[2:4] == ["sks", "heart"]
            assert classify_shape(img, BASE_SHAPES + ("heart",)) == "heart"
            assert stripe_energy(img) < 0.005


# ---------------------------------------------------------------------------------------------------------
# Bundled model


@pytest.fixture(scope="module")
def pipe():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(TINY_MODEL, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_model_folder_is_small_fp16_and_offline_ready() -> None:
    from safetensors import safe_open

    assert os.path.isabs(TINY_MODEL) and os.path.isdir(TINY_MODEL)
    with open(os.path.join(TINY_MODEL, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TINY_MODEL) for f in fs)
    assert total <= 20_000_000
    for sub in ("unet", "vae", "text_encoder"):
        files = [f for f in os.listdir(os.path.join(TINY_MODEL, sub)) if f.endswith(".safetensors")]
        assert files, sub
        with safe_open(os.path.join(TINY_MODEL, sub, files[0]), "pt") as f:
            dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
        assert dtypes == {"F16"}, (sub, dtypes)


def test_tokenizer_is_word_level(pipe) -> None:
    tok = pipe.tokenizer
    assert tok.model_max_length == 77
    ids = tok("a red circle")["input_ids"]
    assert len(ids) == 5 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    for word in list(COLORS) + list(BACKGROUNDS) + list(SHAPES) + ["on", "background", "sks", "striped"]:
        assert len(tok(word)["input_ids"]) == 3, word
    assert len(tok("zebra")["input_ids"]) > 3  # unknown words still tokenize, as byte characters


def test_model_loads_fp32_with_lora_targets(pipe) -> None:
    import torch

    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    names = {n for n, _ in pipe.unet.named_modules()}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            assert any(n.endswith(f"{attn}.{proj}") for n in names), (attn, proj)
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size == 16


# 18 held-out cases: every (colour, base shape) pair once, backgrounds cycling, seeds never used in the build.
CASES = [
    (color, shape, list(BACKGROUNDS)[(i + j) % len(BACKGROUNDS)], 1000 + 7 * (i * len(BASE_SHAPES) + j))
    for i, color in enumerate(COLORS)
    for j, shape in enumerate(BASE_SHAPES)
]


def test_base_model_follows_prompts(pipe) -> None:
    import torch

    prompts = [f"a {c} {s} on a {b} background" for c, s, b, _ in CASES]
    generators = [torch.Generator().manual_seed(seed) for *_, seed in CASES]
    images = pipe(
        prompts,
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=GUIDANCE,
        generator=generators,
        output_type="np",
        height=64,
        width=64,
    ).images
    assert images.shape == (len(CASES), 64, 64, 3)
    colors = np.mean([dominant_color(im) == c for im, (c, _, _, _) in zip(images, CASES)])
    shapes = np.mean([classify_shape(im) == s for im, (_, s, _, _) in zip(images, CASES)])
    backgrounds = np.mean([background_color(im) == b for im, (_, _, b, _) in zip(images, CASES)])
    assert colors >= 0.8, f"colour accuracy {colors:.0%}"
    assert shapes >= 0.6, f"shape accuracy {shapes:.0%}"
    assert backgrounds >= 0.8, f"background accuracy {backgrounds:.0%}"


def test_generation_is_seeded(pipe) -> None:
    import torch

    def run(seed: int) -> np.ndarray:
        return pipe(
            "a blue square on a white background",
            num_inference_steps=4,
            guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            height=64,
            width=64,
        ).images[0]

    a, b, c = run(3), run(3), run(4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
