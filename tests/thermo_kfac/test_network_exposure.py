"""What a single-machine study or distributed run exposes to the network: real commands, their
process tree's listening sockets (psutil), and nothing may listen beyond loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil", reason="psutil (the dev extra) lists the listening sockets")

ROOT = Path(__file__).resolve().parents[2]


def _listening(root: psutil.Process) -> dict[tuple[int, str, int], str]:
    """``{(pid, address, port): command}`` of the TCP/UDP sockets listening in ``root``'s tree now."""
    found = {}
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                # TCP: LISTEN; UDP has no state: a bound socket without a peer receives from anyone
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                    found[(proc.pid, conn.laddr.ip, conn.laddr.port)] = " ".join(proc.cmdline()[1:4])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _run_and_watch(args: list[str], tmp_path: Path, timeout: float = 240.0):
    """Run ``python -m thermo_kfac.cli ARGS`` and poll its process tree's listening sockets."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "thermo_kfac.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[int, str, int], str] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_listening(root))
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert proc.returncode == 0, output[-3000:]
    return seen


def _outside_loopback(seen):
    return {key: cmd for key, cmd in seen.items() if not ipaddress.ip_address(key[1]).is_loopback}


def test_a_study_on_two_local_workers_listens_on_loopback_only(tmp_path):
    pytest.importorskip("distributed", reason="--workers 2 runs a Dask LocalCluster (the [cluster] extra)")
    seen = _run_and_watch(["noise-study", "--sweep", "bits=8,16", "--steps", "2", "--seeds", "1",
                           "--references", "--max-train", "200", "--eval-every", "2", "--workers", "2",
                           "--threads", "1", "--no-progress", "--out", str(tmp_path / "study")], tmp_path)
    # the driver (scheduler, nannies) and two worker processes were seen listening
    assert len({pid for pid, _, _ in seen}) >= 3, seen
    assert _outside_loopback(seen) == {}, seen
    assert (tmp_path / "study" / "results.csv").exists()


def test_train_on_two_local_ranks_listens_on_loopback_only(tmp_path):
    seen = _run_and_watch(["train", "--nproc", "2", "--model", "mlp", "--optimizer", "kfac", "--steps", "3",
                           "--max-train", "200", "--eval-every", "3", "--threads", "1", "--no-progress",
                           "--out", str(tmp_path / "run")], tmp_path)
    # both ranks listen (rank 0's store, each rank's gloo pair)
    assert len({pid for pid, _, _ in seen}) >= 2, seen
    assert _outside_loopback(seen) == {}, seen
    assert (tmp_path / "run" / "results.json").exists()


# ------------------------------------------------------------------ Dask clusters: HTTP and TLS
def _http_status(port: int, path: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _pem_files(directory: Path, prefix: str) -> dict[str, str]:
    """A fresh self-signed CA/certificate/key as PEM files (what an administrator would issue)."""
    from distributed import Security

    sec = Security.temporary()
    files = {"ca_file": sec.tls_ca_file, "cert": sec.tls_client_cert, "key": sec.tls_client_key}
    for name, text in files.items():
        (directory / f"{prefix}-{name}.pem").write_text(text)
    return {name: str(directory / f"{prefix}-{name}.pem") for name in files}


def test_tls_cluster_accepts_only_clients_with_its_certificates(tmp_path):
    pytest.importorskip("distributed", reason="the [cluster] extra (dask distributed) is not installed")
    pytest.importorskip("cryptography", reason="makes the test's certificates (the [cluster] extra)")
    from thermo_kfac.experiments.executors import Task, TLSOptions, make_executor, run_all

    tls = TLSOptions(**_pem_files(tmp_path, "site"))
    with make_executor(1, backend="dask", tls=tls) as local:  # a LocalCluster with these files
        address = local.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        # its HTTP servers answer a health check and nothing else (no worker list, logs, stacks)
        http = local.client.scheduler_info()["services"]["dashboard"]
        assert _http_status(http, "/health") == 200
        for path in ("/info/main/workers.html", "/info/main/logs.html", "/json/counts.json", "/metrics"):
            assert _http_status(http, path) == 404, path
        # a second client with the same files (as --cluster tls://... --tls-* does) runs tasks
        with make_executor(cluster=address, tls=tls) as remote:
            assert run_all(remote, [Task(f"{x}", pow, {"base": x, "exp": 2}) for x in range(3)]) == [0, 1, 4]
        # or with the same certificates from Dask's configuration (~/.config/dask, DASK_* variables)
        import dask

        with dask.config.set({"distributed.comm.tls.ca-file": tls.ca_file,
                              "distributed.comm.tls.client.cert": tls.cert,
                              "distributed.comm.tls.client.key": tls.key}):
            with make_executor(cluster=address) as configured:
                assert run_all(configured, [Task("2^3", pow, {"base": 2, "exp": 3})]) == [8]
        # without certificates, with another CA's, or over plain TCP: refused, saying why
        with pytest.raises(ValueError, match=r"needs TLS certificates: --tls-ca-file, --tls-cert"):
            make_executor(cluster=address)
        with pytest.raises(ValueError, match=r"cannot connect to the Dask scheduler .*TLS certificate"):
            make_executor(cluster=address, tls=TLSOptions(**_pem_files(tmp_path, "other")))
        with pytest.raises(ValueError, match=r"is not a TLS address but TLS is required"):
            make_executor(cluster=address.replace("tls://", "tcp://"), tls=tls)


def test_workers_with_tls_make_their_own_certificates():
    pytest.importorskip("distributed", reason="the [cluster] extra (dask distributed) is not installed")
    pytest.importorskip("cryptography", reason="makes the run's certificates (the [cluster] extra)")
    from distributed import Client, Security

    from thermo_kfac.experiments.executors import Task, TLSOptions, make_executor, run_all

    with make_executor(1, backend="dask", tls=TLSOptions(True)) as local:
        address = local.client.scheduler.address
        assert address.startswith("tls://127.0.0.1:")
        assert run_all(local, [Task("3^2", pow, {"base": 3, "exp": 2})]) == [9]
        with pytest.raises(OSError, match="TLS certificate does not match"):  # anyone else's certificate
            Client(address, security=Security.temporary(), timeout="10s")


def test_tls_options_are_checked(tmp_path, monkeypatch):
    from thermo_kfac.experiments.executors import TLSOptions, factory, make_executor
    from thermo_kfac.experiments.executors.security import security_for

    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ValueError, match=r"--tls-cert '.*missing.pem': no such file"):
        TLSOptions(ca_file=str(tmp_path / "ca.pem"), cert=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"TLS needs both --tls-ca-file .* and --tls-cert"):
        TLSOptions(cert=str(tmp_path / "cert.pem"))
    with pytest.raises(ValueError, match=r"--tls-ca-file, --tls-cert and --no-tls contradict"):
        TLSOptions(False, str(tmp_path / "ca.pem"), str(tmp_path / "cert.pem"))
    with pytest.raises(ValueError, match=r"TLS settings apply to Dask clusters only, not without --workers"):
        make_executor(tls=TLSOptions(True))
    with pytest.raises(ValueError, match=r"TLS settings apply to Dask clusters only, not on a local process"):
        make_executor(2, backend="processes", tls=TLSOptions(True))
    if factory.dask_available():  # Dask's Security (the [cluster] extra)
        monkeypatch.setitem(sys.modules, "cryptography", None)  # as if not installed
        with pytest.raises(ValueError, match=r"TLS for --cluster slurm .* needs the cryptography package .*"
                                             r"or --no-tls on a network you trust"):
            security_for("slurm", None)
        assert security_for("slurm", TLSOptions(False)) is None


def test_cli_tls_flags_reach_the_executor(monkeypatch, tmp_path):
    import argparse

    from thermo_kfac.experiments.executors import TLSOptions, factory

    parser = argparse.ArgumentParser()
    factory.add_arguments(parser)
    seen = {}
    monkeypatch.setattr(factory, "make_executor", lambda *args, **kwargs: seen.update(kwargs))
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "c.pem").write_text("x")
    factory.from_args(parser.parse_args(["--cluster", "slurm", "--tls-ca-file", str(tmp_path / "ca.pem"),
                                         "--tls-cert", str(tmp_path / "c.pem")]))
    assert seen["tls"] == TLSOptions(None, str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), None)
    factory.from_args(parser.parse_args(["--cluster", "slurm", "--no-tls"]))
    assert seen["tls"] == TLSOptions(False)


def test_slurm_scheduler_listens_only_where_its_jobs_connect_and_requires_tls(tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue (the [cluster] extra) is not installed")
    pytest.importorskip("cryptography", reason="temporary TLS certificates (the [cluster] extra)")
    import shlex

    from distributed import Client, Security
    from distributed.utils import get_ip

    from thermo_kfac.experiments.executors import dask_cluster
    from thermo_kfac.experiments.executors.security import security_for

    monkeypatch.chdir(tmp_path)  # the jobs' certificate files go to the current directory
    me = psutil.Process()
    before = set(_listening(me))
    cluster, _ = dask_cluster.slurm_cluster(threads=1, security=security_for("slurm", None), memory="1GB")
    worker = None
    try:
        opened = set(_listening(me)) - before
        http = cluster.scheduler.http_server.port
        port = int(cluster.scheduler_address.rsplit(":", 1)[1])
        # the address the job script connects to, and the HTTP server on loopback: nothing else
        assert {(ip, p) for _, ip, p in opened} == {(get_ip(), port), ("127.0.0.1", http)}, opened
        script = cluster.job_script()
        assert f"tls://{get_ip()}:{port}" in script and "--dashboard-address 127.0.0.1:0" in script
        # run the job's worker command here (what sbatch would start on a compute node)
        command = next(line for line in script.splitlines() if "dask_worker" in line)
        worker = subprocess.Popen(shlex.split(command.replace("dummy-name", "job-0")),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=120)
            task = client.submit(pow, 3, 2, resources={dask_cluster.TASK_RESOURCE: 1})
            assert task.result(timeout=120) == 9
        with pytest.raises(OSError, match="TLS certificate does not match"):  # another CA's client
            Client(cluster.scheduler_address, security=Security.temporary(), timeout="10s")
    finally:
        cluster.close()
        if worker is not None:
            worker.kill()
            worker.wait()


# ------------------------------------------------------------- launch environment on this machine
def _rank(local_rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from thermo_kfac.experiments import launch

    os.environ.update(RANK=str(local_rank), WORLD_SIZE="2", LOCAL_RANK=str(local_rank),
                      MASTER_ADDR="localhost", MASTER_PORT=str(port))
    for key in ("GLOO_SOCKET_IFNAME", "TORCHELASTIC_USE_AGENT_STORE"):
        os.environ.pop(key, None)
    launch.init_from_environment("cpu")
    total = torch.tensor([float(local_rank + 1)])
    dist.all_reduce(total)
    addresses = sorted(c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN)
    Path(out, f"rank{local_rank}.txt").write_text(f"{total.item()} {' '.join(addresses)}")
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_launched_with_a_loopback_master_address_listen_on_loopback_only(tmp_path):
    import torch.multiprocessing as mp

    from thermo_kfac.experiments import launch

    mp.start_processes(_rank, args=(launch.free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=launch.child_start_method())
    for rank in range(2):
        total, *addresses = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert float(total) == 3.0  # 1 + 2: the group works over loopback
        assert addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses
    assert launch.is_loopback("localhost") and launch.is_loopback("::1") and launch.is_loopback("127.0.0.2")
    assert not launch.is_loopback("10.0.0.1") and not launch.is_loopback("node-1")
