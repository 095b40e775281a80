"""kohya's sample prompts: ``--sample_prompts FILE`` with ``--sample_every_n_steps`` / ``--sample_every_n_epochs`` /
``--sample_at_first`` and ``--sample_sampler``, read and named as sd-scripts reads and names them.

A ``.txt`` file holds one prompt a line (``#`` starts a comment line), each with kohya's options after it:
``--n`` negative prompt, ``--w`` / ``--h`` size, ``--d`` seed, ``--l`` guidance scale, ``--s`` steps, ``--ss`` sampler.
A ``.toml`` file has a ``[prompt]`` table whose ``[[prompt.subset]]`` entries each add to it; a ``.json`` file is a
list of such tables or of lines. Each image goes to ``<output_dir>/sample/`` as
``<output_name>_<step>_<i>_<time>_<seed>.png`` (``e<epoch>`` for an epoch's samples; the seed only where given).

Example:
    >>> prompts = read_sample_prompts("prompts.txt")   # "a cat --n blurry --w 512 --h 768 --d 42 --l 7 --s 28"
    >>> prompts[0]["negative_prompt"], prompts[0]["seed"]
    ('blurry', 42)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .config import KOHYA_SAMPLERS as SAMPLERS
from .config import ConfigError, read_text

__all__ = ["SAMPLERS", "read_sample_prompts", "line_to_prompt", "sample_due", "sample_file_name", "scheduler_for_sampler"]


# kohya's per-prompt options: --<letter> -> (key, type)
_OPTIONS = {"w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("sample_steps", int), "l": ("scale", float),
            "n": ("negative_prompt", str), "ss": ("sample_sampler", str)}


def line_to_prompt(line: str, where: str = "") -> dict:
    """One prompt line as kohya reads it (``line_to_prompt_dict``): the text before the first `` --``, then its
    options; steps are kept within 1..1000. An option that does not parse is an error naming ``where``."""
    parts = line.split(" --")
    prompt: dict = {"prompt": parts[0]}
    for part in parts[1:]:
        letter, _, value = part.partition(" ")
        if letter.lower() not in _OPTIONS:
            raise ConfigError(f"{where}: unknown option --{letter} (kohya's are --n, --w, --h, --d, --l, --s, --ss)")
        key, kind = _OPTIONS[letter.lower()]
        value = value.strip()
        if kind is not str and not re.fullmatch(r"\d+" if kind is int else r"\d+\.?\d*|\.\d+", value):  # (kohya's digits)
            raise ConfigError(f"{where}: --{part}: not a {'whole ' if kind is int else ''}number")
        prompt[key] = kind(value)
    if "sample_steps" in prompt:
        prompt["sample_steps"] = max(1, min(1000, prompt["sample_steps"]))
    if prompt.get("sample_sampler") is not None and prompt["sample_sampler"] not in SAMPLERS:
        raise ConfigError(f"{where}: --ss {prompt['sample_sampler']}: unknown sampler; kohya's are {', '.join(SAMPLERS)}")
    return prompt


def read_sample_prompts(path: str | Path) -> list[dict]:
    """The prompts of a kohya sample-prompt file (``.txt``, ``.toml`` or ``.json``), each a dict with ``prompt`` and
    the options given (``negative_prompt``, ``width``, ``height``, ``seed``, ``scale``, ``sample_steps``,
    ``sample_sampler``). Raises ``ConfigError`` naming the file (and line) for what it cannot read."""
    path = Path(path)
    what = f"--sample_prompts {path}"
    if not path.is_file():
        raise ConfigError(f"{what}: no such file")
    text = read_text(path, ConfigError, "--sample_prompts ")
    if path.suffix == ".txt":
        lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
        prompts = [line_to_prompt(line, f"{what}:{n}") for n, line in lines]
    elif path.suffix in (".toml", ".json"):
        try:
            if path.suffix == ".toml":
                import tomllib

                table = tomllib.loads(text)["prompt"]
                entries = [{**{k: v for k, v in table.items() if k != "subset"}, **subset} for subset in table["subset"]]
            else:
                entries = json.loads(text)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{what}: not a kohya prompt file ({type(e).__name__}: {e})") from None
        if not isinstance(entries, list):
            raise ConfigError(f"{what}: a list of prompts is expected")
        prompts = [line_to_prompt(e, f"{what}: prompt {i + 1}") if isinstance(e, str) else _checked(e, f"{what}: prompt {i + 1}")
                   for i, e in enumerate(entries)]
    else:
        raise ConfigError(f"{what}: use a .txt, .toml or .json file (kohya's)")
    if not prompts:
        raise ConfigError(f"{what}: no prompt in the file")
    return prompts


def _checked(entry: object, where: str) -> dict:
    """A prompt given as a table: its keys are kohya's (``prompt``, ``negative_prompt``, ``width``, ...)."""
    known = {"prompt", *(key for key, _ in _OPTIONS.values())}
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise ConfigError(f"{where}: a table with a 'prompt' string is expected")
    if unknown := sorted(set(entry) - known - {"enum"}):
        raise ConfigError(f"{where}: unknown key(s) {unknown}; kohya's are {sorted(known)}")
    if entry.get("sample_sampler") is not None and entry["sample_sampler"] not in SAMPLERS:
        raise ConfigError(f"{where}: sample_sampler {entry['sample_sampler']!r}: unknown; kohya's are {', '.join(SAMPLERS)}")
    for key, kind in _OPTIONS.values():
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind)):
            raise ConfigError(f"{where}: {key} {value!r}: not {({int: 'a whole number', float: 'a number'}).get(kind, 'text')}")
    out = dict(entry)
    if "sample_steps" in out:
        out["sample_steps"] = max(1, min(1000, out["sample_steps"]))
    return out


def sample_due(step: int, epoch: int | None, every_n_steps: int, every_n_epochs: int, at_first: bool) -> bool:
    """Whether kohya samples at this point (``sample_images_common``): at step 0 with ``at_first``; at the end of
    epoch ``epoch`` (1-based) every ``every_n_epochs`` epochs; else, after a step (``epoch`` None), every
    ``every_n_steps`` steps when no epoch interval is given."""
    if step == 0:
        return at_first
    if every_n_epochs:
        return epoch is not None and epoch % every_n_epochs == 0
    return bool(every_n_steps) and epoch is None and step % every_n_steps == 0


def sample_file_name(output_name: str, step: int, epoch: int | None, index: int, seed: int | None) -> str:
    """kohya's name of a sample image: ``[<output_name>_]<step:06d or e<epoch:06d>>_<index:02d>_<time>[_<seed>].png``."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
    return f"{output_name + '_' if output_name else ''}{number}_{index:02d}_{stamp}{'' if seed is None else f'_{seed}'}.png"


def scheduler_for_sampler(base, name: str):
    """A scheduler of kohya's sampler ``name`` on the config of the scheduler ``base`` (the model's own betas and
    prediction type)."""
    import diffusers

    class_name, settings = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(base.config, **settings)
