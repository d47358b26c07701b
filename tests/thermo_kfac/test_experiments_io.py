"""experiments/_io.py: atomic writes, JSON conversion, tables, seconds, the CLI list parsers."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat

import pytest

from thermo_kfac.experiments._io import (
    atomic_write,
    float_list,
    format_seconds,
    int_list,
    jsonable,
    kv_list,
    text_table,
    widths_list,
)


def test_atomic_write_text_bytes_and_callback(tmp_path):
    path = tmp_path / "new" / "a.txt"  # the folder is created
    assert atomic_write(path, "one\r\ntwo\n") == path
    assert path.read_bytes() == b"one\r\ntwo\n"  # text is written as given (newline="")
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(path, lambda f: f.write("from a writer"))
    assert path.read_text() == "from a writer"
    atomic_write(path, lambda f: f.write(b"\x89PNG"), binary=True)
    assert path.read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]  # no temporary file left


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")

    def dies(f):
        f.write("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_jsonable_replaces_non_finite_numbers_recursively():
    value = {"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": "x", "d": None, "e": 3}
    converted = jsonable(value)
    assert converted == {"a": None, "b": [1.0, None, [2, None]], "c": "x", "d": None, "e": 3}
    json.dumps(converted, allow_nan=False)  # strict JSON accepts it
    assert value["a"] != value["a"]  # the input is left alone


def test_text_table_aligns_columns():
    text = text_table(["name", "n", "t"], [["a", 1, "2 ms"], ["long name", 100, "-"]])
    assert text.splitlines() == ["name         n     t",
                                 "---------  ---  ----",
                                 "a            1  2 ms",
                                 "long name  100     -"]
    assert text_table(["x", "y"], [["1", "2"]], align="rl").splitlines()[2] == "1  2"


@pytest.mark.parametrize("seconds,text", [(2.5, "2.5 s"), (0.0125, "12.5 ms"), (3.2e-6, "3.2 us"),
                                          (4e-9, "4 ns"), (0.0, "0 ns"), (-0.002, "-2 ms"),
                                          (None, "-"), (math.nan, "-"), (math.inf, "-")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_list_parsers():
    assert int_list("8, 16,64") == [8, 16, 64]
    assert int_list("0,1", low=0) == [0, 1]
    for bad, low in (("8,x", None), ("", None), ("0,1", 1)):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad, low=low)
    assert float_list("0.1,1e2") == [0.1, 100.0]
    with pytest.raises(argparse.ArgumentTypeError, match="list of numbers"):
        float_list("a")
    assert widths_list("128,64") == widths_list("128-64") == (128, 64)
    for bad in ("0,4", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            widths_list(bad)
    assert kv_list("channels=32, hidden-size=1e-3,act=relu,flag=true") == {
        "channels": 32, "hidden_size": 1e-3, "act": "relu", "flag": True}
    with pytest.raises(argparse.ArgumentTypeError, match="'oops' is not key=value"):
        kv_list("a=1,oops")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_the_mode_of_an_ordinary_open_under_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        reference = tmp_path / "plain.txt"
        with open(reference, "w") as handle:  # what the user's umask gives an ordinary file
            handle.write("x")
        for name, content in (("a.json", "{}"), ("b.png", b"\x89PNG")):
            atomic_write(tmp_path / name, content)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
        assert stat.S_IMODE(reference.stat().st_mode) == 0o666 & ~umask
    finally:
        os.umask(previous)
