"""Co-design targets: the error law against the simulator, and the seed workloads' projected speed-ups.

Prints one JSON object (and writes it with ``--out``):

- ``law_vs_simulation``: 20 random SPD spectra (kappa 2..1e3, n 8..256, seeded), each solved by the
  simulator (``analytic`` and ``exact`` integrators) with many noise draws of one full-scale
  right-hand side, in a bias-dominated and a variance-dominated setting; ratio = measured RMS
  relative error / the law's prediction (hw_models.langevin.error_model). Target: every ratio in
  0.8-1.25.
- ``pricing_window``: the window :func:`hw_models.pricing.price` picks for a target eps, simulated
  on random full-scale right-hand sides; ratio = measured eps / target. Target 0.8-1.25.
- ``speedups``: ``vit-b16`` and ``gnn-molpcba`` under the default scenario and our reading of the
  seed paper (hw_models.projection): step and optimizer-update speed-ups over digital K-FAC,
  time to result against Adam, and the verdict.
- ``pricing_calls``: a small MLP (3 K-FAC layers) trained 12 steps with ``solver=thermo`` and
  with ``solver=auto``, inverse update every 4 steps; the calls of ``hw_models.pricing``'s
  ``price``/``price_program``/``price_digital`` are counted per step
  (:func:`hw_models.pricing.pricing_calls`). Target (``solver=thermo``): at most one ``price``
  call per layer and analog solve in any step (solves are priced once per prepare, programming
  once per update); ``auto`` adds its own decision, one ``price`` per layer and solve per update.

    python benchmarks/codesign.py [--quick] [--out result.json]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import hw_models as hm
from hw_models import projection
from hw_models.cost import Scenario
from hw_models.langevin import error_model
from hw_models.pricing import AnalogJob, SpectrumSummary, price
from thermo_kfac import KFACPreconditioner
from thermo_kfac.experiments.bench import target

from _report import emit


def spd(lam: np.ndarray, seed: int) -> np.ndarray:
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((lam.size, lam.size)))
    A = (Q * lam) @ Q.T
    return 0.5 * (A + A.T)


def spectra(count: int, seed: int = 14) -> list[tuple[int, float, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(round(math.exp(rng.uniform(math.log(8), math.log(256)))))
        kappa = float(math.exp(rng.uniform(math.log(2), math.log(1e3))))
        inner = np.exp(rng.uniform(-math.log(kappa), 0.0, size=n - 2))
        out.append((n, kappa, np.sort(np.concatenate([[1.0 / kappa], inner, [1.0]]))))
    return out


def law_vs_simulation(count: int, draws: int) -> dict:
    rng = np.random.default_rng(7)
    ratios: dict[str, list[float]] = {"analytic": [], "exact": []}
    for i, (n, kappa, lam) in enumerate(spectra(count)):
        A = spd(lam, i)
        lam_s, Q = np.linalg.eigh(A)
        b = rng.standard_normal(n)
        b /= np.abs(b).max()
        xs = np.linalg.solve(A, b)
        for burn, window, kappa0 in ((0.2 * kappa, 2.0 * kappa, 1e-4), (3.0 * kappa, 4.0 * kappa, 1e-2)):
            for integrator in ("analytic", "exact"):
                if integrator == "exact" and n * (burn + window) > 1e5:
                    continue
                cfg = hm.AnalogConfig(analog_time=window, burn_in=burn, kappa0=kappa0, integrator=integrator,
                                      dtype="float64", seed=100 + i,
                                      dt=0.25 if integrator == "exact" else "auto")
                res = hm.solve(A, np.repeat(b[:, None], draws, axis=1), cfg)
                mse = float(np.mean(np.sum((res.x - xs[:, None]) ** 2, axis=0)) / np.sum(xs**2))
                d = res.diagnostics
                law = error_model.solve_error(lam_s, window=d["averaging_time"], burn_in=d["burn_in"],
                                              kappa0=kappa0, rhs=Q.T @ b)
                ratios[integrator].append(math.sqrt(mse) / law.rel_error)
    flat = ratios["analytic"] + ratios["exact"]
    return {"spectra": count, "draws": draws,
            "cases": {k: len(v) for k, v in ratios.items()},
            "ratio": {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                      for k, v in ratios.items() if v},
            "min": min(flat), "max": max(flat)}


def pricing_window(cases: int) -> dict:
    device = hm.thermo_device("chip").replace(kappa0=1e-2)
    ratios = []
    rng = np.random.default_rng(0)
    for case in range(cases):
        n = int(rng.integers(8, 200))
        kappa = float(math.exp(rng.uniform(math.log(2), math.log(1e3))))
        A = spd(np.geomspace(1.0 / kappa, 1.0, n), case)
        spec = SpectrumSummary.from_matrix(A)
        for eps in (0.05, 0.2):
            priced = price(AnalogJob("solve", n, 256, spectrum=spec, target_eps=eps), device.ideal())
            B = np.random.default_rng(10 + case).standard_normal((n, 256))
            B = B / np.abs(B).max(axis=0) * priced.info["input_scale"]
            cfg = device.ideal().analog_config(analog_time=priced.window_tau, burn_in=priced.burn_in_tau,
                                       dtype="float64", seed=case)
            X = np.linalg.solve(A, B)
            err = math.sqrt(np.sum((hm.solve(A, B, cfg).x - X) ** 2) / np.sum(X**2))
            ratios.append(err / eps)
    return {"cases": len(ratios), "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def speedups() -> dict:
    out = {}
    for model in ("vit-b16", "gnn-molpcba"):
        work = hm.workload(model)
        base = Scenario(digital=hm.digital_device("h100"), thermo=hm.thermo_device("chip"))
        report = projection.paper_report(work, base)
        out[model] = {
            name: {"step_speedup_vs_digital_kfac": sc["verdict_metrics"]["step_speedup_vs_digital_kfac"],
                   "update_speedup_vs_digital_kfac": sc["verdict_metrics"]["update_speedup_vs_digital_kfac"],
                   "time_to_result_vs_adam": sc["verdict_metrics"]["time_to_result_vs_adam"],
                   "max_predicted_rel_error": sc["verdict_metrics"]["max_predicted_rel_error"],
                   "layers_on_thermo": sc["step"]["layers_on_thermo"], "layers": sc["step"]["layers"]}
            for name, sc in report["scenarios"].items()}
        out[model]["paper_claim_reproduced"] = report["reproduced"]
        out[model]["deciding_assumptions"] = report["deciding_assumptions"]
        out[model]["most_influential"] = report["most_influential"]
    return out


def pricing_calls(steps: int = 12) -> dict:
    out = {}
    for solver in ("thermo", "auto"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 48),
                                    torch.nn.ReLU(), torch.nn.Linear(48, 10))
        precond = KFACPreconditioner(model, solver=solver, inverse_update_every=4)
        layers = len(precond.layers)
        per_step = []
        for step in range(steps):
            x, y = torch.randn(128, 32), torch.randint(0, 10, (128,))
            model.zero_grad()
            out_ = model(x)
            precond.accumulate_curvature(out_)
            torch.nn.functional.cross_entropy(out_, y).backward()
            hm.pricing.reset_pricing_calls()
            precond.step()
            calls = hm.pricing.pricing_calls()
            per_step.append({"step": step, **calls})
        price_calls = [c.get("price", 0) / (2 * layers) for c in per_step]
        out[solver] = {"layers": layers, "solves_per_layer": 2, "per_step": per_step,
                       "max_price_calls_per_layer_and_solve": max(price_calls),
                       "mean_price_calls_per_layer_and_solve": statistics.mean(price_calls),
                       "total_calls_per_step": statistics.mean(sum(c.get(k, 0) for k in (
                           "price", "price_program", "price_digital")) for c in per_step)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 spectra, 24 draws, 2 pricing cases")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 2)
    start = time.perf_counter()
    law = law_vs_simulation(8 if args.quick else 20, 24 if args.quick else 48)
    window = pricing_window(2 if args.quick else 6)
    speed = speedups()
    calls = pricing_calls()
    report = {
        "benchmark": "codesign", "quick": args.quick,
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cores": os.cpu_count(),
                    "platform": platform.platform(), "threads": torch.get_num_threads()},
        "law_vs_simulation": law, "pricing_window": window, "speedups": speed, "pricing_calls": calls,
        "targets": {
            "law_vs_simulation_min_ratio": target(law["min"], ">=", 0.8, "measured / predicted RMS error"),
            "law_vs_simulation_max_ratio": target(law["max"], "<=", 1.25, "measured / predicted RMS error"),
            "pricing_window_min_ratio": target(window["min"], ">=", 0.8, "simulated eps / target eps"),
            "pricing_window_max_ratio": target(window["max"], "<=", 1.25, "simulated eps / target eps"),
            "vit_b16_paper_update_speedup": target(
                speed["vit-b16"]["paper"]["update_speedup_vs_digital_kfac"], ">=", projection.SUBSTANTIAL,
                "paper scenario, optimizer update only"),
            "gnn_molpcba_paper_update_speedup": target(
                speed["gnn-molpcba"]["paper"]["update_speedup_vs_digital_kfac"], ">=", projection.SUBSTANTIAL,
                "paper scenario, optimizer update only"),
            "pricing_calls_per_step": target(
                calls["thermo"]["max_price_calls_per_layer_and_solve"], "<=", 1.0,
                "most hw_models.pricing.price calls in one training step / (layers x 2 solves), "
                "solver=thermo; auto adds its decision (one price per layer and solve per update)"),
        },
        "seconds": time.perf_counter() - start,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
