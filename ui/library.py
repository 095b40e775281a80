"""The LoRA library: one folder of ``<name>.safetensors`` files (plus an optional ``<name>.png`` sample).

Every name that reaches the file system goes through :func:`check_name`, so neither a LoRA name typed in the
UI nor an uploaded file's name can point outside the folder (``../x``, ``/etc/x``, ``a/b`` are refused). Only
safetensors is accepted; pickled checkpoints are refused before anything reads them as pickles (the reader in
``lora_diffusion.formats`` never unpickles). No gradio here.

Example:
    >>> lib = LoraLibrary("loras")
    >>> lib.add_file("/tmp/upload/style.safetensors")        # validated, copied in atomically
    >>> [info.name for info in lib.list()]
    ['style']
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lora_diffusion.formats import LoraFormatError, our_metadata, read_lora_file

logger = logging.getLogger(__name__)

__all__ = ["LoraLibrary", "LoraInfo", "UIError", "check_name", "safe_child", "NAME_PATTERN"]

# Names are file names (no separators) and adapter names; dots are fine (A1111 names such as detail_v1.5), a run
# of them or a trailing one is not.
NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?=[A-Za-z0-9_-])){0,63}")
SUFFIX = ".safetensors"
DEFAULT_MAX_UPLOAD_MB = 512


class UIError(ValueError):
    """A problem with the user's input; its message is shown in the UI as it is."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid LoRA name (letters, digits, ``_``, ``-``, single dots inside; no paths),
    else raise ``UIError``."""
    name = (name or "").strip()
    if name.endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not NAME_PATTERN.fullmatch(name):
        raise UIError(
            f"invalid LoRA name {name!r}: use 1-64 letters, digits, '_', '-' or single dots, starting with a letter or "
            "digit (no paths, no '..')"
        )
    return name


def sanitize_name(stem: str) -> str:
    """A valid name made from an uploaded file's stem: other characters become ``_``."""
    name = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", stem)).strip("_-.")[:64].rstrip(".")
    return name or "lora"


def safe_child(root: str | os.PathLike, relative: str) -> Path:
    """``root / relative`` resolved, refusing absolute paths and anything that resolves outside ``root``."""
    root_path = Path(root).resolve()
    if not relative or os.path.isabs(relative) or Path(relative).drive:
        raise UIError(f"{relative!r}: give a path relative to {root_path}")
    target = (root_path / relative).resolve()
    if target != root_path and root_path not in target.parents:
        raise UIError(f"{relative!r} is outside {root_path}")
    return target


@dataclass
class LoraInfo:
    """What the library table shows about one LoRA file."""

    name: str
    path: Path
    format: str = ""
    base_model: str = ""
    rank: str = ""
    size_mb: float = 0.0
    trigger_words: list[str] = field(default_factory=list)
    sample: Path | None = None
    components: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    error: str | None = None

    def row(self) -> list:
        """``[name, format, base model, rank, size MB, trigger words, sample]`` for a table."""
        fmt = self.format if self.error is None else f"unreadable: {self.error}"
        return [self.name, fmt, self.base_model, self.rank, round(self.size_mb, 2), ", ".join(self.trigger_words),
                self.sample.name if self.sample else ""]


TABLE_HEADERS = ["name", "format", "base model", "rank", "size (MB)", "trigger words", "sample"]


def _trigger_words(meta: dict, header: dict) -> list[str]:
    words = meta.get("trigger_words") or meta.get("token") or meta.get("instance_prompt") or []
    if isinstance(words, str):
        words = [words]
    if not words and header.get("ss_tag_frequency"):
        try:  # kohya: {"folder": {"tag": count}} -> the most frequent tags
            counts: dict[str, int] = {}
            for tags in json.loads(header["ss_tag_frequency"]).values():
                for tag, n in tags.items():
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
            words = sorted(counts, key=counts.get, reverse=True)[:5]
        except (ValueError, AttributeError):
            words = []
    bundled = json.loads(header.get("_bundled_embeddings", "[]"))  # an embedding bundled in the file: its token
    return list(dict.fromkeys([*bundled, *(str(w) for w in words)]))


class LoraLibrary:
    """A folder of LoRA files with safe naming, validated uploads and a metadata table.

    Args:
        root: the folder (created if missing).
        max_upload_mb: uploads larger than this are refused with a message.
    """

    def __init__(self, root: str | os.PathLike, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB) -> None:
        self.root = Path(root).resolve()
        if self.root.exists() and not self.root.is_dir():
            raise UIError(f"--lora-dir {root}: a file, not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_mb * 1024 * 1024)
        self._cache: dict[str, tuple[tuple[int, int], LoraInfo]] = {}

    # ------------------------------------------------------------------ paths
    def path_for(self, name: str) -> Path:
        """The file of LoRA ``name`` (which need not exist); refuses names that are not plain names."""
        name = check_name(name)
        path = safe_child(self.root, name + SUFFIX)
        if path.parent != self.root:
            raise UIError(f"{name!r} is not a file directly in {self.root}")
        return path

    def sample_path(self, name: str) -> Path:
        return self.path_for(name).with_suffix(".png")

    def names(self) -> list[str]:
        """Names of the LoRA files in the folder, sorted (files with invalid names are ignored)."""
        out = []
        for p in sorted(self.root.glob("*" + SUFFIX)):
            stem = p.name[: -len(SUFFIX)]
            if NAME_PATTERN.fullmatch(stem) and p.is_file():
                out.append(stem)
        return out

    def exists(self, name: str) -> bool:
        return self.path_for(name).is_file()

    # ------------------------------------------------------------------ metadata
    def info(self, name: str) -> LoraInfo:
        """Format, base model, rank, size, trigger words and sample of one LoRA (cached by mtime and size)."""
        path = self.path_for(name)
        if not path.is_file():
            raise UIError(f"no LoRA named {name!r} in {self.root}")
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached and cached[0] == key:
            info = cached[1]
        else:
            info = LoraInfo(name=name, path=path, size_mb=st.st_size / 2**20)
            try:
                lora, header = read_lora_file(path)
            except (LoraFormatError, OSError) as e:
                info.error = str(e).replace(str(path) + ": ", "")
            else:
                meta = our_metadata(header)
                info.metadata = meta
                info.format = header.get("_format", "")
                info.base_model = str(
                    meta.get("base_model") or meta.get("pretrained_model_name_or_path") or header.get("ss_sd_model_name")
                    or header.get("modelspec.architecture") or ""
                )
                ranks = sorted({w.rank for w in lora.values() if w.oft is None})
                kinds = sorted({w.oft.kind for w in lora.values() if w.oft is not None})  # (no rank: blocks)
                info.rank = ", ".join([*map(str, ranks), *kinds])
                info.components = sorted({k.split(".", 1)[0] for k in lora})
                info.trigger_words = _trigger_words(meta, header)
            self._cache[name] = (key, info)
        sample = path.with_suffix(".png")
        info.sample = sample if sample.is_file() else None
        return info

    def list(self) -> list[LoraInfo]:
        """Info for every LoRA in the folder."""
        return [self.info(n) for n in self.names()]

    def table(self) -> list[list]:
        """Rows for the library table (see ``TABLE_HEADERS``)."""
        return [info.row() for info in self.list()]

    # ------------------------------------------------------------------ changes
    def check_upload(self, src: str | os.PathLike) -> Path:
        """Refuse anything but a ``.safetensors`` file within the size limit (before reading it)."""
        src = Path(src)
        if src.suffix.lower() != SUFFIX:
            raise UIError(
                f"{src.name}: only .safetensors files are accepted; pickled checkpoints (.ckpt, .pt, .bin) are "
                "refused because loading them can run arbitrary code"
            )
        size = src.stat().st_size
        if size > self.max_upload_bytes:
            raise UIError(
                f"{src.name} is {size / 2**20:.1f} MB; the upload limit is {self.max_upload_bytes / 2**20:.0f} MB"
            )
        return src

    def add_file(
        self,
        src: str | os.PathLike,
        name: str | None = None,
        *,
        overwrite: bool = False,
        sample: str | os.PathLike | None = None,
        check_size: bool = True,
    ) -> LoraInfo:
        """Validate ``src`` (safetensors, size, a LoRA we can read) and copy it in as ``name``.

        ``name`` defaults to the file's stem with unusual characters replaced; an explicit ``name`` must be valid
        as given. The copy goes through a temp file in the folder and a rename.
        """
        src = Path(src)
        if check_size:
            self.check_upload(src)
        elif src.suffix.lower() != SUFFIX:
            raise UIError(f"{src.name}: only .safetensors files are accepted")
        name = check_name(name) if name else sanitize_name(src.name[: -len(SUFFIX)])
        dest = self.path_for(name)
        if dest.exists() and not overwrite:
            raise UIError(f"a LoRA named {name!r} already exists; delete it first or choose another name")
        try:
            read_lora_file(src)  # refuses pickles by content too, and never unpickles
        except LoraFormatError as e:
            raise UIError(str(e).replace(str(src), src.name)) from None
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.root)
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if sample is not None and Path(sample).is_file():
            shutil.copyfile(sample, dest.with_suffix(".png"))
        logger.info("library: added %s", dest)
        return self.info(name)

    def delete(self, name: str) -> None:
        """Delete LoRA ``name`` and its sample image."""
        path = self.path_for(name)
        if not path.is_file():
            raise UIError(f"no LoRA named {name!r}")
        path.unlink()
        path.with_suffix(".png").unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)  # (A1111's card, written beside a kohya file)
        self._cache.pop(name, None)
