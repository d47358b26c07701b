"""Step-time overhead of training with the simulated thermodynamic K-FAC solver.

For the digits MLP (64-128-128-10, batch 256, cross-entropy) and the MNIST-shaped auto-encoder
(784-1000-500-250-30-250-500-1000-784, sigmoid, BCE) it times, in one process and interleaved
round by round, training steps of

- digital K-FAC (``solver="eigh"``),
- thermodynamic K-FAC, ``integrator="analytic"`` (the time average drawn from its exact law),
- thermodynamic K-FAC, ``integrator="sde"`` (Euler-Maruyama trajectories),

with 8-bit (MLP) or 16-bit (auto-encoder) couplings/DAC/ADC and the solver's other defaults
(method ``solve``, analog time 50 tau, burn-in 10 tau, kappa0 1e-2). Each timing block covers
whole inverse-update cycles, so the periodic work (eigh, or programming the device) is amortized
as in training. Ratios to digital K-FAC are taken within each round; the report gives their
median. Both wall-clock and process CPU time are recorded (CPU time is less distorted on a shared machine).

Floor of the analytic mode: each of a layer's two solves rotates into and out of the programmed
matrix's eigenbasis (two ``O(n^2 m)`` products) and draws the thermal noise, where digital K-FAC's
apply is two products per layer; so the apply costs about twice the digital one, and the step
ratio approaches 1.5 only where forward/backward dominate (large batches).

The auto-encoder is fed MNIST if it is on disk (``thermo_kfac.data.load_mnist``), else the
digits images resized to 28x28 (the step time depends on the shapes only). Its ``sde`` mode
simulates ~300 Euler steps of ``1000 x 1000`` systems per solve, so it is timed for one step
only, and skipped under ``--quick``.

    python benchmarks/analog_training.py [--quick] [--rounds 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from thermo_kfac import KFACPreconditioner
from thermo_kfac.data import load_dataset, load_mnist
from thermo_kfac.models import build_model, mnist_autoencoder

from _report import emit

#: 8-bit converters for the MLP; the auto-encoder's factors (damping 1e-2, condition numbers in
#: the thousands) are not positive definite after 8-bit coupling quantization, so it uses 16 bits
#: (TNGD's hardware precision) -- otherwise most layers would time the digital fallback.
THERMO = {"mlp": {"bits": 8}, "autoencoder": {"bits": 16}}
TARGET_ANALYTIC = 1.5


def mnist_like_images(seed: int, n: int) -> tuple[torch.Tensor, str]:
    """``(n, 784)`` images in [0, 1]: MNIST when on disk, else digits resized to 28x28."""
    try:
        data = load_mnist(autoencoder=True)
        return data.x_train[:n].reshape(n, -1), "mnist"
    except (OSError, ValueError, RuntimeError):
        data = load_dataset("digits", task="autoencoder", seed=seed)
        x = data.x_train[:n]
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
        return x.reshape(x.shape[0], -1), "digits resized to 28x28"


def make_run(model_name: str, solver: str, options: dict, batch: int, seed: int, inverse_every: int,
             images: torch.Tensor | None):
    """A closure doing one training step of ``model_name`` with K-FAC and ``solver``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if model_name == "mlp":
        data = load_dataset("digits", seed=seed)
        model = build_model("mlp", data)
        idx = torch.randint(0, data.x_train.shape[0], (batch,), generator=g)
        x, y = data.x_train[idx], data.y_train[idx]
        loss_fn, loss, damping, lr = F.cross_entropy, "cross_entropy", 0.1, 0.3
    else:
        model = mnist_autoencoder()
        assert images is not None
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = y = images[idx]
        loss_fn, loss, damping, lr = F.binary_cross_entropy_with_logits, "bce", 1e-2, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    precond = KFACPreconditioner(model, loss=loss, damping=damping, kl_clip=1e-3, optimizer=opt,
                                 factor_update_every=10, inverse_update_every=inverse_every,
                                 solver=solver, solver_options=options or None, seed=seed)

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        out = model(x)
        loss_fn(out, y).backward()
        precond.step()
        opt.step()

    return step, precond


def time_block(step, steps: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per step over ``steps`` steps."""
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps


def bench_model(model_name: str, *, rounds: int, cycles: int, batch: int, inverse_every: int,
                sde: bool, images: torch.Tensor | None) -> dict:
    thermo = THERMO[model_name]
    configs = {"eigh": ("eigh", {}), "analytic": ("thermo", {**thermo, "integrator": "analytic"})}
    if sde:
        configs["sde"] = ("thermo", {**thermo, "integrator": "sde"})
    runs = {}
    for name, (solver, options) in configs.items():
        step, precond = make_run(model_name, solver, options, batch, 0, inverse_every, images)
        step()  # warm-up: first factors, first prepare, allocator
        runs[name] = (step, precond)
    steps = cycles * inverse_every
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for round_ in range(rounds):
        for name, (step, _) in runs.items():
            slow = name == "sde" and model_name == "autoencoder"
            if slow and round_ > 0:  # ~minutes per step: one step, first round only
                continue
            w, c = time_block(step, 1 if slow else steps)
            wall[name].append(w)
            cpu[name].append(c)
    result: dict = {"steps_per_block": steps, "batch": batch, "inverse_update_every": inverse_every,
                    "step_time_s": {k: statistics.median(v) for k, v in wall.items()},
                    "step_cpu_s": {k: statistics.median(v) for k, v in cpu.items()}}
    for name in runs:
        if name == "eigh":
            continue
        result[f"{name}_ratio_wall"] = statistics.median(
            w / e for w, e in zip(wall[name], wall["eigh"], strict=False))
        result[f"{name}_ratio_cpu"] = statistics.median(
            c / e for c, e in zip(cpu[name], cpu["eigh"], strict=False))
    # accuracy of the last analytic step, per layer (what the solver reports)
    precond = runs["analytic"][1]
    residuals = {k.split("/")[0]: v.info.get("relative_residual")
                 for k, v in precond.last_report["solver_reports"].items() if k.endswith("/apply")}
    result["analytic_relative_residual"] = residuals
    result["thermo_options"] = thermo
    result["fallbacks"] = {name: sum(p.fallbacks().values()) for name, (_, p) in runs.items()}
    result["analytic_predicted_hardware_s_per_step"] = precond.last_report["hardware_time_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke setting (< 90 s on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    rounds = args.rounds or (2 if args.quick else 5)
    images, source = mnist_like_images(0, 2000)
    models = {
        "mlp_digits": bench_model("mlp", rounds=rounds, cycles=1 if args.quick else 2, batch=256,
                                  inverse_every=50, sde=True, images=None),
        "autoencoder_mnist_shape": bench_model(
            "autoencoder", rounds=1 if args.quick else rounds, cycles=1,
            batch=1000, inverse_every=10 if args.quick else 50,
            sde=not args.quick, images=images),
    }
    targets = {}
    for name, res in models.items():
        value = res["analytic_ratio_wall"]
        targets[f"analytic_step_ratio_{name}"] = {
            "value": value, "target": f"<= {TARGET_ANALYTIC}", "met": value <= TARGET_ANALYTIC,
            "note": f"thermo (analytic) / digital K-FAC (eigh) wall-clock step time; CPU-time "
                    f"ratio {res['analytic_ratio_cpu']:.3f}; fallbacks {res['fallbacks']['analytic']}; "
                    f"sde ratio "
                    + (f"{res['sde_ratio_wall']:.2f}" if "sde_ratio_wall" in res else "not timed"),
        }
    report = {
        "benchmark": "analog_training",
        "quick": args.quick,
        "rounds": rounds,
        "torch_threads": args.threads,
        "autoencoder_data": source,
        "models": models,
        "targets": targets,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
