"""Speed of the Langevin simulator (hw_models.langevin) against the host's own limits.

Prints one JSON object (and writes it with ``--out``). Every figure is measured in this process;
the things compared are interleaved round by round (A B A B ...) and every ratio is taken within
a round, then summarised by its median, min and max over the rounds.

Sections (float32 unless ``--dtype float64``):

- ``euler_step``: time of one Euler-Maruyama step with m = n right-hand sides, torch and numba
  backends, against the host floor = time of the same-shape GEMM (``torch.mm``) + time to draw
  the same number of Gaussians (``Tensor.normal_``). Target: torch step <= 1.25 x floor for
  n >= 256.
- ``throughput_d512``: samples x d^2 per second at d = 512 against one-vector-at-a-time exact
  samplers: a thermox-like torch loop (3 matrix-vector products per sample, as thermox's
  eigenbasis transition) and, when ``thermox`` and JAX are importable (they are not project
  dependencies), thermox's own jitted ``sample`` (``lax.scan`` and associative scan). Target:
  >= 50 x against thermox's sequential (``lax.scan``) sampler, the issue's anchor (against the
  torch loop when thermox is absent); the other references are reported beside it.
- ``analytic_vs_eigh``: a full ``hw_models.solve(..., integrator="analytic")`` call (m = n
  right-hand sides, and m = 1) against ``torch.linalg.eigh`` of the same matrix. Target <= 2 x.
- ``small_batches``: 256 systems of n = 32 (m = 32 and m = 1): per-step time of the numba and
  torch Euler-Maruyama kernels. Target: numba at least as fast as torch.

    python benchmarks/simulator.py [--quick] [--rounds 7] [--dtype float32] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

import hw_models as hm
from hw_models.langevin import backends, torch_backend
from thermo_kfac.experiments.bench import target

from _report import emit


def spd(n: int, seed: int, dtype: torch.dtype, cond: float = 100.0) -> torch.Tensor:
    """Random SPD matrix with eigenvalues log-spaced in [1/cond, 1] (Wishart eigenbasis)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(-np.log10(cond), 0, n, dtype=torch.float64)
    A = (Q * lam) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


PARK_S = 0.05


def interleave(cases: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every case once per round, in order; each case returns its own time per unit.

    Before each timed block the process sleeps ``PARK_S`` (untimed): torch and numba each have
    their own OpenMP pool whose workers busy-wait for a while after a parallel region, and
    without the pause one case's spinning workers would tax the next case.
    """
    for fn in cases.values():  # warm-up: JIT, allocator, caches
        fn()
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            time.sleep(PARK_S)
            out[name].append(fn())
    return out


def per_unit(fn: Callable[[], None], units: int) -> Callable[[], float]:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / units

    return run


def calibrate(fn: Callable[[int], None], budget: float, lo: int = 3, hi: int = 10_000) -> int:
    """Repetitions of ``fn(reps)`` that take about ``budget`` seconds."""
    fn(lo)
    t0 = time.perf_counter()
    fn(lo)
    dt = (time.perf_counter() - t0) / lo
    return int(min(hi, max(lo, budget / max(dt, 1e-9))))


def ratio_summary(num: list[float], *dens: list[float]) -> dict[str, float]:
    return summary([a / sum(d[i] for d in dens) for i, a in enumerate(num)])


# ---------------------------------------------------------------------------------------------


def euler_step(sizes: list[int], dtype: torch.dtype, rounds: int, budget: float) -> dict:
    return {str(n): euler_step_one(n, dtype, rounds, budget) for n in sizes}


def euler_step_one(n: int, dtype: torch.dtype, rounds: int, budget: float) -> dict:
    nb_backend = backends.NumbaBackend(1, torch.device("cpu"))
    A = spd(n, n, dtype)[None]
    P = torch.eye(n, dtype=dtype) - 0.01 * A[0]
    B = torch.randn(1, n, n, dtype=dtype)
    X = torch.randn(n, n, dtype=dtype)
    out = torch.empty_like(X)
    noise = torch.empty_like(X)
    gen = torch.Generator().manual_seed(0)
    kw = {"dt": 0.01, "kappa0": 0.01, "n_burn": 0, "underdamped": False, "mass": 1.0,
          "friction": 1.0}

    def gemm(reps: int) -> None:
        for _ in range(reps):
            torch.mm(P, X, out=out)

    def gauss(reps: int) -> None:
        for _ in range(reps):
            noise.normal_(generator=gen)

    def torch_steps(reps: int) -> None:
        torch_backend.euler_mean(A, B, X[None], n_avg=reps, generator=gen, **kw)

    def numba_steps(reps: int) -> None:
        nb_backend.euler_mean(A, B, X[None], n_avg=reps, **kw)

    funcs = {"gemm": gemm, "gaussians": gauss, "torch_step": torch_steps,
             "numba_step": numba_steps}
    reps = {k: calibrate(f, budget) for k, f in funcs.items()}
    raw = interleave({k: per_unit(lambda f=f, r=reps[k]: f(r), reps[k])
                      for k, f in funcs.items()}, rounds)
    res = {
        "m": n,
        "seconds": {k: summary(v) for k, v in raw.items()},
        "steps_per_block": reps,
        "gemm_gflops": 2 * n**3 / statistics.median(raw["gemm"]) / 1e9,
        "gaussians_per_s": n * n / statistics.median(raw["gaussians"]),
        "torch_over_floor": ratio_summary(raw["torch_step"], raw["gemm"], raw["gaussians"]),
        "numba_over_floor": ratio_summary(raw["numba_step"], raw["gemm"], raw["gaussians"]),
    }
    res["target_torch_le_1.25x_floor"] = (
        None if n < 256 else res["torch_over_floor"]["median"] <= 1.25)
    return res


def throughput(d: int, dtype: torch.dtype, rounds: int, budget: float) -> dict:
    """Samples x d^2 per second: one-vector-at-a-time exact sampler vs the batched simulator."""
    A = spd(d, 7, dtype)
    lam, Q = torch.linalg.eigh(A.double())
    h = 0.5
    a = torch.exp(-lam * h).to(dtype)
    sd = torch.sqrt(0.01 / lam * -torch.expm1(-2 * lam * h)).to(dtype)
    Qf, Qinv = Q.to(dtype), Q.T.contiguous().to(dtype)
    b = torch.randn(d, dtype=dtype)
    xstar = torch.linalg.solve(A, b)
    gen = torch.Generator().manual_seed(0)
    m = d
    B = b[:, None].repeat(1, m)[None].contiguous()
    X0 = torch.zeros_like(B)
    nb_backend = backends.NumbaBackend(2, torch.device("cpu"))
    kw = {"kappa0": 0.01, "n_burn": 0, "underdamped": False, "mass": 1.0, "friction": 1.0}
    coef = np.stack([np.exp(-lam.numpy() * h), sd.double().numpy()], axis=-1)[None]
    U0 = torch.zeros(1, d, m, dtype=dtype)

    def sequential(reps: int) -> None:
        # thermox-like: x <- x* + Q (a * Q^-1 (x - x*)) + Q (sd * z), one vector per step
        x = torch.zeros(d, dtype=dtype)
        for _ in range(reps):
            z = torch.randn(d, generator=gen, dtype=dtype)
            x = xstar + Qf @ (a * (Qinv @ (x - xstar))) + Qf @ (sd * z)

    def torch_euler(reps: int) -> None:
        torch_backend.euler_mean(A[None], B, X0, dt=0.01, n_avg=reps, generator=gen, **kw)

    def numba_euler(reps: int) -> None:
        nb_backend.euler_mean(A[None], B, X0, dt=0.01, n_avg=reps, **kw)

    def torch_exact(reps: int) -> None:
        torch_backend.eig_mean(coef, coef, U0, n_avg=reps, underdamped=False, generator=gen)

    def numba_exact(reps: int) -> None:
        nb_backend.eig_mean(coef, coef, U0, n_avg=reps, underdamped=False)

    funcs = {"sequential": sequential, "torch_euler": torch_euler, "numba_euler": numba_euler,
             "torch_exact_eigenbasis": torch_exact, "numba_exact_eigenbasis": numba_exact}
    samples_per_call = {"sequential": 1, "torch_euler": m, "numba_euler": m,
                        "torch_exact_eigenbasis": m, "numba_exact_eigenbasis": m}
    references = ["sequential"]
    thermox_funcs = _thermox_samplers(A.double().numpy(), b.double().numpy(), h, 0.01)
    for name, fn in thermox_funcs.items():
        funcs[name] = fn
        samples_per_call[name] = 1
        references.append(name)
    reps = {k: calibrate(f, budget, hi=200_000) for k, f in funcs.items()}
    raw = interleave({k: per_unit(lambda f=f, r=reps[k]: f(r), reps[k] * samples_per_call[k])
                      for k, f in funcs.items()}, rounds)  # seconds per sample
    rate = {k: d * d / statistics.median(v) for k, v in raw.items()}
    ours = [k for k in raw if k not in references]
    res = {
        "d": d, "m_columns": m,
        "references": references,
        "thermox_measured": bool(thermox_funcs),
        "seconds_per_sample": {k: summary(v) for k, v in raw.items()},
        "samples_per_s": {k: 1.0 / statistics.median(v) for k, v in raw.items()},
        "samples_x_d2_per_s": rate,
        "speedup": {ref: {k: ratio_summary(raw[ref], raw[k]) for k in ours} for ref in references},
    }
    # the anchor: thermox sampling sequentially, one vector at a time (lax.scan); the
    # associative scan (a parallel prefix) and the torch loop are reported beside it
    anchor = "thermox_scan" if "thermox_scan" in raw else "sequential"
    res["target_anchor"] = anchor
    res["target_ge_50x"] = {k: v["median"] >= 50 for k, v in res["speedup"][anchor].items()}
    return res


def _thermox_samplers(A: np.ndarray, b: np.ndarray, h: float, kappa0: float) -> dict:
    """thermox's own exact sampler (one vector per step), if thermox and JAX are installed.

    ``thermox.sample`` with preprocessed matrices (the O(d^3) set-up is not timed), jitted, with
    ``lax.scan`` (``associative_scan=False``: one vector at a time) and with its associative scan.
    Returns ``{}`` when thermox is not importable (it is not a project dependency).
    """
    try:
        import jax
        import jax.numpy as jnp
        import thermox
    except ImportError:
        return {}
    d = A.shape[0]
    A_j = jnp.asarray(A, dtype=jnp.float32)
    D_j = 2.0 * kappa0 * jnp.eye(d, dtype=jnp.float32)
    b_j = jnp.asarray(b, dtype=jnp.float32)
    A_p, D_p = thermox.preprocess(A_j, D_j)
    x0 = jnp.zeros(d, dtype=jnp.float32)
    cache: dict = {}

    def make(assoc: bool) -> Callable[[int], None]:
        def run(reps: int) -> None:
            key = (assoc, reps)
            if key not in cache:
                ts = jnp.arange(reps + 1, dtype=jnp.float32) * h
                cache[key] = jax.jit(lambda k: thermox.sample(k, ts, x0, A_p, b_j, D_p,
                                                              associative_scan=assoc))
                cache[key](jax.random.PRNGKey(0)).block_until_ready()  # compile, untimed
            cache[key](jax.random.PRNGKey(reps)).block_until_ready()

        return run

    return {"thermox_scan": make(False), "thermox_associative_scan": make(True)}


def analytic_vs_eigh(sizes: list[int], dtype: torch.dtype, rounds: int, budget: float) -> dict:
    return {str(n): analytic_vs_eigh_one(n, dtype, rounds, budget) for n in sizes}


def analytic_vs_eigh_one(n: int, dtype: torch.dtype, rounds: int, budget: float) -> dict:
    A = spd(n, 3 * n, dtype)
    Bm = torch.randn(n, n, dtype=dtype)
    bv = torch.randn(n, dtype=dtype)
    cfg = hm.AnalogConfig(analog_time=100.0, burn_in=10.0, integrator="analytic", seed=0)

    def eigh(reps: int) -> None:
        for _ in range(reps):
            torch.linalg.eigh(A)

    def analytic_matrix(reps: int) -> None:
        for _ in range(reps):
            hm.solve(A, Bm, cfg)

    def analytic_vector(reps: int) -> None:
        for _ in range(reps):
            hm.solve(A, bv, cfg)

    funcs = {"eigh": eigh, "analytic_m_eq_n": analytic_matrix, "analytic_m_1": analytic_vector}
    reps = {k: calibrate(f, budget, lo=1, hi=100) for k, f in funcs.items()}
    raw = interleave({k: per_unit(lambda f=f, r=reps[k]: f(r), reps[k])
                      for k, f in funcs.items()}, rounds)
    res = {
        "seconds": {k: summary(v) for k, v in raw.items()},
        "analytic_m_eq_n_over_eigh": ratio_summary(raw["analytic_m_eq_n"], raw["eigh"]),
        "analytic_m_1_over_eigh": ratio_summary(raw["analytic_m_1"], raw["eigh"]),
    }
    res["target_le_2x"] = res["analytic_m_eq_n_over_eigh"]["median"] <= 2.0
    return res


def small_batches(k: int, n: int, ms: list[int], dtype: torch.dtype, rounds: int,
                  budget: float) -> dict:
    A = torch.stack([spd(n, 11 + i, dtype) for i in range(k)])
    results = {f"m={m}": small_batches_one(A, m, rounds, budget) for m in ms}
    return {"systems": k, "n": n, **results}


def small_batches_one(A: torch.Tensor, m: int, rounds: int, budget: float) -> dict:
    k, n, _ = A.shape
    nb_backend = backends.NumbaBackend(3, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    kw = {"dt": 0.01, "kappa0": 0.01, "n_burn": 0, "underdamped": False, "mass": 1.0,
          "friction": 1.0}
    B = torch.randn(k, n, m, dtype=A.dtype)
    X0 = torch.zeros_like(B)

    def torch_steps(reps: int) -> None:
        torch_backend.euler_mean(A, B, X0, n_avg=reps, generator=gen, **kw)

    def numba_steps(reps: int) -> None:
        nb_backend.euler_mean(A, B, X0, n_avg=reps, **kw)

    funcs = {"torch_step": torch_steps, "numba_step": numba_steps}
    reps = {key: calibrate(f, budget) for key, f in funcs.items()}
    raw = interleave({key: per_unit(lambda f=f, r=reps[key]: f(r), reps[key])
                      for key, f in funcs.items()}, rounds)
    res = {
        "seconds_per_step": {key: summary(v) for key, v in raw.items()},
        "torch_over_numba": ratio_summary(raw["torch_step"], raw["numba_step"]),
    }
    res["target_numba_ge_torch"] = res["torch_over_numba"]["median"] >= 1.0
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (>= 5)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    dtype = getattr(torch, args.dtype)
    rounds = args.rounds or (5 if args.quick else 7)
    budget = 0.03 if args.quick else 0.12
    t0 = time.time()
    report = {
        "benchmark": "simulator",
        "command": " ".join(["python", "benchmarks/simulator.py", *(argv or sys.argv[1:])]),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "numba_threads": numba.get_num_threads(),
                    "numba_threading_layer": numba.config.THREADING_LAYER,
                    "torch": torch.__version__, "numba": numba.__version__,
                    "numpy": np.__version__, "python": platform.python_version(),
                    "platform": platform.platform(), "processor": platform.processor()},
        "load_average_at_start": list(os.getloadavg()),
        "settings": {"quick": args.quick, "rounds": rounds, "dtype": args.dtype,
                     "block_budget_s": budget, "pause_before_block_s": PARK_S},
    }
    sizes = [64, 256] if args.quick else [64, 256, 512, 1024]
    report["euler_step"] = euler_step(sizes, dtype, rounds, budget)
    report["throughput_d512"] = throughput(128 if args.quick else 512, dtype, rounds, budget)
    report["analytic_vs_eigh"] = analytic_vs_eigh([256] if args.quick else [256, 512, 1024],
                                                  dtype, rounds, budget)
    report["small_batches"] = small_batches(64 if args.quick else 256, 32, [32, 1], dtype, rounds,
                                            budget)
    big = {n: v for n, v in report["euler_step"].items() if v["target_torch_le_1.25x_floor"] is not None}
    thr = report["throughput_d512"]
    anchor = thr["target_anchor"]
    targets = {
        "torch_euler_step_over_floor_n_ge_256": target(
            max(v["torch_over_floor"]["median"] for v in big.values()), "<=", 1.25,
            f"worst median over n in {sorted(big, key=int)}; floor = same-shape GEMM + Gaussians"),
    }
    for key, ratio in thr["speedup"][anchor].items():
        targets[f"throughput_{key}_over_{anchor}"] = target(
            ratio["median"], ">=", 50, f"samples x d^2 per second at d={thr['d']}; anchor {anchor}"
            + ("" if thr["thermox_measured"] else " (thermox not installed: torch one-vector loop)"))
    targets["analytic_solve_over_eigh"] = target(
        max(v["analytic_m_eq_n_over_eigh"]["median"] for v in report["analytic_vs_eigh"].values()),
        "<=", 2.0, f"worst median over n in {list(report['analytic_vs_eigh'])}, m = n right-hand sides")
    for key, v in report["small_batches"].items():
        if key.startswith("m="):
            targets[f"small_batches_torch_over_numba_{key.replace('=', '')}"] = target(
                v["torch_over_numba"]["median"], ">=", 1.0,
                f"{report['small_batches']['systems']} systems of n={report['small_batches']['n']}")
    report["targets"] = targets
    report["wall_time_s"] = time.time() - t0
    report["load_average_at_end"] = list(os.getloadavg())
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
