"""Executors: run independent tasks serially, in local processes, or on a Dask cluster.

A study (``noise-study``, ``compare``, ``project --sweep``) is a list of independent tasks, each
a picklable top-level function and its keyword arguments. :meth:`Executor.map` runs them and
yields a :class:`TaskResult` per task *as it completes*; the caller (the driver) alone writes
files, so atomic result files and resume work the same whatever runs the tasks.

Implementations (see :func:`make_executor`):

- :class:`SerialExecutor`: one task after the other in this process (the default).
- :class:`ProcessPoolExecutor`: ``--workers N`` local processes (``concurrent.futures``), used
  when Dask is not installed.
- :class:`DaskExecutor`: a Dask ``distributed`` client: ``--workers N`` starts a
  ``LocalCluster`` of N one-task processes, ``--cluster tcp://host:port`` connects to a running
  scheduler, ``--cluster slurm`` starts a ``dask_jobqueue.SLURMCluster``. A LocalCluster listens
  on loopback only; TLS settings: :class:`TLSOptions` (``security.py``).

Every executor gives a task two attempts: a task that raises, whose worker process dies, or
that runs past ``task_timeout`` (``--task-timeout``; then cancelled: its worker process killed
and restarted, or on the serial executor interrupted by ``SIGALRM``) is run once more, then
recorded as failed (``TaskResult.error``) and the others go on. Tasks seed
themselves from their arguments, so results do not depend on which worker ran them or when.

Threads: each worker runs one task at a time with ``threads`` threads (default: this host's
cores // workers, at least 1) for torch, numba, and BLAS/OpenMP (threadpoolctl, plus the usual
environment variables for libraries loaded later), so N workers do not oversubscribe the cores.
With ``device="cuda"`` worker i uses GPU ``i mod (number of GPUs)``.
"""

from __future__ import annotations

from thermo_kfac.experiments.executors.base import (
    CLUSTER_EXTRA,
    THREAD_ENV_VARS,
    Executor,
    ProgressBar,
    SerialExecutor,
    Task,
    TaskResult,
    TaskTimeout,
    ThreadLimit,
    apply_worker_settings,
    available_cores,
    check_timeout,
    default_threads,
    error_text,
    pack,
    run_all,
    timeout_text,
    unpack,
    worker_report,
)
from thermo_kfac.experiments.executors.dask_cluster import (
    DaskExecutor,
    local_cluster_executor,
    slurm_cluster,
    slurm_executor,
)
from thermo_kfac.experiments.executors.factory import (
    BACKENDS,
    add_arguments,
    dask_available,
    from_args,
    make_executor,
)
from thermo_kfac.experiments.executors.pool import ProcessPoolExecutor
from thermo_kfac.experiments.executors.security import TLSOptions

__all__ = [
    "BACKENDS", "CLUSTER_EXTRA", "THREAD_ENV_VARS", "DaskExecutor", "Executor", "ProcessPoolExecutor",
    "ProgressBar", "SerialExecutor", "TLSOptions", "Task", "TaskResult", "TaskTimeout", "ThreadLimit",
    "add_arguments", "apply_worker_settings", "available_cores", "check_timeout", "dask_available",
    "default_threads", "error_text", "from_args", "local_cluster_executor", "make_executor", "pack",
    "run_all", "slurm_cluster", "slurm_executor", "timeout_text", "unpack",
    "worker_report",
]
