"""Optimizer/preconditioner memory on the MNIST-shaped auto-encoder: SINGD structures vs K-FAC, Adam.

Builds ``mnist_autoencoder()`` (784-1000-500-250-30-250-500-1000-784, 2.8M parameters), takes one
step of each optimizer on a synthetic batch (inputs uniform in [0, 1], BCE-with-logits) and sums the
``nbytes`` of the tensors each one keeps (walking its ``state_dict()``; shared tensors counted once):

* ``adam``: ``torch.optim.Adam`` (two moments per parameter);
* ``kfac_<solver>``: ``KFACPreconditioner`` (factors ``A``, ``G`` + the solver's state: eigh's
  eigenvectors/eigenvalues, Cholesky's factors) with SGD momentum;
* ``singd_<structure>_<dtype>``: ``SINGD`` (roots ``K``, ``C``, their Riemannian momenta) plus its
  parameter momentum buffers.

``preconditioner_bytes`` is the curvature state only, ``optimizer_bytes`` the momentum/moment buffers,
``total_bytes`` both; ratios are to Adam's total (and to Adam's per-parameter state for the
preconditioner part). Memory is counted, not timed, so there are no repeats.

    python benchmarks/singd_memory.py [--quick] [--batch 1000] [--out result.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Any

import torch
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac.experiments.bench import target
from thermo_kfac.models import mnist_autoencoder
from thermo_kfac.singd import SINGD

from _report import emit

STRUCTURES = ("dense", "diagonal", "block", "hierarchical", "toeplitz", "lowrank")


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Sum of ``nbytes`` of the tensors inside nested dicts/lists/tuples (each storage once)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def _batch(n: int) -> torch.Tensor:
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(0))


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(x), x)


def measure_adam(x: torch.Tensor) -> dict[str, int]:
    torch.manual_seed(0)
    model = mnist_autoencoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _loss(model, x).backward()
    opt.step()
    return {"preconditioner_bytes": 0, "optimizer_bytes": tensor_bytes(opt.state_dict()["state"])}


def measure_kfac(x: torch.Tensor, solver: str) -> dict[str, int]:
    torch.manual_seed(0)
    model = mnist_autoencoder()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    pre = KFACPreconditioner(model, loss="bce", optimizer=opt, solver=solver)
    _loss(model, x).backward()
    pre.step()
    opt.step()
    return {"preconditioner_bytes": tensor_bytes(pre.state_dict()),
            "optimizer_bytes": tensor_bytes(opt.state_dict()["state"])}


def measure_singd(x: torch.Tensor, structure: str, dtype: torch.dtype) -> dict[str, Any]:
    torch.manual_seed(0)
    model = mnist_autoencoder()
    opt = SINGD(model, lr=1e-3, structure=structure, dtype=dtype, T=1)
    _loss(model, x).backward()
    opt.step()
    state = opt.state_dict()
    pre = tensor_bytes(state["singd"])
    reported = sum(v["total"] for v in opt.memory_per_layer().values())
    return {"preconditioner_bytes": pre, "optimizer_bytes": tensor_bytes(state["state"]),
            "memory_per_layer_total": reported}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="batch 100 (the state sizes do not "
                        "depend on the batch), K-FAC with eigh only, SINGD in bfloat16 only")
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    if args.quick:
        args.batch = 100
    x = _batch(args.batch)
    n_params = sum(p.numel() for p in mnist_autoencoder().parameters())
    runs: dict[str, dict[str, Any]] = {"adam": measure_adam(x)}
    # --quick: only what the targets need besides all structures (eigh, bfloat16)
    for solver in ("eigh",) if args.quick else ("eigh", "cholesky"):
        runs[f"kfac_{solver}"] = measure_kfac(x, solver)
    for dtype in (torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16):
        for structure in STRUCTURES:
            runs[f"singd_{structure}_{str(dtype).removeprefix('torch.')}"] = measure_singd(
                x, structure, dtype)
    adam = runs["adam"]["optimizer_bytes"]
    for r in runs.values():
        r["total_bytes"] = r["preconditioner_bytes"] + r["optimizer_bytes"]
        r["total_vs_adam"] = r["total_bytes"] / adam
        r["preconditioner_vs_adam_state"] = r["preconditioner_bytes"] / adam
    report = {
        "script": "benchmarks/singd_memory.py" + (f" --batch {args.batch}" if args.batch != 1000 else ""),
        "machine": {"threads": threads, "torch": torch.__version__, "python": sys.version.split()[0],
                    "platform": platform.platform()},
        "inputs": {"model": "mnist_autoencoder 784-1000-500-250-30-250-500-1000-784 (sigmoid)",
                   "parameters": n_params, "param_dtype": "float32", "batch": args.batch,
                   "data": "synthetic uniform [0,1], BCE-with-logits", "steps": 1,
                   "kfac": "KFACPreconditioner defaults (float32 factors) + SGD momentum 0.9",
                   "singd": "SINGD defaults, T=1; structure_options defaults (block 30, "
                            "hierarchical 15/15, lowrank 16)"},
        "adam_state_bytes": adam,
        "runs": runs,
        # SINGD's claim: structured, inverse-free factors in half precision cost about what Adam
        # keeps, and far less than dense float32 K-FAC
        "targets": {
            "singd_diagonal_bfloat16_total_over_adam": target(
                runs["singd_diagonal_bfloat16"]["total_vs_adam"], "<=", 1.0,
                "preconditioner + momentum bytes over Adam's two moments"),
            "singd_dense_bfloat16_precond_over_kfac_eigh": target(
                runs["singd_dense_bfloat16"]["preconditioner_bytes"]
                / runs["kfac_eigh"]["preconditioner_bytes"], "<", 1.0,
                "curvature state of dense bfloat16 SINGD over float32 K-FAC (eigh)"),
        },
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
