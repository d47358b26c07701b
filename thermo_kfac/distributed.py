"""Data-parallel K-FAC on ``torch.distributed``: factor reduction and per-layer solver placement.

:class:`~thermo_kfac.KFACPreconditioner` turns this on by itself when it is built inside an
initialized process group of more than one rank (``distributed="auto"``), for a model wrapped in
``DistributedDataParallel`` or an unwrapped one. What changes across ranks:

- **Factors.** Every rank accumulates ``A`` and ``G`` from its shard of the batch; the factors are
  averaged across ranks by a bucketed all-reduce (tensor fusion: many small factors share one
  collective) of their upper triangles (``n(n+1)/2`` of ``n^2`` numbers), launched asynchronously
  after the factor update and awaited only when the factors are next needed, so the communication
  overlaps the next forward/backward pass. Averaging equal-size shards' factors gives exactly the
  factors of the global batch. Because the EMA is linear, averaging the local EMAs only on the
  inverse-update steps (``defer_factor_reduction=True``) gives the same factors at those steps
  (up to rounding) with ``factor_update_every / inverse_update_every`` of the traffic; the cost
  is that between inverse updates each rank's factors describe only its own shard (visible to
  ``factors()``, the fallback solver and its residual check, which then use local factors).
- **Gradients.** Under DDP they arrive averaged. For an unwrapped model the preconditioner
  averages every parameter's gradient itself (one bucketed all-reduce, ``average_gradients``).
- **Placement.** Each layer's solve (``solver.prepare``) runs on one *owner* rank, chosen by
  :func:`assign_layers`: longest-processing-time-first on the cost model's predicted solve times
  (``balanced``), optionally with ``analog_units_per_rank`` thermodynamic units per rank as
  further machines, or ``round_robin``. Two modes, as in KAISA (Pauloski et al. 2021):

  * ``comm_opt``: the owner broadcasts the solver state (``KFACSolver.state_dict``) after every
    inverse update; every rank preconditions every layer itself. Communication only every
    ``inverse_update_every`` steps; every rank holds every layer's solver state.
  * ``mem_opt``: the owner keeps the state, preconditions its layers' gradients every step and
    broadcasts the preconditioned gradients. Each rank holds only its own layers' states.

  A rank that owns no layer (more ranks than layers) only receives.

All collectives are counted in :attr:`Communicator.bytes` (payload bytes per collective, by
purpose). Solvers that work from the current batch's rows (``uses_batch_statistics``, e.g.
matrix-free CG) are not supported across ranks.
"""

from __future__ import annotations

import heapq
import math
import os
import pickle
import socket
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from hw_models.cost import ThermoCapacityError, thermo_inverse_cost
from hw_models.devices import digital_device, thermo_device
from hw_models.validation import check_choice, check_number, check_positive

if TYPE_CHECKING:
    from thermo_kfac.preconditioner import KFACPreconditioner, _LayerState

PLACEMENT_MODES = ("comm_opt", "mem_opt")
ASSIGNMENT_RULES = ("balanced", "round_robin")
DIGITAL_SOLVE_METHODS = ("eigh", "cholesky", "inverse")
GRANULARITIES = ("layer", "factor")


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DistributedConfig:
    """How K-FAC spreads its work over the ranks of a process group (module docs).

    Args:
        placement: ``"comm_opt"`` (owners broadcast solver states) or ``"mem_opt"`` (owners
            broadcast preconditioned gradients).
        assignment: ``"balanced"`` (LPT on predicted solve times) or ``"round_robin"``.
        analog_units_per_rank: thermodynamic solver units attached to each rank, priced as extra
            machines by the cost model (the code that runs is the configured solver).
        defer_factor_reduction: all-reduce the factors only on inverse-update steps.
        average_gradients: average all parameter gradients across ranks in ``step()``; ``None``
            means "unless the model is wrapped in DistributedDataParallel".
        bucket_mb: size of one fused all-reduce/broadcast buffer, in MiB.
        digital, thermo: cost-model presets pricing a solve (``hw_models.devices``).
        kappa, eps: condition number and accuracy assumed for analog solve times.
        group: the process group (``None``: the default group).
    """

    placement: str = "comm_opt"
    assignment: str = "balanced"
    analog_units_per_rank: int = 0
    defer_factor_reduction: bool = False
    average_gradients: bool | None = None
    bucket_mb: float = 25.0
    digital: str = "h100"
    thermo: str = "chip"
    kappa: float = 100.0
    eps: float = 0.1
    group: Any = None

    def __post_init__(self) -> None:
        check_choice("placement", self.placement, PLACEMENT_MODES)
        check_choice("assignment", self.assignment, ASSIGNMENT_RULES)
        check_positive("analog_units_per_rank", self.analog_units_per_rank, integer=True, allow_zero=True)
        for name in ("defer_factor_reduction",):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.average_gradients is not None and not isinstance(self.average_gradients, bool):
            raise ValueError(f"average_gradients={self.average_gradients!r} must be True, False or None")
        check_positive("bucket_mb", self.bucket_mb)
        digital_device(self.digital)
        thermo_device(self.thermo)
        check_number("kappa", self.kappa, low=1.0)
        check_number("eps", self.eps, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)


_DEFAULT_CONFIG = DistributedConfig()


def set_default_config(config: DistributedConfig | None = None, **changes: Any) -> DistributedConfig:
    """Set the config that ``distributed="auto"`` uses (the CLI's ``--placement`` etc.)."""
    global _DEFAULT_CONFIG
    base = config if config is not None else DistributedConfig()
    _DEFAULT_CONFIG = DistributedConfig(**{**base.__dict__, **changes}) if changes else base
    return _DEFAULT_CONFIG


def default_config() -> DistributedConfig:
    return _DEFAULT_CONFIG


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the rank that prints and writes results."""
    return rank() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (so names lack ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve(setting: Any) -> DistributedConfig | None:
    """``KFACPreconditioner(distributed=...)``: ``"auto"``, ``True``/``False`` or a config."""
    if setting is False or setting is None:
        return None
    if setting == "auto":
        return _DEFAULT_CONFIG if is_distributed() else None
    if setting is True or isinstance(setting, DistributedConfig):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed K-FAC needs an initialized process group: call "
                             "torch.distributed.init_process_group(...) first (or pass distributed=False)")
        return _DEFAULT_CONFIG if setting is True else setting
    raise ValueError(f"distributed={setting!r} must be 'auto', True, False or a DistributedConfig")


# ------------------------------------------------------------------------------- placement
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


def layer_solve_tasks(layers: Iterable[tuple[str, int, int]], *, digital: str = "h100",
                      thermo: str = "chip", method: str = "eigh", kappa: float = 100.0,
                      eps: float = 0.1, bits: int | None = None,
                      granularity: str = "layer") -> list[SolveTask]:
    """Predicted solve times of layers given as ``(name, size of A, size of G)``.

    Digital: one ``method`` decomposition per factor (``hw_models`` op model of ``digital``).
    Analog: a sampling inverse per factor on one ``thermo`` device
    (:func:`hw_models.cost.thermo_inverse_cost`, at condition number ``kappa`` and accuracy ``eps``;
    ``inf`` where the factor does not fit). ``granularity="layer"``: one task per layer (both
    factors, as one solver prepares them); ``"factor"``: one task per factor (``name/A``,
    ``name/G``), the 2L inversion tasks that SPD-KFAC places.
    """
    check_choice("method", method, DIGITAL_SOLVE_METHODS)
    check_choice("granularity", granularity, GRANULARITIES)
    host = digital_device(digital)
    device = thermo_device(thermo)

    def times(n: int) -> tuple[float, float]:
        check_positive("factor size", n, integer=True)
        try:
            analog = thermo_inverse_cost(n, kappa=kappa, eps=eps, device=device, bits=bits,
                                         host=host).seconds
        except ThermoCapacityError:
            analog = math.inf  # the factor does not fit: it stays digital
        return host.op_time(method, n), analog

    tasks = []
    for name, n_a, n_g in layers:
        (da, aa), (dg, ag) = times(n_a), times(n_g)
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


# --------------------------------------------------------------------------- communication
class _Pending:
    """An asynchronous bucketed all-reduce whose results are unpacked on :meth:`wait`."""

    def __init__(self, works: list[Any], unpack: list[Any]) -> None:
        self.works, self.unpack = works, unpack

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        for fn in self.unpack:
            fn()
        self.works, self.unpack = [], []


def _buckets(tensors: list[torch.Tensor], sizes: list[int], limit: int) -> list[list[int]]:
    """Indices grouped by (dtype, device), each group cut into buckets of at most ``limit`` bytes."""
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out = []
    for indices in groups.values():
        bucket, used = [], 0
        for i in indices:
            nbytes = sizes[i] * tensors[i].element_size()
            if bucket and used + nbytes > limit:
                out.append(bucket)
                bucket, used = [], 0
            bucket.append(i)
            used += nbytes
        if bucket:
            out.append(bucket)
    return out


class Communicator:
    """Fused collectives over a process group, counting payload bytes per purpose in :attr:`bytes`."""

    def __init__(self, group: Any = None, bucket_mb: float = 25.0) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.bytes: Counter[str] = Counter()
        self.collectives: Counter[str] = Counter()

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def allreduce_mean(self, tensors: list[torch.Tensor], purpose: str, *, symmetric: bool = False,
                       async_op: bool = False) -> _Pending:
        """Average ``tensors`` across ranks in place; symmetric matrices travel as upper triangles."""
        tensors = list(tensors)
        triu = [torch.triu_indices(t.shape[0], t.shape[0], device=t.device) if symmetric else None
                for t in tensors]
        sizes = [t.shape[0] * (t.shape[0] + 1) // 2 if symmetric else t.numel() for t in tensors]
        works, unpack = [], []
        for bucket in _buckets(tensors, sizes, self.bucket_bytes):
            parts = []
            for i in bucket:
                t = tensors[i]
                parts.append(t[triu[i][0], triu[i][1]] if symmetric else t.reshape(-1))
            flat = torch.cat(parts)
            self.bytes[purpose] += flat.numel() * flat.element_size()
            self.collectives[purpose] += 1
            works.append(dist.all_reduce(flat, group=self.group, async_op=True))

            def finish(flat: torch.Tensor = flat, bucket: list[int] = bucket) -> None:
                flat.div_(self.world_size)
                offset = 0
                for i in bucket:
                    t, n = tensors[i], sizes[i]
                    values = flat[offset:offset + n]
                    offset += n
                    if symmetric:
                        rows, cols = triu[i]
                        t[rows, cols] = values
                        t[cols, rows] = values
                    else:
                        t.copy_(values.view_as(t))

            unpack.append(finish)
        pending = _Pending(works, unpack)
        if not async_op:
            pending.wait()
        return pending

    def broadcast(self, tensors: list[torch.Tensor], src: int, purpose: str) -> None:
        """Broadcast ``tensors`` (same shapes on every rank) from group rank ``src``, fused."""
        tensors = list(tensors)
        if not tensors:
            return
        sizes = [t.numel() for t in tensors]
        for bucket in _buckets(tensors, sizes, self.bucket_bytes):
            flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
            self.bytes[purpose] += flat.numel() * flat.element_size()
            self.collectives[purpose] += 1
            dist.broadcast(flat, src=self._global_rank(src), group=self.group)
            if self.rank != src:
                offset = 0
                for i in bucket:
                    t = tensors[i]
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()

    def all_gather_object(self, obj: Any, purpose: str) -> list[Any]:
        """Every rank's ``obj`` (small metadata), in rank order."""
        self.bytes[purpose] += len(pickle.dumps(obj))
        self.collectives[purpose] += 1
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


# ------------------------------------------------------------------------ K-FAC integration
def _describe_state(state: dict[str, Any]) -> dict[str, Any]:
    """A solver state's picklable description: tensors by shape and dtype, other values as such."""
    return {key: ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor)
            else ("value", value) for key, value in state.items()}


class DistributedKFAC:
    """The distributed side of one :class:`~thermo_kfac.KFACPreconditioner` (module docs)."""

    def __init__(self, precond: KFACPreconditioner, config: DistributedConfig) -> None:
        self.config = config
        self.comm = Communicator(config.group, config.bucket_mb)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        layers = precond._layers
        batch_solvers = [n for n, s in layers.items() if s.solver.uses_batch_statistics]
        if batch_solvers and self.world_size > 1:
            raise ValueError(f"solver {type(layers[batch_solvers[0]].solver).__name__} works from the "
                             "current batch's rows (uses_batch_statistics), which distributed K-FAC does "
                             "not gather across ranks; choose a factor-based solver (eigh, cholesky, cg, "
                             "rsvd, sre, thermo) or distributed=False")
        wrapped = isinstance(precond.model, nn.parallel.DistributedDataParallel)
        average = config.average_gradients
        self.average_gradients = (not wrapped) if average is None else average
        self.tasks = layer_solve_tasks(
            [(name, s.adapter.d_in, s.adapter.d_out) for name, s in layers.items()],
            digital=config.digital, thermo=config.thermo, method=_digital_method(precond.solver_spec),
            kappa=config.kappa, eps=config.eps)
        self.placement = assign_layers(self.tasks, self.world_size, rule=config.assignment,
                                       analog_units_per_rank=config.analog_units_per_rank)
        self.owned = set(self.placement.layers_of(self.rank))
        self._pending: _Pending | None = None
        self._dirty = False  # local factors changed since the last reduction
        self._ready: set[str] = set()  # layers whose owner holds a prepared solver (mem_opt)

    # -------------------------------------------------------------------- step hooks
    def owns(self, name: str) -> bool:
        return name in self.owned

    def begin_step(self, precond: KFACPreconditioner) -> None:
        """Finish a pending factor reduction; average gradients if DDP did not."""
        self.wait()
        if self.average_gradients:
            grads = [p.grad for p in precond.model.parameters() if p.grad is not None]
            if grads:
                self.comm.allreduce_mean(grads, "gradients")

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def factors_updated(self, precond: KFACPreconditioner, inverse_update: bool) -> None:
        """After a factor update: launch the (asynchronous) all-reduce unless it is deferred."""
        self._dirty = True
        if not self.config.defer_factor_reduction or inverse_update:
            self.reduce_factors(precond, async_op=not inverse_update)

    def reduce_factors(self, precond: KFACPreconditioner, *, async_op: bool = False) -> None:
        self.wait()
        if not self._dirty:
            return
        mats = [m for s in precond._layers.values() if s.A is not None and s.G is not None
                for m in (s.A, s.G)]
        if mats:
            self._pending = self.comm.allreduce_mean(mats, "factors", symmetric=True, async_op=True)
        self._dirty = False
        if not async_op:
            self.wait()

    def before_inverse_update(self, precond: KFACPreconditioner) -> None:
        self.reduce_factors(precond)

    def after_inverse_update(self, precond: KFACPreconditioner) -> None:
        """Share what the owners prepared: solver states (comm_opt) or readiness (mem_opt)."""
        for state in precond._layers.values():
            state.fallback = None  # stale on every rank, owner or not
        if self.config.placement == "comm_opt":
            self.share_solver_states(precond)
        else:
            flags = self.comm.all_gather_object(
                {n: precond._layers[n].solver.ready for n in self.owned}, "metadata")
            self._ready = {n for flag in flags for n, ready in flag.items() if ready}

    def share_solver_states(self, precond: KFACPreconditioner, names: set[str] | None = None) -> None:
        """Every rank loads the owners' solver states (``names``: restricted to these layers)."""
        own_states: dict[str, dict[str, Any]] = {}
        mine = {}
        for n in self.owned:
            if names is None or n in names:
                own_states[n] = precond._layers[n].solver.state_dict()
                mine[n] = _describe_state(own_states[n])
        metas = self.comm.all_gather_object(mine, "metadata")
        for src, owned_meta in enumerate(metas):
            buffers: list[torch.Tensor] = []
            received: dict[str, dict[str, Any]] = {}
            for n in [n for n in precond._layers if n in owned_meta]:
                device = precond._layers[n].adapter.module.weight.device
                state: dict[str, Any] = {}
                for key, desc in owned_meta[n].items():
                    if desc[0] == "tensor":
                        t = (own_states[n][key] if src == self.rank
                             else torch.empty(desc[1], dtype=desc[2], device=device))
                        buffers.append(t)
                        state[key] = t
                    else:
                        state[key] = desc[1]
                received[n] = state
            self.comm.broadcast(buffers, src, "solver_state")
            if src != self.rank:
                for n, state in received.items():
                    if state:
                        precond._layers[n].solver.load_state_dict(state)

    def precondition(self, precond: KFACPreconditioner, reports: dict[str, Any]
                     ) -> list[tuple[_LayerState, torch.Tensor, torch.Tensor]]:
        """comm_opt: every rank preconditions every layer. mem_opt: owners precondition their
        layers and broadcast the results."""
        if self.config.placement == "comm_opt":
            return precond._precondition(reports)
        computed = {id(state): (state, grad, result)
                    for state, grad, result in precond._precondition(reports, names=self.owned)}
        by_name: dict[str, tuple[_LayerState, torch.Tensor, torch.Tensor]] = {}
        for src in range(self.world_size):
            buffers = []
            for n in self.placement.layers_of(src):
                state = precond._layers[n]
                if n not in self._ready:
                    continue
                grad = state.adapter.grad_matrix()
                if grad is None:
                    continue
                if src == self.rank:
                    _, grad, result = computed[id(state)]
                else:
                    result = torch.empty_like(grad)
                buffers.append(result)
                by_name[n] = (state, grad, result)
            self.comm.broadcast(buffers, src, "preconditioned_gradients")
        return [by_name[n] for n in precond._layers if n in by_name]

    # -------------------------------------------------------------------------- state
    def prepare_state_dict(self, precond: KFACPreconditioner) -> None:
        """Before ``state_dict``: global factors on every rank, owners' solver states everywhere."""
        if self.config.defer_factor_reduction:
            self._dirty = True  # local factors: reduce them now (exact: the EMA is linear)
        self.reduce_factors(precond)
        if self.config.placement == "mem_opt":
            self.share_solver_states(precond)

    def finish_state_dict(self, precond: KFACPreconditioner, state: dict[str, Any]) -> None:
        generator = None if precond._generator is None else precond._generator.get_state()
        generators = self.comm.all_gather_object(generator, "metadata")
        state["distributed"] = {
            "world_size": self.world_size, "placement": self.config.placement,
            "generators": generators if any(g is not None for g in generators) else None,
        }
        if self.config.placement == "mem_opt":
            self._drop_foreign_states(precond)

    def after_load(self, precond: KFACPreconditioner, state: dict[str, Any]) -> None:
        self._pending, self._dirty = None, False
        generators = (state.get("distributed") or {}).get("generators")
        if generators is not None and generators[self.rank] is not None:
            device = next(iter(precond._layers.values())).adapter.module.weight.device
            precond._get_generator(device).set_state(generators[self.rank])
        self._ready = {n for n, s in precond._layers.items() if s.solver.ready}
        if self.config.placement == "mem_opt":
            self._drop_foreign_states(precond)

    def _drop_foreign_states(self, precond: KFACPreconditioner) -> None:
        for name, s in precond._layers.items():
            if name not in self.owned:
                index = s.solver.layer_index
                s.solver = precond._make_solver(name)
                s.solver.layer_index = index
                s.fallback = None

    def report(self) -> dict[str, Any]:
        """Communication so far and the placement, for ``precond.last_report``."""
        return {"bytes": dict(self.comm.bytes), "collectives": dict(self.comm.collectives),
                "owned_layers": sorted(self.owned), "makespan_s": self.placement.makespan_s}


def check_resume(state: dict[str, Any], world_size: int) -> None:
    """Raise if a checkpoint cannot continue at ``world_size``: only per-rank Monte-Carlo label
    streams (``fisher_type="mc"``) tie a K-FAC state to the world size it was saved at."""
    saved = state.get("distributed") or {}
    generators = saved.get("generators")
    if generators is not None and len(generators) != world_size:
        raise ValueError(
            f"this K-FAC checkpoint was saved at world size {len(generators)} with per-rank "
            f"Monte-Carlo label streams (fisher_type='mc'); they cannot continue at world size "
            f"{world_size}. Resume at world size {len(generators)}, or delete "
            "state['distributed']['generators'] to start fresh streams (seed + rank)")


def _digital_method(solver: Any) -> str:
    name = solver if isinstance(solver, str) else getattr(solver, "name", "eigh")
    return "cholesky" if name == "cholesky" else "eigh"


# ------------------------------------------------------------------------------- launching
def free_port() -> int:
    """A TCP port that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_start_method() -> str:
    """How to start local worker processes: ``"fork"`` where it is safe, else ``"spawn"``.

    Forked children inherit the imported torch (a fresh interpreter spends seconds importing it).
    With a CUDA build of torch, autograd starts device threads at the first backward in the
    parent, after which torch refuses to run backward in a forked child; those builds spawn.
    """
    return "fork" if torch.version.cuda is None and not torch.cuda.is_available() else "spawn"


def launch_environment() -> dict[str, int] | None:
    """``{"rank", "world_size", "local_rank"}`` from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)
    or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``); None outside a launcher."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0))}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0))}
    return None


def init_from_environment(device: str = "cpu") -> dict[str, int] | None:
    """Join the process group described by the launcher's environment (gloo on CPU, nccl on CUDA).

    Returns the launch environment (None when not launched by torchrun/SLURM). Under SLURM
    ``MASTER_ADDR`` defaults to ``SLURM_LAUNCH_NODE_IPADDR`` and ``MASTER_PORT`` to 29500.
    """
    launch = launch_environment()
    if launch is None or launch["world_size"] <= 1:
        return launch
    if dist.is_initialized():
        return launch
    if "MASTER_ADDR" not in os.environ:
        address = os.environ.get("SLURM_LAUNCH_NODE_IPADDR")
        if address is None:
            raise ValueError("MASTER_ADDR is not set: export MASTER_ADDR=<host of rank 0> (and "
                             "MASTER_PORT) for a SLURM launch, or start with torchrun")
        os.environ["MASTER_ADDR"] = address
    os.environ.setdefault("MASTER_PORT", "29500")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(launch["local_rank"])
    dist.init_process_group("nccl" if cuda else "gloo", rank=launch["rank"],
                            world_size=launch["world_size"])
    return launch


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m thermo_kfac.cli <argv>`` in ``nproc`` processes through torchrun's launcher
    (``torch.distributed.launcher``, a c10d rendezvous on a free local port) and return the exit
    code: 0, or 1 when a rank failed (torchrun then stops the others)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_positive("nproc", nproc, integer=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"thermo-kfac-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "thermo_kfac.cli", *argv)
    except ChildFailedError as err:
        print(f"thermo-kfac: a rank failed: {err.format_msg()}", file=sys.stderr)
        return 1
    return 0


def global_mean(value: float) -> float:
    """The average of a per-rank number over all ranks (the number itself without a group)."""
    if not is_distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous share of a global batch (sizes differ by at most one)."""
    if not is_distributed():
        return x, y
    r, p = rank(), world_size()
    if len(x) < p:
        raise ValueError(f"a batch of {len(x)} examples cannot be split over {p} ranks; use "
                         f"--batch-size >= {p}")
    return torch.tensor_split(x, p)[r], torch.tensor_split(y, p)[r]


def wrap_model(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group of more than one rank, else ``model``."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def add_arguments(parser: Any) -> None:
    """The ``distributed`` option group of ``thermo-kfac train``."""
    group = parser.add_argument_group(
        "distributed", "data-parallel training (torchrun on this machine, or an external torchrun/"
                       "SLURM launch: RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    group.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="processes on this machine; N > 1 relaunches through torchrun (gloo on "
                            "CPU, nccl with --device cuda); ignored under an external launcher")
    group.add_argument("--placement", default="comm_opt", choices=PLACEMENT_MODES,
                       help="comm_opt: owners broadcast solver states; mem_opt: owners broadcast "
                            "preconditioned gradients (default comm_opt)")
    group.add_argument("--assignment", default="balanced", choices=ASSIGNMENT_RULES,
                       help="layer-to-rank rule: balanced (LPT on predicted solve times) or round_robin")
    group.add_argument("--analog-units-per-rank", type=int, default=0, metavar="K",
                       help="thermodynamic units per rank priced by the placement cost model (default 0)")
    group.add_argument("--defer-factor-reduction", action="store_true",
                       help="all-reduce the factors only on inverse-update steps")


def launch_cli(args: Any, run: Any) -> int:
    """Run ``run()`` (a CLI command) as one rank of a process group, or relaunch it with torchrun.

    Outside a launcher, ``--nproc N > 1`` starts ``N`` copies of the same command through torchrun;
    inside one (torchrun or SLURM) this process joins the group, uses ``cuda:LOCAL_RANK`` for a
    CUDA ``--device`` and leaves the group when ``run`` returns.
    """
    nproc = check_positive("--nproc", args.nproc, integer=True)
    set_default_config(placement=args.placement, assignment=args.assignment,
                       analog_units_per_rank=args.analog_units_per_rank,
                       defer_factor_reduction=args.defer_factor_reduction)
    launch = launch_environment()
    if launch is None or launch["world_size"] <= 1:
        if nproc > 1:
            return relaunch_with_torchrun(nproc, args.argv)
        return int(run() or 0)
    init_from_environment(args.device)
    if str(args.device).startswith("cuda"):
        args.device = f"cuda:{launch['local_rank']}"
    try:
        return int(run() or 0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
