"""One config merge and one override syntax, for ``dinolab train``, ``dinolab eval`` and ``dinolab curate``.

A config is a dataclass whose fields hold every default. :func:`merge` layers YAML files or dicts over
those defaults, then ``key=value`` overrides (dotted keys, YAML values: ``optim.base_lr=1e-3``,
``ks=[10,20]``, ``features.bf16=false``), checks every key and type against the dataclass, and returns
an instance (its ``__post_init__`` validates the values). Any mistake is one ``ValueError`` line that
names the bad key or item:

    merge(KnnConfig, overrides=["ks=[10,20]"])         # KnnConfig(ks=(10, 20), ...)
    merge(KnnConfig, overrides=["temperature=abc"])    # ValueError: invalid config: temperature: Value 'abc' ...

The same syntax is written as plain arguments anywhere on each command line (``dinolab.cli``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
PRESET_DIR = Path(__file__).parent / "presets"
# deltas over a run's saved config (``highres``: applied by ``dinolab train --high-res CKPT``), not presets
DELTA_DIR = Path(__file__).parent / "deltas"


def looks_like_override(item: str) -> bool:
    """True for ``key=value`` with a non-empty key that is not an option (``--x=1``)."""
    key, sep, _ = item.partition("=")
    return bool(sep) and bool(key.strip()) and not key.startswith("-")


def is_field_override(item: str, schema: type) -> bool:
    """True if ``item`` is ``key=value`` whose (dotted) key starts with a field of the dataclass ``schema``.

    Tells overrides apart from other ``NAME=PATH`` arguments that argparse handed the same list.
    """
    return looks_like_override(item) and item.partition("=")[0].split(".")[0].strip() in schema.__dataclass_fields__


def parse_overrides(items: Sequence[str]) -> DictConfig:
    """``["a.b=1", "c=[2,3]"]`` -> the nested node ``{a: {b: 1}, c: [2, 3]}`` (values parsed as YAML).

    Raises:
        ValueError: an item is not ``key=value`` or its value is not valid YAML (one line naming the item).
    """
    for item in items:
        if not looks_like_override(item):
            raise ValueError(f"override {item!r} must be key=value with a dotted config key, e.g. optim.base_lr=1e-3")
        try:
            OmegaConf.from_dotlist([item])
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_first_line(err)})") from None
    return OmegaConf.from_dotlist(list(items))


def merge(schema: type[T], layers: Sequence[Any] = (), overrides: Sequence[str] = (), *,
          context: str = "invalid config", check: Callable[[Any], None] | None = None) -> T:
    """Defaults of ``schema`` <- each of ``layers`` (a DictConfig or dict) <- ``key=value`` overrides -> instance.

    Args:
        schema: the config dataclass (its defaults are the first layer).
        layers: YAML nodes or dicts, later ones win.
        overrides: ``key=value`` strings (:func:`parse_overrides`), applied last.
        context: what the error line starts with, e.g. ``"invalid config"``.
        check: called with the merged plain container before the dataclass is built (e.g. :func:`check_finite`).

    Raises:
        ValueError: a malformed override, an unknown key or a value of the wrong type, as one line
            ``"{context}: {reason}"`` naming the key; invalid values raise the dataclass's own ValueError.
    """
    node = parse_overrides(overrides) if overrides else None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers, *([node] if node is not None else []))
        if check is not None:
            check(OmegaConf.to_container(merged, resolve=True))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(f"{context}: {_reason(err)}") from None


def _reason(err: OmegaConfBaseException) -> str:
    """OmegaConf's first line, prefixed by the full key when that line does not name it."""
    line, key = _first_line(err), getattr(err, "full_key", None)
    leaf = str(key).rsplit(".", 1)[-1] if key else ""
    return f"{key}: {line}" if leaf and leaf not in line else line


def _first_line(err: BaseException) -> str:
    return next((s.strip() for s in str(err).splitlines() if s.strip()), type(err).__name__)


# ------------------------------------------------------------------ YAML layers
def preset_names() -> list[str]:
    """The presets shipped in ``presets/``, by name."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_layers(preset: str, seen: tuple[str, ...] = ()) -> list[DictConfig]:
    """A preset's YAML (a name or a path), preceded by the preset it names as ``inherit:`` (deltas over deltas).

    Raises:
        ValueError: unknown preset, a delta file given as a preset, or an inheritance loop.
    """
    if preset in seen:
        raise ValueError(f"preset {preset!r} inherits from itself ({' -> '.join(seen + (preset,))})")
    node = load_yaml(_preset_path(preset))
    parent = node.pop("inherit", None)
    return (preset_layers(str(parent), seen + (preset,)) if parent else []) + [node]


def _preset_path(preset: str) -> Path:
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
    if not path.is_file() and (DELTA_DIR / f"{preset}.yaml").is_file():
        raise ValueError(f"{preset!r} is not a preset but deltas applied over a run's own config: "
                         f"use dinolab train --high-res RUN/checkpoints/ckpt_*.pth")
    if not path.is_file():
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(preset_names())} or a .yaml path")
    return path


def load_yaml(path: str | Path) -> DictConfig:
    """A YAML config file as an OmegaConf node: plain YAML only (no ``!!python/...`` tags).

    Raises:
        ValueError: the file is not valid YAML, holds a tag that would construct a Python object,
            or is not a mapping (one line naming the file).
    """
    path = Path(path)
    try:
        node = OmegaConf.load(path)
    except yaml.constructor.ConstructorError as err:
        tag = _tag_of(err)
        where = f" (line {err.problem_mark.line + 1})" if err.problem_mark is not None else ""
        raise ValueError(f"{path}{where}: YAML tag {tag} is not allowed: configs hold plain values "
                         "(numbers, strings, lists, mappings), never Python objects") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML: {problem}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"{path}: {str(err).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ValueError(f"{path}: expected a mapping of config keys, got a {type(node).__name__}")
    return node


def _tag_of(err: Any) -> str:
    """``'tag:yaml.org,2002:python/object/apply:os.system'`` -> ``!!python/object/apply:os.system``."""
    text = str(getattr(err, "problem", "") or err)
    start = text.find("'")
    tag = text[start + 1 : text.find("'", start + 1)] if start >= 0 else text
    return tag.replace("tag:yaml.org,2002:", "!!")


def check_finite(node: Any, key: str = "") -> None:
    """Refuse ``inf`` / ``nan`` anywhere in a config (every float field, list items included).

    Raises:
        ValueError: naming the first non-finite key, e.g. ``optim.base_lr must be a finite number, got inf``.
    """
    if isinstance(node, float) and not math.isfinite(node):
        raise ValueError(f"{key} must be a finite number, got {node}")
    if isinstance(node, dict):
        for k, v in node.items():
            check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_finite(v, f"{key}[{i}]")
