"""The README's claim commands are the ones docs/gen_claim_tables.py runs, and its tables report
what the studies hold (diverged points as diverged, not as a huge mean)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

from thermo_kfac.cli import build_parser
from thermo_kfac.experiments.noise_study import summarize

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_claim_tables", REPO / "docs" / "gen_claim_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_commands() -> dict[str, list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Reproducing published claims", 1)[1].split("\n## ", 1)[0]
    commands = {}
    for name, body in re.findall(r"# \(([abc])\)[^\n]*\n(.*?)(?=\n\s*#|\n\n)", section, flags=re.S):
        commands[name] = shlex.split(body.replace("\\\n", " "))
    return commands


def _parsed(argv: list[str]) -> dict:
    args = vars(build_parser().parse_args(argv))
    return {k: v for k, v in args.items() if k not in ("out", "func")}


def test_readme_claim_commands_are_the_generators():
    readme = _readme_commands()
    claims = _generator().CLAIMS
    assert sorted(readme) == sorted(claims) == ["a", "b", "c"]
    for name, (folder, args) in claims.items():
        words = readme[name]
        assert words[:2] == ["thermo-kfac", "noise-study"]
        assert words[words.index("--out") + 1] == f"runs/{folder}"
        assert _parsed(words[1:]) == _parsed(["noise-study", *args]), f"claim ({name}) differs"


def _entry_rows():
    rows = []
    for seed in (0, 1):
        for k, t in ((1e-3, 50), (1e-1, 50)):
            bad = k == 1e-1
            rows.append({"method": "thermo", "label": f"thermo kappa0={k},analog_time={t}",
                         "point": {"kappa0": k, "analog_time": t}, "seed": seed, "steps": 30 if bad else 100,
                         "final_train_loss": 4e21 if bad else 1.2e-4, "diverged": bad, "error": None,
                         "cosine_to_exact": 0.2 if bad else 0.97, "curve": [[0, 2.3, 2.3]]})
    return rows


def test_tables_mark_diverged_points_and_report_the_healthy_means():
    rows = _entry_rows()
    grid = {"kappa0": [1e-3, 1e-1], "analog_time": [50]}
    study = {"config": {"sweep_keys": list(grid)}, "grid": {"sweeps": grid}, "rows": rows,
             "summary": summarize(rows, list(grid))}
    table = _generator().table_c(study)
    assert "| analog_time = 50 | 0.970 / 0.00012 | **diverged** (2/2 seeds) |" in table
    assert "e+21" not in table


def test_generator_reports_a_missing_study(tmp_path, capsys):
    assert _generator().main(["--runs", str(tmp_path), "--claims", "c"]) == 1
    assert "no study in" in capsys.readouterr().err
