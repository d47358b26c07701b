"""``--task-timeout``: a task that sleeps forever is cancelled, retried once and recorded as failed
on a real Dask LocalCluster, a process pool and the serial executor; nothing is lost or duplicated,
the driver finishes, and a rerun (a resumed study) retries it."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time
from pathlib import Path

import pytest
import torch

from thermo_kfac import cli
from thermo_kfac.experiments import executors as ex
from thermo_kfac.experiments import noise_study as ns
from thermo_kfac.experiments.executors import Task
from thermo_kfac.experiments.noise_study import study as ns_study

TIMEOUT = 2.0
DRIVER_LIMIT = 300  # seconds: a driver still running then is stuck (a liveness check, not a timing)


# --------------------------------------------------------------- tasks (top level: picklable)
def square(x: int) -> int:
    time.sleep(0.2)  # long enough that the tasks overlap the hung one on the other worker
    return x * x


def hangs_while(marker: str, value: int) -> int:
    """Sleeps forever (without dying) while ``marker`` exists; else returns ``value``."""
    path = Path(marker)
    with open(path.with_suffix(".attempts"), "a") as log:
        log.write("attempt\n")
    while path.exists():
        time.sleep(3600)
    return value


def _map_in_time(executor: ex.Executor, tasks: list[Task]) -> dict[str, ex.TaskResult]:
    """``executor.map`` in a thread; fails the test if the driver does not finish. (The serial
    executor's timeout needs the main thread: there the alarm itself ends a stuck task.)"""
    if not executor.parallel:
        results = list(executor.map(tasks))
    else:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            results = pool.submit(lambda: list(executor.map(tasks))).result(timeout=DRIVER_LIMIT)
    by_key: dict[str, ex.TaskResult] = {}
    for result in results:
        assert result.key not in by_key, f"duplicate result for {result.key}"
        by_key[result.key] = result
    return by_key


def _check_hung_study(executor: ex.Executor, tmp_path: Path, reason: str) -> None:
    marker = tmp_path / "hang"
    marker.write_text("hang")
    tasks = [Task(f"x={x}", square, {"x": x}) for x in range(4)]
    tasks.insert(1, Task("hung", hangs_while, {"marker": str(marker), "value": 7}))
    results = _map_in_time(executor, tasks)
    assert set(results) == {t.key for t in tasks}  # nothing lost, nothing duplicated
    for x in range(4):
        assert results[f"x={x}"].ok and results[f"x={x}"].value == x * x
    hung = results["hung"]
    assert not hung.ok and hung.attempts == 2  # cancelled, retried once, recorded as failed
    assert hung.error == f"TaskTimeout: timed out after {TIMEOUT:g} s{reason}", hung.error
    assert marker.with_suffix(".attempts").read_text().count("attempt") == 2
    # a rerun (what a resumed study does with its failed rows) retries it; the restarted workers serve
    marker.unlink()
    again = _map_in_time(executor, [Task("hung", hangs_while, {"marker": str(marker), "value": 7})])
    assert again["hung"].ok and again["hung"].value == 7


@pytest.fixture(scope="module")
def local_cluster():
    pytest.importorskip("distributed", reason="the [cluster] extra (dask distributed) is not installed")
    executor = ex.make_executor(2, threads=1, backend="dask", task_timeout=TIMEOUT)
    yield executor
    executor.close()


# --------------------------------------------------------------------------------- tests
def test_hung_task_on_a_real_local_cluster(local_cluster, tmp_path):
    assert local_cluster.task_timeout == TIMEOUT and "task timeout 2 s" in local_cluster.describe()
    _check_hung_study(local_cluster, tmp_path, " (worker restarted)")
    local_cluster.client.wait_for_workers(2, timeout=DRIVER_LIMIT)  # the ended worker's nanny restarts it
    assert len(local_cluster.client.scheduler_info()["workers"]) == 2


def test_hung_task_on_a_process_pool(tmp_path):
    with ex.make_executor(2, threads=1, backend="processes", task_timeout=TIMEOUT) as pool:
        _check_hung_study(pool, tmp_path, " (worker killed)")


def test_hung_task_on_the_serial_executor(tmp_path):
    previous = signal.getsignal(signal.SIGALRM)
    _check_hung_study(ex.SerialExecutor(task_timeout=TIMEOUT), tmp_path, "")
    assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_serial_timeout_outside_the_main_thread_is_refused():
    executor = ex.SerialExecutor(task_timeout=1.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: list(executor.map([Task("a", square, {"x": 1})])))
        with pytest.raises(ValueError, match="needs a POSIX system and the main thread"):
            future.result(timeout=60)


def test_hung_study_row_is_recorded_as_failed_and_retried_on_resume(tmp_path, monkeypatch):
    """noise-study end to end: the hung row fails with the reason, the others finish, a resume
    runs only that row again."""
    marker = tmp_path / "hang"
    marker.write_text("hang")
    calls: list[str] = []
    original = ns_study.study_task

    def hangs_for_kfac(**kwargs):
        calls.append(kwargs["method"])
        while kwargs["method"] == "kfac" and marker.exists():
            time.sleep(3600)
        return original(**kwargs)

    monkeypatch.setattr(ns_study, "study_task", hangs_for_kfac)
    torch.set_num_threads(1)
    options = dict(model_options={"widths": (16,)}, steps=2, eval_every=1, plots=False, seeds=1,
                   sweeps={"bits": [8]}, references=["adam", "kfac"], out=tmp_path / "study",
                   optimizer="kfac:solver=thermo,integrator=analytic,analog_time=100")
    study = ns.noise_study("digits", "mlp", executor=ex.SerialExecutor(task_timeout=TIMEOUT), **options)
    rows = {r["method"]: r for r in study["rows"]}
    assert set(rows) == {"adam", "kfac", "thermo"} and len(study["rows"]) == 3
    assert rows["kfac"]["task_failed"] and rows["kfac"]["error"] == (
        f"task failed (2 attempts): TaskTimeout: timed out after {TIMEOUT:g} s")
    assert not rows["adam"].get("task_failed") and rows["adam"]["steps"] == 2
    assert not rows["thermo"].get("task_failed") and rows["thermo"]["steps"] == 2
    assert sorted(calls) == ["adam", "kfac", "kfac", "thermo"]
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [r["method"] for r in saved["rows"] if r.get("task_failed")] == ["kfac"]
    # resume: only the failed row runs again, now to completion
    marker.unlink()
    calls.clear()
    resumed = ns.noise_study("digits", "mlp", executor=ex.SerialExecutor(task_timeout=TIMEOUT), **options)
    assert calls == ["kfac"]
    assert len(resumed["rows"]) == 3 and not any(r.get("task_failed") for r in resumed["rows"])


@pytest.mark.parametrize("command", [["compare"], ["noise-study", "--sweep", "bits=8"],
                                     ["project", "--sweep", "kappa"]])
def test_every_study_command_takes_task_timeout(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command[0], "--help"])
    assert "--task-timeout SECONDS" in capsys.readouterr().out
    assert cli.main([*command, "--task-timeout", "0"]) == 2
    assert "task_timeout=0.0 must be a positive number of seconds" in capsys.readouterr().err


def test_compare_with_a_timeout_runs_each_optimizer_as_a_task():
    from thermo_kfac.experiments.training import compare

    torch.set_num_threads(1)
    kwargs = dict(steps=3, eval_every=3, model_options={"widths": (16,)})
    plain = compare("digits", "mlp", ["adam", "sgd"], **kwargs)
    timed = compare("digits", "mlp", ["adam", "sgd"], executor=ex.SerialExecutor(task_timeout=60), **kwargs)
    assert "one after the other as tasks" in timed["config"]["wall_time_note"]
    for a, b in zip(plain["runs"], timed["runs"], strict=True):
        assert a["label"] == b["label"] and a["final_train_loss"] == b["final_train_loss"]
