"""Run the README's claim studies (a)-(c) and print the Markdown tables of docs/noise_study.md.

    python docs/gen_claim_tables.py --run            # run (or resume) the three studies, then print
    python docs/gen_claim_tables.py                  # print from the finished studies in runs/
    python docs/gen_claim_tables.py --runs DIR       # studies in DIR/repro-* instead of runs/

The commands are :data:`CLAIMS`, the same as the README's (a test checks that they agree); each
study resumes from its folder, so a second ``--run`` trains nothing. Every number in the tables
comes from the studies' ``study.json`` (mean over the seeds that did not diverge; diverged and
fallback counts as the study's table reports them), and the first line names the version and
commit that produced them, so the docs can say where their figures come from.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

# name -> (folder under --runs, noise-study arguments); the README's commands, word for word
CLAIMS: dict[str, tuple[str, list[str]]] = {
    "a": ("repro-quantization", [
        "--sweep", "bits=4,6,8,16", "--steps", "100", "--seeds", "3", "--threads", "1",
        "--optimizer", "kfac:solver=thermo,kappa0=1e-4,analog_time=1000,track_exact=true"]),
    "b": ("repro-analog-time", [
        "--sweep", "analog_time=0,1,5,20,50", "--references", "adam", "sgd", "kfac", "--steps", "100",
        "--seeds", "2", "--optimizer", "kfac:solver=thermo,warm_start=gradient,burn_in=0,kappa0=1e-3,"
        "track_exact=true", "--threads", "1"]),
    "c": ("repro-kappa0", [
        "--sweep", "kappa0=1e-3,1e-2,1e-1", "--sweep", "analog_time=1,50", "--steps", "100", "--seeds", "2",
        "--optimizer", "kfac:solver=thermo,warm_start=gradient,burn_in=0,track_exact=true",
        "--threads", "1"]),
}


def _num(stat: dict[str, Any] | None, fmt: str = ".3g") -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return format(stat["mean"], fmt)


def _status(entry: dict[str, Any]) -> str:
    notes = []
    if entry.get("diverged"):
        notes.append(f"{entry['diverged']}/{entry['n_seeds']} diverged")
    if entry.get("failed"):
        notes.append(f"{entry['failed']}/{entry['n_seeds']} failed")
    return "; ".join(notes)


def table_a(study: dict[str, Any]) -> str:
    """One line per method and bit width: losses, accuracy, direction, fallbacks."""
    lines = ["| run | train loss | test loss | test acc | cos to NG | rel. error | fallbacks | note |",
             "|---|---|---|---|---|---|---|---|"]
    for e in study["summary"]:
        acc = e["test_accuracy"]
        acc_text = "-" if acc["mean"] is None else f"{100 * acc['mean']:.1f} %"
        falls = e["fallbacks"]["mean"]
        lines.append(f"| {e['label']} | {_num(e['final_train_loss'])} | {_num(e['final_test_loss'])} | "
                     f"{acc_text} | {_num(e['cosine_to_exact'], '.3f')} | {_num(e['rel_error_to_exact'])} | "
                     f"{'' if not falls else f'{falls:.0f}'} | {_status(e)} |")
    return "\n".join(lines)


def table_b(study: dict[str, Any]) -> str:
    """Analog time across, direction and training loss down; the references below."""
    points = [e for e in study["summary"] if e["method"] == "thermo"]
    key = study["config"]["sweep_keys"][0]
    head = "| t (tau) | " + " | ".join(str(e["point"][key]) for e in points) + " |"
    rows = [head, "|---" * (len(points) + 1) + "|"]
    for title, metric, fmt in (("cos to NG", "cosine_to_exact", ".3f"),
                               ("rel. error to NG", "rel_error_to_exact", ".2f"),
                               ("train loss", "final_train_loss", ".2g")):
        rows.append(f"| {title} | " + " | ".join(_num(e[metric], fmt) + (f" ({_status(e)})" if _status(e)
                                                                        else "") for e in points) + " |")
    refs = ", ".join(f"{e['label']} {_num(e['final_train_loss'], '.2g')}" for e in study["summary"]
                     if e["method"] != "thermo")
    return "\n".join(rows) + f"\n\nReferences, train loss: {refs}."


def table_c(study: dict[str, Any]) -> str:
    """kappa0 across, analog time down: cosine / training loss per cell, diverged cells say so."""
    first, second = study["config"]["sweep_keys"][:2]
    grid = study["grid"]["sweeps"]
    cells = {json.dumps(e["point"], sort_keys=True): e for e in study["summary"] if e["method"] == "thermo"}
    rows = ["| cos to NG / train loss | " + " | ".join(f"{first} = {v}" for v in grid[first]) + " |",
            "|---" * (len(grid[first]) + 1) + "|"]
    for v2 in grid[second]:
        out = []
        for v1 in grid[first]:
            e = cells.get(json.dumps({first: v1, second: v2}, sort_keys=True))
            if e is None:
                out.append("-")
            elif e["diverged"] == e["n_seeds"]:
                out.append(f"**diverged** ({e['diverged']}/{e['n_seeds']} seeds)")
            else:
                text = f"{_num(e['cosine_to_exact'], '.3f')} / {_num(e['final_train_loss'])}"
                out.append(text + (f" ({_status(e)})" if _status(e) else ""))
        rows.append(f"| {second} = {v2} | " + " | ".join(out) + " |")
    return "\n".join(rows)


TABLES = {"a": table_a, "b": table_b, "c": table_c}


def provenance() -> str:
    """``thermo-kfac X (commit abc1234, 2026-12-07)``: where the figures come from."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("thermo-kfac")
    except PackageNotFoundError:
        release = "unknown version"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown commit"
    return f"thermo-kfac {release} (commit {commit}, {datetime.now(UTC):%Y-%m-%d})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(ROOT / "runs"), help="folder of the studies (default runs/)")
    parser.add_argument("--run", action="store_true", help="run (or resume) the studies first")
    parser.add_argument("--claims", default="abc", help="which claims (default abc)")
    args = parser.parse_args(argv)
    print(f"Generated by `python docs/gen_claim_tables.py` with {provenance()}.\n")
    for name in args.claims:
        folder, study_args = CLAIMS[name]
        out = Path(args.runs) / folder
        if args.run:
            from thermo_kfac import cli

            code = cli.main(["noise-study", *study_args, "--out", str(out), "--no-progress"])
            if code:
                return code
        path = out / "study.json"
        if not path.exists():
            print(f"({name}): no study in {out}; run with --run", file=sys.stderr)
            return 1
        print(f"({name}) `thermo-kfac noise-study {' '.join(study_args)}`\n")
        print(TABLES[name](json.loads(path.read_text())) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
