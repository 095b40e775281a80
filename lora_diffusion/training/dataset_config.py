"""kohya's dataset config (sd-scripts' ``--dataset_config``): a TOML file of data sets and their subsets.

    [general]
    shuffle_caption = true
    caption_extension = ".txt"

    [[datasets]]
    resolution = 512
    batch_size = 2

      [[datasets.subsets]]
      image_dir = "img/sks"
      num_repeats = 10
      class_tokens = "sks dog"

      [[datasets.subsets]]
      image_dir = "reg/dog"
      is_reg = true
      class_tokens = "dog"

A subset's setting is looked up in the subset, its data set, ``[general]``, then the run's own settings (the
command line), kohya's order. Each subset's folder is read alone (not its sub-folders, as kohya reads it); its
images come ``num_repeats`` times per epoch, take ``class_tokens`` where they have no caption file, and vary by the
subset's own caption and augmentation settings (``SampleOptions``). ``is_reg`` subsets are the regularisation images
(``--reg_data_dir``'s). The data set's size settings (``resolution``, ``batch_size``, buckets) become the run's; of
several data sets, the first's, each batch taking its own data set's.

Example:
    >>> found = read_dataset_config("dataset.toml", config)
    >>> config = dataclasses.replace(config, **found.settings)
    >>> examples, reg_examples = found.scan(config)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig, read_text
from .data import DatasetSize, Example, SampleOptions, attach_masks, read_fine_tuning_metadata, scan_images

logger = logging.getLogger(__name__)

__all__ = ["DatasetConfig", "Subset", "read_dataset_config"]

# a data set's settings (in [[datasets]] or [general]) -> the run's
_DATASET: dict[str, tuple[type, str]] = {
    "resolution": (int, "resolution"), "batch_size": (int, "train_batch_size"), "enable_bucket": (bool, "enable_bucket"),
    "min_bucket_reso": (int, "min_bucket_reso"), "max_bucket_reso": (int, "max_bucket_reso"),
    "bucket_reso_steps": (int, "bucket_reso_steps"), "bucket_no_upscale": (bool, "bucket_no_upscale"),
    "validation_split": (float, "validation_split"), "validation_seed": (int, "validation_seed"),
}
# a subset's settings (in the subset, its data set or [general]): their type, and the run's setting they fall back to
_SUBSET: dict[str, tuple[type, str | None]] = {
    "num_repeats": (int, None), "class_tokens": (str, None), "caption_extension": (str, "caption_extension"),
    "caption_prefix": (str, "caption_prefix"), "caption_suffix": (str, "caption_suffix"),
    "shuffle_caption": (bool, "shuffle_caption"), "keep_tokens": (int, "keep_tokens"),
    "caption_separator": (str, "caption_separator"), "keep_tokens_separator": (str, "keep_tokens_separator"),
    "secondary_separator": (str, "secondary_separator"), "enable_wildcard": (bool, "enable_wildcard"),
    "caption_dropout_rate": (float, "caption_dropout_rate"), "caption_tag_dropout_rate": (float, "caption_tag_dropout_rate"),
    "caption_dropout_every_n_epochs": (int, "caption_dropout_every_n_epochs"),
    "flip_aug": (bool, "random_flip"), "color_aug": (bool, "color_aug"), "random_crop": (bool, None),
    "alpha_mask": (bool, "alpha_mask"), "resize_interpolation": (str, "resize_interpolation"),
}
_SUBSET_ONLY = {"image_dir": str, "is_reg": bool, "conditioning_data_dir": str,  # (--masked_loss's masks)
                "metadata_file": str}  # (kohya's fine-tuning subset: its images and captions, --in_json's)
_IGNORED = ("cache_info",)  # (kohya's cache of image sizes: they are read once here)
# kohya's settings not built here, with the value that changes nothing (None: any value is refused)
_REFUSED: dict[str, tuple[Any, str]] = {
    "network_multiplier": (1.0, "a data set's own LoRA strength is not built"),
    "face_crop_aug_range": (None, "face crop augmentation is not built"),
    "token_warmup_min": (1, "token warm-up is not built"), "token_warmup_step": (0, "token warm-up is not built"),
    "custom_attributes": (None, "custom attributes are not read"),
}


@dataclass(frozen=True)
class Subset:
    """One ``[[datasets.subsets]]`` with every setting looked up."""

    where: str  # "datasets[0].subsets[1]"
    image_dir: Path | None  # (None: a fine-tuning subset whose metadata_file names its images by path)
    is_reg: bool
    num_repeats: int
    class_tokens: str
    caption_extension: str
    caption_prefix: str
    caption_suffix: str
    options: SampleOptions
    alpha_mask: bool = False  # (the loss masks: the images' alpha, or conditioning_data_dir's images)
    conditioning_data_dir: Path | None = None
    group: int = 0  # its data set's index
    metadata_file: Path | None = None


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset config file read: the run's settings it gives and its subsets."""

    path: Path
    settings: dict[str, Any]  # TrainConfig fields: the first data set's, the run's
    subsets: list[Subset]
    datasets: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # (each data set's)

    def sizes(self, config: TrainConfig) -> dict[int, DatasetSize] | None:
        """Each data set's ``DatasetSize`` (its settings over ``config``'s, the command line's), where they differ;
        ``None`` where there is one data set, or all are alike."""
        if all(d == self.settings for d in self.datasets):
            return None
        out = {}
        for group, settings in enumerate(self.datasets):
            own = dataclasses.replace(config, **settings)
            try:
                own.validate()
            except ConfigError as e:
                raise ConfigError(f"--dataset_config {self.path}: datasets[{group}]: {e}") from None
            out[group] = DatasetSize.of(own)
        return out

    def scan(self, config: TrainConfig) -> tuple[list[Example], list[Example] | None]:
        """(training examples, regularisation examples or ``None``): each subset's images with its captions,
        repeats and ``SampleOptions``. ``config``'s ``mode`` and ``token`` make the training captions (as for
        ``--train_data_dir``); a regularisation image without a caption file takes its subset's ``class_tokens``,
        else ``--class_prompt``."""
        train: list[Example] = []
        reg: list[Example] = []
        for subset in self.subsets:
            if subset.is_reg:
                mode, token, fallback = "style", "", subset.class_tokens or config.class_prompt
            else:
                mode, token, fallback = config.mode, config.token, subset.class_tokens or config.instance_prompt
            what = f"--dataset_config {self.path}: {subset.where}"
            captions = read_fine_tuning_metadata(subset.metadata_file, subset.image_dir, subset.options.caption_separator,
                                                 f"{what}.metadata_file") if subset.metadata_file else None
            found = scan_images(subset.image_dir or subset.metadata_file.parent, caption_extension=subset.caption_extension, mode=mode,
                                token=token, instance_prompt=fallback, strict=config.strict, resolution=max(config.size),
                                recursive=False, what=f"{what}.image_dir", captions=captions)
            found = attach_masks(found, subset.conditioning_data_dir, alpha=subset.alpha_mask,
                                 what=f"--dataset_config {self.path}: {subset.where}.conditioning_data_dir")
            options = subset.options if not config.cache_latents else dataclasses.replace(subset.options, center_crop=True)
            for e in found:
                caption = " ".join(filter(None, (subset.caption_prefix, e.caption, subset.caption_suffix)))
                (reg if subset.is_reg else train).append(dataclasses.replace(e, caption=caption, repeats=subset.num_repeats,
                                                                             options=options, group=subset.group))
        if reg and config.with_prior_preservation:
            raise ConfigError(f"--dataset_config {self.path}: its is_reg subsets are the regularisation images; "
                              "--with_prior_preservation would generate others: drop one of them")
        if not train:
            raise ConfigError(f"--dataset_config {self.path}: every subset is is_reg; give one of training images")
        if not any(e.repeats for e in train):
            raise ConfigError(f"--dataset_config {self.path}: every training subset has num_repeats 0")
        return train, reg or None


def _check_type(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"{where}: expected {name}, got {value!r}")
    return value


def _resolution(value: Any, where: str) -> dict[str, int]:
    sides = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(sides, list) and len(sides) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in sides)):
        raise ConfigError(f"{where}: expected a side (512) or [WIDTH, HEIGHT] ([512, 768]), got {value!r}")
    return {"resolution": sides[0], "resolution_height": 0 if sides[1] == sides[0] else sides[1]}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key, value in table.items():
        if key in _REFUSED:
            harmless, reason = _REFUSED[key]
            if harmless is None or value != harmless:
                raise ConfigError(f"{where}.{key}: {reason}")
        elif key not in allowed and key not in _IGNORED:
            raise ConfigError(f"{where}: unknown setting {key!r} (kohya's dataset config takes {', '.join(sorted(allowed))})")


def read_dataset_config(path: str | Path, config: TrainConfig) -> DatasetConfig:
    """Read kohya's dataset config at ``path``, ``config`` giving the settings it leaves out. Raises ``ConfigError``
    naming the file and the setting (``datasets[0].subsets[1].num_repeats``) that cannot be read, or that this
    trainer does not build. Several ``[[datasets]]`` train side by side, each at its own resolution, buckets and batch
    size (``DatasetConfig.sizes``), as kohya trains them: a batch holds one data set's images."""
    import tomllib

    path = Path(path)
    source = f"--dataset_config {path}"
    if not path.is_file():
        raise ConfigError(f"{source}: no such file")
    try:
        data = tomllib.loads(read_text(path, ConfigError, "--dataset_config "))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    _check_keys(data, {"general", "datasets"}, source)
    general, datasets = data.get("general", {}), data.get("datasets", [])
    if not isinstance(general, dict):
        raise ConfigError(f"{source}: general must be a table ([general])")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, dict) for d in datasets):
        raise ConfigError(f"{source}: no data set: give at least one [[datasets]] with a [[datasets.subsets]]")
    _check_keys(general, set(_DATASET) | set(_SUBSET), f"{source}: general")
    per_dataset: list[dict[str, Any]] = []
    subsets = []
    for i, dataset in enumerate(datasets):
        where = f"{source}: datasets[{i}]"
        _check_keys(dataset, set(_DATASET) | set(_SUBSET) | {"subsets"}, where)
        own = {}
        for key, (kind, ours) in _DATASET.items():
            value = dataset.get(key, general.get(key))
            if value is None:
                continue
            here = f"{where}.{key}" if key in dataset else f"{source}: general.{key}"
            if key == "resolution":
                own.update(_resolution(value, here))
            else:
                own[ours] = _check_type(value, kind, here)
        per_dataset.append(own)
        for key in ("validation_split", "validation_seed"):  # (data sets of their own sizes side by side; one held-out share)
            if own.get(key) != per_dataset[0].get(key):
                raise ConfigError(f"{where}: its {key} ({own.get(key, 'unset')}) is not datasets[0]'s "
                                  f"({per_dataset[0].get(key, 'unset')}): give it once, in [general]")
        members = dataset.get("subsets", [])
        if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
            raise ConfigError(f"{where}: no subsets: give at least one [[datasets.subsets]] with an image_dir")
        for j, member in enumerate(members):
            tables = [(dataset, where), (general, f"{source}: general")]
            subsets.append(_subset(member, tables, config, f"{where}.subsets[{j}]", f"datasets[{i}].subsets[{j}]", i))
    return DatasetConfig(path, per_dataset[0], subsets, per_dataset)


def _subset(member: dict, tables: list[tuple[dict, str]], config: TrainConfig, where: str, name: str, group: int) -> Subset:
    """One subset's settings: each from the subset, else ``tables`` (its data set, then [general]: ``(table,
    where)``), else ``config``."""
    _check_keys(member, set(_SUBSET) | set(_SUBSET_ONLY), where)
    if "image_dir" not in member and "metadata_file" not in member:
        raise ConfigError(f"{where}: image_dir is required (or a fine-tuning subset's metadata_file)")
    if "metadata_file" in member and (member.get("is_reg") or "conditioning_data_dir" in member):
        raise ConfigError(f"{where}: a fine-tuning subset (metadata_file) is not is_reg and has no conditioning_data_dir")
    values: dict[str, Any] = {}
    for key, (kind, ours) in _SUBSET.items():
        for table, at in [(member, where), *tables]:
            if key in table:
                values[key] = _check_type(table[key], kind, f"{at}.{key}")
                break
        else:
            values[key] = getattr(config, ours) if ours else {"num_repeats": 1, "random_crop": not config.center_crop}.get(key, "")
    for key, kind in _SUBSET_ONLY.items():
        values[key] = _check_type(member[key], kind, f"{where}.{key}") if key in member else None
    if values["conditioning_data_dir"] and values["alpha_mask"]:
        raise ConfigError(f"{where}: give its masks as conditioning_data_dir or alpha_mask, not both")
    if values["num_repeats"] < 0:
        raise ConfigError(f"{where}.num_repeats must not be negative, got {values['num_repeats']}")
    own = dataclasses.replace(config, center_crop=not values["random_crop"],
                              **{ours: values[key] for key, (_, ours) in _SUBSET.items() if ours})
    try:
        own.validate()  # (the run's own checks of these settings: ranges, choices, the caption extension's dot, ...)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    options = SampleOptions(**{f.name: getattr(own, f.name) for f in dataclasses.fields(SampleOptions)})
    extension = own.caption_extension
    masks, table = values["conditioning_data_dir"], values["metadata_file"]
    return Subset(name, Path(values["image_dir"]) if values["image_dir"] else None, bool(values["is_reg"]), values["num_repeats"], values["class_tokens"],
                  extension, values["caption_prefix"], values["caption_suffix"], options, values["alpha_mask"],
                  Path(masks) if masks else None, group, Path(table) if table else None)
