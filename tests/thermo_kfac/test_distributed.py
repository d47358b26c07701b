"""Distributed K-FAC on gloo (CPU): world sizes 2 and 4 against one process on the same global batch.

Two process groups are spawned per module (2 and 4 ranks); each runs every scenario and returns
its parameters, reports and checkpoints, which the tests compare with single-process runs of the
same code. The reference never touches torch.distributed.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import subprocess
import sys
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

STEPS = 5
BATCH = 16
LAYER_FACTOR_SIZES = [(7, 8), (9, 5), (6, 3)]  # (A incl. bias, G) of the model below

SCENARIOS: dict[str, dict[str, Any]] = {
    "comm_opt/balanced/ddp": dict(ddp=True, config=dict(placement="comm_opt"), kl_clip=1e-2),
    "mem_opt/balanced/ddp": dict(ddp=True, config=dict(placement="mem_opt"), kl_clip=1e-2),
    "comm_opt/round_robin/plain/defer": dict(
        ddp=False, config=dict(placement="comm_opt", assignment="round_robin", defer_factor_reduction=True)),
    "mem_opt/round_robin/plain/defer": dict(
        ddp=False, config=dict(placement="mem_opt", assignment="round_robin", defer_factor_reduction=True)),
    "mem_opt/thermo/ddp": dict(ddp=True, config=dict(placement="mem_opt", analog_units_per_rank=1),
                               solver="thermo", solver_options=dict(analog_time=20.0, burn_in=5.0, seed=3)),
    "mem_opt/type2/ddp": dict(ddp=True, config=dict(placement="mem_opt"), fisher_type="type2"),
    "comm_opt/thermo/plain": dict(ddp=False, config=dict(placement="comm_opt"), solver="thermo",
                                  solver_options=dict(analog_time=20.0, burn_in=5.0, seed=3)),
}
CHECKPOINT = dict(ddp=True, config=dict(placement="mem_opt"), kl_clip=1e-2)
SAVE_AT = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batches(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(steps, BATCH, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (steps, BATCH), generator=gen))


def _train(scenario: dict[str, Any], steps: int, *, start: dict[str, Any] | None = None,
           save_at: int | None = None, fisher_type: str = "empirical") -> dict[str, Any]:
    """Train the tiny model; in a process group each rank takes its shard of the global batch."""
    fisher_type = scenario.get("fisher_type", fisher_type)
    model = _model()
    group = kd.is_distributed()
    trained = nn.parallel.DistributedDataParallel(model) if group and scenario["ddp"] else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precond = KFACPreconditioner(
        trained, loss="cross_entropy", damping=0.1, factor_decay=0.9, factor_update_every=1,
        inverse_update_every=2, factor_dtype=torch.float64, optimizer=opt, fisher_type=fisher_type,
        kl_clip=scenario.get("kl_clip"), solver=scenario.get("solver", "eigh"),
        solver_options=scenario.get("solver_options"),
        distributed=kd.DistributedKFAC(kd.DistributedConfig(**scenario["config"])) if group else False)
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["opt"])
        precond.load_state_dict(start["precond"])
        first = start["step"]
    xs, ys = _batches(steps)
    saved = None
    for step in range(first, steps):
        x, y = launch.shard(xs[step], ys[step])
        opt.zero_grad()
        out = trained(x)
        if fisher_type != "empirical":
            precond.accumulate_curvature(out)
        F.cross_entropy(out, y).backward()
        precond.step()
        opt.step()
        if save_at == step + 1:
            # deep copies: state dicts share storage with tensors that keep training
            saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                   "precond": precond.state_dict(), "step": step + 1})
    return {"params": [p.detach().clone() for p in model.parameters()], "checkpoint": saved,
            "report": precond.last_report.get("distributed")}


def _check_communicator(rank: int, world: int) -> None:
    """Fused triangle all-reduce over several buckets equals the mean of every rank's matrices."""
    def matrices(r: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(100 + r)
        out = []
        for n in (3, 5, 7, 2):
            m = torch.randn(n, n, generator=gen, dtype=torch.float64)
            out.append(m + m.T)
        return out

    comm = kd.Communicator(bucket_mb=100 / 2**20)  # 100-byte buckets: several collectives
    mine = matrices(rank)
    comm.allreduce_mean(mine, "test", symmetric=True)
    expected = [sum(ms) / world for ms in zip(*(matrices(r) for r in range(world)), strict=True)]
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert comm.bytes["test"] == 8 * sum(n * (n + 1) // 2 for n in (3, 5, 7, 2))
    assert comm.collectives["test"] > 1


def _worker(rank: int, world: int, port: int, out: str, resume: str | None) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_communicator(rank, world)
        results: dict[str, Any] = {"refusals": _refusals()}
        for name, scenario in SCENARIOS.items():
            run = _train(scenario, STEPS)
            run["reports"] = [None] * world
            dist.all_gather_object(run["reports"], run.pop("report"))
            results[name] = run
        results["checkpoint"] = _train(CHECKPOINT, STEPS, save_at=SAVE_AT)
        results["mc"] = _train(dict(ddp=False, config={}), 2, save_at=1, fisher_type="mc")
        if resume is not None:
            results["resumed"] = _train(CHECKPOINT, STEPS, start=torch.load(resume, weights_only=False))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _refusals() -> list[str]:
    """Inside a process group: building without a strategy, and reusing an attached strategy."""
    strategy = kd.DistributedKFAC()
    KFACPreconditioner(_model(), distributed=strategy)
    KFACPreconditioner(_model(), distributed=False)  # every rank on its own: accepted
    messages = []
    for kwargs in ({}, {"distributed": strategy}):
        with pytest.raises(ValueError) as err:
            KFACPreconditioner(_model(), **kwargs)
        messages.append(str(err.value))
    return messages


def _spawn(world: int, folder: Path, resume: Path | None = None) -> dict[str, Any]:
    out = folder / f"world{world}.pt"
    # fork where safe: the children inherit the imported torch (a fresh interpreter spends seconds
    # importing torch._dynamo for torch.optim); CUDA builds must spawn (child_start_method)
    args = (world, launch.free_port(), str(out), None if resume is None else str(resume))
    mp.start_processes(_worker, args=args, nprocs=world, join=True, start_method=launch.child_start_method())
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    torch.set_num_threads(1)
    _train(CHECKPOINT, 1)  # imports everything once, before forking
    folder = tmp_path_factory.mktemp("dist")
    two = _spawn(2, folder)
    checkpoint = folder / "checkpoint.pt"
    torch.save(two["checkpoint"]["checkpoint"], checkpoint)
    four = _spawn(4, folder, resume=checkpoint)
    return {2: two, 4: four, "checkpoint_file": checkpoint}


def _assert_same(params: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    for got, want in zip(params, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_parameters_as_one_process(runs: dict[Any, Any], world: int, name: str) -> None:
    reference = _train(SCENARIOS[name], STEPS)["params"]
    initial = [p.detach() for p in _model().parameters()]
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(reference, initial, strict=True))  # it trained
    _assert_same(runs[world][name]["params"], reference)


@pytest.mark.parametrize("world", [2, 4])
def test_communication_volume_and_owners(runs: dict[Any, Any], world: int) -> None:
    triangles = sum(n * (n + 1) // 2 for pair in LAYER_FACTOR_SIZES for n in pair)
    gradients = sum(p.numel() for p in _model().parameters())
    ddp = runs[world]["comm_opt/balanced/ddp"]["reports"]
    deferred = runs[world]["comm_opt/round_robin/plain/defer"]["reports"]
    for report in ddp:
        assert report["bytes"]["factors"] == 8 * triangles * STEPS  # every step, upper triangles
        assert "gradients" not in report["bytes"]  # DDP already averaged them
    inverse_steps = len(range(0, STEPS, 2))
    for report in deferred:
        assert report["bytes"]["factors"] == 8 * triangles * inverse_steps
        assert report["bytes"]["gradients"] == 8 * gradients * STEPS
    owned = [r["owned_layers"] for r in ddp]
    assert sorted(itertools.chain(*owned)) == ["0", "2", "4"]  # each layer exactly once
    if world == 4:
        assert [] in owned  # more ranks than layers: a rank without a layer trained along
    names = ["0", "2", "4"]
    assert [r["owned_layers"] for r in deferred] == [
        [n for i, n in enumerate(names) if i % world == r] for r in range(world)]  # round-robin


def test_checkpoint_from_two_ranks_resumes_at_one_and_four(runs: dict[Any, Any]) -> None:
    reference = _train(CHECKPOINT, STEPS)["params"]
    state = torch.load(runs["checkpoint_file"], weights_only=False)
    assert state["precond"]["distributed"]["world_size"] == 2
    # mem_opt: the checkpoint still holds every layer's solver state, gathered from the owners
    assert all(layer["solver"] for layer in state["precond"]["layers"].values())
    _assert_same(_train(CHECKPOINT, STEPS, start=state)["params"], reference)
    _assert_same(runs[4]["resumed"]["params"], reference)
    _assert_same(runs[2]["checkpoint"]["params"], reference)


@pytest.mark.parametrize("world", [2, 4])
def test_a_group_needs_a_strategy_attached_once(runs: dict[Any, Any], world: int) -> None:
    # the library never builds its distributed extension: inside a group it refuses to guess
    without, reused = runs[world]["refusals"]
    assert "process group of more than one rank" in without and "DistributedKFAC" in without
    assert "already attached" in reused


def test_mc_checkpoint_refuses_another_world_size(runs: dict[Any, Any]) -> None:
    state = runs[2]["mc"]["checkpoint"]
    assert len(state["precond"]["distributed"]["generators"]) == 2
    resumed = KFACPreconditioner(_model(), fisher_type="mc", distributed=False)
    with pytest.raises(ValueError, match="world size 2 .* world size 1"):
        resumed.load_state_dict(state["precond"])
    del state["precond"]["distributed"]["generators"]
    resumed.load_state_dict(state["precond"])  # the documented way out


def test_bad_configurations() -> None:
    with pytest.raises(ValueError, match="placement='fastest'.*comm_opt.*mem_opt"):
        kd.DistributedConfig(placement="fastest")
    with pytest.raises(ValueError, match="assignment"):
        kd.DistributedConfig(assignment="random")
    tasks = kd.layer_solve_tasks([("a", 10, 10), ("b", 20, 5)])
    with pytest.raises(ValueError, match="analog_units_per_rank=3 exceeds the number of layers"):
        kd.assign_layers(tasks, 2, analog_units_per_rank=3)
    with pytest.raises(ValueError, match="initialized process group"):
        kd.DistributedKFAC(kd.DistributedConfig())
    for setting in (True, "auto", kd.DistributedConfig()):  # a strategy is built outside and passed in
        with pytest.raises(ValueError, match="None, False or a distribution strategy"):
            KFACPreconditioner(_model(), distributed=setting)


# ------------------------------------------------------------------------------ placement
def _brute_force_makespan(times: list[float], machines: int) -> float:
    best = math.inf
    for assignment in itertools.product(range(machines), repeat=len(times)):
        loads = [0.0] * machines
        for t, m in zip(times, assignment, strict=True):
            loads[m] += t
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_lpt_within_graham_bound_of_optimum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    times = (torch.rand(7, generator=gen) * 10 + 0.1).tolist()
    tasks = [kd.SolveTask(f"l{i}", t) for i, t in enumerate(times)]
    for machines in (2, 3):
        opt = _brute_force_makespan(times, machines)
        lpt = kd.assign_layers(tasks, machines, rule="balanced").makespan_s
        rr = kd.assign_layers(tasks, machines, rule="round_robin")
        assert opt - 1e-12 <= lpt <= (4 / 3 - 1 / (3 * machines)) * opt + 1e-12
        assert rr.owners == {f"l{i}": i % machines for i in range(7)}
        assert rr.makespan_s >= opt - 1e-12


def test_analog_units_take_work_when_faster() -> None:
    # two ranks, four equal tasks 4x faster on an analog unit: with one unit per rank, both units
    # run two tasks each (0.5) instead of each rank's digital device running two (2.0)
    tasks = [kd.SolveTask(f"l{i}", 1.0, 0.25) for i in range(4)]
    digital_only = kd.assign_layers(tasks, 2)
    with_units = kd.assign_layers(tasks, 2, analog_units_per_rank=1)
    assert digital_only.makespan_s == pytest.approx(2.0)
    assert with_units.makespan_s == pytest.approx(0.5)  # all four on the two analog units
    assert set(with_units.resources.values()) == {"analog0"}
    # a factor too large for the analog device (inf) stays digital
    big = kd.layer_solve_tasks([("huge", 5000, 5000)], thermo="chip")
    assert math.isinf(big[0].analog_s)
    assert kd.assign_layers(big, 1, analog_units_per_rank=1).resources == {"huge": "digital"}


def test_placement_simulator_balanced_beats_round_robin(tmp_path: Path) -> None:
    from thermo_kfac.cli import main

    out, plot = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["placement", "--model", "resnet50", "--ranks", "8,64", "--analog-units", "0,1",
                 "--json", str(out), "--plot", str(plot)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and plot.stat().st_size > 0
    for row in rows:
        assert row["tasks"] == 2 * row["layers"] == 2 * 54
        assert row["lower_bound_s"] <= row["balanced_s"] * (1 + 1e-12)
        assert row["balanced_s"] < row["round_robin_s"]
    assert main(["placement", "--model", "resnet50", "--ranks", "8", "--analog-units", "200"]) == 2


@pytest.mark.slow  # two fresh interpreters import torch: ~10 s on a quiet machine, a minute under load
def test_train_nproc_two_matches_one_process(tmp_path: Path) -> None:
    """``thermo-kfac train --nproc 2`` (torchrun, gloo) ends at the single-process training loss."""
    from thermo_kfac.experiments.training import train

    args = ["train", "--dataset", "digits", "--model", "mlp", "--widths", "16", "--steps", "3",
            "--batch-size", "64", "--no-progress", "--threads", "1", "--optimizer",
            "kfac:inverse_update_every=2,factor_update_every=1", "--placement", "mem_opt"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "thermo_kfac.cli", *args, "--nproc", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["config"]["world_size"] == 2
    assert proc.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    single = train("digits", "mlp", "kfac:inverse_update_every=2,factor_update_every=1", steps=3,
                   batch_size=64, model_options={"widths": (16,)})
    dist_run, ref_run = result["runs"][0], single["runs"][0]
    assert dist_run["final_train_loss"] == pytest.approx(ref_run["final_train_loss"], rel=1e-4)
    assert [h["train_loss"] for h in dist_run["history"]] == pytest.approx(
        [h["train_loss"] for h in ref_run["history"]], rel=1e-4)
