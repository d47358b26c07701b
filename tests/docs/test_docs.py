"""The documentation stays true: generated reference current, CLI reference complete, examples run,
links resolve."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import hw_models
from thermo_kfac import KFACPreconditioner
from thermo_kfac.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    # a fresh interpreter: examples register solvers and adapters, which must not leak into other
    # tests, and the generator must see only the package's own solvers
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["MPLBACKEND"] = "Agg"
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_configuration_reference_is_current() -> None:
    proc = _run([str(DOCS / "gen_config_reference.py"), "--check"])
    assert proc.returncode == 0, (
        "docs/configuration.md is stale; regenerate it with `python docs/gen_config_reference.py`\n"
        + proc.stderr)


def test_configuration_reference_lists_every_option() -> None:
    text = (DOCS / "configuration.md").read_text()
    names = [n for n in inspect.signature(KFACPreconditioner.__init__).parameters if n != "self"]
    for cls in (hw_models.AnalogConfig, hw_models.NoiseConfig, hw_models.ThermoDevice,
                hw_models.DigitalDevice):
        names += [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if f"| `{n}` |" not in text]
    assert not missing, f"options missing from docs/configuration.md: {missing}"
    for preset in hw_models.THERMO_PRESETS:
        assert f"#### `{preset}`" in text


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_cli_reference_documents_every_command_and_option() -> None:
    text = (DOCS / "cli.md").read_text()
    commands = _subcommands()
    assert {"train", "compare", "calibrate", "project", "bench"} <= set(commands)
    for name, sub in commands.items():
        assert f"thermo-kfac {name}" in text, f"docs/cli.md does not document `thermo-kfac {name}`"
        flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
        missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)]
        assert not missing, f"docs/cli.md lacks options of `thermo-kfac {name}`: {missing}"


def _python_blocks(path: Path) -> str:
    return "\n\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.parametrize("page", ["extending.md", "user_guide.md"])
def test_documented_examples_run(page: str) -> None:
    code = _python_blocks(DOCS / page)
    assert code.strip(), f"docs/{page} has no python example"
    proc = _run(["-c", code])
    assert proc.returncode == 0, f"an example in docs/{page} failed:\n{proc.stderr[-3000:]}"


def test_extending_examples_check_their_results() -> None:
    # the examples assert against independent references; make sure those checks are there
    code = _python_blocks(DOCS / "extending.md")
    assert code.count("assert ") >= 8
    assert "@register_solver" in code and "ADAPTERS[" in code and "ThermoDevice(" in code


@pytest.mark.parametrize("page", ["README.md", *sorted(p.name for p in DOCS.glob("*.md"))])
def test_relative_links_resolve(page: str) -> None:
    path = REPO / page if page == "README.md" else DOCS / page
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{page}: broken link {target}"
