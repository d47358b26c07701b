"""Factor statistics all-reduced during the backward pass (DistributedConfig(overlap_backward=True)) on
gloo: world sizes 1 and 2 against one process without torch.distributed on the same global batch,
and against the reduction after the backward; a recurrent model checks layers called several times
per step (reduced once all their calls' gradients are in)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from thermo_kfac import KFACPreconditioner
from thermo_kfac import distributed as kd
from thermo_kfac.experiments import launch
from thermo_kfac.models import RecurrentLayer

STEPS, BATCH = 4, 16
KINDS = ("mlp", "rnn", "mlp-accum")


class _RNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = RecurrentLayer(3, 4, kron=((2, 2), (2, 2)))  # W_hh = A (x) B: 3 calls per step each
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x.reshape(-1, 4, 3))[:, -1])


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        layers = [nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)]
        return nn.Sequential(*layers).double()
    return _RNN().double()


def _train(kind: str, overlap: bool | None) -> dict[str, Any]:
    """``overlap`` None: no process group (the reference); else the DistributedConfig flag.
    ``kind`` "mlp-accum": two backward passes (halves of the batch) per step."""
    model = _model(kind.removesuffix("-accum"))
    parts = 2 if kind.endswith("-accum") else 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(
        model, loss="cross_entropy", damping=0.1, factor_decay=0.9, factor_update_every=1,
        inverse_update_every=2, factor_dtype=torch.float64, optimizer=opt, kl_clip=1e-2,
        distributed=False if overlap is None
        else kd.DistributedKFAC(kd.DistributedConfig(overlap_backward=overlap)))
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, BATCH, 12, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (STEPS, BATCH), generator=gen)
    for step in range(STEPS):
        x, y = (xs[step], ys[step]) if overlap is None else launch.shard(xs[step], ys[step])
        opt.zero_grad()
        for xp, yp in zip(x.chunk(parts), y.chunk(parts), strict=True):
            (F.cross_entropy(model(xp), yp) / parts).backward()
        precond.step()
        opt.step()
    return {"params": [p.detach().clone() for p in model.parameters()],
            "factors": {n: (A.clone(), G.clone()) for n, (A, G) in precond.factors().items()},
            "report": precond.last_report.get("distributed")}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results: dict[Any, Any] = {(kind, overlap): _train(kind, overlap) for kind in KINDS
                                   for overlap in (True, False)}
        try:
            KFACPreconditioner(_model("mlp"), fisher_type="mc",
                               distributed=kd.DistributedKFAC(kd.DistributedConfig(overlap_backward=True)))
            results["mc_refused"] = None
        except ValueError as err:
            results["mc_refused"] = str(err)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("overlap")
    results: dict[Any, Any] = {"serial": {kind: _train(kind, None) for kind in KINDS}}
    for world in (1, 2):
        out = folder / f"world{world}.pt"
        mp.start_processes(_worker, args=(world, launch.free_port(), str(out)), nprocs=world, join=True,
                           start_method=launch.child_start_method())
        results[world] = torch.load(Path(out), weights_only=False)
    return results


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_overlapped_reduction_gives_the_serial_result(runs, world, kind):
    reference = runs["serial"][kind]
    run = runs[world][(kind, True)]
    for p, q in zip(run["params"], reference["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    for name, (A, G) in reference["factors"].items():
        torch.testing.assert_close(run["factors"][name][0], A, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(run["factors"][name][1], G, rtol=1e-9, atol=1e-11)
    # and the reduction after the backward pass gives the same
    after = runs[world][(kind, False)]
    for p, q in zip(run["params"], after["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["mlp", "rnn"])
def test_every_layer_is_reduced_from_the_backward_pass(runs, kind):
    report = runs[2][(kind, True)]["report"]
    layers = len(runs["serial"][kind]["factors"])
    overlap = report["overlap"]
    assert overlap["launched_in_backward"] == STEPS * layers  # multi-call layers included
    assert overlap["reduced_in_step"] == 0
    assert 0.0 <= overlap["overlap_fraction"] <= 1.0
    assert report["bytes"]["factor_statistics"] > 0 and "factors" not in report["bytes"]
    assert "factor_statistics" not in runs[2][(kind, False)]["report"]["bytes"]


def test_gradient_accumulation_relaunches_the_reduction(runs):
    # the second backward pass of a step replaces the statistics: each layer is launched twice
    overlap = runs[2][("mlp-accum", True)]["report"]["overlap"]
    assert overlap["launched_in_backward"] == 2 * STEPS * 3 and overlap["reduced_in_step"] == 0


def test_overlap_needs_the_empirical_fisher(runs):
    assert "fisher_type='empirical'" in runs[2]["mc_refused"]
    with pytest.raises(ValueError, match="overlap_backward='yes' must be True or False"):
        kd.DistributedConfig(overlap_backward="yes")
