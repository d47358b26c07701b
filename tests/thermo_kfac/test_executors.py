"""Executors: a real 2-worker Dask LocalCluster and a local process pool against the serial executor;
worker deaths, failing tasks, thread limits, the progress bar and the CLI's error messages."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from thermo_kfac.experiments import executors as ex
from thermo_kfac.experiments.executors import Task, factory


# --------------------------------------------------------------- tasks (top level: picklable)
def seeded_training(seed: int, steps: int = 5) -> list[float]:
    """A few SGD steps of a small network, seeded from the arguments only."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses + [float(p.detach().double().sum()) for p in net.parameters()]


def dies_on_first_attempt(seed: int, marker: str) -> list[float]:
    """Kills its worker process (no exception, no cleanup) the first time it runs."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died once")
        time.sleep(0.2)  # let the other worker pick up tasks meanwhile
        os._exit(17)
    return seeded_training(seed)


def raises(log: str) -> None:
    with open(log, "a") as f:
        f.write("attempt\n")
    raise RuntimeError("this task always fails (injected)")


def report(_: int) -> dict:
    import numba  # noqa: F401  (so that its thread setting is reported)

    time.sleep(0.3)  # keep this worker busy so that the other worker takes the next task
    return ex.worker_report()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def local_cluster():
    pytest.importorskip("distributed", reason="the [cluster] extra (dask distributed) is not installed")
    executor = ex.make_executor(2, threads=1, backend="dask")
    yield executor
    executor.close()


@pytest.fixture(params=["dask", "processes"])
def parallel(request, local_cluster):
    if request.param == "dask":
        yield local_cluster
        return
    with ex.make_executor(2, threads=1, backend="processes") as pool:
        yield pool


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _by_key(results):
    out = {}
    for r in results:
        assert r.key not in out, f"duplicate result for {r.key}"
        out[r.key] = r
    return out


# --------------------------------------------------------------------------------- tests
def test_local_cluster_has_two_worker_processes_of_one_thread(local_cluster):
    info = local_cluster.client.scheduler_info()["workers"]
    assert len(info) == 2 and all(w["nthreads"] == 1 for w in info.values())
    assert local_cluster.workers == 2 and local_cluster.threads == 1


def test_parallel_results_equal_the_serial_ones_bitwise(parallel, one_thread):
    tasks = [Task(f"seed={s}", seeded_training, {"seed": s}) for s in range(6)]
    serial = _by_key(ex.SerialExecutor(threads=1).map(tasks))
    results = _by_key(parallel.map(tasks))
    assert set(results) == set(serial) == {t.key for t in tasks}
    for key, result in results.items():
        assert result.ok and result.attempts == 1
        assert result.value == serial[key].value  # same floats, bit for bit
    assert results["seed=0"].value != results["seed=1"].value  # the seed matters


def test_killed_worker_loses_and_duplicates_no_result(parallel, tmp_path, one_thread):
    tasks = [Task(f"seed={s}", seeded_training, {"seed": s}) for s in range(5)]
    tasks.insert(2, Task("killer", dies_on_first_attempt, {"seed": 99, "marker": str(tmp_path / "m")}))
    results = list(parallel.map(tasks))
    by_key = _by_key(results)
    assert len(results) == len(tasks) and set(by_key) == {t.key for t in tasks}
    assert (tmp_path / "m").exists()  # the first attempt did die
    assert by_key["killer"].ok and by_key["killer"].attempts == 2
    assert by_key["killer"].value == seeded_training(99)
    for s in range(5):
        assert by_key[f"seed={s}"].value == seeded_training(s)
    assert [r.index for r in sorted(results, key=lambda r: r.index)] == list(range(len(tasks)))


def test_a_raising_task_is_retried_once_then_recorded_while_the_others_finish(parallel, tmp_path):
    log = tmp_path / "attempts.txt"
    tasks = [Task(f"seed={s}", seeded_training, {"seed": s, "steps": 2}) for s in range(4)]
    tasks.insert(1, Task("bad", raises, {"log": str(log)}))
    by_key = _by_key(parallel.map(tasks))
    assert set(by_key) == {t.key for t in tasks}
    assert not by_key["bad"].ok and by_key["bad"].attempts == 2
    assert by_key["bad"].error == "RuntimeError: this task always fails (injected)"
    assert log.read_text().count("attempt") == 2  # ran exactly twice
    assert all(by_key[f"seed={s}"].ok for s in range(4))


def test_cluster_address_connects_to_a_running_scheduler(local_cluster, one_thread):
    local_cluster.client.wait_for_workers(2, timeout=120)  # a worker killed above may be restarting
    address = local_cluster.client.scheduler_info()["address"]
    with ex.make_executor(cluster=address) as remote:
        assert isinstance(remote, ex.DaskExecutor) and remote.workers == 2  # its 2 one-thread workers
        tasks = [Task(f"seed={s}", seeded_training, {"seed": s}) for s in range(3)]
        tasks.append(Task("report", report, {"_": 0}))
        by_key = _by_key(remote.map(tasks))
    for s in range(3):
        assert by_key[f"seed={s}"].value == seeded_training(s)
    # threads not given: the worker host's cores // its task slots (1 each here)
    assert by_key["report"].value["torch_threads"] == ex.default_threads(1)
    assert local_cluster.client.scheduler_info()["workers"]  # closing the connection left it running


def test_a_task_the_worker_cannot_load_fails_alone(local_cluster, tmp_path, monkeypatch):
    # A module only the driver can import (as with another version of the code on a cluster).
    (tmp_path / "driver_only_tasks.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import driver_only_tasks

    tasks = [Task("unloadable", driver_only_tasks.double, {"x": 2}),
             Task("fine", seeded_training, {"seed": 0, "steps": 1})]
    by_key = _by_key(local_cluster.map(tasks))
    assert not by_key["unloadable"].ok and by_key["unloadable"].attempts == 2
    assert "No module named 'driver_only_tasks'" in by_key["unloadable"].error
    assert by_key["fine"].ok and by_key["fine"].value == seeded_training(0, steps=1)


def test_a_task_that_cannot_be_sent_is_refused_before_running():
    import threading

    with ex.ProcessPoolExecutor(1, threads=1) as pool, pytest.raises(
            ValueError, match=r"task 'locked' cannot be sent to a worker process: TypeError: .*lock"):
        list(pool.map([Task("locked", report, {"_": threading.Lock()})]))


def test_thread_limits_are_applied_in_the_workers(parallel):
    reports = [r.value for r in parallel.map([Task(f"r{i}", report, {"_": i}) for i in range(4)])]
    for rep in reports:
        assert rep["torch_threads"] == 1
        assert rep["numba_threads"] == 1
        assert rep["env"]["OMP_NUM_THREADS"] == "1" and rep["env"]["OPENBLAS_NUM_THREADS"] == "1"
        assert rep["threadpools"] and set(rep["threadpools"].values()) == {1}, rep["threadpools"]
        assert rep["pid"] != os.getpid()
    assert len({rep["pid"] for rep in reports}) == 2  # both workers ran tasks


def test_serial_executor_runs_in_order_retries_and_restores_threads(tmp_path):
    before = torch.get_num_threads()
    log = tmp_path / "attempts.txt"
    tasks = [Task("a", seeded_training, {"seed": 1, "steps": 1}), Task("bad", raises, {"log": str(log)}),
             Task("b", seeded_training, {"seed": 2, "steps": 1})]
    results = list(ex.SerialExecutor(threads=1).map(tasks))
    assert [r.key for r in results] == ["a", "bad", "b"] and [r.index for r in results] == [0, 1, 2]
    assert results[1].error == "RuntimeError: this task always fails (injected)" and results[1].attempts == 2
    assert log.read_text().count("attempt") == 2
    assert torch.get_num_threads() == before


def test_run_all_returns_values_in_order_or_names_the_failures(tmp_path):
    tasks = [Task(f"seed={s}", seeded_training, {"seed": s, "steps": 1}) for s in (3, 1, 2)]
    assert ex.run_all(ex.SerialExecutor(), tasks) == [seeded_training(s, steps=1) for s in (3, 1, 2)]
    tasks.insert(1, Task("bad", raises, {"log": str(tmp_path / "log")}))
    with pytest.raises(ValueError, match=r"^1 of 4 task\(s\) failed: bad: RuntimeError: this task always "
                                         r"fails \(injected\)$"):
        ex.run_all(ex.SerialExecutor(), tasks)


def test_progress_bar_shows_done_failed_running(tmp_path, capsys):
    tasks = [Task("a", seeded_training, {"seed": 1, "steps": 1}),
             Task("bad", raises, {"log": str(tmp_path / "log")})]
    list(ex.SerialExecutor().map(tasks, progress=True, desc="study", initial=3))
    err = capsys.readouterr().err
    assert "study" in err and "5/5" in err  # 3 done before + 2 now
    assert "done 1, failed 1, running 0" in err


def test_default_threads_share_the_cores():
    assert ex.default_threads(2, cores=16) == 8
    assert ex.default_threads(3, cores=16) == 5
    assert ex.default_threads(4, cores=2) == 1  # at least one


def test_bad_arguments_and_missing_extras_give_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"workers=0 must be a positive integer"):
        ex.make_executor(0)
    with pytest.raises(ValueError, match=r"threads=-2 must be a positive integer"):
        ex.make_executor(2, threads=-2)
    with pytest.raises(ValueError, match=r"backend='ray'; allowed: auto, serial, processes, dask"):
        ex.make_executor(2, backend="ray")
    with pytest.raises(ValueError, match="task keys must be unique"):
        list(ex.SerialExecutor().map([Task("a", report, {"_": 1}), Task("a", report, {"_": 2})]))
    assert isinstance(ex.make_executor(), ex.SerialExecutor)
    assert isinstance(ex.make_executor(1), ex.SerialExecutor)

    monkeypatch.setattr(factory, "dask_available", lambda: False)
    with pytest.raises(ValueError, match=r"--cluster tcp://host:8786 needs Dask distributed: "
                                         r"pip install 'thermo-kfac\[cluster\]'"):
        ex.make_executor(cluster="tcp://host:8786")
    pool = ex.make_executor(2)  # without dask, --workers falls back to a process pool
    assert isinstance(pool, ex.ProcessPoolExecutor) and pool.threads == ex.default_threads(2)
    monkeypatch.undo()

    if ex.dask_available():
        monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if not installed
        with pytest.raises(ValueError, match=r"--cluster slurm needs dask-jobqueue: "
                                             r"pip install 'thermo-kfac\[cluster\]'"):
            ex.make_executor(2, cluster="slurm")
        with pytest.raises(ValueError, match=r"--workers 2 does not apply to --cluster tcp://h:1"):
            ex.make_executor(2, cluster="tcp://h:1")
        with pytest.raises(ValueError, match=r"not a scheduler address"):
            ex.make_executor(cluster="my cluster")


def test_slurm_jobs_run_one_task_at_a_time_with_all_their_cores(monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (the [cluster] extra) is not installed")
    cluster, task_threads = ex.slurm_cluster(threads=4, memory="8GB", queue="normal", account="proj",
                                             walltime="02:00:00")
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert task_threads == 4
    for line in ("#SBATCH -p normal", "#SBATCH -A proj", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8G",
                 "#SBATCH -t 02:00:00", "--nthreads 4", "--resources thermo_kfac_task=1"):
        assert line in script, (line, script)
    monkeypatch.delenv("DASK_JOBQUEUE__SLURM__MEMORY", raising=False)
    with pytest.raises(ValueError, match=r"cannot configure the SLURM cluster: .*memory.*"
                                         r"DASK_JOBQUEUE__SLURM__\* variables"):
        ex.slurm_cluster(threads=4)


@pytest.mark.cuda
def test_cuda_workers_are_pinned_round_robin():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    count = torch.cuda.device_count()
    executor = ex.make_executor(2, threads=1, device="cuda", backend="processes")
    reports = [r.value for r in executor.map([Task(f"r{i}", report, {"_": i}) for i in range(4)])]
    assert {rep["cuda_device"] for rep in reports} == {i % count for i in range(2)}


# ------------------------------------------------------------ the commands on the executors
STUDY = dict(model_options={"widths": (16,)}, steps=6, eval_every=3, plots=False,
             optimizer="kfac:solver=thermo,integrator=analytic,analog_time=100,factor_update_every=2,"
                       "inverse_update_every=2")
VOLATILE = {"wall_time_s", "ms_per_step"}  # measured, so they differ between identical runs


def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in VOLATILE} for row in csv.DictReader(f)]


def test_noise_study_on_the_cluster_writes_the_serial_rows(local_cluster, tmp_path, one_thread):
    from thermo_kfac.experiments import noise_study as ns

    grid = {"bits": [6, 8], "kappa0": [1e-3, 1e-2]}
    serial = ns.noise_study("digits", "mlp", grid, seeds=2, out=tmp_path / "serial", **STUDY)
    parallel = ns.noise_study("digits", "mlp", grid, seeds=2, out=tmp_path / "parallel",
                              executor=local_cluster, **STUDY)
    rows = _csv_rows(tmp_path / "serial" / "results.csv")
    assert len(rows) == 12  # (2 references + 2 x 2 points) x 2 seeds
    assert all(r["error"] == "" and float(r["final_train_loss"]) > 0 for r in rows)
    assert _csv_rows(tmp_path / "parallel" / "results.csv") == rows  # same rows, same order
    assert [r["key"] for r in parallel["rows"]] == [r["key"] for r in serial["rows"]]


def test_noise_study_resumes_on_the_cluster_after_a_killed_driver(local_cluster, tmp_path, one_thread):
    from thermo_kfac.experiments import noise_study as ns

    class Killed(Exception):
        pass

    def kill_after_three(row, seen=[]):  # noqa: B006 (the hook's own counter)
        seen.append(row)
        if len(seen) == 3:
            raise Killed

    grid = {"bits": [6, 8]}
    full = ns.noise_study("digits", "mlp", grid, seeds=2, out=tmp_path / "full", **STUDY)
    with pytest.raises(Killed):  # the driver dies after 3 rows, tasks still in flight are dropped
        ns.noise_study("digits", "mlp", grid, seeds=2, out=tmp_path / "resumed", executor=local_cluster,
                       on_row=kill_after_three, **STUDY)
    assert len(_csv_rows(tmp_path / "resumed" / "results.csv")) == 3
    trained = []
    ns.noise_study("digits", "mlp", grid, seeds=2, out=tmp_path / "resumed", executor=local_cluster,
                   on_row=lambda r: trained.append(r["key"]), **STUDY)
    assert len(trained) == len(full["rows"]) - 3  # the finished rows were skipped
    assert _csv_rows(tmp_path / "resumed" / "results.csv") == _csv_rows(tmp_path / "full" / "results.csv")


def test_a_failed_study_task_is_recorded_and_retried_by_the_next_run(tmp_path, monkeypatch, one_thread):
    from thermo_kfac.experiments import noise_study as ns
    from thermo_kfac.experiments.noise_study import study as study_module  # where noise_study looks it up

    real = ns.study_task
    calls = []

    def flaky(**kwargs):
        calls.append(kwargs["point"])
        if kwargs["point"] == {"bits": 6}:
            raise MemoryError("worker ran out of memory (injected)")
        return real(**kwargs)

    monkeypatch.setattr(study_module, "study_task", flaky)
    study = ns.noise_study("digits", "mlp", {"bits": [6, 8]}, references=["adam"], out=tmp_path, **STUDY)
    by_label = {r["label"]: r for r in study["rows"]}
    assert calls.count({"bits": 6}) == 2  # tried twice
    assert by_label["thermo bits=6"]["error"] == (
        "task failed (2 attempts): MemoryError: worker ran out of memory (injected)")
    assert by_label["thermo bits=6"]["final_train_loss"] is None
    assert by_label["thermo bits=8"]["error"] is None and by_label["adam"]["error"] is None
    assert "1 failed" in ns.format_table(study)
    monkeypatch.setattr(study_module, "study_task", real)
    rerun = []
    again = ns.noise_study("digits", "mlp", {"bits": [6, 8]}, references=["adam"], out=tmp_path,
                           on_row=lambda r: rerun.append(r["label"]), **STUDY)
    assert rerun == ["thermo bits=6"]  # only the failed task ran again
    assert all(r["error"] is None for r in again["rows"]) and len(again["rows"]) == 3
    assert len(_csv_rows(tmp_path / "results.csv")) == 3


def test_compare_on_the_cluster_matches_the_interleaved_serial_compare(local_cluster, one_thread):
    from thermo_kfac.experiments.training import compare

    kwargs = dict(steps=8, eval_every=4, model_options={"widths": (16,)})
    optimizers = ["adam", "kfac:damping=0.1", "sgd:lr=0.05"]
    serial = compare("digits", "mlp", optimizers, **kwargs)
    parallel = compare("digits", "mlp", optimizers, executor=local_cluster, **kwargs)
    assert [r["label"] for r in parallel["runs"]] == [r["label"] for r in serial["runs"]]
    measured = {"wall_time_s", "step_time_s", "mean_step_time_s", "time_to_target_s"}
    for a, b in zip(serial["runs"], parallel["runs"], strict=True):
        strip = lambda run: {k: v for k, v in run.items() if k not in measured | {"history"}}  # noqa: E731
        assert strip(a) == strip(b)
        assert [{k: v for k, v in h.items() if k not in measured} for h in a["history"]] == [
            {k: v for k, v in h.items() if k not in measured} for h in b["history"]]
    assert "runs in parallel" in parallel["config"]["wall_time_note"]


def test_project_sweep_with_workers_gives_the_serial_points(tmp_path, monkeypatch):
    from thermo_kfac.experiments import hardware

    argv = ["project", "--model", "resnet50", "--sweep", "kappa", "--values", "10,100,1000"]
    assert hardware.main(argv + ["--json", str(tmp_path / "serial.json")]) == 0
    monkeypatch.setattr(factory, "dask_available", lambda: False)  # a process pool: quick to start
    assert hardware.main(argv + ["--workers", "2", "--json", str(tmp_path / "pool.json")]) == 0
    import json

    serial = json.loads((tmp_path / "serial.json").read_text())
    pool = json.loads((tmp_path / "pool.json").read_text())
    assert pool == serial and [p["x"] for p in pool["points"]] == [10, 100, 1000]


def test_project_refuses_workers_without_a_sweep(capsys):
    from thermo_kfac import cli

    assert cli.main(["project", "--model", "resnet50", "--workers", "2"]) == 2
    assert "--workers/--cluster apply to --sweep only" in capsys.readouterr().err


def test_cli_flags_select_the_executor(monkeypatch, capsys):
    from thermo_kfac import cli

    monkeypatch.setattr(factory, "dask_available", lambda: False)
    code = cli.main(["noise-study", "--sweep", "bits=8", "--cluster", "tcp://h:8786", "--steps", "2"])
    assert code == 2
    assert "needs Dask distributed: pip install 'thermo-kfac[cluster]'" in capsys.readouterr().err
    assert cli.main(["compare", "--workers", "0"]) == 2
    assert "--workers=0 must be a positive integer" in capsys.readouterr().err
