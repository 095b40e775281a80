"""Deterministic image metrics for the shape images: colour, shape, stripes, saturation.

Every function takes an image as a ``PIL.Image``, a ``uint8`` array ``(H, W, 3)`` or a float array in [0, 1]
(what ``StableDiffusionPipeline(..., output_type="np")`` returns per image), and uses numpy only.

* background: the median colour of a 2-pixel border; foreground: pixels far (RGB distance) from it.
* colour: hue vote of the saturated foreground pixels, binned to the names in ``shapes.COLORS``.
* shape: IoU of the largest foreground blob with each shape template stretched to the blob's bounding box.
* stripes: share of the foreground's brightness energy at the striped style's frequency and angle.

Example:
    >>> from lora_diffusion.data.shapes import ShapeSpec, render
    >>> img = render(ShapeSpec("triangle", "orange", "black", 30.0, 34.0, 18.0))
    >>> dominant_color(img), classify_shape(img), background_color(img)
    ('orange', 'triangle', 'black')
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
from PIL import Image

from lora_diffusion.data.shapes import BACKGROUNDS, BASE_SHAPES, STRIPE_PERIOD, ShapeSpec, render_mask

ImageLike = Union[Image.Image, np.ndarray]

#: Hue (degrees) bins of the colour names: ``(name, start, end)``; red wraps around 360.
HUE_BINS: tuple[tuple[str, float, float], ...] = (
    ("red", -38.0, 15.0),
    ("orange", 15.0, 41.0),
    ("yellow", 41.0, 90.0),
    ("green", 90.0, 180.0),
    ("blue", 180.0, 256.0),
    ("purple", 256.0, 322.0),
)


def to_uint8(image: ImageLike) -> np.ndarray:
    """The image as a ``uint8`` array ``(H, W, 3)``; float input is read as [0, 1].

    Example:
        >>> to_uint8(np.ones((2, 2, 3), np.float32))[0, 0].tolist()
        [255, 255, 255]
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    return np.clip(np.rint(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def estimate_background(image: ImageLike, border: int = 2) -> np.ndarray:
    """Background RGB (float32 ``(3,)``): per-channel median of the ``border``-pixel frame.

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> estimate_background(render(ShapeSpec("circle", "red", "gray", 32.0, 32.0, 12.0))).tolist()
        [128.0, 128.0, 128.0]
    """
    arr = to_uint8(image).astype(np.float32)
    frame = np.concatenate(
        [
            arr[:border].reshape(-1, 3),
            arr[-border:].reshape(-1, 3),
            arr[:, :border].reshape(-1, 3),
            arr[:, -border:].reshape(-1, 3),
        ]
    )
    return np.median(frame, axis=0).astype(np.float32)


def foreground_mask(image: ImageLike, threshold: float = 60.0) -> np.ndarray:
    """Boolean ``(H, W)`` mask of pixels whose RGB distance to the background exceeds ``threshold``.

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> int(foreground_mask(render(ShapeSpec("square", "red", "white", 32.0, 32.0, 10.0))).sum())
        324
    """
    arr = to_uint8(image).astype(np.float32)
    dist = np.linalg.norm(arr - estimate_background(image)[None, None, :], axis=-1)
    return dist > threshold


def background_color(image: ImageLike) -> str:
    """Name of the background (nearest of ``shapes.BACKGROUNDS`` to the border colour).

    Example:
        >>> background_color(np.zeros((8, 8, 3), np.uint8))
        'black'
    """
    bg = estimate_background(image)
    names = list(BACKGROUNDS)
    dists = [float(np.linalg.norm(bg - np.asarray(BACKGROUNDS[n], np.float32))) for n in names]
    return names[int(np.argmin(dists))]


def _hsv(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of a uint8 RGB array."""
    rgb = arr.astype(np.float32) / 255.0
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-8), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.maximum(delta, 1e-8)
    hue = np.where(
        mx == r,
        ((g - b) / safe) % 6.0,
        np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(delta > 0, hue * 60.0, 0.0)
    return hue, sat, mx


def hue_name(hue: float) -> str:
    """Colour name of a hue in degrees.

    Example:
        >>> hue_name(120.0), hue_name(350.0)
        ('green', 'red')
    """
    h = hue % 360.0
    for name, start, end in HUE_BINS:
        if start <= h < end or start <= h - 360.0 < end:
            return name
    raise AssertionError(f"hue {hue} falls in no bin")  # the bins cover the circle


def color_votes(image: ImageLike, min_saturation: float = 0.35, min_value: float = 0.2) -> dict[str, int]:
    """How many saturated foreground pixels fall in each colour's hue bin.

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> color_votes(render(ShapeSpec("square", "green", "black", 32.0, 32.0, 10.0)))["green"]
        323
    """
    arr = to_uint8(image)
    hue, sat, val = _hsv(arr)
    keep = foreground_mask(arr) & (sat >= min_saturation) & (val >= min_value)
    votes = {name: 0 for name, _, _ in HUE_BINS}
    for h in hue[keep].ravel():
        votes[hue_name(float(h))] += 1
    return votes


def dominant_color(image: ImageLike, min_pixels: int = 12) -> str | None:
    """Colour name most saturated foreground pixels vote for, or ``None`` under ``min_pixels`` votes.

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> dominant_color(render(ShapeSpec("circle", "purple", "white", 32.0, 32.0, 14.0)))
        'purple'
    """
    votes = color_votes(image)
    name = max(votes, key=lambda k: votes[k])
    return name if votes[name] >= min_pixels else None


def saturation(image: ImageLike, foreground_only: bool = False) -> float:
    """Mean HSV saturation in [0, 1] of the whole image (or of its foreground).

    Example:
        >>> saturation(np.full((4, 4, 3), 128, np.uint8))
        0.0
    """
    arr = to_uint8(image)
    _, sat, _ = _hsv(arr)
    if foreground_only:
        mask = foreground_mask(arr)
        return float(sat[mask].mean()) if mask.any() else 0.0
    return float(sat.mean())


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (empty mask in, empty mask out).

    Example:
        >>> m = np.zeros((5, 5), bool); m[0, 0] = True; m[2:5, 2:5] = True
        >>> int(largest_component(m).sum())
        9
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack = [(int(y0), int(x0))]
        size = 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label if best_label else np.zeros_like(mask)


@lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    """High-resolution coverage of ``shape`` cropped to its bounding box (float32)."""
    mask = render_mask(ShapeSpec(shape, "red", "white", 128.0, 128.0, 110.0, size=256)) > 0.5
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)


def _as_mask(image_or_mask: ImageLike) -> np.ndarray:
    arr = np.asarray(image_or_mask) if not isinstance(image_or_mask, Image.Image) else None
    if arr is not None and arr.ndim == 2:
        return arr.astype(bool)
    return foreground_mask(image_or_mask)


def shape_scores(image_or_mask: ImageLike, shapes: Sequence[str] = BASE_SHAPES, min_pixels: int = 30) -> dict[str, float]:
    """IoU of the largest foreground blob with each shape's template fitted to the blob's bounding box.

    Accepts an image or a boolean ``(H, W)`` mask. All scores are 0 when the blob has < ``min_pixels`` pixels.

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> s = shape_scores(render(ShapeSpec("circle", "red", "white", 32.0, 32.0, 16.0)))
        >>> max(s, key=s.get), round(s["circle"], 2) > 0.9
        ('circle', True)
    """
    blob = largest_component(_as_mask(image_or_mask))
    if blob.sum() < min_pixels:
        return {s: 0.0 for s in shapes}
    ys, xs = np.nonzero(blob)
    crop = blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scores = {}
    for shape in shapes:
        tmpl = Image.fromarray((_template(shape) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        t = np.asarray(tmpl) >= 128
        union = np.logical_or(t, crop).sum()
        scores[shape] = float(np.logical_and(t, crop).sum() / union) if union else 0.0
    return scores


def shape_iou(image_or_mask: ImageLike, shape: str) -> float:
    """IoU of the largest foreground blob with ``shape``'s template (see :func:`shape_scores`).

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> shape_iou(render(ShapeSpec("square", "blue", "white", 32.0, 32.0, 16.0)), "square") > 0.95
        True
    """
    return shape_scores(image_or_mask, (shape,))[shape]


def classify_shape(image_or_mask: ImageLike, shapes: Sequence[str] = BASE_SHAPES, min_iou: float = 0.5) -> str | None:
    """The shape with the best IoU, or ``None`` when the best IoU is below ``min_iou`` (no clear shape).

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> classify_shape(render(ShapeSpec("heart", "red", "white", 32.0, 32.0, 18.0)), ("circle", "heart"))
        'heart'
    """
    scores = shape_scores(image_or_mask, shapes)
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] >= min_iou else None


def stripe_energy(
    image: ImageLike, period: float = STRIPE_PERIOD, angle_tol_deg: float = 22.0, band: tuple[float, float] = (0.6, 1.6)
) -> float:
    """Share of the foreground's brightness energy in diagonal "/" stripes of about ``period`` pixels.

    Brightness is ``max(R, G, B)`` on the (1-pixel eroded) foreground; its mean is removed and the 2-D power
    spectrum summed over frequencies within ``band`` x the stripe frequency and ``angle_tol_deg`` of the
    (1, 1) direction, then divided by the total (DC included) energy. The ``"striped"`` style scores about
    0.1, a flat fill about 0.

    Example:
        >>> from lora_diffusion.data.shapes import ShapeSpec, render
        >>> spec = ShapeSpec("square", "red", "white", 32.0, 32.0, 20.0)
        >>> stripe_energy(render(spec)) < 0.01, stripe_energy(render(spec.__class__(**{**spec.__dict__, "style": "striped"}))) > 0.05
        (True, True)
    """
    arr = to_uint8(image)
    mask = foreground_mask(arr)
    # Erode by one pixel so the shape outline (anti-aliasing) does not count as texture.
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    if inner.sum() < 16:
        return 0.0
    val = arr.astype(np.float32).max(axis=-1) / 255.0
    total = float((val[inner] ** 2).sum())
    if total <= 0.0:
        return 0.0
    dev = np.where(inner, val - float(val[inner].mean()), 0.0)
    power = np.abs(np.fft.fft2(dev)) ** 2
    h, w = dev.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    f0 = 1.0 / period
    in_band = (radius >= band[0] * f0) & (radius <= band[1] * f0)
    # Angle to the (1, 1) axis, folded so that f and -f count the same.
    cos = np.abs(fx + fy) / (math.sqrt(2.0) * np.maximum(radius, 1e-12))
    in_angle = cos >= math.cos(math.radians(angle_tol_deg))
    return float(power[in_band & in_angle].sum() / (h * w * total))
