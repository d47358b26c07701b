"""``thermo-kfac placement``: makespan of distributed K-FAC's solve phase under a placement rule.

For a network's layer-shape table (:mod:`hw_models.workloads`) and a cluster of ``P`` ranks, each
with one digital device and ``k`` thermodynamic solver units, every layer's solve (both factors)
is assigned to one rank by :func:`thermo_kfac.distributed.assign_layers`, round-robin or
balanced (longest processing time first), with the predicted times of :mod:`hw_models.cost`.
The makespan is the time until the last rank has finished its solves (broadcasts excluded).
``lower_bound_s`` is ``max(longest single solve, total work / machines)`` at each task's fastest
time, a bound no placement can beat.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.validation import check_choice, check_positive
from hw_models.workloads import WORKLOADS, workload
from thermo_kfac.distributed import (
    ASSIGNMENT_RULES,
    DIGITAL_SOLVE_METHODS,
    GRANULARITIES,
    assign_layers,
    layer_solve_tasks,
)
from thermo_kfac.experiments._io import atomic_write, int_list


def simulate(models: Sequence[str] = ("resnet50",), ranks: Sequence[int] = (8, 16, 64),
             analog_units: Sequence[int] = (0,), *, digital: str = DEFAULT_DIGITAL,
             thermo: str = DEFAULT_THERMO, method: str = "eigh", kappa: float = DEFAULT_KAPPA,
             eps: float = DEFAULT_EPS,
             bits: int | None = None, granularity: str = "factor") -> dict[str, Any]:
    """Round-robin vs balanced makespan for every model, rank count and analog units per rank."""
    if not models or not ranks or not analog_units:
        raise ValueError("give at least one model, one rank count and one analog-unit count")
    rows = []
    for name in models:
        check_choice("model", name, WORKLOADS)
        work = workload(name)
        tasks = layer_solve_tasks([(layer.name, *layer.factor_sizes) for layer in work.layers],
                                  digital=digital, thermo=thermo, method=method, kappa=kappa, eps=eps,
                                  bits=bits, granularity=granularity, analog_method="inverse")
        serial = sum(t.digital_s for t in tasks)
        for p in ranks:
            check_positive("ranks", p, integer=True)
            for k in analog_units:
                plans = {rule: assign_layers(tasks, p, rule=rule, analog_units_per_rank=k)
                         for rule in ASSIGNMENT_RULES}
                fastest = [min(t.digital_s, t.analog_s) if k > 0 else t.digital_s for t in tasks]
                bound = max(max(fastest), sum(fastest) / (p * (1 + k)))
                rr, bal = plans["round_robin"].makespan_s, plans["balanced"].makespan_s
                rows.append({
                    "model": name, "layers": len(work.layers), "tasks": len(tasks), "ranks": p,
                    "analog_units_per_rank": k,
                    "round_robin_s": rr, "balanced_s": bal, "speedup": rr / bal,
                    "lower_bound_s": bound, "serial_digital_s": serial,
                    "analog_tasks": sum(1 for r in plans["balanced"].resources.values() if r != "digital"),
                    "idle_ranks": sum(1 for s in plans["balanced"].rank_seconds if s == 0.0),
                })
    return {"command": "placement",
            "assumptions": {"digital": digital, "thermo": thermo, "method": method, "kappa": kappa,
                            "eps": eps, "bits": bits, "granularity": granularity,
                            "task": "one factor (granularity factor) or both factors of a layer: "
                                    "decomposition (digital) or sampling inverse (analog); "
                                    "broadcasts excluded"},
            "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    head = (f"{'model':<12}{'ranks':>6}{'k':>3}{'round-robin ms':>16}{'balanced ms':>13}"
            f"{'speedup':>9}{'bound ms':>10}{'analog':>8}{'idle':>6}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(f"{r['model']:<12}{r['ranks']:>6}{r['analog_units_per_rank']:>3}"
                     f"{1e3 * r['round_robin_s']:>16.3f}{1e3 * r['balanced_s']:>13.3f}"
                     f"{r['speedup']:>9.2f}{1e3 * r['lower_bound_s']:>10.3f}{r['analog_tasks']:>8}"
                     f"{r['idle_ranks']:>6}")
    a = result["assumptions"]
    lines.append(f"solve phase only; digital {a['digital']} ({a['method']}), analog units: {a['thermo']} "
                 f"at kappa {a['kappa']:g}, eps {a['eps']:g}; {a['granularity']} tasks; k = analog units "
                 "per rank, analog = tasks on analog units, idle = ranks without a task (balanced)")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """``result`` as indented JSON, written atomically."""
    atomic_write(path, json.dumps(result, indent=1) + "\n")


def write_plot(result: dict[str, Any], path: str | Path) -> None:
    """Makespan vs ranks, one panel per model, round-robin dashed and balanced solid per k."""
    from thermo_kfac.experiments._plotting import agg_pyplot

    plt = agg_pyplot()  # files only: matplotlib's backend and pyplot are left alone

    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    units = sorted({r["analog_units_per_rank"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for i, k in enumerate(units):
            rows = sorted((r for r in result["rows"] if r["model"] == model
                           and r["analog_units_per_rank"] == k), key=lambda r: r["ranks"])
            x = [r["ranks"] for r in rows]
            color = f"C{i}"
            ax.plot(x, [1e3 * r["round_robin_s"] for r in rows], "--o", color=color,
                    label=f"round-robin, k={k}")
            ax.plot(x, [1e3 * r["balanced_s"] for r in rows], "-s", color=color, label=f"balanced, k={k}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks")
        ax.set_ylabel("solve-phase makespan (ms)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()

    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"), binary=True)
    finally:
        plt.close(fig)


def run_placement(args: argparse.Namespace) -> int:
    models = [m for m in args.model.split(",") if m]
    for p in args.ranks:
        check_positive("--ranks", p, integer=True)
    for k in args.analog_units:
        check_positive("--analog-units", k, integer=True, allow_zero=True)
    if not (math.isfinite(args.kappa) and math.isfinite(args.eps)):
        raise ValueError("--kappa and --eps must be finite")
    result = simulate(models, args.ranks, args.analog_units, digital=args.digital, thermo=args.thermo,
                      method=args.method, kappa=args.kappa, eps=args.eps, granularity=args.granularity)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``placement`` sub-command."""
    parser = subparsers.add_parser(
        "placement", help="simulate the solve-phase makespan of distributed K-FAC placements",
        description="For each model, rank count and number of analog units per rank: the makespan of "
                    "K-FAC's solve phase with round-robin and with cost-balanced (LPT) placement, from "
                    "the hw_models cost model. Table on the terminal; --json and --plot for files.")
    parser.add_argument("--model", default="resnet50", metavar="NAME[,NAME...]",
                        help=f"layer tables: {', '.join(WORKLOADS)} (default resnet50)")
    parser.add_argument("--ranks", type=int_list, default=[8, 16, 64], metavar="P,P,...",
                        help="rank counts (default 8,16,64)")
    parser.add_argument("--analog-units", type=int_list, default=[0], metavar="K,K,...",
                        help="thermodynamic solver units per rank (default 0)")
    parser.add_argument("--digital", default=DEFAULT_DIGITAL,
                        help=f"digital preset of every rank (default {DEFAULT_DIGITAL})")
    parser.add_argument("--thermo", default=DEFAULT_THERMO,
                        help=f"thermodynamic preset of an analog unit (default {DEFAULT_THERMO})")
    parser.add_argument("--method", default="eigh", choices=DIGITAL_SOLVE_METHODS,
                        help="digital decomposition (default eigh)")
    parser.add_argument("--granularity", default="factor", choices=GRANULARITIES,
                        help="factor: 2L tasks, one per Kronecker factor (as SPD-KFAC); layer: one per "
                             "layer, as thermo-kfac train places them (default factor)")
    parser.add_argument("--kappa", type=float, default=DEFAULT_KAPPA,
                        help=f"condition number for analog times ({DEFAULT_KAPPA:g})")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS,
                        help=f"analog accuracy target ({DEFAULT_EPS:g})")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write a PNG plot")
    parser.set_defaults(func=run_placement)
