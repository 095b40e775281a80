"""What a training run writes: checkpoints, the loss log and plot, sample grids. Every file is written atomically.

A file is written to a temporary name in the same folder and renamed over the old one; a checkpoint folder is
filled under a hidden temporary name and renamed into place. A run killed mid-save leaves the previous file or
checkpoint intact (and at worst a hidden ``.tmp`` leftover, removed at the next start).

Example:
    >>> with atomic_path("out/log.csv") as tmp:
    ...     tmp.write_text("step,loss\\n")
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..formats import atomic_folder, make_public

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_path",
    "OUTPUT_NAMES",
    "run_outputs",
    "kohya_name",
    "kohya_companions",
    "write_a1111_card",
    "LORA_NAME",
    "list_checkpoints",
    "find_checkpoint",
    "write_checkpoint",
    "prune_checkpoints",
    "prune_snapshots",
    "write_log",
    "read_log",
    "plot_loss",
    "image_grid",
]

LORA_NAME = "pytorch_lora_weights.safetensors"
STATE_NAME = "training_state.pt"
CHECKPOINTS = "checkpoints"
# (val_loss: at the steps a validation ran; keys_scaled, max_key_norm: with --scale_weight_norms, as kohya logs them)
LOG_FIELDS = ("step", "epoch", "loss", "lr", "elapsed_s", "val_loss", "keys_scaled", "max_key_norm")
OUTPUT_NAMES = (LORA_NAME, CHECKPOINTS, "samples", "sample", "log.csv", "loss.png")  # what marks a folder as a previous run


def kohya_name(output_dir: str | os.PathLike, output_name: str = "") -> str:
    """The file name of a run's kohya copy (``--save_kohya``): ``output_name`` (kohya's ``--output_name``) or the
    output folder's name, as A1111 and ComfyUI list a LoRA by its file name (``out/my-style`` ->
    ``my-style.safetensors``; ``lora_kohya.safetensors`` where that name would be ``LORA_NAME``)."""
    name = f"{output_name or Path(output_dir).resolve().name or 'lora'}.safetensors"
    return "lora_kohya.safetensors" if name == LORA_NAME else name


def kohya_companions(output_dir: str | os.PathLike, output_name: str = "") -> tuple[str, str, str]:
    """The kohya copy's name and those of the files A1111 shows beside it: its card's user metadata (``.json``) and
    preview (``.preview.png``)."""
    stem = kohya_name(output_dir, output_name).removesuffix(".safetensors")
    return f"{stem}.safetensors", f"{stem}.json", f"{stem}.preview.png"


def run_outputs(output_dir: str | os.PathLike, output_name: str = "") -> list[str]:
    """The names in ``output_dir`` of what a run there writes (``OUTPUT_NAMES``, its kohya copy and the files beside
    it, the LoRAs ``--save_every_n_steps`` / ``--save_every_n_epochs`` wrote) that exist."""
    stem = re.escape(kohya_name(output_dir, output_name).removesuffix(".safetensors"))
    snapshots = sorted(p.name for p in Path(output_dir).glob("*.safetensors")
                       if re.fullmatch(rf"{stem}-(step\d{{8}}|\d{{6}})\.safetensors", p.name))
    kept = (*OUTPUT_NAMES, *kohya_companions(output_dir, output_name))
    return [name for name in kept if (Path(output_dir) / name).exists()] + snapshots


# A1111's "sd version" of a LoRA card, from our metadata's ``architecture``
_SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


def write_a1111_card(path: str | os.PathLike, *, trigger: str = "", architecture: str | None = None,
                     description: str = "") -> None:
    """A1111's user metadata of a LoRA's card (``<lora>.json`` beside it, what its "edit metadata" dialog writes):
    the activation text (the trigger word, added to the prompt with the tag), the SD version (which filters the cards
    by the loaded model) and a description."""
    import json

    card = {"description": description, "sd version": _SD_VERSIONS.get(architecture or "", "Unknown"),
            "activation text": trigger, "preferred weight": 0, "negative text": "", "notes": ""}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(card, indent=4), encoding="utf-8")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_public(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders ``checkpoints/checkpoint-<step>``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_checkpoint(output_dir: str | os.PathLike, spec: str) -> Path:
    """``"latest"`` -> the newest checkpoint of ``output_dir``; otherwise ``spec`` is a checkpoint folder."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS}")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_NAME).is_file() and (Path(output_dir) / CHECKPOINTS / spec / STATE_NAME).is_file():
        path = Path(output_dir) / CHECKPOINTS / spec
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a checkpoint folder (no {STATE_NAME})")
    return path


def write_checkpoint(output_dir: str | os.PathLike, step: int, write_files) -> Path:
    """Create ``checkpoints/checkpoint-<step>`` atomically; ``write_files(folder)`` fills a temporary folder."""
    final = Path(output_dir) / CHECKPOINTS / f"checkpoint-{step}"
    with atomic_folder(final) as tmp:  # (the same step saved before, e.g. a cancelled run resumed: swapped in)
        write_files(tmp)
    return final


def set_aside_checkpoints_after(output_dir: str | os.PathLike, step: int) -> Path | None:
    """Resuming at ``step`` abandons the checkpoints past it (a later run, resumed from earlier): they move into
    ``checkpoints/superseded-<n>/``, kept, but neither ``latest`` nor pruned any more. Returns that folder."""
    later = [p for p in list_checkpoints(output_dir) if int(p.name.split("-")[-1]) > step]
    if not later:
        return None
    root = Path(output_dir) / CHECKPOINTS
    n = 1
    while (root / f"superseded-{n}").exists():
        n += 1
    aside = root / f"superseded-{n}"
    aside.mkdir()
    for path in later:
        os.rename(path, aside / path.name)
    logger.warning("resuming at step %d: the later checkpoints %s are kept in %s", step, ", ".join(p.name for p in later), aside)
    return aside


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep=0`` keeps all) and stale temporary folders."""
    root = Path(output_dir) / CHECKPOINTS
    for stale in root.glob(".checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", old, keep)
            shutil.rmtree(old)


def prune_snapshots(output_dir: str | os.PathLike, output_name: str, kind: str, at: int, keep: int, every: int) -> None:
    """kohya's ``--save_last_n_steps`` (``kind="step"``: the step LoRAs from more than ``keep`` steps before ``at``)
    and ``--save_last_n_epochs`` (``"epoch"``: those ``keep`` = n x every epochs or more before ``at``), as kohya
    removes them (``get_remove_step_no`` / ``get_remove_epoch_no``); ``keep=0`` keeps all."""
    if not keep:
        return
    limit = _kohya_limit(kind, at, keep, every)
    stem = re.escape(kohya_name(output_dir, output_name).removesuffix(".safetensors"))
    pattern = rf"{stem}-step(\d{{8}})\.safetensors" if kind == "step" else rf"{stem}-(\d{{6}})\.safetensors"
    for path in sorted(Path(output_dir).glob("*.safetensors")):
        if (m := re.fullmatch(pattern, path.name)) and int(m.group(1)) <= limit:
            logger.info("removing %s (kohya's --save_last_n_%ss)", path.name, kind)
            path.unlink()


def _kohya_limit(kind: str, at: int, keep: int, every: int) -> int:
    """The newest step (``kind="step"``) or epoch that kohya deletes after saving ``at``: ``keep`` steps back (one
    more, down to a multiple of ``every``), or ``keep`` (= n x every) epochs back."""
    if kind == "epoch":
        return at - keep
    limit = at - keep - 1
    return limit - limit % every


def prune_states(output_dir: str | os.PathLike, states: dict[tuple[str, int], int], kind: str, at: int, keep: int,
                 every: int, kept: set[int]) -> None:
    """kohya's ``--save_last_n_steps_state`` / ``--save_last_n_epochs_state`` with ``--save_state``, after the state
    of ``kind`` (``"step"`` / ``"epoch"``) ``at`` (``prune_snapshots``' rules; ``keep=0`` keeps all): ``states`` maps
    each such state, ``(kind, number)``, to the step of the checkpoint that holds it. Those kohya deletes are dropped,
    and a checkpoint that holds none left, and is not in ``kept`` (``--checkpointing_steps``' own), is deleted."""
    if not keep:
        return
    limit = _kohya_limit(kind, at, keep, every)
    for state in [s for s in states if s[0] == kind and s[1] <= limit]:
        step = states.pop(state)
        folder = Path(output_dir) / CHECKPOINTS / f"checkpoint-{step}"
        if step not in states.values() and step not in kept and folder.is_dir():
            logger.info("removing %s (kohya's --save_last_n_%ss_state)", folder.name, kind)
            shutil.rmtree(folder)


def save_state(folder: Path, state: dict) -> None:
    torch.save(state, folder / STATE_NAME)


def load_state(folder: Path) -> dict:
    return torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- log, plot
def write_log(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with ``LOG_FIELDS``) as CSV, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_log(path: str | os.PathLike) -> list[dict]:
    """Rows of a ``log.csv`` (numbers parsed); empty if the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k in ("step", "epoch", "keys_scaled") else float(v)) for k, v in row.items() if k in LOG_FIELDS and v not in ("", None)}
            for row in rows]


def plot_loss(path: str | os.PathLike, rows: list[dict], size: tuple[int, int] = (640, 360)) -> None:
    """Draw loss per step (light) and its running mean (dark), and the validation loss where rows hold one (orange
    dots joined), into a PNG, atomically; no matplotlib needed."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    margin = 40
    points = [(r["step"], r["loss"]) for r in rows if math.isfinite(r["loss"])]
    validation = [(r["step"], r["val_loss"]) for r in rows if math.isfinite(r.get("val_loss", math.nan))]
    draw.rectangle([margin, 10, width - 10, height - margin], outline=(160, 160, 160))
    if points:
        steps, losses = zip(*points)
        lo, hi = min(losses + tuple(v for _, v in validation)), max(losses + tuple(v for _, v in validation))
        hi = hi if hi > lo else lo + 1e-8
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)

        def xy(step: float, loss: float) -> tuple[float, float]:
            return (margin + (step - s0) / (s1 - s0) * (width - 10 - margin),
                    height - margin - (loss - lo) / (hi - lo) * (height - margin - 10))

        draw.line([xy(s, v) for s, v in points], fill=(150, 180, 230), width=1)
        window = max(1, len(points) // 20)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 160), width=2)
        if validation:
            draw.line([xy(s, v) for s, v in validation], fill=(230, 120, 20), width=2)
            for s, v in validation:
                x, y = xy(s, v)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(230, 120, 20))
        draw.text((margin, height - margin + 8), f"step {s0}", fill="black")
        draw.text((width - 90, height - margin + 8), f"step {s1}", fill="black")
        draw.text((2, 10), f"{hi:.3g}", fill="black")
        draw.text((2, height - margin - 12), f"{lo:.3g}", fill="black")
    draw.text((width // 2 - 20, height - 18), "loss" + (" (orange: validation)" if validation and points else ""), fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile equally sized images in rows of ``columns`` (default: about square)."""
    columns = columns or max(1, round(len(images) ** 0.5 + 0.49))
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
