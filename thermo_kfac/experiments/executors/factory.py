"""Choosing an executor: :func:`make_executor` and the ``--workers``/``--cluster`` flags."""

from __future__ import annotations

import argparse
import re
from typing import Any

from thermo_kfac.experiments.executors.base import CLUSTER_EXTRA, Executor, SerialExecutor, check_timeout
from thermo_kfac.experiments.executors.dask_cluster import (
    DaskExecutor,
    local_cluster_executor,
    slurm_executor,
)
from thermo_kfac.experiments.executors.pool import ProcessPoolExecutor
from thermo_kfac.experiments.executors.security import TLSOptions, security_for

BACKENDS = ("auto", "serial", "processes", "dask")


def dask_available() -> bool:
    """Whether ``dask.distributed`` can be imported (the ``[cluster]`` extra)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def _check_count(name: str, value: Any) -> int | None:
    """None or a positive int (``workers``, ``threads``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def make_executor(workers: int | None = None, cluster: str | None = None, *,
                  threads: int | None = None, device: str = "cpu", backend: str = "auto",
                  retries: int = 1, tls: TLSOptions | Any | None = None,
                  task_timeout: float | None = None) -> Executor:
    """The executor for ``--workers``/``--cluster``.

    - neither (or ``workers=1``): :class:`SerialExecutor` (``threads`` as given).
    - ``workers=N``: a Dask LocalCluster when Dask is installed (``backend="auto"``/``"dask"``),
      else a local process pool (``backend="processes"`` forces it).
    - ``cluster="tcp://host:port"`` (any Dask scheduler address): that cluster's workers.
    - ``cluster="slurm"``: a dask-jobqueue SLURMCluster of ``workers`` jobs (default 1).

    ``threads``: threads per worker (default: cores // workers locally, cores // task slots on
    a remote worker); ``device="cuda"``: worker i on GPU i mod count. ``tls``: a
    :class:`TLSOptions` (the ``--tls*`` flags) or a ``distributed.Security``; a cluster started
    here (``workers=N``, ``"slurm"``) binds to loopback, resp. the jobs' interface, either way.
    ``task_timeout``: seconds a task may run before it is cancelled (its worker restarted where
    the engine allows), retried once, then recorded as failed (see each executor); None: no limit.
    """
    task_timeout = check_timeout(task_timeout)
    executor = _make(workers, cluster, threads, device, backend, retries, tls)
    executor.task_timeout = task_timeout
    return executor


def _make(workers: int | None, cluster: str | None, threads: int | None, device: str, backend: str,
          retries: int, tls: TLSOptions | Any | None) -> Executor:
    workers = _check_count("workers", workers)
    threads = _check_count("threads", threads)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {', '.join(BACKENDS)}")
    if cluster is not None:
        cluster = str(cluster).strip()
        if not cluster:
            raise ValueError("cluster='' is empty; give a scheduler address such as "
                             "tcp://host:8786, or 'slurm'")
        if backend in ("serial", "processes"):
            raise ValueError(f"cluster={cluster!r} needs backend 'dask' or 'auto', not {backend!r}")
        if not dask_available():
            raise ValueError(f"--cluster {cluster} needs Dask distributed: {CLUSTER_EXTRA}")
        if cluster.lower() == "slurm":
            return slurm_executor(workers, threads, device, retries, security_for("slurm", tls))
        if workers is not None:
            raise ValueError(f"--workers {workers} does not apply to --cluster {cluster}: the "
                             "scheduler's workers run the tasks (start more workers there)")
        if "://" not in cluster and not re.fullmatch(r"[\w.\-]+:\d+", cluster):
            raise ValueError(f"--cluster {cluster!r} is not a scheduler address like "
                             "tcp://host:8786 (or host:8786), nor 'slurm'")
        from distributed import Client

        security = security_for("address", tls, cluster)
        if security is not None and security.require_encryption:
            if "://" not in cluster:
                cluster = "tls://" + cluster
            elif not cluster.lower().startswith("tls://"):
                raise ValueError(f"--cluster {cluster!r} is not a TLS address but TLS is required "
                                 "(--tls, certificate files or Dask's configuration): use tls://host:port")
        try:
            client = Client(cluster, timeout="20s", security=security)
        except (OSError, TimeoutError) as err:
            raise ValueError(f"cannot connect to the Dask scheduler at {cluster!r}: {err}") from None
        slots = sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        return DaskExecutor(client, workers=max(1, slots), threads=threads, device=device,
                            retries=retries, label=f"dask scheduler {cluster}")
    if backend == "serial" or (workers in (None, 1) and backend == "auto"):
        _refuse_tls(tls, "without --workers N > 1 (this process runs the tasks)")
        return SerialExecutor(threads, device, retries)
    workers = workers or 1
    if backend == "processes" or (backend == "auto" and not dask_available()):
        _refuse_tls(tls, f"on a local process pool (Dask is not installed: {CLUSTER_EXTRA})")
        return ProcessPoolExecutor(workers, threads, device, retries)
    if not dask_available():
        raise ValueError(f"backend='dask' needs Dask distributed: {CLUSTER_EXTRA}")
    return local_cluster_executor(workers, threads, device, retries, security_for("local", tls))


def _refuse_tls(tls: Any, where: str) -> None:
    """TLS asked for where no Dask connection is made: say so rather than ignore it."""
    if tls is not None and (not isinstance(tls, TLSOptions) or tls.requested):
        raise ValueError(f"TLS settings apply to Dask clusters only, not {where}")


# --------------------------------------------------------------------------------- CLI
def add_arguments(parser: Any) -> None:
    """Add ``--workers`` and ``--cluster`` to a sub-command's parser."""
    group = parser.add_argument_group("parallel execution")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="run the independent runs in N worker processes on this machine (a Dask "
                            "LocalCluster when dask is installed, else a process pool; default: one "
                            "after the other in this process); threads per worker: --threads if the "
                            "command has it, else cores // N")
    group.add_argument("--cluster", default=None, metavar="ADDRESS",
                       help="submit the runs to a running Dask scheduler (tcp://host:8786, or "
                            "tls://host:8786 with the --tls-* files or Dask's TLS configuration), or "
                            "'slurm' for a dask-jobqueue SLURM cluster of --workers jobs (TLS by "
                            "default); needs " + CLUSTER_EXTRA)
    group.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                       help="encrypt and authenticate the Dask connections with TLS (default: on for "
                            "--cluster slurm, per Dask's configuration otherwise); without the files "
                            "below: Dask's configured certificates, else (a cluster started here) "
                            "self-signed ones made for this run")
    group.add_argument("--tls-ca-file", default=None, metavar="PEM",
                       help="CA certificate that signed the scheduler's and workers' certificates")
    group.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="this side's certificate (for --cluster slurm also the scheduler's and "
                            "the workers'), signed by --tls-ca-file")
    group.add_argument("--tls-key", default=None, metavar="PEM",
                       help="private key of --tls-cert (if not in the same file)")
    group.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                       help="a run (task) still running after SECONDS is cancelled (its worker "
                            "process killed and restarted; without --workers/--cluster it is "
                            "interrupted in this process), retried once, then recorded as failed; "
                            "the others go on and a resumed study retries it (default: no limit)")


def from_args(args: Any, *, device: str = "cpu") -> Executor:
    """The executor selected by ``--workers``/``--cluster`` (and ``--threads`` when present)."""
    workers = getattr(args, "workers", None)
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise ValueError(f"--workers={workers} must be a positive integer")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads={threads} must be a positive integer")
    if workers in (None, 1) and getattr(args, "cluster", None) is None:
        threads = None  # serial: the command sets --threads itself, as before
    tls = TLSOptions(getattr(args, "tls", None), getattr(args, "tls_ca_file", None),
                     getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    timeout = getattr(args, "task_timeout", None)
    if timeout is not None:
        check_timeout(timeout)  # before a cluster starts
    return make_executor(workers, getattr(args, "cluster", None), threads=threads, device=device,
                         tls=tls, task_timeout=timeout)
