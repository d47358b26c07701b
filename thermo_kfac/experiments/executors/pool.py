"""Local worker processes (``concurrent.futures``): ``--workers N`` without Dask."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
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
    unpack,
)

# Set in each pool worker by its initializer.
_pool_state: dict[str, Any] = {}


def _pool_initializer(threads: int | None, device: str, indices: Any, started: Any) -> None:
    index = indices.get()
    _pool_state.update(index=index, started=started)
    apply_worker_settings(threads, device, index)


def _pool_call(token: int, payload: bytes) -> Any:
    # Written through a pipe before the task runs, so a worker that dies in the task is known.
    _pool_state["started"].put(token)
    fn, kwargs = unpack(payload)
    return fn(**kwargs)


class ProcessPoolExecutor(Executor):
    """``workers`` local processes (``concurrent.futures``), one task at a time each; the pool
    lives until :meth:`close`, so workers stay warm between :meth:`map` calls.

    A worker that dies breaks the whole pool; the pool is then restarted and the tasks that were
    running are charged an attempt (the culprit is among them), the others are resubmitted free."""

    name = "processes"

    def __init__(self, workers: int, threads: int | None = None, device: str = "cpu",
                 retries: int = 1) -> None:
        super().__init__(workers, threads if threads is not None else default_threads(workers),
                         device, retries)
        from thermo_kfac.experiments.launch import child_start_method

        self.context = multiprocessing.get_context(child_start_method())
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.started_queue: Any = None
        self.started: set[int] = set()  # tokens of submissions that a worker began
        self.token = 0

    def _ensure_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self.pool is None:
            indices = self.context.Queue()
            for i in range(self.workers):
                indices.put(i)
            self.started_queue = self.context.SimpleQueue()
            self.started = set()
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=self.context, initializer=_pool_initializer,
                initargs=(self.threads, self.device, indices, self.started_queue))
        return self.pool

    def _drain(self) -> None:
        # Read the start notes often: the pipe would fill and block the workers otherwise.
        while self.started_queue is not None and not self.started_queue.empty():
            self.started.add(self.started_queue.get())

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
                        pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    self._drain()
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
                    # The dead worker's task is among those that had started; if none is known
                    # to have started, charge them all so that the loop ends.
                    charged = {i for i, tok in broken if tok in started} or {i for i, _ in broken}
                    for index in sorted({i for i, _ in broken}):
                        if index in charged:
                            attempts[index] += 1
                        if attempts[index] <= self.retries:
                            queue.append(index)
                            continue
                        result = TaskResult(tasks[index].key, index, None,
                                            "worker process died while running the task", attempts[index])
                        bar.update(finished=result)
                        yield result
            complete = True
        finally:
            if not complete:  # an interrupted driver does not wait for the running tasks
                self._discard_pool(wait=False)

    def close(self) -> None:
        self._discard_pool(wait=True)
