"""Dask ``distributed``: a LocalCluster, a running scheduler, or a dask-jobqueue SLURM cluster."""

from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

from thermo_kfac.experiments.executors.base import (
    CLUSTER_EXTRA,
    THREAD_ENV_VARS,
    Executor,
    ProgressBar,
    Task,
    TaskResult,
    apply_worker_settings,
    default_threads,
    error_text,
    pack,
    timeout_text,
    unpack,
)


def _dask_call(payload: bytes, threads: int | None, device: str) -> Any:
    """Run a task on a Dask worker after applying its thread/GPU settings there."""
    from distributed import get_worker

    worker = get_worker()
    if threads is None:  # a cluster started elsewhere: share this host's cores among its slots
        threads = default_threads(worker.state.nthreads)
    apply_worker_settings(threads, device, _worker_number(worker.name))
    key = str(worker.get_current_task())
    _RUNNING[key] = time.monotonic()  # read by _running_for (the driver's task timeout)
    try:
        fn, kwargs = unpack(payload)
        return fn(**kwargs)
    finally:
        _RUNNING.pop(key, None)


_RUNNING: dict[str, float] = {}  # in a worker process: key of each running task -> its start


def _running_for() -> dict[str, float]:
    """Run on a worker's event loop (``Client.run``): seconds each of its tasks has been running."""
    now = time.monotonic()
    return {key: now - start for key, start in list(_RUNNING.items())}


async def _exit_soon() -> None:
    """Run on a worker's event loop (``Client.run``): end its process just after replying."""
    import asyncio
    import os
    import signal

    asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGKILL)


def _worker_number(name: Any) -> int:
    """LocalCluster workers are named 0..n-1; others (``SLURMCluster-3``): the trailing number."""
    if isinstance(name, int):
        return name
    match = re.search(r"(\d+)$", str(name))
    return int(match.group(1)) if match else 0


class DaskExecutor(Executor):
    """Tasks on a Dask ``distributed`` cluster through ``client`` (use :func:`make_executor`).

    Worker deaths: a LocalCluster started here is configured so that the scheduler gives up on a
    task at the first death of its worker (``allowed-failures`` 0) and hands a one-thread
    worker one task at a time (``worker-saturation`` 1.0), so the retry count is this class's
    alone and a death charges only the task that caused it. An external scheduler keeps its own
    settings (Dask's default retries a task whose worker died 3 times before this class's retry).

    ``task_timeout``: a task that has been processing on a worker for longer is cancelled and its
    worker process ended (its nanny, which LocalCluster, ``dask worker`` and SLURM jobs start,
    starts a fresh one; a worker without a nanny is gone), then retried or recorded as failed
    like any other failure.
    """

    name = "dask"

    def __init__(self, client: Any, *, workers: int, threads: int | None, device: str = "cpu",
                 retries: int = 1, owned: list[Any] | None = None, label: str = "dask",
                 max_in_flight: int | None = None, resources: dict[str, float] | None = None,
                 task_timeout: float | None = None) -> None:
        super().__init__(workers, threads, device, retries, task_timeout)
        self.client = client
        self.owned = owned or []  # cluster objects started here, closed by close()
        self.name = label
        # Tasks submitted at a time: a LocalCluster's task slots; None (clusters that grow or
        # start late, e.g. SLURM jobs waiting in the queue): all at once, the scheduler queues.
        self.max_in_flight = max_in_flight
        self.resources = resources  # worker resources each task needs (Dask's ``resources=``)

    def _run(self, tasks: list[Task], bar: ProgressBar) -> Iterator[TaskResult]:
        from distributed import as_completed

        run_id = uuid.uuid4().hex[:8]
        payloads = [pack(t) for t in tasks]
        meta: dict[Any, tuple[int, int]] = {}
        waiting = [(i, 1) for i in range(len(tasks))]
        waiting.reverse()  # pop() from the end: submitted in the given order

        def submit(index: int, attempt: int) -> Any:
            # Same key prefix for every task: one task group on the scheduler's dashboard.
            key = f"thermo-kfac-task-{run_id}-{index}-try{attempt}"
            future = self.client.submit(_dask_call, payloads[index], self.threads, self.device,
                                        key=key, pure=False, retries=0, resources=self.resources)
            meta[future] = (index, attempt)
            return future

        # On a LocalCluster at most one task per worker slot is submitted at a time: the scheduler
        # would otherwise queue several on one worker, and its death would charge them all.
        limit = self.max_in_flight or len(tasks)
        completed = as_completed()
        watch = _Watch(self.client, self.task_timeout)
        try:
            while waiting or meta:
                while waiting and len(meta) < limit:
                    completed.add(submit(*waiting.pop()))
                bar.update(running=min(len(meta), max(1, self.workers)))
                # tasks past the timeout: cancelled, their workers ended; charged like failures
                ready = watch.overdue(meta) if watch.due() else []
                if completed.has_ready() or self.task_timeout is None:
                    ready.append(next(completed))
                elif not ready:
                    time.sleep(watch.poll_s)
                for future in ready:
                    if future not in meta:  # cancelled for its timeout before; already charged
                        continue
                    index, attempt = meta.pop(future)
                    if future.status == "finished" and future not in watch.timed_out:
                        result = TaskResult(tasks[index].key, index, future.result(), None, attempt)
                    else:
                        error = (f"{timeout_text(watch.seconds or 0)} ({watch.timed_out[future]})"
                                 if future in watch.timed_out else
                                 _dask_error(future.exception() if future.status == "error" else None))
                        if attempt <= self.retries:
                            waiting.append((index, attempt + 1))  # next in line
                            future.release()
                            continue
                        result = TaskResult(tasks[index].key, index, None, error, attempt)
                    future.release()
                    bar.update(finished=result, running=min(len(meta), max(1, self.workers)))
                    yield result
        finally:
            for future in list(meta):
                future.cancel()

    def close(self) -> None:
        # A cluster started here logs its shutdown at INFO level: keep the terminal clean.
        handlers = [h for h in logging.getLogger("distributed").handlers
                    if isinstance(h, logging.StreamHandler)]
        levels = [h.level for h in handlers]
        for handler in handlers if self.owned else []:
            handler.setLevel(logging.CRITICAL)
        try:
            if self.client is not None:
                self.client.close()
                self.client = None
            for cluster in self.owned:
                cluster.close()
            self.owned = []
        finally:
            for handler, level in zip(handlers, levels, strict=True):
                handler.setLevel(level)


class _Watch:
    """The running time of a DaskExecutor's tasks, as each worker measures it (a task's own
    start, not its submission or queueing), and the cancellation of those past the timeout."""

    def __init__(self, client: Any, seconds: float | None) -> None:
        self.client, self.seconds = client, seconds
        self.poll_s = 0.25 if seconds is None else min(1.0, seconds / 4)
        self.timed_out: dict[Any, str] = {}  # future -> what became of its worker
        self.checked = -math.inf

    def due(self) -> bool:
        """Whether to check the running times now (at most every ``poll_s``; never without a timeout)."""
        if self.seconds is None or time.monotonic() - self.checked < self.poll_s:
            return False
        self.checked = time.monotonic()
        return True

    def overdue(self, meta: dict[Any, Any]) -> list[Any]:
        """The futures of ``meta`` past the timeout, each cancelled and its worker process ended."""
        if self.seconds is None or not meta:
            return []
        # on the workers' event loops, so a worker whose task thread is stuck still answers
        replies = self.client.run(_running_for, on_error="return")
        where = {key: (address, elapsed) for address, running in replies.items()
                 if isinstance(running, dict) for key, elapsed in running.items()}
        late = []
        for future in meta:
            address, elapsed = where.get(str(future.key), ("", 0.0))
            if future.done() or future in self.timed_out or elapsed <= self.seconds:
                continue
            future.cancel()
            self.timed_out[future] = self._end_worker(address)
            late.append(future)
        return late

    def _end_worker(self, address: str) -> str:
        """End the worker process stuck in a task (its nanny starts a new one); return what happened.

        The exit runs on the worker's event loop, not in the stuck task's thread. The scheduler
        is then waited on to drop the worker, so that no retry lands on the dying process."""
        try:
            self.client.run(_exit_soon, workers=[address])
        except Exception as err:  # gone already, or unreachable
            return f"worker not ended: {error_text(err)}"
        deadline = time.monotonic() + 60.0
        while address in self.client.scheduler_info()["workers"] and time.monotonic() < deadline:
            time.sleep(0.1)
        return "worker restarted"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:60]


def _dask_error(err: BaseException | None) -> str:
    if err is None:
        return "task did not finish (cancelled)"
    if type(err).__name__ == "KilledWorker":
        return "worker process died while running the task (KilledWorker)"
    return error_text(err)


LOOPBACK = "127.0.0.1"
# The only HTTP route a scheduler or worker started here serves (Dask's defaults add the
# dashboard's pages, logs, call stacks and Prometheus metrics).
HTTP_ROUTES = ["distributed.http.health"]


def local_cluster_executor(workers: int, threads: int | None = None, device: str = "cpu",
                           retries: int = 1, security: Any = None) -> DaskExecutor:
    """A Dask ``LocalCluster`` of ``workers`` processes, one task at a time each.

    Everything it starts listens on 127.0.0.1 only (scheduler, nannies, workers and their HTTP
    servers, which serve nothing but a health check). ``security``: a ``distributed.Security``
    (TLS between all of them and the client), or None for Dask's configuration."""
    import dask
    from distributed import Client, LocalCluster

    threads = threads if threads is not None else default_threads(workers)
    env = dict.fromkeys(THREAD_ENV_VARS, str(threads))
    # Workers are spawned with this configuration (the nanny sends it), so the routes hold there too.
    with dask.config.set({"distributed.scheduler.worker-saturation": 1.0,
                          "distributed.scheduler.allowed-failures": 0,
                          "distributed.scheduler.http.routes": HTTP_ROUTES,
                          "distributed.worker.http.routes": HTTP_ROUTES}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host=LOOPBACK,
                               dashboard_address=None, env=env, silence_logs=50, security=security,
                               # no dashboard; the scheduler's HTTP server (one always starts) on a
                               # free loopback port: ":0" would mean every interface
                               scheduler_kwargs={"allowed_failures": 0,
                                                 "dashboard_address": f"{LOOPBACK}:0"})
    client = Client(cluster)
    return DaskExecutor(client, workers=workers, threads=threads, device=device, retries=retries,
                        owned=[cluster], label="dask LocalCluster", max_in_flight=workers)


TASK_RESOURCE = "thermo_kfac_task"  # a worker resource: one task at a time on a SLURM job's worker


def slurm_cluster(threads: int | None = None, security: Any = None, **options: Any) -> tuple[Any, int]:
    """A ``dask_jobqueue.SLURMCluster`` (not yet scaled) whose jobs run one worker that takes one
    task at a time with all of the job's cores; returns it and the threads a task uses.

    Queue, account, memory, walltime and extra ``#SBATCH`` lines come from ``options`` or Dask's
    configuration (``~/.config/dask/jobqueue.yaml`` section ``jobqueue.slurm``, or environment
    variables such as ``DASK_JOBQUEUE__SLURM__MEMORY=8GB``); ``threads`` sets the job's cores.

    Network: the scheduler listens on the one address the job scripts connect to (that of the
    configured ``interface``, else this host's outgoing address), not on every interface; its HTTP
    server and the jobs' worker HTTP servers on loopback, serving a health check only.
    ``security`` (a ``distributed.Security``): TLS between scheduler, workers and this client;
    certificates held only in memory are written (mode 0600) to ``shared-temp-directory``
    (default: the current directory), which the jobs must be able to read."""
    try:
        import dask
        from dask_jobqueue import SLURMCluster
        from distributed.utils import get_ip
    except ImportError:
        raise ValueError("--cluster slurm needs dask-jobqueue: " + CLUSTER_EXTRA
                         + " (or pip install dask-jobqueue)") from None
    if threads is not None:
        options["cores"] = threads
    options.setdefault("processes", 1)
    # Dask runs `cores` tasks at once on a worker; the resource limits it to one, which then
    # gets every core of the job. Nothing outside the job's node needs its worker's HTTP server.
    options["worker_extra_args"] = list(options.get("worker_extra_args") or []) + [
        "--resources", f"{TASK_RESOURCE}=1", "--dashboard-address", f"{LOOPBACK}:0"]
    scheduler = dict(options.get("scheduler_options")
                     or dask.config.get("jobqueue.slurm.scheduler-options", None) or {})
    interface = options.get("interface") or dask.config.get("jobqueue.slurm.interface", None)
    if "host" not in scheduler and "interface" not in scheduler and not interface:
        # dask-jobqueue's default binds every interface and writes get_ip() into the job script
        scheduler["host"] = get_ip()
    scheduler.setdefault("dashboard_address", f"{LOOPBACK}:0")
    options["scheduler_options"] = scheduler
    if security is not None:
        options["security"] = security
        options.setdefault("protocol", "tls://")
        if dask.config.get("jobqueue.slurm.shared-temp-directory", None) is None:
            options.setdefault("shared_temp_directory", os.getcwd())
    try:
        with dask.config.set({"distributed.scheduler.http.routes": HTTP_ROUTES}):
            cluster = SLURMCluster(**options)
    except ValueError as err:  # e.g. no memory/cores given and none configured
        detail = " ".join(str(err).split())  # one line
        raise ValueError(f"cannot configure the SLURM cluster: {detail} (set jobqueue.slurm options "
                         "in ~/.config/dask/jobqueue.yaml or DASK_JOBQUEUE__SLURM__* variables; "
                         "see docs/noise_study.md)") from None
    cores = options.get("cores") or dask.config.get("jobqueue.slurm.cores")
    return cluster, max(1, int(cores) // int(options["processes"]))


def slurm_executor(jobs: int | None = None, threads: int | None = None, device: str = "cpu",
                   retries: int = 1, security: Any = None, **options: Any) -> DaskExecutor:
    """:func:`slurm_cluster` scaled to ``jobs`` SLURM jobs (default 1), as an executor."""
    from distributed import Client

    cluster, task_threads = slurm_cluster(threads, security, **options)
    jobs = jobs or 1
    cluster.scale(jobs=jobs)
    client = Client(cluster)
    return DaskExecutor(client, workers=jobs, threads=task_threads, device=device, retries=retries,
                        owned=[cluster], label="dask SLURMCluster", resources={TASK_RESOURCE: 1})
