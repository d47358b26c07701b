"""Solver back ends on Kronecker systems with realistic factor spectra: time and accuracy.

For each n, square-layer factors ``A``, ``G`` (n x n) are exponential moving averages (rho = 0.95,
40 batches of 128) of ``x^T x / b`` where the activations ``x`` have power-law singular values (the
fast spectral decay of averaged K-FAC factors). Each solver is prepared on the same float32 factors
with ``Damping(1e-3)`` (factored: ``sqrt(1e-3)`` per factor) and applied to two gradients: a
realistic one (``g^T a / b`` of a fresh batch) and a Gaussian one. The error is
``||X - X_exact|| / ||X_exact||`` against a float64 dense solve. Times are medians over repeats
(rounds interleave all solvers, order rotated each round) after a warm-up; ``prepare`` is the
per-update cost (factorization/sketch), ``apply`` the per-step cost; CG has no prepare and its
apply is a full solve to relative residual 1e-4 (cold start).

Factors from a real training run (``"trained"`` in the output): the MNIST-shaped auto-encoder
784-1000-500-250-30-...-784 is trained with K-FAC (eigh, EMA decay 0.95, damping 0.1, batch 250)
on the digits upsampled to 28x28 (``benchmarks/randomized_training.py``'s ``digits28``) for
``--train-steps`` steps; the solvers are then benchmarked the same way on the saved float32 factors
of a few layers (non-square: ``A`` is d_in+1, ``G`` d_out), with that layer's last gradient as the
realistic right-hand side and the damping of the training run.

    python benchmarks/solvers.py [--quick] [--repeats 5] [--train-steps 40] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from thermo_kfac import KFACPreconditioner
from thermo_kfac.experiments.bench import target
from thermo_kfac.models import mnist_autoencoder
from thermo_kfac.solvers import CholeskySolver, Damping, EighSolver
from thermo_kfac.solvers.cg import CGSolver
from thermo_kfac.solvers.randomized import (
    RandomizedSVDSolver,
    SymmetricRandomizedEighSolver,
    spectrum_decay,
)

from _report import emit

DAMPING = 1e-3
TRAIN_DAMPING = 0.1
TRAINED_LAYERS = ("encoder.1", "encoder.3", "decoder.6")  # (A, G) dims 785x1000, 1001x500, 1001x784


def realistic_factor(n: int, seed: int, batches: int = 40, batch: int = 128, rho: float = 0.95,
                     power: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA of ``x^T x / b`` over random batches with power-law activation spectrum; also returns
    a fresh batch ``x`` (for the realistic gradient)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    s = torch.arange(1, n + 1, dtype=torch.float32) ** (-power)
    mix = Q * s  # columns scaled: x = z @ mix^T has singular values ~ i^-power
    F = torch.zeros(n, n)
    for _ in range(batches):
        x = torch.randn(batch, n, generator=g) @ mix.T
        F.mul_(rho).add_(x.T @ x / batch, alpha=1 - rho)
    x = torch.randn(batch, n, generator=g) @ mix.T
    return F, x


def make_solvers(ranks: tuple[int, ...] = (64, 128, 256)) -> dict[str, object]:
    solvers: dict[str, object] = {"eigh": EighSolver(), "cholesky": CholeskySolver()}
    for r in ranks:
        solvers[f"rsvd_r{r}"] = RandomizedSVDSolver(rank=r, oversample=10, power_iters=3)
        solvers[f"sre_r{r}"] = SymmetricRandomizedEighSolver(rank=r, oversample=10, power_iters=3)
    solvers["cg_1e-4"] = CGSolver(tol=1e-4, max_iter=1000, warm_start=False)
    return solvers


def gemm_gflops(n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def summarize(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def bench_size(n: int, repeats: int, ranks: tuple[int, ...] = (64, 128, 256)) -> dict[str, object]:
    A, xa = realistic_factor(n, seed=n)
    G, xg = realistic_factor(n, seed=n + 1)
    return bench_factors(A, G, xg.T @ xa / xa.shape[0], Damping(DAMPING), repeats, ranks)


def trained_factors(steps: int, layers: tuple[str, ...] = TRAINED_LAYERS
                    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], dict]:
    """Train the MNIST-shaped auto-encoder with K-FAC on digits28; ``{layer: (A, G, grad)}``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from randomized_training import digits28

    data = digits28()
    torch.manual_seed(0)
    model = mnist_autoencoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    pre = KFACPreconditioner(model, loss="bce", damping=TRAIN_DAMPING, kl_clip=1.0, optimizer=opt,
                             factor_update_every=1, inverse_update_every=5)
    g = torch.Generator().manual_seed(0)
    x_all = data.x_train.flatten(1)
    losses = []
    grads: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for _ in range(steps):
        x = x_all[torch.randint(0, len(x_all), (250,), generator=g)]
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), x)
        loss.backward()
        losses.append(float(loss))
        grads = {k: torch.cat([modules[k].weight.grad, modules[k].bias.grad[:, None]], 1).clone()
                 for k in layers}
        pre.step()
        opt.step()
    factors = pre.factors()
    out = {k: (factors[k][0].clone(), factors[k][1].clone(), grads[k]) for k in layers}
    return out, {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}


def bench_factors(A: torch.Tensor, G: torch.Tensor, V_real: torch.Tensor, damping: Damping,
                  repeats: int, ranks: tuple[int, ...] = (64, 128, 256)) -> dict[str, object]:
    """Time/accuracy of every solver on ``(A, G)`` for ``V_real`` and a Gaussian gradient."""
    V_rand = torch.randn(V_real.shape, generator=torch.Generator().manual_seed(7))
    lam_a, lam_g = damping.split(A, G)
    A64 = A.double() + lam_a * torch.eye(A.shape[0], dtype=torch.float64)
    G64 = G.double() + lam_g * torch.eye(G.shape[0], dtype=torch.float64)
    exact = {k: torch.linalg.solve(A64, torch.linalg.solve(G64, V.double()).T).T
             for k, V in (("real", V_real), ("rand", V_rand))}
    solvers = make_solvers(ranks)
    names = list(solvers)
    prep: dict[str, list[float]] = {k: [] for k in names}
    appl: dict[str, list[float]] = {k: [] for k in names}
    errors: dict[str, dict[str, float]] = {}
    info: dict[str, object] = {}
    for rnd in range(repeats + 1):  # round 0 is the warm-up
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for k in order:
            s = solvers[k]
            t0 = time.perf_counter()
            s.prepare(A, G, damping)
            t1 = time.perf_counter()
            out = s.apply(V_real)
            t2 = time.perf_counter()
            if rnd == 0:
                out_rand = s.apply(V_rand)
                errors[k] = {
                    "real_grad": float((out.double() - exact["real"]).norm() / exact["real"].norm()),
                    "random_grad": float((out_rand.double() - exact["rand"]).norm()
                                         / exact["rand"].norm()),
                }
                if s.last_report is not None:
                    info[k] = s.last_report.info
                continue
            prep[k].append(t1 - t0)
            appl[k].append(t2 - t1)
    result: dict[str, object] = {
        "spectrum_decay_1e-3": {"A": spectrum_decay(A), "G": spectrum_decay(G)},
        "lambda_per_factor": [lam_a, lam_g],
        "prepare_s": {k: summarize(v) for k, v in prep.items()},
        "apply_s": {k: summarize(v) for k, v in appl.items()},
        "rel_error": errors,
        "info": {k: v for k, v in info.items() if k.startswith(("cg", "rsvd", "sre"))},
    }
    eig = statistics.median(prep["eigh"])
    result["speedup_prepare_vs_eigh"] = {k: eig / statistics.median(v) for k, v in prep.items()
                                         if k != "eigh" and not k.startswith("cg")}
    result["speedup_total_vs_eigh"] = {
        k: (eig + statistics.median(appl["eigh"])) / (statistics.median(prep[k])
                                                      + statistics.median(appl[k]))
        for k in names if k != "eigh"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {256, 512}, 2 repeats, ranks 64 and "
                        "128, 5 training steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=40,
                        help="K-FAC steps on the auto-encoder before saving its factors")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="synthetic factor sizes (default 256 512 1024 2048; --quick 256 512)")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    sizes = args.sizes or ([256, 512] if args.quick else [256, 512, 1024, 2048])
    repeats = 2 if args.quick else max(5, args.repeats)
    ranks = (64, 128) if args.quick else (64, 128, 256)
    train_steps = 5 if args.quick else args.train_steps
    trained_layers = TRAINED_LAYERS[1:2] if args.quick else TRAINED_LAYERS
    report: dict[str, object] = {
        "script": "benchmarks/solvers.py" + (" --quick" if args.quick else "")
        + (f" --train-steps {args.train_steps}" if args.train_steps != 40 and not args.quick else "")
        + (" --sizes " + " ".join(map(str, args.sizes)) if args.sizes else ""),
        "machine": {"threads": threads, "torch": torch.__version__, "python": sys.version.split()[0],
                    "platform": platform.platform()},
        "inputs": {"sizes": sizes, "repeats": repeats, "dtype": "float32", "damping": DAMPING,
                   "factors": "EMA(rho=0.95) of 40 batches of 128, activation singular values i^-1",
                   "randomized": {"oversample": 10, "power_iters": 3, "ranks": list(ranks)}},
        "trained_inputs": {"model": "mnist_autoencoder, BCE, digits upsampled to 28x28",
                           "kfac": f"eigh, damping {TRAIN_DAMPING}, EMA 0.95, batch 250, lr 0.3, "
                                   "momentum 0.9, kl_clip 1", "layers": list(trained_layers),
                           "damping": TRAIN_DAMPING},
        "gemm_gflops_n1024": gemm_gflops(1024),
        "sizes": {},
    }
    for n in sizes:
        report["sizes"][str(n)] = bench_size(n, repeats, ranks)
    layers, run_info = trained_factors(train_steps, trained_layers) if train_steps else ({}, {})
    report["trained"] = {"run": run_info, "layers": {}}  # --train-steps 0: skipped
    for name, (A, G, V) in layers.items():
        entry = {"A_dim": A.shape[0], "G_dim": G.shape[0]}
        entry.update(bench_factors(A, G, V, Damping(TRAIN_DAMPING), repeats, ranks))
        report["trained"]["layers"][name] = entry
    if 2048 in sizes:
        r = report["sizes"]["2048"]
        best = "sre_r128" if r["prepare_s"]["sre_r128"]["median"] <= r["prepare_s"]["rsvd_r128"]["median"] \
            else "rsvd_r128"
        report["target"] = {
            "rule": "randomized rank-128 at n=2048: prepare >= 5x faster than eigh, rel. error < 5%",
            "solver": best,
            "speedup": r["speedup_prepare_vs_eigh"][best],
            "rel_error_real_grad": r["rel_error"][best]["real_grad"],
            "met": bool(r["speedup_prepare_vs_eigh"][best] >= 5
                        and r["rel_error"][best]["real_grad"] < 0.05),
        }
    # the target is defined at n = 2048; a --quick run evaluates it at its largest n
    n_t = str(max(sizes))
    r = report["sizes"][n_t]
    best = min(("sre_r128", "rsvd_r128"), key=lambda k: r["prepare_s"][k]["median"])
    note = f"{best} at n={n_t}" + ("" if n_t == "2048" else " (--quick; the target is set at n=2048)")
    report["targets"] = {
        "randomized_r128_prepare_speedup_vs_eigh": target(r["speedup_prepare_vs_eigh"][best], ">=", 5,
                                                          note),
        "randomized_r128_rel_error_real_grad": target(r["rel_error"][best]["real_grad"], "<", 0.05, note),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
