"""Factor statistics all-reduced during the backward pass (DistributedConfig(overlap_backward=True)) on
gloo: world sizes 1, 2 and 4 against one process without torch.distributed on the same global batch,
and against the reduction after the backward, with dynamic fusion buckets (planned after the
profiled steps), one all-reduce per layer and a forced single bucket; a recurrent model checks
layers called several times per step (reduced once all their calls' gradients are in)."""

from __future__ import annotations

import argparse
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
# "after": the reduction after the backward; "preset": dynamic buckets on the eth10 network model
MODES = ("dynamic", "layer", "one-bucket", "preset", "after")
WORLDS = (1, 2, 4)


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


def _train(kind: str, mode: str | None) -> dict[str, Any]:
    """``mode`` None: no process group (the reference); else one of MODES.
    ``kind`` "mlp-accum": two backward passes (halves of the batch) per step."""
    model = _model(kind.removesuffix("-accum"))
    parts = 2 if kind.endswith("-accum") else 1
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = None if mode is None else kd.DistributedKFAC(kd.DistributedConfig(
        overlap_backward=mode != "after", fusion="layer" if mode == "layer" else "dynamic",
        fusion_network="eth10" if mode == "preset" else "measured"))
    precond = KFACPreconditioner(
        model, loss="cross_entropy", damping=0.1, factor_decay=0.9, factor_update_every=1,
        inverse_update_every=2, factor_dtype=torch.float64, optimizer=opt, kl_clip=1e-2,
        distributed=False if strategy is None else strategy)
    if mode == "one-bucket":
        assert strategy is not None and strategy.overlap is not None
        strategy.overlap.use_plan([list(strategy.overlap.names)])
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, BATCH, 12, generator=gen, dtype=torch.float64)
    ys = torch.randint(0, 3, (STEPS, BATCH), generator=gen)
    for step in range(STEPS):
        x, y = (xs[step], ys[step]) if mode is None else launch.shard(xs[step], ys[step])
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
        modes = MODES if world == 2 else ("dynamic", "after")  # every mode once; 1 and 4 short
        results: dict[Any, Any] = {(kind, mode): _train(kind, mode) for kind in KINDS for mode in modes}
        try:
            KFACPreconditioner(_model("mlp"), fisher_type="mc",
                               distributed=kd.DistributedKFAC(kd.DistributedConfig(overlap_backward=True)))
            results["mc_refused"] = None
        except ValueError as err:
            results["mc_refused"] = str(err)
        parser = argparse.ArgumentParser()
        launch.add_arguments(parser)
        config = launch.config_from_args(parser.parse_args(["--overlap-backward", "--fusion", "layer"]))
        results["cli_config"] = (config.overlap_backward, config.fusion) if config is not None else None
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("overlap")
    results: dict[Any, Any] = {"serial": {kind: _train(kind, None) for kind in KINDS}}
    for world in WORLDS:
        out = folder / f"world{world}.pt"
        mp.start_processes(_worker, args=(world, launch.free_port(), str(out)), nprocs=world, join=True,
                           start_method=launch.child_start_method())
        results[world] = torch.load(Path(out), weights_only=False)
    return results


def _cases() -> list[tuple[int, str, str]]:
    return [(world, kind, mode) for world in WORLDS for kind in KINDS
            for mode in (MODES if world == 2 else ("dynamic", "after"))]


@pytest.mark.parametrize(("world", "kind", "mode"), _cases())
def test_overlapped_reduction_gives_the_serial_result(runs, world, kind, mode):
    reference = runs["serial"][kind]
    run = runs[world][(kind, mode)]
    for p, q in zip(run["params"], reference["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    if mode == "after":
        return  # its last factor all-reduce is still pending: local factors until the next step
    for name, (A, G) in reference["factors"].items():
        torch.testing.assert_close(run["factors"][name][0], A, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(run["factors"][name][1], G, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["mlp", "rnn"])
def test_every_layer_is_reduced_from_the_backward_pass(runs, world, kind):
    report = runs[world][(kind, "dynamic")]["report"]
    layers = len(runs["serial"][kind]["factors"])
    overlap = report["overlap"]
    assert overlap["launched_in_backward"] == STEPS * layers  # multi-call layers included
    assert overlap["reduced_in_step"] == 0
    assert 0.0 <= overlap["overlap_fraction"] <= 1.0 and 0.0 <= overlap["bytes_overlap_fraction"] <= 1.0
    assert report["bytes"]["factor_statistics"] > 0 and "factors" not in report["bytes"]
    assert "factor_statistics" not in runs[world][(kind, "after")]["report"]["bytes"]
    # the dynamic plan: a partition of the layers into buckets, used after the profiled steps
    buckets = overlap["buckets"]
    assert sorted(n for b in buckets for n in b) == sorted(runs["serial"][kind]["factors"])
    profiled = kd.PROFILE_STEPS
    assert overlap["collectives_in_backward"] == profiled * layers + (STEPS - profiled) * len(buckets)
    assert overlap["alpha_s"] >= 0 and overlap["beta_s_per_byte"] >= 0


def test_fusion_modes_launch_what_they_plan(runs):
    layers = len(runs["serial"]["mlp"]["factors"])
    per_layer = runs[2][("mlp", "layer")]["report"]["overlap"]
    assert per_layer["collectives_in_backward"] == STEPS * layers and per_layer["buckets"] is None
    one = runs[2][("mlp", "one-bucket")]["report"]["overlap"]  # launched when the last layer is ready
    assert one["collectives_in_backward"] == STEPS and one["launched_in_backward"] == STEPS * layers
    assert one["reduced_in_step"] == 0


def test_gradient_accumulation_relaunches_the_reduction(runs):
    # the second backward pass of a step replaces the statistics: each layer is launched twice
    for mode in ("layer", "one-bucket", "dynamic"):
        overlap = runs[2][("mlp-accum", mode)]["report"]["overlap"]
        assert overlap["launched_in_backward"] == 2 * STEPS * 3 and overlap["reduced_in_step"] == 0


def test_command_line_flags_build_the_config(runs):
    assert runs[2]["cli_config"] == (True, "layer")
    assert runs[1]["cli_config"] is None  # one rank: no distributed config


def test_preset_network_plan_uses_its_alpha_beta(runs):
    from hw_models.cost import NETWORKS

    overlap = runs[2][("mlp", "preset")]["report"]["overlap"]
    assert (overlap["alpha_s"], overlap["beta_s_per_byte"]) == pytest.approx(NETWORKS["eth10"].alpha_beta(2))
    assert "fusion_calibration" not in runs[2][("mlp", "preset")]["report"]["bytes"]


def test_overlap_needs_the_empirical_fisher(runs):
    assert "fisher_type='empirical'" in runs[2]["mc_refused"]
    with pytest.raises(ValueError, match="overlap_backward='yes' must be True or False"):
        kd.DistributedConfig(overlap_backward="yes")
    with pytest.raises(ValueError, match="fusion"):
        kd.DistributedConfig(fusion="sometimes")
    with pytest.raises(ValueError, match="fusion_network"):
        kd.DistributedConfig(fusion_network="carrier-pigeon")
