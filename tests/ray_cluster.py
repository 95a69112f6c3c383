"""A real multi-node Ray cluster on one machine (127.0.0.1), for tests and benchmarks/ray_infer.py.

Each node is ``ray start --block`` in its own process group, with its own ports, temporary
directory and object store, so it neither meets nor disturbs other Ray instances on the machine
(a test session's local instance, other users'). :meth:`LoopbackCluster.stop` signals only those
process groups: never ``ray stop``, which stops every Ray process on the machine.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is 3.11+

RAY = Path(sys.executable).with_name("ray")
STARTED = "Ray runtime started"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now (for a node's worker processes),
    below Linux's ephemeral range, so they never overlap a port :func:`free_port` hands out."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        base = random.randrange(20_000, low - count)
        try:
            socks = []
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports")


class LoopbackCluster:
    """A head and worker nodes started with ``ray start`` on 127.0.0.1, each with ``cpus`` CPUs."""

    def __init__(self, root: Path, node_cpus: tuple[int, ...] = (1, 1), *, object_store_mb: int = 256) -> None:
        self.root = Path(root)
        self.node_cpus = node_cpus
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.procs: list[subprocess.Popen] = []
        self.logs: list[list[str]] = []
        self.address = ""
        self.stopped: list[int] = []  # process groups stop() emptied
        self.temp_dir = ""  # Ray's session files: a short path, as its socket paths must fit in 107 bytes
        # Ray 2.60 starts a head with token authentication when a token exists (~/.ray/auth_token),
        # but a worker node or a driver joins with it only when told: say it to every process.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}

    def _node_args(self, cpus: int) -> list[str]:
        workers = free_port_range(64)
        return [
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            str(cpus),
            "--num-gpus",
            "0",
            "--object-store-memory",
            str(self.object_store_bytes),
            "--node-manager-port",
            str(free_port()),
            "--object-manager-port",
            str(free_port()),
            "--min-worker-port",
            str(workers),
            "--max-worker-port",
            str(workers + 63),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--disable-usage-stats",
            "--block",
        ]

    def _launch(self, args: list[str], timeout: float) -> None:
        proc = subprocess.Popen(
            [str(RAY), "start", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            cwd=self.root,
            start_new_session=True,
        )  # its own process group: stop() signals only it
        self.procs.append(proc)
        lines: list[str] = []
        self.logs.append(lines)
        started = threading.Event()

        def pump() -> None:  # keep reading, or a full pipe would block the node
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line.rstrip())
                if STARTED in line:
                    started.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not started.wait(0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ray start failed:\n" + "\n".join(lines[-30:]))

    def start(self, timeout: float = 180) -> str:
        """Start the head, then each worker; returns the head's address (``127.0.0.1:<port>``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.temp_dir = tempfile.mkdtemp(prefix="stnray-", dir="/tmp")
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        head = [
            "--head",
            "--port",
            str(port),
            "--include-dashboard",
            "false",
            "--temp-dir",
            self.temp_dir,
        ]
        self._launch(head + self._node_args(self.node_cpus[0]), timeout)
        for cpus in self.node_cpus[1:]:
            self._launch(["--address", self.address] + self._node_args(cpus), timeout)
        return self.address

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM each node's process group (``ray start --block`` then stops its own processes),
        SIGKILL what is left after ``timeout``; workers first, the head last. Returns once no live
        process is left in those groups."""
        for proc in reversed(self.procs):
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + timeout
            while group_members(proc.pid) and time.monotonic() < deadline:
                _signal_group(proc.pid, signal.SIGKILL)  # whatever of the group outlived its leader
                time.sleep(0.2)
            proc.wait(timeout)
        self.stopped = [proc.pid for proc in self.procs]
        self.procs.clear()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # pgid == the node's `ray start` pid: started with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[str]:
    """``"pid command"`` of each live (not zombie) process in process group ``pgid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ')'
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            found.append(f"{entry} {comm}")
    return found
