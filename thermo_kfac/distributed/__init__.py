"""Data-parallel K-FAC on ``torch.distributed``: factor reduction and per-layer solver placement.

:class:`DistributedKFAC` is the distribution strategy of a
:class:`~thermo_kfac.KFACPreconditioner`: built inside an initialized process group and passed in,
``KFACPreconditioner(model, distributed=DistributedKFAC(DistributedConfig(...)))``, for a model
wrapped in ``DistributedDataParallel`` or an unwrapped one (the library never builds it itself,
and refuses to run inside a multi-rank group without a strategy unless ``distributed=False``).
What changes across ranks:

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

Layout: :mod:`.config` (the config), :mod:`.placement` (predicted solve
times, assignment rules), :mod:`.communication` (fused collectives), :mod:`.overlap` (statistics
reduced from the backward pass, dynamic fusion buckets), :mod:`.kfac` (the glue). The
torchrun launcher and its command-line options live in :mod:`thermo_kfac.experiments.launch`.
"""

from thermo_kfac.distributed.communication import Communicator, PendingReduction
from thermo_kfac.distributed.config import ASSIGNMENT_RULES, FUSIONS, PLACEMENT_MODES, DistributedConfig
from thermo_kfac.distributed.kfac import DistributedKFAC
from thermo_kfac.distributed.overlap import PROFILE_STEPS, BackwardFactorReduction
from thermo_kfac.distributed.placement import (
    DIGITAL_SOLVE_METHODS,
    GRANULARITIES,
    Placement,
    SolveTask,
    assign_layers,
    layer_solve_tasks,
)
from thermo_kfac.process_group import (
    check_resume,
    is_distributed,
    is_main_process,
    rank,
    unwrap,
    world_size,
)
from thermo_kfac.solvers.base import digital_method_of

__all__ = [
    "ASSIGNMENT_RULES",
    "BackwardFactorReduction",
    "DIGITAL_SOLVE_METHODS",
    "FUSIONS",
    "GRANULARITIES",
    "PLACEMENT_MODES",
    "PROFILE_STEPS",
    "Communicator",
    "DistributedConfig",
    "DistributedKFAC",
    "PendingReduction",
    "Placement",
    "SolveTask",
    "assign_layers",
    "check_resume",
    "digital_method_of",
    "is_distributed",
    "is_main_process",
    "layer_solve_tasks",
    "rank",
    "unwrap",
    "world_size",
]
