"""Which rank solves which layer: predicted solve times per layer and the assignment rules.

Pure functions of the pricing API (:mod:`hw_models.pricing`); nothing here talks to a process group,
so :mod:`thermo_kfac.experiments.placement` simulates clusters of any size with it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hw_models import layer_cost
from hw_models.defaults import DEFAULT_DIGITAL, DEFAULT_EPS, DEFAULT_KAPPA, DEFAULT_THERMO
from hw_models.devices import digital_device, thermo_device
from hw_models.spectrum import SpectrumSummary
from hw_models.validation import check_choice, check_positive
from thermo_kfac.distributed.config import ASSIGNMENT_RULES

DIGITAL_SOLVE_METHODS = layer_cost.DIGITAL_METHODS
GRANULARITIES = ("layer", "factor")


@dataclass(frozen=True)
class SolveTask:
    """One layer's solve: predicted seconds on a rank's digital device and on one analog unit
    (``inf`` when its factors do not fit the analog device)."""

    name: str
    digital_s: float
    analog_s: float = math.inf


@dataclass
class Placement:
    """Which rank (and which of its devices) solves each layer, and the predicted makespan."""

    rule: str
    world_size: int
    analog_units_per_rank: int
    owners: dict[str, int]
    resources: dict[str, str]
    rank_seconds: list[float]
    makespan_s: float
    devices_busy_s: dict[str, float] = field(default_factory=dict)

    def layers_of(self, rank: int) -> list[str]:
        return [name for name, owner in self.owners.items() if owner == rank]

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "world_size": self.world_size,
                "analog_units_per_rank": self.analog_units_per_rank, "owners": dict(self.owners),
                "resources": dict(self.resources), "rank_seconds": list(self.rank_seconds),
                "makespan_s": self.makespan_s}


def layer_solve_tasks(layers: Iterable[tuple[str, int, int]], *, digital: str = DEFAULT_DIGITAL,
                      thermo: str = DEFAULT_THERMO, method: str = "eigh", kappa: float = DEFAULT_KAPPA,
                      eps: float = DEFAULT_EPS, bits: int | None = None,
                      granularity: str = "layer", analog_method: str = "solve") -> list[SolveTask]:
    """Predicted solve times of layers given as ``(name, size of A, size of G)``.

    Digital: one ``method`` decomposition per factor (:func:`hw_models.layer_cost.decomposition_seconds`).
    Analog, on the ``thermo`` device (the geometric model spectrum at condition number ``kappa``,
    target accuracy ``eps``; ``inf`` where the factor does not fit), by the thermodynamic solver's
    ``analog_method``: ``"solve"`` (its default) programs the factor and runs one resident solve
    with the other factor's size of right-hand sides; ``"inverse"`` samples the inverse (SPD-KFAC's
    inversion tasks, what the ``placement`` command compares). Per factor, these are the
    prepare-time halves of :func:`hw_models.layer_cost.analog_layer_seconds` (one
    inverse update's work; preconditioning is not part of the solve phase).
    ``granularity="layer"``: one task per layer (both factors, as one solver prepares them);
    ``"factor"``: one task per factor (``name/A``, ``name/G``), the 2L inversion tasks that SPD-KFAC
    places.
    """
    check_choice("method", method, DIGITAL_SOLVE_METHODS)
    check_choice("granularity", granularity, GRANULARITIES)
    check_choice("analog_method", analog_method, ("solve", "inverse"))
    host = digital_device(digital)
    device = thermo_device(thermo)
    device = device if bits is None else device.replace(bits=bits)

    def times(n: int, n_rhs: int) -> tuple[float, float]:
        check_positive("factor size", n, integer=True)
        analog = layer_cost.analog_factor_seconds(n, n_rhs, device=device, host=host, method=analog_method,
                                                  spectrum=SpectrumSummary.from_kappa(n, kappa), eps=eps)
        return layer_cost.decomposition_seconds(method, (n,), host), math.inf if analog is None else analog

    tasks = []
    for name, n_a, n_g in layers:
        (da, aa), (dg, ag) = times(n_a, n_g), times(n_g, n_a)
        if granularity == "layer":
            tasks.append(SolveTask(name, da + dg, aa + ag))
        else:
            tasks += [SolveTask(f"{name}/A", da, aa), SolveTask(f"{name}/G", dg, ag)]
    return tasks


def assign_layers(tasks: Sequence[SolveTask], world_size: int, *, rule: str = "balanced",
                  analog_units_per_rank: int = 0) -> Placement:
    """Assign each task to one rank, and to its digital device or one of its analog units.

    Every rank is ``1 + analog_units_per_rank`` machines working in parallel. ``"balanced"``:
    tasks in decreasing order of their fastest time (longest processing time first), each on
    the machine where it would finish earliest (Graham's LPT rule, with the task's time on that
    machine's kind). ``"round_robin"``: task ``i`` goes to rank ``i mod world_size`` in layer
    order, on whichever of that rank's machines finishes it first. The makespan is the latest
    finish time of any machine.
    """
    check_choice("assignment", rule, ASSIGNMENT_RULES)
    check_positive("world_size", world_size, integer=True)
    k = check_positive("analog_units_per_rank", analog_units_per_rank, integer=True, allow_zero=True)
    if not tasks:
        raise ValueError("assign_layers needs at least one layer")
    if k > len(tasks):
        raise ValueError(f"analog_units_per_rank={k} exceeds the number of layers ({len(tasks)}): a "
                         f"rank cannot use more analog units than there are layers; choose 0..{len(tasks)}")
    kinds = ["digital"] + [f"analog{j}" for j in range(k)]
    busy = {(r, kind): 0.0 for r in range(world_size) for kind in kinds}

    def time_on(task: SolveTask, kind: str) -> float:
        return task.digital_s if kind == "digital" else task.analog_s

    def best_on(task: SolveTask, ranks: Iterable[int]) -> tuple[int, str]:
        # earliest finish; ties go to the lower rank, then the digital device
        return min(((r, kind) for r in ranks for kind in kinds),
                   key=lambda m: (busy[m] + time_on(task, m[1]), m[0], kinds.index(m[1])))

    owners: dict[str, int] = {}
    resources: dict[str, str] = {}
    if rule == "balanced":
        order = sorted(range(len(tasks)), key=lambda i: (-min(tasks[i].digital_s, tasks[i].analog_s), i))
        if k == 0:
            # plain LPT with a heap: O(L log P) for large clusters
            heap = [(0.0, r) for r in range(world_size)]
            for i in order:
                load, r = heapq.heappop(heap)
                owners[tasks[i].name], resources[tasks[i].name] = r, "digital"
                busy[(r, "digital")] = load + tasks[i].digital_s
                heapq.heappush(heap, (busy[(r, "digital")], r))
        else:
            for i in order:
                r, kind = best_on(tasks[i], range(world_size))
                owners[tasks[i].name], resources[tasks[i].name] = r, kind
                busy[(r, kind)] += time_on(tasks[i], kind)
    else:
        for i, task in enumerate(tasks):
            r, kind = best_on(task, [i % world_size])
            owners[task.name], resources[task.name] = r, kind
            busy[(r, kind)] += time_on(task, kind)
    # keep the layer order in the dicts
    owners = {t.name: owners[t.name] for t in tasks}
    resources = {t.name: resources[t.name] for t in tasks}
    rank_seconds = [max(busy[(r, kind)] for kind in kinds) for r in range(world_size)]
    return Placement(rule, world_size, k, owners, resources, rank_seconds, max(rank_seconds),
                     {f"{r}:{kind}": v for (r, kind), v in busy.items()})
