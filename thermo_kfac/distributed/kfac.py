"""The K-FAC glue of distributed training: :class:`DistributedKFAC` is the distribution strategy
passed to a preconditioner (``KFACPreconditioner(distributed=DistributedKFAC(config))``); attached,
it takes part in the preconditioner's step (:class:`thermo_kfac.layers.StepHooks`) to reduce the
factors, place the solves on owner ranks and share solver states or preconditioned gradients
(package docs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from thermo_kfac.distributed.communication import Communicator, PendingReduction
from thermo_kfac.distributed.config import DistributedConfig
from thermo_kfac.distributed.overlap import BackwardFactorReduction
from thermo_kfac.distributed.placement import Placement, SolveTask, assign_layers, layer_solve_tasks
from thermo_kfac.layers import PreconditionedGradient, Preconditioner, StepHooks
from thermo_kfac.solvers.base import digital_method_of


def _describe_state(state: dict[str, Any]) -> dict[str, Any]:
    """A solver state's picklable description: tensors by shape and dtype, other values as such."""
    return {key: ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor)
            else ("value", value) for key, value in state.items()}


class DistributedKFAC(StepHooks):
    """Data-parallel K-FAC for one :class:`~thermo_kfac.KFACPreconditioner` (module docs).

    Built outside the preconditioner, inside an initialized process group, and passed in as
    ``distributed=DistributedKFAC(config)`` (``config``: a :class:`DistributedConfig`, default
    ``DistributedConfig()``). The preconditioner calls :meth:`attach` once its layers are
    registered; from then on this object is its :class:`~thermo_kfac.layers.StepHooks`, working
    on ``precond.layer_table`` and the preconditioner's public methods only. One object serves
    one preconditioner.
    """

    def __init__(self, config: DistributedConfig | None = None) -> None:
        if config is None:
            config = DistributedConfig()
        if not isinstance(config, DistributedConfig):
            raise ValueError(f"config={config!r} must be a DistributedConfig")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed K-FAC needs an initialized process group: call "
                             "torch.distributed.init_process_group(...) first (or pass distributed=False)")
        self.config = config
        self.comm = Communicator(config.group, config.bucket_mb)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        # set by attach(), which the preconditioner calls before any other hook
        self.attached = False
        self.average_gradients = False
        self.tasks: list[SolveTask] = []
        self.placement: Placement | None = None
        self.owned: set[str] = set()
        self._pending: PendingReduction | None = None
        self._dirty = False  # local factors changed since the last reduction
        self._ready: set[str] = set()  # layers whose owner holds a prepared solver (mem_opt)

    def attach(self, precond: Preconditioner) -> DistributedKFAC:
        """Place the layers of ``precond`` on the ranks (the preconditioner calls this once)."""
        if self.attached:
            raise ValueError("this DistributedKFAC is already attached to a preconditioner; build "
                             "one DistributedKFAC(config) per preconditioner")
        config = self.config
        layers = precond.layer_table
        batch_solvers = [n for n, s in layers.items() if s.solver.uses_batch_statistics]
        if batch_solvers and self.world_size > 1:
            raise ValueError(f"solver {type(layers[batch_solvers[0]].solver).__name__} works from the "
                             "current batch's rows (uses_batch_statistics), which distributed K-FAC does "
                             "not gather across ranks; choose a factor-based solver (eigh, cholesky, cg, "
                             "rsvd, sre, thermo) or distributed=False")
        wrapped = isinstance(precond.model, nn.parallel.DistributedDataParallel)
        average = config.average_gradients
        self.average_gradients = (not wrapped) if average is None else average
        # the analog solvers' own method (a resident solve by default, a sampled inverse if asked)
        analog = [s.solver.pricing_settings().get("method") for s in layers.values() if s.solver.analog]
        self.tasks = layer_solve_tasks(
            [(name, s.adapter.d_in, s.adapter.d_out) for name, s in layers.items()],
            digital=config.digital, thermo=config.thermo, method=digital_method_of(precond.solver_spec),
            kappa=config.kappa, eps=config.eps,
            analog_method="inverse" if analog and all(m == "inverse" for m in analog) else "solve")
        self.placement = assign_layers(self.tasks, self.world_size, rule=config.assignment,
                                       analog_units_per_rank=config.analog_units_per_rank)
        self.owned = set(self.placement.layers_of(self.rank))
        self.overlap: BackwardFactorReduction | None = None
        if config.overlap_backward:
            if precond.fisher_type != "empirical":
                raise ValueError(f"overlap_backward=True needs fisher_type='empirical', got "
                                 f"{precond.fisher_type!r} (its extra backward passes are not followed)")
            self.overlap = BackwardFactorReduction(self.comm, layers, fusion=config.fusion,
                                                   network_model=config.fusion_network)
        self.attached = True
        return self

    # -------------------------------------------------------------------- step hooks
    def owns(self, name: str) -> bool:
        return name in self.owned

    def begin_step(self, precond: Preconditioner) -> None:
        """Finish a pending factor (or, overlapped, statistics) reduction; average gradients if DDP
        did not."""
        self.wait()
        if self.overlap is not None:
            self.overlap.wait()
        if self.average_gradients:
            grads = [p.grad for p in precond.model.parameters() if p.grad is not None]
            if grads:
                self.comm.allreduce_mean(grads, "gradients")

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def factors_updated(self, precond: Preconditioner, inverse_update: bool) -> None:
        """After a factor update: launch the (asynchronous) all-reduce unless it is deferred."""
        if self.overlap is not None:
            return  # the statistics were averaged before the update: the factors are global
        self._dirty = True
        if not self.config.defer_factor_reduction or inverse_update:
            self.reduce_factors(precond, async_op=not inverse_update)

    def reduce_factors(self, precond: Preconditioner, *, async_op: bool = False) -> None:
        self.wait()
        if not self._dirty:
            return
        mats = precond.layer_table.factor_tensors()
        if mats:
            self._pending = self.comm.allreduce_mean(mats, "factors", symmetric=True, async_op=True)
        self._dirty = False
        if not async_op:
            self.wait()

    def before_inverse_update(self, precond: Preconditioner) -> None:
        self.reduce_factors(precond)

    def after_inverse_update(self, precond: Preconditioner) -> None:
        """Share what the owners prepared: solver states (comm_opt) or readiness (mem_opt)."""
        precond.layer_table.drop_fallbacks()  # stale on every rank, owner or not
        if self.config.placement == "comm_opt":
            self.share_solver_states(precond)
        else:
            flags = self.comm.all_gather_object(
                {n: precond.layer_table.solver_for(n).ready for n in self.owned}, "metadata")
            self._ready = {n for flag in flags for n, ready in flag.items() if ready}

    def share_solver_states(self, precond: Preconditioner, names: set[str] | None = None) -> None:
        """Every rank loads the owners' solver states (``names``: restricted to these layers)."""
        table = precond.layer_table
        own_states: dict[str, dict[str, Any]] = {}
        mine = {}
        for n in self.owned:
            if names is None or n in names:
                own_states[n] = table.solver_for(n).state_dict()
                mine[n] = _describe_state(own_states[n])
        metas = self.comm.all_gather_object(mine, "metadata")
        for src, owned_meta in enumerate(metas):
            buffers: list[torch.Tensor] = []
            received: dict[str, dict[str, Any]] = {}
            for n in [n for n in table if n in owned_meta]:
                device = table[n].device
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
                        table.solver_for(n).load_state_dict(state)

    def precondition(self, precond: Preconditioner, reports: dict[str, Any]
                     ) -> list[PreconditionedGradient]:
        """comm_opt: every rank preconditions every layer. mem_opt: owners precondition their
        layers and broadcast the results."""
        if self.config.placement == "comm_opt":
            return precond.precondition_layers(reports)
        assert self.placement is not None, "attach() has not run"
        computed = {id(item.state): item
                    for item in precond.precondition_layers(reports, names=self.owned)}
        table = precond.layer_table
        by_name: dict[str, PreconditionedGradient] = {}
        for src in range(self.world_size):
            buffers = []
            for n in self.placement.layers_of(src):
                state = table[n]
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
                by_name[n] = PreconditionedGradient(state, grad, result)
            self.comm.broadcast(buffers, src, "preconditioned_gradients")
        return [by_name[n] for n in table if n in by_name]

    # -------------------------------------------------------------------------- state
    def prepare_state_dict(self, precond: Preconditioner) -> None:
        """Before ``state_dict``: global factors on every rank, owners' solver states everywhere."""
        if self.config.defer_factor_reduction:
            self._dirty = True  # local factors: reduce them now (exact: the EMA is linear)
        self.reduce_factors(precond)
        if self.config.placement == "mem_opt":
            self.share_solver_states(precond)

    def finish_state_dict(self, precond: Preconditioner, state: dict[str, Any]) -> None:
        generators = self.comm.all_gather_object(precond.rng_state(), "metadata")
        state["distributed"] = {
            "world_size": self.world_size, "placement": self.config.placement,
            "generators": generators if any(g is not None for g in generators) else None,
        }
        if self.config.placement == "mem_opt":
            self._drop_foreign_states(precond)

    def after_load(self, precond: Preconditioner, state: dict[str, Any]) -> None:
        self._pending, self._dirty = None, False
        generators = (state.get("distributed") or {}).get("generators")
        if generators is not None and generators[self.rank] is not None:
            precond.set_rng_state(generators[self.rank])
        self._ready = {n for n, s in precond.layer_table.items() if s.solver.ready}
        if self.config.placement == "mem_opt":
            self._drop_foreign_states(precond)

    def _drop_foreign_states(self, precond: Preconditioner) -> None:
        for name in precond.layer_table:
            if name not in self.owned:
                precond.layer_table.replace_solver(name, precond.new_solver(name))

    def report(self) -> dict[str, Any]:
        """Communication so far and the placement, for ``precond.last_report``."""
        makespan = None if self.placement is None else self.placement.makespan_s
        report = {"bytes": dict(self.comm.bytes), "collectives": dict(self.comm.collectives),
                  "owned_layers": sorted(self.owned), "makespan_s": makespan}
        if self.overlap is not None:
            report["overlap"] = self.overlap.report()
        return report
