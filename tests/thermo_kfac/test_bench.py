"""``thermo-kfac bench``: discovery, subprocess runs, failure records and the JSON/Markdown report."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from thermo_kfac.cli import main as cli_main
from thermo_kfac.experiments import bench

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"

PASSING = textwrap.dedent('''
    """A fake benchmark that meets one target and misses another."""
    import argparse, json
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    a = p.parse_args()
    size = 10 if a.quick else 1000
    report = {"benchmark": "fast", "quick": a.quick, "size": size, "targets": {
        "speed_ratio": {"value": 1.25, "target": "<= 1.5", "met": True, "note": "x | y"},
        "accuracy": {"value": 0.2, "target": ">= 0.9", "met": False, "note": ""}}}
    text = json.dumps(report)
    print(text)
    open(a.out, "w").write(text)
''')

CRASHING = textwrap.dedent('''
    import sys
    print("about to fail", file=sys.stderr)
    raise RuntimeError("boom: the fake benchmark crashed")
''')


@pytest.fixture()
def fake_benchmarks(tmp_path: Path) -> Path:
    d = tmp_path / "benchmarks"
    d.mkdir()
    (d / "fast.py").write_text(PASSING)
    (d / "broken.py").write_text(CRASHING)
    (d / "_helper.py").write_text("raise SystemExit('helpers must not run')\n")
    return d


def test_target_entry_semantics() -> None:
    assert bench.target(1.2, "<=", 1.5, "n") == {"value": 1.2, "target": "<= 1.5", "met": True,
                                                  "note": "n"}
    assert bench.target(1.5, "<", 1.5)["met"] is False
    assert bench.target(50.0, ">=", 50)["met"] is True
    assert bench.target(None, ">", 1.0) == {"value": None, "target": "> 1", "met": False, "note": ""}
    assert bench.target(math.nan, "<", 1.0)["met"] is False
    with pytest.raises(ValueError, match="'=='.*<, <=, >, >="):
        bench.target(1.0, "==", 1.0)


def test_check_targets_flags_malformed_entries() -> None:
    rows, problems = bench.check_targets({"good": {"value": 2, "target": "> 1", "met": True},
                                          "bare_bool": True,
                                          "text_value": {"value": "fast", "target": "x", "met": 1}})
    assert [r["name"] for r in rows] == ["good", "text_value"]
    assert rows[0]["value"] == 2 and rows[0]["met"] is True
    assert rows[1]["value"] is None and rows[1]["met"] is False
    assert len(problems) == 3
    assert bench.check_targets([1, 2])[1] == ["'targets' is list, expected a dict"]


def test_bench_report_records_pass_and_failure(fake_benchmarks: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        code = cli_main(["bench", "--quick", "--out", str(out), "--bench-dir", str(fake_benchmarks)])
    assert code == 1  # a script failed: recorded, the run went on, the status says so
    report = json.loads((out / "report.json").read_text())
    assert report["quick"] is True
    assert report["command"].startswith("thermo-kfac bench --quick --out ")
    names = [r["name"] for r in report["benchmarks"]]
    assert names == ["broken", "fast"]  # sorted, _helper skipped
    broken, fast = report["benchmarks"]
    assert broken["status"] == "failed" and broken["returncode"] != 0
    assert "boom: the fake benchmark crashed" in broken["stderr_tail"]
    assert broken["targets"] == []
    assert fast["status"] == "ok" and fast["returncode"] == 0
    # the script really ran in quick mode and wrote its JSON where bench told it to
    fast_json = json.loads((out / "fast.json").read_text())
    assert fast_json["quick"] is True and fast_json["size"] == 10
    assert [(t["name"], t["value"], t["target"], t["met"]) for t in fast["targets"]] == [
        ("speed_ratio", 1.25, "<= 1.5", True), ("accuracy", 0.2, ">= 0.9", False)]
    assert report["summary"] == {"scripts": 2, "targets": 2, "met": 1, "failed": ["broken"]}
    assert report["git"]["commit"] is None or len(report["git"]["commit"]) == 40

    md = (out / "report.md").read_text()
    assert f"`{report['command']}`" in md
    assert report["date"] in md
    assert "| fast | speed_ratio | 1.25 | <= 1.5 | yes |" in md
    assert "| fast | accuracy | 0.2 | >= 0.9 | NO |" in md
    assert "| broken | (script failed) | n/a | n/a | NO |" in md
    assert "- fast / speed_ratio: x | y" in md  # notes are listed under the table
    assert "1 of 2" in md and md in stdout.getvalue()


def test_bench_only_and_unknown_names(fake_benchmarks: Path, tmp_path: Path) -> None:
    out = tmp_path / "only"
    report = bench.run_bench(out, only=["fast"], bench_dir=fake_benchmarks, progress=False)
    assert [r["name"] for r in report["benchmarks"]] == ["fast"]
    assert report["quick"] is False
    assert json.loads((out / "fast.json").read_text())["size"] == 1000  # no --quick passed
    with pytest.raises(ValueError, match="unknown benchmark.*'nope'.*broken, fast"):
        bench.run_bench(out, only=["nope"], bench_dir=fake_benchmarks, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        bench.run_bench(out, bench_dir=tmp_path / "missing", progress=False)


def test_bench_timeout_is_recorded(tmp_path: Path) -> None:
    d = tmp_path / "b"
    d.mkdir()
    (d / "slow.py").write_text("import time\ntime.sleep(30)\n")
    report = bench.run_bench(tmp_path / "o", bench_dir=d, timeout=1.0, progress=False)
    rec = report["benchmarks"][0]
    assert rec["status"] == "timeout" and rec["wall_s"] < 20
    assert report["summary"]["failed"] == ["slow"]


def _load_script(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_bench_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", bench.discover(BENCH_DIR), ids=lambda p: p.stem)
def test_every_real_benchmark_accepts_quick_and_out(script: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # --help only: argparse prints and exits before any work is done
    module = _load_script(script, monkeypatch)
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])  # main() or main(argv=None) parse it
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "--quick" in stdout.getvalue() and "--out" in stdout.getvalue()
