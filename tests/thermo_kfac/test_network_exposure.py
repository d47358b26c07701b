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
