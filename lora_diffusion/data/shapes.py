"""Seeded procedural images of flat shapes with captions (numpy + PIL only).

An image is described by a :class:`ShapeSpec` (shape, colour, background, centre, radius, style); rendering
a spec is deterministic, and :func:`sample_spec` draws specs from a ``numpy.random.Generator``, so a seed fixes a
whole dataset. Captions follow one template: ``"a red circle on a white background"``.

Shapes: ``BASE_SHAPES`` (circle, square, triangle) are what the bundled tiny model was trained on;
``NEW_SHAPES`` (heart, star) it never saw (subjects for DreamBooth-style LoRAs). Styles: ``"plain"`` (flat fill,
what the model was trained on) and ``"striped"`` (diagonal "/" stripes of the colour and a dark shade of it).

Example:
    >>> import numpy as np
    >>> spec = sample_spec(np.random.default_rng(0))
    >>> render(spec).size
    (64, 64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Named foreground colours (RGB). Hues are spread so a hue classifier separates them.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 10),
    "yellow": (240, 210, 20),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "purple": (140, 40, 180),
}
#: Named background colours (RGB).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
#: Shapes the bundled base model was trained on.
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Shapes the base model never saw (subjects for LoRA training).
NEW_SHAPES: tuple[str, ...] = ("heart", "star")
#: Every shape the renderer knows.
SHAPES: tuple[str, ...] = BASE_SHAPES + NEW_SHAPES
#: Rendering styles; the base model only saw ``"plain"``.
STYLES: tuple[str, ...] = ("plain", "striped")

#: Stripe period (pixels, measured across the stripes) of the ``"striped"`` style.
STRIPE_PERIOD: float = 16.0
#: Brightness factor of the dark stripes of the ``"striped"`` style.
STRIPE_SHADE: float = 0.4
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one image.

    ``cx, cy`` is the centre and ``radius`` the half-extent in pixels of a ``size`` x ``size`` image;
    ``fg_rgb``/``bg_rgb`` are the exact (possibly jittered) colours; ``phase`` shifts the stripes.

    Example:
        >>> ShapeSpec("circle", "red", "white", 32.0, 32.0, 16.0).caption
        'a red circle on a white background'
    """

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    radius: float
    style: str = "plain"
    size: int = 64
    fg_rgb: tuple[int, int, int] | None = None
    bg_rgb: tuple[int, int, int] | None = None
    phase: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known: {tuple(COLORS)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; known: {tuple(BACKGROUNDS)}")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; known: {STYLES}")

    @property
    def caption(self) -> str:
        """The caption of this image, e.g. ``'a red circle on a white background'``."""
        return caption_for(self)


def caption_for(spec: ShapeSpec, subject_token: str | None = None) -> str:
    """Caption of a spec; ``subject_token`` is put before the shape word (DreamBooth style).

    Example:
        >>> s = ShapeSpec("heart", "red", "white", 32.0, 32.0, 16.0)
        >>> caption_for(s), caption_for(s, "sks")
        ('a red heart on a white background', 'a red sks heart on a white background')
    """
    shape = f"{subject_token} {spec.shape}" if subject_token else spec.shape
    return f"a {spec.color} {shape} on a {spec.background} background"


def _polygon(spec: ShapeSpec, scale: float) -> list[tuple[float, float]] | None:
    """Vertices (in supersampled pixels) of the polygon shapes; ``None`` for the circle."""
    cx, cy, r = spec.cx * scale, spec.cy * scale, spec.radius * scale
    if spec.shape == "circle":
        return None
    if spec.shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if spec.shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if spec.shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.05 * r + rad * math.sin(ang)))
        return pts
    if spec.shape == "heart":
        t = np.linspace(0.0, 2.0 * math.pi, 120, endpoint=False)
        x = 16.0 * np.sin(t) ** 3
        y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
        # The curve spans x in [-16, 16], y in [-12, 17]; fit it in the radius, centred on its box.
        k = r / 16.0
        return [(cx + k * float(a), cy + k * (float(b) - 2.5)) for a, b in zip(x, y)]
    raise ValueError(f"unknown shape {spec.shape!r}")


def render_mask(spec: ShapeSpec) -> np.ndarray:
    """Anti-aliased coverage of the shape, float32 in [0, 1], shape ``(size, size)``.

    Example:
        >>> m = render_mask(ShapeSpec("square", "red", "white", 32.0, 32.0, 10.0))
        >>> float(m[32, 32]), float(m[0, 0])
        (1.0, 0.0)
    """
    s = _SUPERSAMPLE
    canvas = Image.new("L", (spec.size * s, spec.size * s), 0)
    draw = ImageDraw.Draw(canvas)
    poly = _polygon(spec, s)
    if poly is None:
        cx, cy, r = spec.cx * s, spec.cy * s, spec.radius * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    small = canvas.resize((spec.size, spec.size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _fill(spec: ShapeSpec) -> np.ndarray:
    """Foreground colour per pixel, float32 ``(size, size, 3)`` in [0, 255]."""
    fg = np.asarray(spec.fg_rgb or COLORS[spec.color], dtype=np.float32)
    n = spec.size
    if spec.style == "plain":
        return np.broadcast_to(fg, (n, n, 3)).copy()
    # Diagonal "/" stripes (lines x + y = const), supersampled for clean edges.
    s = _SUPERSAMPLE
    coords = (np.arange(n * s, dtype=np.float32) + 0.5) / s
    across = (coords[None, :] + coords[:, None]) / math.sqrt(2.0) + spec.phase
    dark = (np.floor(across / (STRIPE_PERIOD / 2.0)) % 2).astype(np.float32)
    dark = dark.reshape(n, s, n, s).mean(axis=(1, 3))
    shade = 1.0 - (1.0 - STRIPE_SHADE) * dark
    return fg[None, None, :] * shade[:, :, None]


def render_array(spec: ShapeSpec) -> np.ndarray:
    """The image as ``uint8`` array ``(size, size, 3)``.

    Example:
        >>> a = render_array(ShapeSpec("circle", "blue", "black", 32.0, 32.0, 12.0))
        >>> a.shape, a.dtype.name, a[32, 32].tolist(), a[0, 0].tolist()
        ((64, 64, 3), 'uint8', [30, 60, 220], [0, 0, 0])
    """
    mask = render_mask(spec)[:, :, None]
    bg = np.asarray(spec.bg_rgb or BACKGROUNDS[spec.background], dtype=np.float32)
    img = mask * _fill(spec) + (1.0 - mask) * bg[None, None, :]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(spec: ShapeSpec) -> Image.Image:
    """The image as an RGB ``PIL.Image``.

    Example:
        >>> render(ShapeSpec("star", "yellow", "gray", 32.0, 32.0, 20.0, style="striped")).mode
        'RGB'
    """
    return Image.fromarray(render_array(spec), mode="RGB")


def sample_spec(
    rng: np.random.Generator,
    shapes: Sequence[str] = BASE_SHAPES,
    colors: Sequence[str] = tuple(COLORS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    style: str = "plain",
    size: int = 64,
    radius_range: tuple[float, float] = (13.0, 22.0),
    jitter: int = 12,
) -> ShapeSpec:
    """Draw one random spec: uniform shape/colour/background, random radius and position fully inside.

    ``jitter`` is the max per-channel offset added to the foreground colour (half of it to the background).

    Example:
        >>> spec = sample_spec(np.random.default_rng(1), shapes=("heart",), colors=("red",))
        >>> spec.shape, spec.color
        ('heart', 'red')
    """
    shape = str(shapes[rng.integers(len(shapes))])
    color = str(colors[rng.integers(len(colors))])
    background = str(backgrounds[rng.integers(len(backgrounds))])
    lo, hi = radius_range
    radius = float(rng.uniform(lo, hi))
    margin = radius + 2.0
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    fg = np.asarray(COLORS[color]) + rng.integers(-jitter, jitter + 1, size=3)
    bg = np.asarray(BACKGROUNDS[background]) + rng.integers(-(jitter // 2), jitter // 2 + 1, size=3)
    phase = float(rng.uniform(0.0, STRIPE_PERIOD))
    return ShapeSpec(
        shape=shape,
        color=color,
        background=background,
        cx=cx,
        cy=cy,
        radius=radius,
        style=style,
        size=size,
        fg_rgb=tuple(int(v) for v in np.clip(fg, 0, 255)),
        bg_rgb=tuple(int(v) for v in np.clip(bg, 0, 255)),
        phase=phase,
    )


def iter_specs(n: int, seed: int = 0, exclude: Iterable[tuple[str, str, str]] = (), **kwargs: object) -> Iterator[ShapeSpec]:
    """Yield ``n`` specs from ``seed``, skipping ``(shape, colour, background)`` triples in ``exclude``.

    Extra keyword arguments go to :func:`sample_spec`.

    Example:
        >>> [s.shape for s in iter_specs(3, seed=0, shapes=("circle",))]
        ['circle', 'circle', 'circle']
    """
    rng = np.random.default_rng(seed)
    banned = set(exclude)
    produced = 0
    while produced < n:
        spec = sample_spec(rng, **kwargs)  # type: ignore[arg-type]
        if (spec.shape, spec.color, spec.background) in banned:
            continue
        produced += 1
        yield spec


def generate_dataset(
    n: int,
    seed: int = 0,
    exclude: Iterable[tuple[str, str, str]] = (),
    subject_token: str | None = None,
    **kwargs: object,
) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """``n`` images as a ``uint8`` array ``(n, size, size, 3)``, their captions and their specs.

    Example:
        >>> images, captions, specs = generate_dataset(4, seed=0)
        >>> images.shape, captions[0] == specs[0].caption
        ((4, 64, 64, 3), True)
    """
    specs = list(iter_specs(n, seed=seed, exclude=exclude, **kwargs))
    images = np.stack([render_array(s) for s in specs]) if specs else np.zeros((0, 64, 64, 3), np.uint8)
    captions = [caption_for(s, subject_token) for s in specs]
    return images, captions, specs


def with_style(spec: ShapeSpec, style: str) -> ShapeSpec:
    """The same spec in another style.

    Example:
        >>> with_style(ShapeSpec("circle", "red", "white", 32.0, 32.0, 16.0), "striped").style
        'striped'
    """
    return replace(spec, style=style)
