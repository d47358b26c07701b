"""The one option grammar (``thermo_kfac.grammar``) and the one dtype-name map
(``hw_models.validation.DTYPES``): every text reader of the project gives the same values and the
same errors for the same text."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from hw_models.langevin import AnalogConfig
from hw_models.validation import DTYPES, check_dtype
from thermo_kfac.experiments._io import kv_list
from thermo_kfac.experiments.training.options import (
    FACTOR_DTYPES,
    parse_adaptive_options,
    parse_optimizer_spec,
)
from thermo_kfac.grammar import (
    format_spec,
    format_value,
    parse_dtype,
    parse_items,
    parse_spec,
    parse_value,
    split_spec,
)
from thermo_kfac.policy import SolverSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, expected", [
    ("8", 8), (" -3 ", -3), ("1e-3", 1e-3), ("0.25", 0.25), ("True", True), ("false", False),
    ("none", None), ("NULL", None), (" chip ", "chip"), ("float64", "float64"), ("inf", float("inf")),
])
def test_parse_value(text: str, expected: object) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("value", [8, 0.01, True, False, None, "analytic", -2.5e-07])
def test_format_value_is_the_inverse_of_parse_value(value: object) -> None:
    text = format_value(value)
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_specs_split_and_round_trip() -> None:
    assert split_spec(" thermo : bits=8, analog-time = 20 ") == ("thermo", {"bits": "8", "analog_time": "20"})
    name, options = parse_spec("thermo:bits=8,ideal=true,kappa0=none,integrator=analytic")
    assert (name, options) == ("thermo", {"bits": 8, "ideal": True, "kappa0": None, "integrator": "analytic"})
    assert parse_spec(format_spec(name, options)) == (name, options)
    assert format_spec("eigh", {}) == "eigh" and parse_spec("eigh") == ("eigh", {})
    assert parse_items("") == {} and parse_items("a=1,,b=x,") == {"a": "1", "b": "x"}


@pytest.mark.parametrize("items, message", [
    ("bits", "'bits' is not key=value"),
    ("bits=", "'bits=' is not key=value"),
    ("=3", "'=3' is not key=value"),
    ("bits=8,bits=6", "bits is given twice"),
    ("analog-time=1,analog_time=2", "analog_time is given twice"),
])
def test_every_reader_reports_the_same_errors(items: str, message: str) -> None:
    # the CLI's optimizer specs, solver specs (library), kfac-adaptive options and --model-options
    # all read key=value items with the one grammar, so a bad item is reported alike
    readers = [
        lambda: parse_optimizer_spec(f"kfac:{items}"),
        lambda: SolverSpec.parse(f"thermo:{items}"),
        lambda: parse_adaptive_options(items),
        lambda: parse_items(items),
    ]
    for read in readers:
        with pytest.raises(ValueError, match=message):
            read()
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        kv_list(items)


def test_readers_give_the_same_values() -> None:
    text = "bits=8,analog_time=2.5,ideal=false,kappa0=none,integrator=analytic"
    expected = dict(parse_spec(f"thermo:{text}")[1])
    assert SolverSpec.parse(f"thermo:{text}").options == expected
    assert parse_optimizer_spec(f"kfac:{text}").solver_options == expected
    assert parse_adaptive_options(text)["solver_options"] == expected
    assert kv_list(text) == expected


def test_adaptive_options_are_typed_keyword_arguments() -> None:
    kwargs = parse_adaptive_options({"lr": "auto", "momentum": "0.5", "loss_dtype": "none",
                                     "factor_dtype": "float64", "curvature_examples": "none", "rank": 4})
    assert kwargs == {"lr": None, "momentum": 0.5, "loss_dtype": None, "factor_dtype": torch.float64,
                      "curvature_examples": None, "solver_options": {"rank": 4}}
    assert parse_adaptive_options("loss-dtype=float32")["loss_dtype"] is torch.float32
    assert parse_adaptive_options(None) == {}


def test_one_dtype_map() -> None:
    assert DTYPES == {"float32": torch.float32, "float64": torch.float64}
    for name, dtype in DTYPES.items():
        assert check_dtype("dtype", name) is dtype and check_dtype("dtype", dtype) is dtype
        assert parse_dtype("x", f" {name} ") is dtype
        assert AnalogConfig(dtype=name).dtype is dtype  # the simulator reads the same map
    assert FACTOR_DTYPES == DTYPES  # the preconditioner takes both
    assert parse_dtype("loss_dtype", "None", allow_none=True) is None
    for bad in ("float16", torch.float16, "torch.float32", None):
        with pytest.raises(ValueError, match=r"is not valid; choose one of: 'float32', 'float64'"):
            check_dtype("dtype", bad)
    with pytest.raises(ValueError, match="dtype='float16' is not valid"):
        AnalogConfig(dtype="float16")
    with pytest.raises(ValueError, match="factor_dtype='float16' is not valid"):
        parse_adaptive_options("factor_dtype=float16")


def _dtype_name_maps(path: Path) -> list[int]:
    """Lines of dict literals in ``path`` mapping a dtype's name to something (``{"float32": ...}``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict) and any(
                isinstance(k, ast.Constant) and k.value in ("float32", "float64") for k in node.keys):
            lines.append(node.lineno)
    return lines


def test_no_second_dtype_name_map() -> None:
    found = {str(p.relative_to(ROOT)): _dtype_name_maps(p)
             for package in ("thermo_kfac", "hw_models") for p in sorted((ROOT / package).rglob("*.py"))}
    found = {path: lines for path, lines in found.items() if lines}
    assert list(found) == ["hw_models/validation.py"] and len(found["hw_models/validation.py"]) == 1
