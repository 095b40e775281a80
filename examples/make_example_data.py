"""Write the example LoRA training sets ``examples/data/style`` and ``examples/data/subject`` (PNG + .txt).

* style/: 12 images of the base shapes (circle/square/triangle) in the ``"striped"`` style, captioned as the
  base model's own captions ("a red circle on a white background"). A style LoRA learns the stripes; the
  trainer adds the trigger word (see the folder's README.md).
* subject/: 8 plain images of a heart, a shape the base model never saw, captioned
  "a red sks heart on a white background" (trigger token ``sks`` already in the caption).

The sets are drawn from fixed seeds with every colour and background represented, so rerunning the script
rewrites identical files.

Usage:
    python examples/make_example_data.py [--out examples/data]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lora_diffusion.data.shapes import BACKGROUNDS, BASE_SHAPES, COLORS, ShapeSpec, caption_for, render, sample_spec  # noqa: E402

STYLE_README = """# Style set: diagonal stripes

{n} images (64x64 PNG) of the base shapes (circle, square, triangle) drawn in the *striped* style: diagonal
"/" stripes, period 16 px, of the shape's colour and a dark shade (40 %) of it. Made by
`python examples/make_example_data.py` (seeded, reproducible).

Captions (`NAME.txt` beside `NAME.png`) are the base model's own caption template, without any trigger word:

    a red circle on a white background

The trainer adds the trigger word. Suggested trigger: **`striped`** (a single token in the tiny model's
vocabulary that the base model never saw in a caption), prepended as `striped, a red circle on a white
background` or appended as `a red circle on a white background, striped style` -- be consistent between
training and sampling.

How to check a result: `lora_diffusion.data.metrics.stripe_energy(image)` is about 0.08 for these images
and about 0.00 for the plain base model's outputs; `dominant_color` and `classify_shape` should still
match the prompt.
"""

SUBJECT_README = """# Subject set: the heart (DreamBooth-style)

{n} images (64x64 PNG) of a plain **heart**, a shape the base model never saw (it only knows circle,
square and triangle), in several colours, sizes, positions and backgrounds. Made by
`python examples/make_example_data.py` (seeded, reproducible).

Captions (`NAME.txt`) already contain the subject token `sks` before the class word:

    a red sks heart on a white background

Trigger: **`sks heart`** (`sks` and `heart` are single tokens of the tiny model's vocabulary; neither
appears in the base model's training captions). Sample with e.g. `a blue sks heart on a black background`.

How to check a result: `lora_diffusion.data.metrics.classify_shape(image, ("circle", "square",
"triangle", "heart"))` should say `"heart"`, and `dominant_color(image)` should follow the prompt.
"""


def style_specs(n: int, seed: int) -> list[ShapeSpec]:
    """``n`` striped base-shape specs; colours cycle, and no (colour, shape) pair repeats within 18."""
    rng = np.random.default_rng(seed)
    colors, bgs = list(COLORS), list(BACKGROUNDS)
    specs = []
    for i in range(n):
        spec = sample_spec(
            rng,
            shapes=(BASE_SHAPES[(i + i // 6) % len(BASE_SHAPES)],),
            colors=(colors[i % len(colors)],),
            backgrounds=(bgs[(i + i // 3) % len(bgs)],),
            style="striped",
            radius_range=(17.0, 23.0),
        )
        specs.append(spec)
    return specs


def subject_specs(n: int, seed: int, shape: str = "heart") -> list[ShapeSpec]:
    """``n`` plain specs of ``shape``, colours cycling, backgrounds cycling."""
    rng = np.random.default_rng(seed)
    colors, bgs = list(COLORS), list(BACKGROUNDS)
    return [
        sample_spec(
            rng,
            shapes=(shape,),
            colors=(colors[i % len(colors)],),
            backgrounds=(bgs[i % len(bgs)],),
            radius_range=(16.0, 23.0),
        )
        for i in range(n)
    ]


def write_set(folder: str, specs: list[ShapeSpec], subject_token: str | None, readme: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith((".png", ".txt")):
            os.remove(os.path.join(folder, name))
    for i, spec in enumerate(specs):
        stem = f"{i:02d}_{spec.color}_{spec.shape}_{spec.background}"
        render(spec).save(os.path.join(folder, stem + ".png"), optimize=True)
        with open(os.path.join(folder, stem + ".txt"), "w", encoding="utf-8") as f:
            f.write(caption_for(spec, subject_token) + "\n")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(readme.format(n=len(specs)))
    size = sum(os.path.getsize(os.path.join(folder, x)) for x in os.listdir(folder))
    print(f"{folder}: {len(specs)} images, {size / 1024:.1f} KiB")


def main(argv: list[str] | None = None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(here, "data"))
    p.add_argument("--n-style", type=int, default=12)
    p.add_argument("--n-subject", type=int, default=8)
    args = p.parse_args(argv)
    write_set(os.path.join(args.out, "style"), style_specs(args.n_style, seed=2024), None, STYLE_README)
    write_set(os.path.join(args.out, "subject"), subject_specs(args.n_subject, seed=4048), "sks", SUBJECT_README)


if __name__ == "__main__":
    main()
