"""The one text grammar of options: ``name[:key=value,...]`` specs, ``key=value`` lists, values.

Everything that reads options written as text uses this module: the command line's optimizer
specs (:mod:`thermo_kfac.experiments.training.options`), ``--model-options`` and ``--sweep``
values, the ``kfac-adaptive`` spec, and solver specs and solver maps
(:class:`thermo_kfac.policy.SolverSpec`, ``KFACPreconditioner(solver="thermo:bits=8")``,
``solver_map="fc1=thermo:bits=8;.*=eigh"``). The library's own API takes typed keyword arguments;
it reads text only where a caller hands it a spec written as text, through this module. It
imports nothing of ``thermo_kfac``, so both the library and the experiments can use it.

The grammar:

- a **spec** is ``name`` or ``name:key=value,key=value`` (split at the first ``:``);
- a **key** may use ``-`` or ``_`` (``factor-dtype`` is ``factor_dtype``); a key given twice and
  an item without ``=`` or without a value are errors naming the item;
- a **value** is read by :func:`parse_value`: ``true``/``false`` (any case), ``none``/``null``,
  an int, a float, else the text (stripped); :func:`format_value` writes it back;
- a **dtype** is named as in :data:`hw_models.validation.DTYPES` (``float32``, ``float64``);
- a **solver map** is ``pattern=spec;pattern=spec`` or the path of a JSON file
  (:func:`parse_solver_map`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hw_models.validation import DTYPES, check_dtype

__all__ = ["DTYPES", "format_spec", "format_value", "parse_bool", "parse_dtype", "parse_items",
           "parse_optional_float", "parse_solver_map", "parse_spec", "parse_value", "split_spec"]


def parse_value(text: str) -> Any:
    """A value as int, float, bool, None or text (``"8"`` -> 8, ``"1e-3"`` -> 0.001, ``"True"`` ->
    True, ``"none"`` -> None, ``"chip"`` -> ``"chip"``)."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def format_value(value: Any) -> str:
    """A value as written in a spec (``none``, ``true``/``false``, ``8``, ``0.01``): the inverse of
    :func:`parse_value` for the values it returns."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_bool(value: Any) -> bool:
    """A switch: a bool, or ``1/true/yes/on`` and ``0/false/no/off`` (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def parse_optional_float(value: Any) -> float | None:
    """A number, or None for ``none``/``off``/``null``."""
    if value is None or str(value).strip().lower() in ("none", "off", "null"):
        return None
    return float(value)


def parse_dtype(name: str, value: Any, *, allow_none: bool = False) -> torch.dtype | None:
    """The torch dtype of option ``name`` given as a dtype or its name (:data:`DTYPES`); with
    ``allow_none``, ``None``/``"none"`` is None. Raises ``ValueError`` naming the valid names."""
    if allow_none and (value is None or (isinstance(value, str) and value.strip().lower() == "none")):
        return None
    return check_dtype(name, value.strip() if isinstance(value, str) else value)


def parse_items(text: str, context: str = "") -> dict[str, str]:
    """``"key=value,key=value"`` -> ``{key: value text}`` in order (keys with ``_`` for ``-``,
    values stripped, not parsed). Errors start with ``context`` (e.g. ``"solver spec 'x': "``)."""
    items: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise ValueError(f"{context}{item!r} is not key=value")
        if key in items:
            raise ValueError(f"{context}{key} is given twice")
        items[key] = value.strip()
    return items


def split_spec(text: str, context: str = "") -> tuple[str, dict[str, str]]:
    """``"name:key=value,..."`` -> ``(name, {key: value text})`` (the name stripped, values not
    parsed); see :func:`parse_items` for the errors."""
    name, _, rest = text.strip().partition(":")
    return name.strip(), parse_items(rest, context)


def parse_spec(text: str, context: str = "") -> tuple[str, dict[str, Any]]:
    """``"name:key=value,..."`` -> ``(name, {key: parse_value(value)})``."""
    name, items = split_spec(text, context)
    return name, {key: parse_value(value) for key, value in items.items()}


def format_spec(name: str, options: dict[str, Any]) -> str:
    """``(name, options)`` written as a spec: ``name`` or ``name:key=value,...``."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in options.items())


def parse_solver_map(text: str) -> list[tuple[str, Any]]:
    """``"pattern=spec;pattern=spec"`` or the path of a JSON file into ``[(pattern, spec), ...]``.

    In the text form each entry is split at its first ``=`` (a pattern cannot contain ``=``;
    its spec may, ``fc1=thermo:bits=8,analog_time=20``) and entries are separated by ``;``.
    The JSON file holds an object ``{pattern: spec}`` (in order) or a list of ``[pattern, spec]``
    pairs; a spec may be a string or an object ``{"solver": name, key: value}``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"solver map {text!r} is empty; use 'pattern=spec;pattern=spec' or a JSON file")
    stripped = text.strip()
    path = Path(stripped)
    if stripped.endswith(".json") or ("=" not in stripped and path.is_file()):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"solver map file {stripped!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"solver map file {stripped!r} is not valid JSON: {err}") from None
        if isinstance(data, dict):
            return list(data.items())
        if isinstance(data, list) and all(isinstance(p, list) and len(p) == 2 for p in data):
            return [(p[0], p[1]) for p in data]
        raise ValueError(f"solver map file {stripped!r} must hold an object {{pattern: spec}} or a "
                         "list of [pattern, spec] pairs")
    pairs = []
    for entry in filter(None, (e.strip() for e in stripped.split(";"))):
        pattern, sep, spec = entry.partition("=")
        if not sep or not pattern.strip() or not spec.strip():
            raise ValueError(f"solver map entry {entry!r} is not pattern=spec (entries are separated "
                             "by ';', e.g. 'fc1=thermo:bits=8;.*=eigh')")
        pairs.append((pattern.strip(), spec.strip()))
    return pairs
