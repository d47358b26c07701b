"""Generate ``docs/configuration.md`` from the code: signatures, dataclass fields and docstrings.

    python docs/gen_config_reference.py            # rewrite docs/configuration.md
    python docs/gen_config_reference.py --check    # exit 1 if the checked-in file is stale

Everything in the reference comes from the objects themselves (``inspect.signature``,
``dataclasses.fields``, the ``Args:`` / ``Attributes:`` / ``Fields:`` sections of docstrings, the
preset functions' docstrings), so the page cannot drift from the code: the test suite runs
``--check``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"
SECTION_HEADERS = ("Args:", "Attributes:", "Fields:")


def rst_to_md(text: str) -> str:
    """Sphinx roles and double backticks as plain Markdown code spans."""
    text = re.sub(r":(?:meth|func|class|data|mod|attr|obj):`~?([^`]+)`", r"``\1``", text)
    return text.replace("``", "`")


def _dedent_doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def doc_intro(obj: Any) -> str:
    """The docstring up to its first ``Args:``/``Attributes:``/``Fields:`` section."""
    lines = []
    for line in _dedent_doc(obj).splitlines():
        if line.strip() in SECTION_HEADERS:
            break
        lines.append(line)
    return rst_to_md("\n".join(lines).strip())


def doc_entries(obj: Any) -> dict[str, str]:
    """Per-name descriptions from a Google-style section or a ``- ``name``: text`` bullet list.

    ``a, b: text`` documents both names.
    """
    doc = _dedent_doc(obj)
    entries: dict[str, str] = {}
    lines = doc.splitlines()
    in_section = False
    current: list[str] = []
    names: list[str] = []

    def flush() -> None:
        if names:
            text = " ".join(part.strip() for part in current).strip()
            for name in names:
                entries[name] = text

    for line in lines:
        stripped = line.strip()
        if stripped in SECTION_HEADERS:
            in_section = True
            continue
        if not in_section:
            continue
        bullet = re.match(r"^- (``[^`]+``(?:\s*/\s*``[^`]+``)*)\s*:\s*(.*)$", stripped)
        google = re.match(r"^([A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_]\w*)*)\s*:\s*(.*)$", stripped)
        indent = len(line) - len(line.lstrip())
        if bullet:
            flush()
            names = re.findall(r"``([^`]+)``", bullet.group(1))
            current = [bullet.group(2)]
        elif google and indent <= 4 and not stripped.startswith("-"):
            flush()
            names = [n.strip() for n in google.group(1).split(",")]
            current = [google.group(2)]
        elif stripped == "":
            if names and not current[-1:] == [""]:
                current.append("")
        else:
            current.append(stripped)
    flush()
    return {k: rst_to_md(re.sub(r"\s+", " ", v).strip()) for k, v in entries.items()}


def class_entries(cls: type) -> dict[str, str]:
    """:func:`doc_entries` of ``cls`` and its bases (a subclass may document only what differs)."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object:
            merged.update(doc_entries(klass))
    return merged


def preset_doc(factory: Callable[..., Any]) -> str:
    return rst_to_md(inspect.cleandoc(factory.__doc__ or ""))


def fmt_default(value: Any) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"`{type(value).__name__}()`"
    if isinstance(value, type):
        return f"`{value.__name__}`"
    text = repr(value)
    if text.startswith("torch."):
        return f"`{text}`"
    return f"`{text}`"


def fmt_annotation(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return f"`{text}`"


def fill_blanks(names: list[str], descriptions: dict[str, str]) -> dict[str, str]:
    """A name documented inside another name's entry gets "see `other`"."""
    out = {}
    for name in names:
        text = descriptions.get(name, "")
        if not text:
            for other, other_text in descriptions.items():
                if other != name and f"`{name}`" in other_text:
                    text = f"see `{other}`"
                    break
        out[name] = text
    return out


def md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def signature_table(func: Callable[..., Any], descriptions: dict[str, str]) -> str:
    params = {k: v for k, v in inspect.signature(func).parameters.items() if k != "self"}
    descriptions = fill_blanks(list(params), descriptions)
    if not any(descriptions.values()):  # documented in the prose above the table
        rows = ["| option | type | default |", "|---|---|---|"]
        for name, param in params.items():
            star = {param.VAR_KEYWORD: "**", param.VAR_POSITIONAL: "*"}.get(param.kind, "")
            default = "" if star else fmt_default(param.default)
            kind = md_cell(fmt_annotation(param.annotation))
            rows.append(f"| `{star}{name}` | {kind} | {md_cell(default)} |")
        return "\n".join(rows)
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for name, param in params.items():
        label = f"`{name}`"
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            label = f"`**{name}`"
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            label = f"`*{name}`"
        variadic = param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
        default = "" if variadic else fmt_default(param.default)
        rows.append(f"| {label} | {md_cell(fmt_annotation(param.annotation))} | {md_cell(default)} | "
                    f"{md_cell(descriptions.get(name, ''))} |")
    return "\n".join(rows)


def dataclass_table(cls: type, descriptions: dict[str, str]) -> str:
    descriptions = fill_blanks([f.name for f in dataclasses.fields(cls)], descriptions)
    with_meaning = any(descriptions.values())
    rows = (["| field | type | default | meaning |", "|---|---|---|---|"] if with_meaning
            else ["| field | type | default |", "|---|---|---|"])
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = fmt_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = fmt_default(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        row = f"| `{f.name}` | {md_cell(fmt_annotation(f.type))} | {md_cell(default)} |"
        rows.append(row + (f" {md_cell(descriptions.get(f.name, ''))} |" if with_meaning else ""))
    return "\n".join(rows)


def preset_table(presets: dict[str, Any], fields: list[str]) -> str:
    names = list(presets)
    rows = ["| field | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|" + "---|" * len(names)]
    first = presets[names[0]]
    paths: list[tuple[str, ...]] = []
    for field in fields:  # a nested dataclass (a device's noise, an op model) gets a row per field
        value = getattr(first, field)
        if dataclasses.is_dataclass(value):
            paths += [(field, f.name) for f in dataclasses.fields(value)]
        else:
            paths.append((field,))
    for path in paths:
        cells = []
        for name in names:
            value = presets[name]
            for part in path:
                value = getattr(value, part)
            if isinstance(value, float):
                value = f"{value:g}"
            cells.append(md_cell(str(value)))
        rows.append(f"| `{'.'.join(path)}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def generate() -> str:
    sys.path.insert(0, str(ROOT))
    import hw_models
    from hw_models import devices
    from thermo_kfac import KFACPreconditioner, available_solvers
    from thermo_kfac.solvers import ThermodynamicSolver
    from thermo_kfac.solvers.base import _REGISTRY

    parts = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python docs/gen_config_reference.py` from the code's signatures, dataclass "
        "fields and docstrings. Do not edit by hand: change the docstring and regenerate "
        "(tests/docs/test_docs.py fails when this file is stale). -->",
        "",
        "Every option of the objects a user configures, with its default. Bad values raise a "
        "`ValueError` naming the value and the allowed ones. Concepts: [user_guide.md](user_guide.md); "
        "command-line flags: [cli.md](cli.md).",
        "",
        "- [`thermo_kfac.KFACPreconditioner`](#thermo_kfackfacpreconditioner)",
        "- [Solvers](#solvers) and [`ThermodynamicSolver`](#thermodynamicsolver-thermo)",
        "- [`hw_models.AnalogConfig`](#hw_modelsanalogconfig)",
        "- [`hw_models.NoiseConfig`](#hw_modelsnoiseconfig)",
        "- [Device presets](#device-presets): `ThermoDevice`, `DigitalDevice`",
        "",
        "## `thermo_kfac.KFACPreconditioner`",
        "",
        doc_intro(KFACPreconditioner),
        "",
        signature_table(KFACPreconditioner.__init__, doc_entries(KFACPreconditioner)),
        "",
        "## Solvers",
        "",
        "`KFACPreconditioner(solver=NAME, solver_options={...})` builds one solver per layer from the "
        "registry; `solver_options` are the keyword arguments of the solver's class. Registered names: "
        + ", ".join(f"`{n}`" for n in available_solvers()) + ". The digital back ends and their "
        "options are explained in [solvers.md](solvers.md); how to add one: [extending.md](extending.md).",
        "",
    ]
    for name in available_solvers():
        cls = _REGISTRY[name]
        if cls is ThermodynamicSolver:
            continue
        parts += [f"### `{name}`: `{cls.__module__}.{cls.__name__}`", "", doc_intro(cls), "",
                  signature_table(cls.__init__, class_entries(cls)), ""]
    parts += [
        "### `ThermodynamicSolver` (`\"thermo\"`)",
        "",
        doc_intro(ThermodynamicSolver),
        "",
        signature_table(ThermodynamicSolver.__init__, doc_entries(ThermodynamicSolver)),
        "",
        "`**noise` takes any field of [`hw_models.NoiseConfig`](#hw_modelsnoiseconfig) by name.",
        "",
        "## `hw_models.AnalogConfig`",
        "",
        doc_intro(hw_models.AnalogConfig),
        "",
        dataclass_table(hw_models.AnalogConfig, doc_entries(hw_models.AnalogConfig)),
        "",
        "## `hw_models.NoiseConfig`",
        "",
        doc_intro(hw_models.NoiseConfig),
        "",
        dataclass_table(hw_models.NoiseConfig, doc_entries(hw_models.NoiseConfig)),
        "",
        "## Device presets",
        "",
        "### Thermodynamic devices: `hw_models.ThermoDevice`",
        "",
        doc_intro(hw_models.ThermoDevice),
        "",
        dataclass_table(hw_models.ThermoDevice, doc_entries(hw_models.ThermoDevice)),
        "",
        "`hw_models.thermo_device(name, **overrides)` returns a preset, with any field overridden. The "
        "presets' values:",
        "",
    ]
    thermo = {name: hw_models.thermo_device(name) for name in hw_models.THERMO_PRESETS}
    parts += [preset_table(thermo, [f.name for f in dataclasses.fields(hw_models.ThermoDevice)
                                    if f.name not in ("name", "description")]), ""]
    for name in hw_models.THERMO_PRESETS:
        factory = getattr(devices, f"_{name}")
        parts += [f"#### `{name}`", "", preset_doc(factory), ""]
    digital = {"cpu (fallback)": devices._cpu_fallback(), "a100": hw_models.digital_device("a100"),
               "h100": hw_models.digital_device("h100")}
    parts += [
        "### Digital devices: `hw_models.DigitalDevice`",
        "",
        doc_intro(hw_models.DigitalDevice),
        "",
        "Each operation (`gemm`, `cholesky`, `eigh`, `inverse`) has an `OpModel(eff_max, n_half, "
        "latency_s)`: " + doc_intro(devices.OpModel),
        "",
        dataclass_table(hw_models.DigitalDevice, doc_entries(hw_models.DigitalDevice)),
        "",
        "`hw_models.digital_device(name)` returns a preset (" + ", ".join(
            f"`{n}`" for n in hw_models.DIGITAL_PRESETS) + "); `cpu` is read from the calibration file "
        "that `thermo-kfac calibrate` writes, else the fallback below; `cuda` needs a calibration. "
        "The presets' values:",
        "",
        preset_table(digital, [f.name for f in dataclasses.fields(hw_models.DigitalDevice)
                               if f.name not in ("name", "source")]),
        "",
    ]
    for label, factory in (("cpu (fallback)", devices._cpu_fallback), ("a100", devices._a100),
                           ("h100", devices._h100)):
        parts += [f"#### `{label}`", "", preset_doc(factory), ""]
    text = "\n".join(parts)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return textwrap.dedent(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is stale")
    parser.add_argument("--out", default=str(OUT), help="where to write (default: docs/configuration.md)")
    args = parser.parse_args(argv)
    text = generate()
    out = Path(args.out)
    if args.check:
        current = out.read_text() if out.exists() else ""
        if current != text:
            print(f"{out} is stale: run `python docs/gen_config_reference.py`", file=sys.stderr)
            return 1
        return 0
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
