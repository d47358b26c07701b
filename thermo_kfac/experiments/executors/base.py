"""Tasks, results, the :class:`Executor` interface, the serial executor and worker settings."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from thermo_kfac.experiments.progress import print_line, resolve_progress

CLUSTER_EXTRA = "pip install 'thermo-kfac[cluster]'"
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
                   "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(**kwargs)``; ``fn`` must be a top-level (importable) function and
    ``kwargs`` picklable. ``key`` names the task in results and progress (unique in a map)."""

    key: str
    fn: Callable[..., Any]
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """What became of a task: ``value`` (its return value) or ``error`` (text of the last
    failure), the task's position ``index`` in the submitted list, and the attempts made."""

    key: str
    index: int
    value: Any = None
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads(workers: int, cores: int | None = None) -> int:
    """Threads per worker so that ``workers`` workers fill but do not oversubscribe the cores."""
    return max(1, (cores if cores is not None else available_cores()) // max(1, workers))


def error_text(err: BaseException) -> str:
    """``Type: first line of the message`` (what a failed task records)."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''}".rstrip(": ").rstrip()


# ------------------------------------------------------------------------------ payloads
def pack(task: Task) -> bytes:
    """``task.fn`` and its kwargs as bytes (cloudpickle when installed: functions defined in a
    script travel by value). Tasks travel packed and are unpacked *inside* the task, so that a
    worker that cannot load one (a missing module, another version of the code) fails that task
    with the error instead of failing the worker."""
    try:
        import cloudpickle as pickler
    except ImportError:
        import pickle as pickler
    try:
        return pickler.dumps((task.fn, dict(task.kwargs)))
    except Exception as err:  # e.g. a lambda without cloudpickle, an open file in kwargs
        raise ValueError(f"task {task.key!r} cannot be sent to a worker process: {error_text(err)}") from None


def unpack(payload: bytes) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The ``(fn, kwargs)`` of :func:`pack`."""
    import pickle

    return pickle.loads(payload)


# ------------------------------------------------------------------------- worker settings
_applied: dict[int, tuple[int | None, str, int]] = {}  # thread id -> settings applied there


def apply_worker_settings(threads: int | None, device: str = "cpu", worker_index: int = 0) -> None:
    """Limit this process to ``threads`` threads (torch, numba, BLAS/OpenMP) and, for
    ``device="cuda"``, make GPU ``worker_index mod count`` the current one.

    Idempotent and cheap after the first call in a thread (numba's limit is per thread, so it is
    applied in each thread that runs tasks)."""
    key = threading.get_ident()
    settings = (threads, str(device), int(worker_index))
    if _applied.get(key) == settings:
        return
    import torch

    if threads is not None:
        threads = max(1, int(threads))
        for name in THREAD_ENV_VARS:  # for libraries that read them when loaded later
            os.environ[name] = str(threads)
        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads)  # BLAS and OpenMP pools already loaded
        except ImportError:  # a dependency of thermo-kfac, but keep workers usable without it
            pass
        if "numba" in sys.modules:  # otherwise NUMBA_NUM_THREADS applies when it is imported
            import numba

            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(worker_index) % torch.cuda.device_count())
    _applied[key] = settings


def worker_report() -> dict[str, Any]:
    """Thread and device settings in effect in the calling process (for checks and logs)."""
    import torch

    report: dict[str, Any] = {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                              "env": {k: os.environ.get(k) for k in THREAD_ENV_VARS}}
    try:
        import numba

        report["numba_threads"] = numba.get_num_threads()
    except ImportError:
        report["numba_threads"] = None
    try:
        from threadpoolctl import threadpool_info

        report["threadpools"] = {f"{p['user_api']}:{p['internal_api']}": p["num_threads"]
                                 for p in threadpool_info()}
    except ImportError:
        report["threadpools"] = {}
    report["cuda_device"] = torch.cuda.current_device() if torch.cuda.is_available() else None
    return report


# ------------------------------------------------------------------------------ progress
class ProgressBar:
    """Progress of a map: done/failed/running counts on one tqdm bar (``"bar"``; tqdm estimates
    the time left), or one plain line per finished task (``"lines"``), or nothing.

    ``enabled``: a ``--progress`` mode (:func:`thermo_kfac.experiments.progress.resolve_progress`;
    ``True`` is ``"auto"``, ``False`` ``"none"``)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: str | bool) -> None:
        self.done, self.failed, self.running = 0, 0, 0
        self.total, self.finished, self.desc = total, initial, desc
        self.mode = resolve_progress(enabled)
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="task", file=sys.stderr,
                            dynamic_ncols=True)

    def counts(self) -> str:
        return f"done {self.done}, failed {self.failed}, running {self.running}"

    def update(self, *, finished: TaskResult | None = None, running: int | None = None) -> None:
        if running is not None:
            self.running = running
        if finished is not None:
            self.finished += 1
            if finished.ok:
                self.done += 1
            else:
                self.failed += 1
        if self.bar is not None:
            self.bar.set_postfix_str(self.counts(), refresh=finished is None)
            if finished is not None:
                self.bar.update(1)
        elif self.mode == "lines" and finished is not None:
            what = "done" if finished.ok else f"FAILED ({finished.error})"
            print_line(f"{self.desc}: {self.finished}/{self.total} tasks ({self.counts()}); "
                       f"{finished.key} {what}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ executors
class Executor(ABC):
    """Runs independent :class:`Task` s; use as a context manager (or call :meth:`close`)."""

    name = "executor"

    def __init__(self, workers: int, threads: int | None, device: str = "cpu", retries: int = 1,
                 task_timeout: float | None = None) -> None:
        self.workers = workers
        self.threads = threads
        self.device = str(device)
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries={retries!r} must be a non-negative integer")
        self.retries = retries
        self.task_timeout = check_timeout(task_timeout)

    @property
    def parallel(self) -> bool:
        """Whether tasks may run at the same time (then timings are measured under shared load)."""
        return True

    def map(self, tasks: Iterable[Task], *, progress: str | bool = False, desc: str = "tasks",
            initial: int = 0) -> Iterator[TaskResult]:
        """Run ``tasks``; yield one result per task as it completes (not in order).

        ``progress``: a ``--progress`` mode (``auto``, ``bar``, ``lines``, ``none``; ``True`` is
        ``auto``). ``initial``: tasks already done before (a resumed study), counted in the progress.
        Closing the iterator early cancels the tasks that have not started."""
        tasks = list(tasks)
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise ValueError("task keys must be unique")
        for task in tasks:
            if not callable(task.fn):
                raise ValueError(f"task {task.key!r}: fn={task.fn!r} is not callable")
        bar = ProgressBar(len(tasks) + initial, initial, desc, progress)
        try:
            if tasks:
                yield from self._run(tasks, bar)
        finally:
            bar.close()

    @abstractmethod
    def _run(self, tasks: list[Task], bar: ProgressBar) -> Iterator[TaskResult]: ...

    def describe(self) -> str:
        threads = "default" if self.threads is None else str(self.threads)
        timeout = "" if self.task_timeout is None else f", task timeout {self.task_timeout:g} s"
        return (f"{self.name}: {self.workers} worker(s), {threads} thread(s) each, device "
                f"{self.device}{timeout}")

    def close(self) -> None:
        """Release workers and connections (idempotent)."""
        self.closed = True

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """Tasks one after the other in this process, in the given order (today's behaviour).

    ``threads``: torch/BLAS threads while the tasks run (restored afterwards); None leaves them.
    ``task_timeout``: a task running longer is interrupted by ``SIGALRM`` (POSIX, main thread
    only): Python code and sleeps stop at once, a long call into C code when it returns."""

    name = "serial"

    def __init__(self, threads: int | None = None, device: str = "cpu", retries: int = 1,
                 task_timeout: float | None = None) -> None:
        super().__init__(1, threads, device, retries, task_timeout)

    @property
    def parallel(self) -> bool:
        return False

    def _run(self, tasks: list[Task], bar: ProgressBar) -> Iterator[TaskResult]:
        if self.task_timeout is not None and not (
                hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()):
            raise ValueError("task_timeout on the serial executor needs a POSIX system and the main "
                             "thread (SIGALRM); use --workers N to run the tasks in worker processes")
        for index, task in enumerate(tasks):
            bar.update(running=1)
            error = None
            for attempt in range(1, self.retries + 2):
                try:
                    with ThreadLimit(self.threads), Alarm(self.task_timeout):
                        value = task.fn(**task.kwargs)
                except Exception as err:  # a failed task is recorded; Ctrl-C still stops
                    error = error_text(err)
                    continue
                result = TaskResult(task.key, index, value, None, attempt)
                break
            else:
                result = TaskResult(task.key, index, None, error, self.retries + 1)
            bar.update(finished=result, running=0)
            yield result


class TaskTimeout(Exception):
    """A task ran past the executor's ``task_timeout``."""


def timeout_text(seconds: float) -> str:
    """What a timed-out task records as its error."""
    return f"TaskTimeout: timed out after {seconds:g} s"


def check_timeout(seconds: float | None) -> float | None:
    """None or a positive, finite number of seconds (``--task-timeout``)."""
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not (
            math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"task_timeout={seconds!r} must be a positive number of seconds (or None)")
    return float(seconds)


class Alarm:
    """Raise :class:`TaskTimeout` in the main thread after ``seconds`` (None: no limit); the
    previous ``SIGALRM`` handler and timer are restored on exit."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds

    def _fire(self, signum: int, frame: Any) -> None:
        raise TaskTimeout(f"timed out after {self.seconds:g} s")

    def __enter__(self) -> None:
        if self.seconds is not None:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        if self.seconds is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


class ThreadLimit:
    """Temporarily set torch's and the BLAS/OpenMP pools' thread count (None: no change)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        if self.threads is None:
            return
        import torch

        # torch's thread count is OpenMP's: read it before limiting the pools, restore it after.
        self.previous = torch.get_num_threads()
        try:
            from threadpoolctl import threadpool_limits

            self.limits: Any = threadpool_limits(limits=self.threads)
        except ImportError:
            self.limits = None
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        if self.threads is None:
            return
        import torch

        if self.limits is not None:
            self.limits.restore_original_limits()
        torch.set_num_threads(self.previous)


def run_all(executor: Executor, tasks: Iterable[Task], *, progress: str | bool = False,
            desc: str = "tasks") -> list[Any]:
    """Run ``tasks`` and return their values in the given order; if any task failed (twice),
    raise a ValueError listing each with its error (one line for the CLI)."""
    results = sorted(executor.map(tasks, progress=progress, desc=desc), key=lambda r: r.index)
    failed = [f"{r.key}: {r.error}" for r in results if not r.ok]
    if failed:
        raise ValueError(f"{len(failed)} of {len(results)} task(s) failed: " + "; ".join(failed))
    return [r.value for r in results]
