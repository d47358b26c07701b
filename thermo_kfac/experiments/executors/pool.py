"""Local worker processes (``concurrent.futures``): ``--workers N`` without Dask."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from thermo_kfac.experiments.executors.base import (
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

# Set in each pool worker by its initializer.
_pool_state: dict[str, Any] = {}


def _pool_initializer(threads: int | None, device: str, indices: Any, started: Any) -> None:
    index = indices.get()
    _pool_state.update(index=index, started=started)
    apply_worker_settings(threads, device, index)


def _pool_call(token: int, payload: bytes) -> Any:
    # Written through a pipe before the task runs, so a worker that dies in the task is known,
    # and which process to stop when the task runs past the timeout.
    _pool_state["started"].put((token, os.getpid(), time.time()))
    fn, kwargs = unpack(payload)
    return fn(**kwargs)


class ProcessPoolExecutor(Executor):
    """``workers`` local processes (``concurrent.futures``), one task at a time each; the pool
    lives until :meth:`close`, so workers stay warm between :meth:`map` calls.

    A worker that dies breaks the whole pool; the pool is then restarted and the tasks that were
    running are charged an attempt (the culprit is among them), the others are resubmitted free.
    A task running past ``task_timeout`` has its worker killed, which breaks the pool the same
    way; then only that task is charged."""

    name = "processes"

    def __init__(self, workers: int, threads: int | None = None, device: str = "cpu",
                 retries: int = 1, task_timeout: float | None = None) -> None:
        super().__init__(workers, threads if threads is not None else default_threads(workers),
                         device, retries, task_timeout)
        from thermo_kfac.experiments.launch import child_start_method

        self.context = multiprocessing.get_context(child_start_method())
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.started_queue: Any = None
        self.started: dict[int, tuple[int, float]] = {}  # token -> (worker pid, start time) of begun tasks
        self.timed_out: set[int] = set()  # tokens whose worker was killed for the timeout
        self.token = 0

    def _ensure_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.pool is None:
            indices = self.context.Queue()
            for i in range(self.workers):
                indices.put(i)
            self.started_queue = self.context.SimpleQueue()
            self.started = {}
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=self.context, initializer=_pool_initializer,
                initargs=(self.threads, self.device, indices, self.started_queue))
        return self.pool

    def _drain(self) -> None:
        # Read the start notes often: the pipe would fill and block the workers otherwise.
        while self.started_queue is not None and not self.started_queue.empty():
            token, pid, start = self.started_queue.get()
            self.started[token] = (pid, start)

    def _poll_s(self) -> float | None:
        """How long to wait for a result before checking the running tasks' times."""
        return None if self.task_timeout is None else min(1.0, self.task_timeout / 4)

    def _kill_overdue(self, futures: dict[Any, tuple[int, int]], pending: set[Any]) -> None:
        """Kill the worker of each pending task past the timeout (its pool then breaks)."""
        if self.task_timeout is None:
            return
        now = time.time()
        for future in pending:
            token = futures[future][1]
            begun = self.started.get(token)
            if begun is not None and token not in self.timed_out and now - begun[1] > self.task_timeout:
                self.timed_out.add(token)
                try:
                    os.kill(begun[0], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):  # it ended meanwhile
                    pass

    def _discard_pool(self, wait: bool) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=True)
        self.pool, self.started_queue = None, None

    def _submit(self, task: Task) -> tuple[concurrent.futures.Future[Any] | None, int]:
        self.token += 1
        try:
            future = self._ensure_pool().submit(_pool_call, self.token, pack(task))
        except concurrent.futures.process.BrokenProcessPool:
            return None, self.token
        return future, self.token

    def _run(self, tasks: list[Task], bar: ProgressBar) -> Iterator[TaskResult]:
        attempts = [0] * len(tasks)
        queue = list(range(len(tasks)))
        complete = False
        try:
            while queue:
                futures: dict[concurrent.futures.Future[Any], tuple[int, int]] = {}
                broken: list[tuple[int, int]] = []
                for index in queue:
                    future, token = self._submit(tasks[index])
                    if future is None:
                        broken.append((index, token))
                    else:
                        futures[future] = (index, token)
                queue = []
                pending = set(futures)
                while pending:
                    bar.update(running=min(len(pending), self.workers))
                    finished, pending = concurrent.futures.wait(
                        pending, timeout=self._poll_s(), return_when=concurrent.futures.FIRST_COMPLETED)
                    self._drain()
                    self._kill_overdue(futures, pending)
                    for future in finished:
                        index, token = futures[future]
                        err = future.exception()
                        if isinstance(err, concurrent.futures.process.BrokenProcessPool):
                            broken.append((index, token))
                            continue
                        attempts[index] += 1
                        if err is not None and attempts[index] <= self.retries:
                            again, token = self._submit(tasks[index])  # same pool unless it broke
                            if again is None:
                                broken.append((index, token))
                            else:
                                futures[again] = (index, token)
                                pending.add(again)
                            continue
                        result = (TaskResult(tasks[index].key, index, future.result(), None, attempts[index])
                                  if err is None else
                                  TaskResult(tasks[index].key, index, None, error_text(err), attempts[index]))
                        bar.update(finished=result, running=min(len(pending), self.workers))
                        yield result
                if broken:
                    self._drain()
                    started = self.started
                    self._discard_pool(wait=True)
                    # A task past the timeout whose worker was killed here is the culprit; else the
                    # dead worker's task is among those that had started; if none is known to
                    # have started, charge them all so that the loop ends.
                    timed_out = {i for i, tok in broken if tok in self.timed_out}
                    charged = (timed_out or {i for i, tok in broken if tok in started}
                               or {i for i, _ in broken})
                    for index in sorted({i for i, _ in broken}):
                        if index in charged:
                            attempts[index] += 1
                        if attempts[index] <= self.retries:
                            queue.append(index)
                            continue
                        error = (f"{timeout_text(self.task_timeout or 0)} (worker killed)"
                                 if index in timed_out else "worker process died while running the task")
                        result = TaskResult(tasks[index].key, index, None, error, attempts[index])
                        bar.update(finished=result)
                        yield result
            complete = True
        finally:
            if not complete:  # an interrupted driver does not wait for the running tasks
                self._discard_pool(wait=False)

    def close(self) -> None:
        self._discard_pool(wait=True)
