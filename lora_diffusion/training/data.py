"""Training data: an image folder with captions, image repair, aspect-ratio buckets and a resumable batch order.

* Images: every ``.png/.jpg/.jpeg/.webp/.bmp/.gif/.tif/.tiff`` file below the folder. Each is opened once when the
  data set is built: unreadable or truncated files are named in a warning and skipped (``strict=True`` raises);
  CMYK, grayscale, palette and alpha images become RGB (transparency on white); EXIF rotation is applied; tiny
  images are upscaled and huge ones downscaled to the training size.
* Captions: a sidecar file (``cat.png`` -> ``cat.txt``), else ``metadata.jsonl`` lines
  ``{"file_name": "cat.png", "text": "..."}`` (the ImageFolder convention), else the text of a kohya-style folder
  (below), else the instance prompt or a template. The trigger token is added to every caption (``compose_caption``).
* kohya's folder names: images in a top-level sub-folder named ``<repeats>_<text>`` (``10_sks dog``) come
  ``repeats`` times per epoch (each time with its own crop and flip) and, where they have no caption of their own,
  take ``<text>`` as their caption, as kohya's DreamBooth-style data sets work.
* Batch order is a pure function of (seed, epoch), and each sample's crop and flip of (seed, epoch, index), so
  a resumed run sees exactly the batches an uninterrupted run would.

Example:
    >>> examples = scan_images("data/style", caption_extension=".txt", mode="style", token="<s>")
    >>> dataset = ImageDataset(examples, resolution=512, random_flip=True)
    >>> plan = BatchPlan(dataset.buckets(), batch_size=2, seed=0)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import posixpath
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import read_text

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "Example",
    "SampleOptions",
    "SampleKey",
    "list_images",
    "scan_images",
    "compose_caption",
    "attach_masks",
    "dataset_summary",
    "load_rgb",
    "make_buckets",
    "KohyaBuckets",
    "DatasetSize",
    "ImageDataset",
    "BatchPlan",
    "collate",
    "mix_seed",
    "StepBatchSampler",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


class DataError(ValueError):
    """Training data that cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class SampleOptions:
    """How each sample of an image varies (kohya's subset options): its caption (``ImageDataset.caption``) and its
    crop, flip and colours (``ImageDataset.augmentation``)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    enable_wildcard: bool = False
    random_flip: bool = False
    center_crop: bool = False
    color_aug: bool = False
    resize_interpolation: str = ""  # (kohya's; "": ours, bicubic; "auto": kohya's default; see ``resize``)


# kohya's --resize_interpolation names -> PIL's filters ("area": cv2's INTER_AREA, PIL's box average)
RESIZE_FILTERS = {"lanczos": Image.LANCZOS, "area": Image.BOX, "box": Image.BOX, "bilinear": Image.BILINEAR,
                  "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize(image: Image.Image, size: tuple[int, int], interpolation: str = "") -> Image.Image:
    """``image`` at ``size`` with kohya's ``--resize_interpolation`` (``RESIZE_FILTERS``); ``"auto"``: kohya's default,
    area when shrinking, lanczos when enlarging; ``""``: this trainer's, bicubic (reducing in steps from 3x)."""
    if not interpolation:
        return image.resize(size, Image.BICUBIC, reducing_gap=3.0)
    if interpolation == "auto":
        interpolation = "area" if image.width >= size[0] and image.height >= size[1] else "lanczos"
    return image.resize(size, RESIZE_FILTERS[interpolation])


@dataclass(frozen=True)
class Example:
    """One training image: where it is, its caption and its size (width, height) after EXIF rotation."""

    path: Path
    caption: str
    size: tuple[int, int]
    repeats: int = 1  # times per epoch (kohya's ``<repeats>_<text>`` folders)
    options: SampleOptions | None = None  # (its own, as a kohya --dataset_config subset's; None: the data set's)
    mask: Path | None = None  # kohya's masked loss: an image whose ``mask_channel`` weighs the loss (0-255 -> 0-1)
    mask_channel: str = "R"  # "R" (a mask image's red channel) or "A" (kohya's --alpha_mask: the image's own alpha)
    group: int = 0  # its data set (a kohya dataset config's [[datasets]]), whose ``DatasetSize`` it takes


def list_images(folder: str | Path, what: str = "--train_data_dir", recursive: bool = True) -> list[Path]:
    """Image files below ``folder`` (sorted, hidden files skipped; only those in it where not ``recursive``); raises
    ``DataError`` if there are none."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} {folder}: no such folder")
    if not folder.is_dir():
        raise DataError(f"{what} {folder}: not a folder")
    files = sorted(
        p for p in (folder.rglob("*") if recursive else folder.glob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"{what} {folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_fine_tuning_metadata(path: str | Path, image_dir: str | Path | None, separator: str = ",",
                              what: str = "--in_json") -> dict[Path, str]:
    """kohya's fine-tuning metadata (``--in_json``, a dataset config's ``metadata_file``; what its
    ``merge_captions_to_metadata.py`` / ``merge_dd_tags_to_metadata.py`` write): ``{image key: {"caption", "tags"}}``
    (``.json``) or lines ``{"image_path", "caption", "tags"}`` (``.jsonl``), as ``{image: caption}``. An image is its
    key as a path (absolute, or in ``image_dir``), else the image in ``image_dir`` of that name with any image
    extension; its caption is the caption, then ``separator`` and the tags, as kohya joins them. ``DataError`` names
    the file and the key that cannot be read or found."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: no such file")
    text = read_text(path, DataError)
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            table = {str(row["image_path"]): row for row in rows}
        else:
            table = json.loads(text)
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise TypeError("expected a JSON object of image keys, each an object with 'caption' and/or 'tags'")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{what} {path}: not kohya's fine-tuning metadata ({e})") from None
    folder = Path(image_dir) if image_dir else None
    stems = {}
    if folder is not None and folder.is_dir():
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_EXTENSIONS:
                stems.setdefault(image.stem, image)
    out: dict[Path, str] = {}
    for key, entry in table.items():
        given = Path(key) if Path(key).is_absolute() or folder is None else folder / key
        image = given if given.is_file() else stems.get(Path(key).name if folder is not None else "")
        if image is None:
            raise DataError(f"{what} {path}: no image for {key!r} (looked for it{f' in {folder}' if folder else ''}, "
                            "any image extension)")
        caption, tags = str(entry.get("caption") or ""), str(entry.get("tags") or "")
        out[image] = caption + separator + tags if caption and tags else caption or tags
    if not out:
        raise DataError(f"{what} {path}: no image entries")
    return out


def read_metadata(folder: Path) -> dict[str, str]:
    """``{file_name: text}`` from ``folder/metadata.jsonl`` (empty if there is none)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(read_text(path, DataError).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = posixpath.normpath(str(row["file_name"]).replace("\\", "/"))  # "./cat.png" names cat.png too
            out[name] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: expected a JSON object with 'file_name' and 'text' ({e})") from None
    return out


# kohya's DreamBooth-style folder: ``<repeats>_<text>`` (``10_sks dog``)
_KOHYA_FOLDER = re.compile(r"(\d+)_(.*)")


def kohya_folder(relative: Path) -> tuple[int, str] | None:
    """``(repeats, text)`` of an image's top-level sub-folder where it is named kohya's way (``10_sks dog``), else
    ``None`` (an image in the folder itself, or a sub-folder named otherwise)."""
    match = _KOHYA_FOLDER.fullmatch(relative.parts[0]) if len(relative.parts) > 1 else None
    return (int(match.group(1)), match.group(2).strip()) if match else None


def wildcard(caption: str, rng: random.Random) -> str:
    """kohya's ``--enable_wildcard``: one line of a caption of several, each ``{a|b|c}`` one of its choices
    (``{{`` / ``}}`` are literal braces), drawn from ``rng``."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    parts = re.split(r"(\{\{|\}\})", caption)  # (escaped braces kept out of the choices)
    return "".join({"{{": "{", "}}": "}"}.get(part) or re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), part)
                   for part in parts)


def caption_tags(caption: str, separator: str = ",") -> list[str]:
    """A caption's comma-separated tags (or ``separator``-), stripped, empty ones left out (kohya's unit of shuffling
    and counting)."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def dataset_summary(examples: list[Example], folder: str | Path | None) -> dict:
    """What kohya records of a data set, per top-level folder (its name; the data folder's own for images in it;
    with no ``folder``, as kohya's dataset config subsets, the name of the folder each image is in):
    ``dirs`` ``{name: {"n_repeats", "img_count"}}``, ``tag_frequency`` ``{name: {tag: images}}`` (a caption's
    comma-separated parts, lower-cased) and ``num_train_images`` (images times their repeats)."""
    dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for e in examples:
        relative = e.path.relative_to(folder) if folder is not None and e.path.is_relative_to(folder) else Path(e.path.name)
        name = relative.parts[0] if len(relative.parts) > 1 else (Path(folder) if folder is not None else e.path.parent).name
        entry = dirs.setdefault(name, {"n_repeats": e.repeats, "img_count": 0})
        entry["img_count"] += 1
        counts = tags.setdefault(name, {})
        for tag in caption_tags(e.caption.lower()):
            counts[tag] = counts.get(tag, 0) + 1
    return {"dirs": dirs, "tag_frequency": tags, "num_train_images": sum(e.repeats for e in examples)}


def attach_masks(examples: list[Example], folder: Path | None, root: Path | None = None, *, alpha: bool = False,
                 what: str = "--conditioning_data_dir") -> list[Example]:
    """``examples`` with kohya's loss masks: ``alpha``, each image's own alpha channel (an image without one: all 1);
    else the image of the same name (any image extension) in ``folder`` (sub-folders of ``root`` mirrored there),
    its red channel. ``DataError`` names an image without a mask."""
    if alpha:
        return [dataclasses.replace(e, mask=e.path, mask_channel="A") for e in examples]
    if folder is None:
        return examples
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} {folder}: no such folder")
    found = {}
    for path in list_images(folder, what):
        found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    out, missing = [], []
    for e in examples:
        inside = root is not None and e.path.is_relative_to(root)
        name = (e.path.relative_to(root) if inside else Path(e.path.name)).with_suffix("").as_posix()
        if name not in found:
            missing.append(e.path.name)
        out.append(dataclasses.replace(e, mask=found.get(name), mask_channel="R"))
    if missing:
        raise DataError(f"{what} {folder}: no mask for {len(missing)} image(s), e.g. {missing[0]} (a mask has the "
                        "image's name, any image extension)")
    return out


def compose_caption(raw: str | None, *, mode: str = "style", token: str = "", instance_prompt: str = "") -> str:
    """The caption trained on: the image's own caption (or the instance prompt, or a template) with the token.

    Style mode appends ``", in the style of <token>"``; subject mode puts ``"<token>, "`` in front. A caption that
    already holds the token as a word of its own is kept as it is ("desks" does not hold "sks").

    Example:
        >>> compose_caption("a house by a lake", token="<my-style>")
        'a house by a lake, in the style of <my-style>'
        >>> compose_caption(None, mode="subject", instance_prompt="a photo of sks dog", token="sks")
        'a photo of sks dog'
    """
    text = (raw or "").strip() or instance_prompt.strip()
    if not text:
        return (f"an image in the style of {token}" if mode == "style" else f"a photo of {token}") if token else ""
    if not token or re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text):
        return text
    return f"{text}, in the style of {token}" if mode == "style" else f"{token}, {text}"


def fix_mode(image: Image.Image) -> Image.Image:
    """RGB from any PIL mode: EXIF rotation applied, transparency composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "I;16" or image.mode == "I":
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def load_rgb(path: str | Path, draft: int | None = None) -> Image.Image:
    """Open ``path`` fully (so truncation shows) as RGB; ``draft`` lets JPEG decode at a reduced size first.

    Images up to twice PIL's ``Image.MAX_IMAGE_PIXELS`` (about 179 MP by default) are read (and later downscaled);
    a larger one is refused as a possible decompression bomb (``ValueError`` giving its size).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL warns from 1x its limit, refuses at 2x
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as e:
            raise ValueError(f"too large to decode: {e}") from None
        with image:
            if draft and image.format == "JPEG":
                image.draft("RGB", (draft, draft))
            image.load()
            return fix_mode(image)


def scan_images(
    folder: str | Path,
    *,
    caption_extension: str = ".txt",
    mode: str = "style",
    token: str = "",
    instance_prompt: str = "",
    strict: bool = False,
    what: str = "--train_data_dir",
    resolution: int = 512,
    recursive: bool = True,
    captions: dict[Path, str] | None = None,
) -> list[Example]:
    """Open every image once and pair it with its caption; bad images are skipped with a warning naming them
    (``recursive``: in sub-folders too, kohya's ``<repeats>_<text>`` ones read as such; ``captions``: those images,
    with those captions, kohya's fine-tuning metadata, ``read_fine_tuning_metadata``).

    Raises ``DataError`` if the folder is missing or empty, if every image is unreadable, or (``strict``) at the
    first unreadable one.
    """
    folder = Path(folder)
    files = sorted(captions) if captions is not None else list_images(folder, what, recursive)
    metadata = read_metadata(folder) if captions is None else {}
    examples, bad = [], []
    unused = set(metadata)
    for path in files:
        try:
            image = load_rgb(path, draft=resolution)
            size = image.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            if strict:
                raise DataError(f"{path}: cannot read image ({e})") from None
            logger.warning("skipping %s: cannot read image (%s)", path, e)
            bad.append(path)
            continue
        if min(size) < resolution // 2:
            logger.info("%s is %dx%d, smaller than half of --resolution %d: it will be upscaled", path, *size, resolution)
        raw = None
        sidecar = path.with_suffix(caption_extension) if caption_extension and captions is None else None
        relative = path.relative_to(folder) if path.is_relative_to(folder) else Path(path.name)
        unused.discard(relative.as_posix())
        kohya = kohya_folder(relative) if captions is None else None
        if captions is not None:
            raw = captions[path]
        elif sidecar is not None and sidecar.is_file():
            raw = read_text(sidecar, DataError).strip()
        elif relative.as_posix() in metadata:
            raw = metadata[relative.as_posix()]
        elif kohya is not None:
            raw = kohya[1]
        caption = compose_caption(raw, mode=mode, token=token, instance_prompt=instance_prompt)
        examples.append(Example(path=path, caption=caption, size=size, repeats=kohya[0] if kohya else 1))
    if unused:
        logger.warning("%s: %d of its %d entries name no image of %s (file_name is relative to that folder), e.g. %r",
                       folder / METADATA_FILE, len(unused), len(metadata), folder, sorted(unused)[0])
    if not examples:
        raise DataError(f"{what} {folder}: none of the {len(files)} images could be read")
    if bad:
        logger.warning("%d of %d images in %s were skipped as unreadable", len(bad), len(files), folder)
    folders = sorted({(e.path.relative_to(folder).parts[0], e.repeats) for e in examples
                      if captions is None and kohya_folder(e.path.relative_to(folder))})
    for name, repeats in folders:
        logger.info("%s: kohya-style folder %r: its images come %d times per epoch", what, name, repeats)
    if folders and not any(e.repeats for e in examples):
        raise DataError(f"{what} {folder}: every image is in a kohya-style folder of 0 repeats ({folders[0][0]!r}...)")
    return examples


def make_buckets(resolution: int, step: int | None = None, max_ratio: float = 2.5) -> list[tuple[int, int]]:
    """(width, height) pairs of about ``resolution**2`` pixels, sides multiples of ``step``, aspect up to ``max_ratio``.

    Example:
        >>> (512, 512) in make_buckets(512) and (640, 384) in make_buckets(512)
        True
    """
    step = step or (64 if resolution >= 256 else 8)
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_ratio:
        height = min(int(area / width) // step * step, int(resolution * max_ratio) // step * step)
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    buckets.add((resolution, resolution))
    return sorted(buckets)


@dataclass(frozen=True)
class KohyaBuckets:
    """kohya's buckets (sd-scripts' ``BucketManager``; ``--min_bucket_reso``, ``--max_bucket_reso``,
    ``--bucket_reso_steps``, ``--bucket_no_upscale``): sides from ``min_size`` to ``max_size`` in ``steps``, each
    width with the tallest height that keeps the area within the training size's, and the square; an image takes the
    bucket of the nearest aspect ratio. ``no_upscale``: each image its own bucket instead, its size (shrunk to the
    area if larger) cut down to ``steps``, so nothing is enlarged."""

    min_size: int = 256
    max_size: int = 1024
    steps: int = 64
    no_upscale: bool = False

    def grid(self, resolution: int, height: int | None = None) -> list[tuple[int, int]]:
        """The buckets (width, height) for ``resolution`` (x ``height``: kohya's max_reso), sorted (kohya's
        ``make_bucket_resolutions``)."""
        area, steps = resolution * (height or resolution), self.steps
        side = int(math.sqrt(area) // steps) * steps
        buckets = {(side, side)}
        for width in range(self.min_size, self.max_size + 1, steps):
            height = min(self.max_size, area // width // steps * steps)
            if height >= self.min_size:
                buckets |= {(width, height), (height, width)}
        return sorted(buckets)

    def select(self, size: tuple[int, int], area: int, grid: list[tuple[int, int]]) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(bucket, size the image is resized to before the crop) for an image of ``size`` (``area``: the largest
        bucket area), as kohya's ``select_bucket``; the size is ``None`` where the image is resized to cover the
        bucket."""
        width, height = size
        aspect = width / height
        if not self.no_upscale:
            if size in grid:
                return size, None
            return min(grid, key=lambda b: abs(b[0] / b[1] - aspect)), None  # (the first of equals, as argmin)
        if width * height > area:  # shrunk to the area, its long or short side rounded to steps: the closer aspect
            wide = math.sqrt(area * aspect)
            by_width = self._round(wide)
            by_height = self._round(area / wide)
            if abs(by_width / self._round(by_width / aspect) - aspect) < abs(self._round(by_height * aspect) / by_height - aspect):
                width, height = by_width, int(by_width / aspect + 0.5)
            else:
                width, height = int(by_height * aspect + 0.5), by_height
        bucket = (max(self.steps, width - width % self.steps), max(self.steps, height - height % self.steps))
        return bucket, (max(width, bucket[0]), max(height, bucket[1]))

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps


@dataclass(frozen=True)
class DatasetSize:
    """A data set's own sizes, where a kohya dataset config trains several side by side: the training size
    (``resolution`` x ``height``), its buckets (``KohyaBuckets`` or, ``kohya_buckets`` None, ours) and its batch size."""

    resolution: int
    height: int | None = None
    enable_bucket: bool = False
    kohya_buckets: KohyaBuckets | None = None
    batch_size: int = 1

    @classmethod
    def of(cls, config) -> DatasetSize:
        """A run's (``TrainConfig``'s) sizes: kohya's buckets where ``--enable_bucket`` comes with a kohya bucket
        setting (its defaults where one is 0), else ours."""
        buckets = KohyaBuckets(config.min_bucket_reso or 256, config.max_bucket_reso or 1024, config.bucket_reso_steps or 64,
                               config.bucket_no_upscale) if config.uses_kohya_buckets else None
        return cls(config.resolution, config.resolution_height or None, config.enable_bucket, buckets, config.train_batch_size)


def color_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's ``--color_aug`` (sd-scripts' ``AugHelper.color_aug``): with chance 0.33, either a hue shift of up to 8 of
    OpenCV's 180 hue steps either way, or the 8-bit values raised to a power in [0.95, 1.05], clipped to 255."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        shift = rng.uniform(-8, 8) % 180 * 256 / 180  # (in PIL's 256 hue steps)
        hsv = np.asarray(image.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0] + shift) % 256).astype(np.uint8)
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(0.95, 1.05)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) ** gamma, 0, 255).astype(np.uint8))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (in log space); ties go to the larger bucket."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


class ImageDataset(torch.utils.data.Dataset):
    """Images resized to cover their bucket (``resolution`` square, ``resolution`` x ``height``, or aspect-ratio
    buckets), cropped, maybe flipped, as ``[-1, 1]`` tensors.

    Items are addressed by ``SampleKey(index, seed, epoch)``: the seed decides the random crop, flip and caption, so
    the same key always gives the same sample. The settings given here are every example's, except an example's own
    ``options`` (a kohya dataset config's subset).
    """

    def __init__(
        self,
        examples: list[Example],
        *,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        enable_bucket: bool = False,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_dropout_rate: float = 0.0,
        caption_tag_dropout_rate: float = 0.0,
        caption_dropout_every_n_epochs: int = 0,
        caption_separator: str = ",",
        keep_tokens_separator: str = "",
        secondary_separator: str = "",
        enable_wildcard: bool = False,
        kohya_buckets: KohyaBuckets | None = None,
        color_aug: bool = False,
        height: int | None = None,
        group_sizes: dict[int, DatasetSize] | None = None,
        resize_interpolation: str = "",
    ) -> None:
        self.examples = examples
        self.options = SampleOptions(
            shuffle_caption=shuffle_caption, keep_tokens=keep_tokens, caption_dropout_rate=caption_dropout_rate,
            caption_dropout_every_n_epochs=caption_dropout_every_n_epochs, caption_tag_dropout_rate=caption_tag_dropout_rate,
            caption_separator=caption_separator, keep_tokens_separator=keep_tokens_separator,
            secondary_separator=secondary_separator, enable_wildcard=enable_wildcard, random_flip=random_flip,
            center_crop=center_crop, color_aug=color_aug, resize_interpolation=resize_interpolation)
        self.resolution = resolution
        # (None: resized to cover the bucket)
        self.bucket_of: list[tuple[int, int]] = [(0, 0)] * len(examples)
        self.resized_of: list[tuple[int, int] | None] = [None] * len(examples)
        default = DatasetSize(resolution, height, enable_bucket, kohya_buckets)
        for group in sorted({e.group for e in examples}):
            size = (group_sizes or {}).get(group, default)
            members = [i for i, e in enumerate(examples) if e.group == group]
            fixed = (size.resolution, size.height or size.resolution)  # (kohya's --resolution WIDTH,HEIGHT: not square)
            if size.enable_bucket and size.kohya_buckets is not None:
                grid = size.kohya_buckets.grid(*fixed)
                for i in members:
                    self.bucket_of[i], self.resized_of[i] = size.kohya_buckets.select(examples[i].size, fixed[0] * fixed[1], grid)
            else:  # (our buckets: about the area of the fixed size)
                grid = make_buckets(math.isqrt(fixed[0] * fixed[1]) // 8 * 8) if size.enable_bucket else [fixed]
                for i in members:
                    self.bucket_of[i] = nearest_bucket(examples[i].size, grid)

    def __len__(self) -> int:
        return len(self.examples)

    def repeats(self) -> list[int]:
        """How many times per epoch each example comes (``Example.repeats``)."""
        return [e.repeats for e in self.examples]

    def groups(self) -> list[int]:
        """Each example's data set (``Example.group``)."""
        return [e.group for e in self.examples]

    def buckets(self) -> list[tuple[int, int]]:
        """The bucket (width, height) of every example, in order."""
        return list(self.bucket_of)

    def options_of(self, index: int) -> SampleOptions:
        """Example ``index``'s ``SampleOptions``: its own, else the data set's."""
        return self.examples[index].options or self.options

    def augmentation(self, index: int, sample_seed: int) -> tuple[bool, float, float]:
        """(flip, x, y) for one sample of example ``index``: the crop position as fractions of the slack (0.5 = centre)."""
        options = self.options_of(index)
        rng = random.Random(sample_seed)
        flip = options.random_flip and rng.random() < 0.5
        x, y = (0.5, 0.5) if options.center_crop else (rng.random(), rng.random())
        return flip, x, y

    def caption(self, index: int, sample_seed: int, epoch: int = 0) -> str:
        """Example ``index``'s caption for one sample, as kohya varies it (``process_caption``): dropped whole
        (``caption_dropout_rate``, or in every ``caption_dropout_every_n_epochs``-th epoch, counted from 1), else
        with ``enable_wildcard`` one of its lines and one choice of each ``{a|b}``, then its tags (split at
        ``caption_separator``) after the first ``keep_tokens`` (or those around ``keep_tokens_separator``) shuffled
        (``shuffle_caption``) and each dropped (``caption_tag_dropout_rate``), joined by ", ", and
        ``secondary_separator`` made a comma. Decided by the sample's seed (a stream of its own: the crop and flip
        are those of a run without these), so a resumed run sees the same captions."""
        caption, o = self.examples[index].caption, self.options_of(index)
        every = o.caption_dropout_every_n_epochs
        tagged = o.shuffle_caption or o.caption_tag_dropout_rate
        if not (tagged or o.caption_dropout_rate or every or o.enable_wildcard or o.secondary_separator):
            return caption
        rng = random.Random(mix_seed(sample_seed, 1))
        if o.caption_dropout_rate and rng.random() < o.caption_dropout_rate or every and (epoch + 1) % every == 0:
            return ""
        if o.enable_wildcard:
            caption = wildcard(caption, rng)
        if tagged:
            separator, split = o.keep_tokens_separator, o.caption_separator
            if separator and separator in caption:  # kohya's "fixed ||| shuffled ||| fixed suffix"
                kept_part, _, rest_part = caption.partition(separator)
                rest_part, _, suffix_part = rest_part.partition(separator)
                kept, rest, suffix = (caption_tags(part, split) for part in (kept_part, rest_part, suffix_part))
            else:
                tags = caption_tags(caption, split)
                kept, rest, suffix = tags[: o.keep_tokens], tags[o.keep_tokens :], []
            if o.shuffle_caption:
                rng.shuffle(rest)
            if o.caption_tag_dropout_rate:
                rest = [t for t in rest if rng.random() >= o.caption_tag_dropout_rate]
            caption = ", ".join(kept + rest + suffix)
        return caption.replace(o.secondary_separator, ",") if o.secondary_separator else caption

    def size_conditioning(self, index: int, flip: bool, x: float, y: float) -> list[int]:
        """SDXL's size and crop conditioning of one sample, as its trainers (diffusers', kohya's) give it:
        ``[original height, width, crop top, crop left, target height, width]``: the image's size before resizing,
        the crop's top-left corner in the resized image (mirrored when flipped: the corner the flipped crop has),
        and the bucket's size. Computed from the example's size, so the latent cache needs no pixels."""
        width, height = self.bucket_of[index]
        orig_w, orig_h = self.examples[index].size
        new_w, new_h = self.resized_size(index)
        left, top = round((new_w - width) * x), round((new_h - height) * y)
        return [orig_h, orig_w, top, new_w - width - left if flip else left, height, width]

    def resized_size(self, index: int) -> tuple[int, int]:
        """The size example ``index`` is resized to before its crop: covering its bucket, aspect kept (or as
        ``KohyaBuckets`` chose)."""
        if (kept := self.resized_of[index]) is not None:
            return kept
        width, height = self.bucket_of[index]
        orig_w, orig_h = self.examples[index].size
        scale = max(width / orig_w, height / orig_h)
        return max(width, round(orig_w * scale)), max(height, round(orig_h * scale))

    def load(self, index: int, flip: bool, x: float, y: float, color_seed: int | None = None) -> torch.Tensor:
        """``[3, H, W]`` float tensor in ``[-1, 1]`` of example ``index`` at its bucket size (``color_seed``: with
        ``color_aug``, the sample's colour augmentation)."""
        image = self._placed(index, self.examples[index].path, flip, x, y)
        if self.options_of(index).color_aug and color_seed is not None:
            image = color_augment(image, random.Random(color_seed))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def mask(self, index: int, flip: bool, x: float, y: float) -> torch.Tensor | None:
        """``[1, H, W]`` loss mask in ``[0, 1]`` of example ``index``, resized, cropped and flipped as its image is
        (``load``); ``None`` where it has none."""
        e = self.examples[index]
        if e.mask is None:
            return None
        image = self._placed(index, e.mask, flip, x, y, channel=e.mask_channel)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]

    def _placed(self, index: int, path: Path, flip: bool, x: float, y: float, channel: str | None = None) -> Image.Image:
        """The image at ``path`` (RGB, or one ``channel`` of it) resized to cover example ``index``'s bucket, cropped at
        ``(x, y)`` and maybe flipped."""
        width, height = self.bucket_of[index]
        new_size = self.resized_size(index)
        try:
            if channel == "A":
                with Image.open(path) as raw:
                    image = ImageOps.exif_transpose(raw).convert("RGBA").getchannel("A")
            else:
                image = load_rgb(path, draft=max(new_size))
                image = image.getchannel(channel) if channel else image
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read image ({e}); it was readable when training started") from None
        image = resize(image, new_size, self.options_of(index).resize_interpolation)
        left = round((new_size[0] - width) * x)
        top = round((new_size[1] - height) * y)
        image = image.crop((left, top, left + width, top + height))
        return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image

    def __getitem__(self, key: SampleKey | tuple[int, int]) -> dict:
        index, sample_seed, epoch = SampleKey(*key)
        flip, x, y = self.augmentation(index, sample_seed)
        return {
            "pixel_values": self.load(index, flip, x, y, mix_seed(sample_seed, 2)),
            "mask": self.mask(index, flip, x, y),
            "caption": self.caption(index, sample_seed, epoch),
            "index": index,
            "flip": flip,
            "size_conditioning": self.size_conditioning(index, flip, x, y),
        }


class SampleKey(NamedTuple):
    """One sample: which example, the seed of its crop, flip and caption, and its epoch (from 0)."""

    index: int
    seed: int
    epoch: int = 0


def stack_masks(masks: list[torch.Tensor | None], size: tuple[int, int]) -> torch.Tensor | None:
    """A batch's loss masks ``[B, 1, H, W]`` (1 for an example without one), or ``None`` where none has one."""
    if all(m is None for m in masks):
        return None
    return torch.stack([torch.ones(1, size[1], size[0]) if m is None else m for m in masks])


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items: ``pixel_values [B, 3, H, W]``, ``masks`` (``stack_masks``), ``captions``,
    ``indices``, ``flips``, ``size_conditioning`` (SDXL's, ``[B, 6]``)."""
    pixels = torch.stack([it["pixel_values"] for it in items])
    return {
        "pixel_values": pixels,
        "masks": stack_masks([it.get("mask") for it in items], (pixels.shape[-1], pixels.shape[-2])),
        "captions": [it["caption"] for it in items],
        "indices": [it["index"] for it in items],
        "flips": [it["flip"] for it in items],
        "size_conditioning": torch.tensor([it["size_conditioning"] for it in items]),
    }


class BatchPlan:
    """The batch order of a run, as a pure function of the seed: batch ``g`` of the endless stream of epochs.

    Each epoch groups examples by bucket (an example ``repeats[i]`` times, default once; with ``groups``, by data set
    and bucket), shuffles within buckets, cuts batches of ``batch_size`` (or a data set's, ``{group: size}``; a
    bucket's last batch may be smaller) and shuffles the batches. Optimizer step
    ``s``, micro-batch ``k`` of process ``r`` (of ``P``, with ``G`` micro-batches per step) takes global batch
    ``(s * G + k) * P + r``.
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int | dict[int, int], seed: int, repeats: list[int] | None = None,
                 groups: list[int] | None = None) -> None:
        self.buckets = buckets
        self.batch_size = batch_size
        self.seed = seed
        self.repeats = repeats or [1] * len(buckets)
        self.groups = groups or [0] * len(buckets)
        self._epoch: tuple[int, list[list[tuple[int, int]]]] | None = None
        counts: dict[tuple[int, tuple[int, int]], int] = {}
        for key, n in zip(zip(self.groups, buckets), self.repeats):
            counts[key] = counts.get(key, 0) + n
        self.batches_per_epoch = sum(math.ceil(n / self._size(group)) for (group, _), n in counts.items())

    def _size(self, group: int) -> int:
        return self.batch_size[group] if isinstance(self.batch_size, dict) else self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's batches of ``(index, repeat)``: each example once per repeat."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(f"{self.seed}/{epoch}")
            groups: dict[tuple[int, tuple[int, int]], list[tuple[int, int]]] = {}
            for index, (key, n) in enumerate(zip(zip(self.groups, self.buckets), self.repeats)):
                groups.setdefault(key, []).extend((index, k) for k in range(n))
            batches = []
            for key in sorted(groups):
                members, size = groups[key], self._size(key[0])
                rng.shuffle(members)
                batches += [members[i : i + size] for i in range(0, len(members), size)]
            rng.shuffle(batches)
            self._epoch = (epoch, batches)
        return self._epoch[1]

    def batch(self, g: int) -> list[SampleKey]:
        """Global batch ``g`` as ``SampleKey``s for ``ImageDataset`` (each repeat its own crop and flip; the first
        one's seed is an unrepeated example's)."""
        epoch, j = divmod(g, self.batches_per_epoch)
        return [SampleKey(i, mix_seed(self.seed, epoch, i, *([k] if k else [])), epoch) for i, k in self.epoch_batches(epoch)[j]]

    def epoch_of(self, g: int) -> int:
        return g // self.batches_per_epoch


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from a few integers (stable across runs and platforms)."""
    return int.from_bytes(random.Random("/".join(map(str, numbers))).randbytes(8), "little") >> 1


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of one process from optimizer step ``start`` to ``stop``, for a ``DataLoader(batch_sampler=...)``."""

    def __init__(self, plan: BatchPlan, *, start: int, stop: int, accumulation: int, num_processes: int, rank: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop
        self.accumulation, self.num_processes, self.rank = accumulation, num_processes, rank

    def global_index(self, step: int, micro: int) -> int:
        return (step * self.accumulation + micro) * self.num_processes + self.rank

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accumulation

    def __iter__(self):
        for step in range(self.start, self.stop):
            for micro in range(self.accumulation):
                yield self.plan.batch(self.global_index(step, micro))
