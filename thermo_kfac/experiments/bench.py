"""``thermo-kfac bench``: run every benchmark script and collect its targets into one report.

Each script in ``benchmarks/`` (files starting with ``_`` are helpers and are skipped) runs in its
own subprocess as ``python benchmarks/<name>.py [--quick] --out DIR/<name>.json``, one after the
other, each with a time limit. A script that crashes, times out or writes no JSON is recorded as
such and the run goes on. Every script's top-level ``"targets"`` dict follows one convention::

    {"<target name>": {"value": <float or null>, "target": "<= 1.5", "met": <bool>, "note": "..."}}

(:func:`target` builds an entry). The collected targets go to ``DIR/report.json`` and, as a
Markdown table with the exact command, date, host and git commit, to ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw_models.validation import check_positive
from thermo_kfac.experiments._io import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BENCH_DIR = REPO_ROOT / "benchmarks"
OPERATORS = ("<", "<=", ">", ">=")
REPORT_FORMAT = "thermo-kfac-bench/1"


def target(value: float | None, op: str, bound: float, note: str = "") -> dict[str, Any]:
    """One entry of a benchmark's ``"targets"`` dict: ``value op bound`` and whether it holds.

    A missing (``None``) or NaN value never meets its target.
    """
    if op not in OPERATORS:
        raise ValueError(f"op={op!r} is not valid; choose one of: {', '.join(OPERATORS)}")
    val = None if value is None else float(value)
    met = False
    if val is not None and not math.isnan(val):
        met = {"<": val < bound, "<=": val <= bound, ">": val > bound, ">=": val >= bound}[op]
    return {"value": val, "target": f"{op} {bound:g}", "met": bool(met), "note": note}


def discover(bench_dir: str | os.PathLike[str]) -> list[Path]:
    """The benchmark scripts of ``bench_dir``: ``*.py`` not starting with ``_``, sorted by name."""
    path = Path(bench_dir)
    if not path.is_dir():
        raise ValueError(f"benchmark directory {str(path)!r} does not exist; pass --bench-dir")
    return sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))


def check_targets(targets: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows ``{name, value, target, met, note}`` of a ``"targets"`` dict, and problems found."""
    if not isinstance(targets, dict):
        return [], [f"'targets' is {type(targets).__name__}, expected a dict"]
    rows, problems = [], []
    for name, entry in targets.items():
        if not isinstance(entry, dict) or not {"value", "target", "met"} <= set(entry):
            problems.append(f"target {name!r} lacks value/target/met")
            continue
        value = entry["value"]
        if value is not None and not isinstance(value, (int, float)):
            problems.append(f"target {name!r}: value {value!r} is not a number")
            value = None
        if not isinstance(entry["met"], bool):
            problems.append(f"target {name!r}: met {entry['met']!r} is not true/false")
        rows.append({"name": str(name), "value": value, "target": str(entry["target"]),
                     "met": entry["met"] is True, "note": str(entry.get("note", ""))})
    return rows, problems


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_script(script: Path, out_json: Path, *, quick: bool, timeout: float,
               python: str = sys.executable) -> dict[str, Any]:
    """Run one benchmark script in a subprocess; a record of how it went and its targets."""
    cmd = [python, str(script), *(["--quick"] if quick else []), "--out", str(out_json)]
    env = dict(os.environ)
    # the scripts import thermo_kfac/hw_models from this checkout, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("MPLBACKEND", "Agg")
    if out_json.exists():
        out_json.unlink()  # a stale file must not pass for this run's output
    record: dict[str, Any] = {"name": script.stem, "script": str(script), "command": shlex.join(cmd)}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        record.update(status="timeout", returncode=None, wall_s=time.perf_counter() - start,
                      error=f"no result within {timeout:g} s",
                      stderr_tail=_tail(err.stderr.decode() if isinstance(err.stderr, bytes)
                                        else (err.stderr or "")), targets=[])
        return record
    record["wall_s"] = time.perf_counter() - start
    record["returncode"] = proc.returncode
    record["stderr_tail"] = _tail(proc.stderr)
    report = None
    if out_json.exists():
        try:
            report = json.loads(out_json.read_text())
        except json.JSONDecodeError as err:
            record["error"] = f"{out_json.name} is not JSON ({err})"
    if proc.returncode != 0:
        record.update(status="failed", targets=[])
        record.setdefault("error", f"exit status {proc.returncode}")
        return record
    if not isinstance(report, dict):
        record.update(status="failed", targets=[])
        record.setdefault("error", f"wrote no JSON object to {out_json}")
        return record
    rows, problems = check_targets(report.get("targets", {}))
    record.update(status="ok", targets=rows, json=str(out_json))
    if "targets" not in report:
        problems.append("no 'targets' in the JSON")
    if problems:
        record["problems"] = problems
    return record


def _git_commit() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _fmt_value(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: how it was made, then one table row per target."""
    git = report["git"]
    commit = (git["commit"] or "unknown") + (" (uncommitted changes)" if git["dirty"] else "")
    lines = [
        "# Benchmark report",
        "",
        f"- command: `{report['command']}`",
        f"- date (UTC): {report['date']}",
        f"- host: {report['host']['node']} ({report['host']['platform']}, "
        f"{report['host']['cpu_count']} CPUs, load average {report['host']['load_average']})",
        f"- git commit: {commit}",
        f"- mode: {'--quick' if report['quick'] else 'full'}; total wall time "
        f"{report['total_wall_s']:.1f} s",
        f"- targets met: {report['summary']['met']} of {report['summary']['targets']}; scripts "
        f"failed: {len(report['summary']['failed'])} of {report['summary']['scripts']}",
        "",
        "| benchmark | target name | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for rec in report["benchmarks"]:
        for row in rec["targets"]:
            lines.append(f"| {rec['name']} | {_md_cell(row['name'])} | {_fmt_value(row['value'])} | "
                         f"{_md_cell(row['target'])} | {'yes' if row['met'] else 'NO'} |")
        if rec["status"] != "ok":
            lines.append(f"| {rec['name']} | (script {rec['status']}) | n/a | n/a | NO |")
        elif not rec["targets"]:
            lines.append(f"| {rec['name']} | (no targets) | n/a | n/a | n/a |")
    lines += ["", "## Scripts", "", "| benchmark | status | wall time (s) | JSON / error |",
              "|---|---|---|---|"]
    for rec in report["benchmarks"]:
        detail = rec.get("json") or rec.get("error", "")
        if rec.get("problems"):
            detail += "; " + "; ".join(rec["problems"])
        lines.append(f"| {rec['name']} | {rec['status']} | {rec['wall_s']:.1f} | {_md_cell(detail)} |")
    notes = [(rec["name"], row) for rec in report["benchmarks"] for row in rec["targets"] if row["note"]]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {name} / {row['name']}: {row['note']}" for name, row in notes]
    return "\n".join(lines) + "\n"


def run_bench(out_dir: str | os.PathLike[str], *, quick: bool = False, only: Sequence[str] | None = None,
              bench_dir: str | os.PathLike[str] = DEFAULT_BENCH_DIR, timeout: float | None = None,
              command: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark scripts, write ``report.json`` and ``report.md`` in ``out_dir``.

    ``only``: script names (without ``.py``) to run; ``timeout``: seconds per script (default
    300 with ``quick``, 3600 without).
    """
    scripts = discover(bench_dir)
    names = [s.stem for s in scripts]
    if not scripts:
        raise ValueError(f"no benchmark scripts (*.py not starting with '_') in {str(bench_dir)!r}")
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; choose from: "
                             f"{', '.join(names)}")
        scripts = [s for s in scripts if s.stem in set(only)]
    timeout = (300.0 if quick else 3600.0) if timeout is None else check_positive("timeout", timeout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    records = []
    start = time.perf_counter()
    bar = tqdm(scripts, desc="bench", unit="script", disable=not progress, file=sys.stderr)
    for script in bar:
        bar.set_postfix_str(script.stem)
        rec = run_script(script, out / f"{script.stem}.json", quick=quick, timeout=timeout)
        records.append(rec)
        met = sum(row["met"] for row in rec["targets"])
        if progress:
            bar.write(f"{script.stem}: {rec['status']} in {rec['wall_s']:.1f} s, "
                      f"{met}/{len(rec['targets'])} targets met"
                      + (f" ({rec['error']})" if rec.get("error") else ""))
    rows = [row for rec in records for row in rec["targets"]]
    report = {
        "format": REPORT_FORMAT,
        "command": command or shlex.join(["thermo-kfac", "bench", *(["--quick"] if quick else []),
                                          "--out", str(out_dir)]),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "host": {"node": platform.node(), "platform": platform.platform(),
                 "python": platform.python_version(), "cpu_count": os.cpu_count(),
                 "load_average": [round(x, 2) for x in os.getloadavg()]},
        "git": _git_commit(),
        "quick": quick,
        "timeout_s": timeout,
        "total_wall_s": time.perf_counter() - start,
        "summary": {"scripts": len(records), "targets": len(rows), "met": sum(r["met"] for r in rows),
                    "failed": [r["name"] for r in records if r["status"] != "ok"]},
        "benchmarks": records,
    }
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write(out / "report.md", markdown(report))
    return report


def run_cli(args: argparse.Namespace) -> int:
    argv = ["thermo-kfac", "bench", *(["--quick"] if args.quick else []), "--out", args.out]
    if args.only:
        argv += ["--only", *args.only]
    if args.timeout is not None:
        argv += ["--timeout", f"{args.timeout:g}"]
    report = run_bench(args.out, quick=args.quick, only=args.only, bench_dir=args.bench_dir,
                       timeout=args.timeout, command=shlex.join(argv))
    summary = report["summary"]
    print(markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'report.md'}: "
          f"{summary['met']}/{summary['targets']} targets met, "
          f"{len(summary['failed'])} of {summary['scripts']} scripts failed")
    # failures are recorded, not fatal to the run; the exit status still tells CI about them
    return 1 if summary["failed"] else 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="run every benchmark script and write a report of all targets",
        description="Run every benchmarks/*.py script (each in its own process, with --quick if "
                    "given and --out DIR/<name>.json), collect each script's 'targets' and write "
                    "DIR/report.json and DIR/report.md. A failing script is recorded and the run "
                    "goes on; the exit status is 1 if any script failed.")
    p.add_argument("--quick", action="store_true", help="pass --quick to every script (fast smoke "
                   "settings; the whole run takes a few minutes on 2 cores)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts (names "
                   "without .py)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per script (default 300 "
                   "with --quick, 3600 without)")
    p.add_argument("--bench-dir", default=str(DEFAULT_BENCH_DIR), help="directory of the "
                   "benchmark scripts (default: the checkout's benchmarks/)")
    p.set_defaults(func=run_cli)
