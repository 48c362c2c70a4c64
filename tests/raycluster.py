"""Real Ray clusters for the tests, on loopback only and provably sending nothing off the machine.

:func:`loopback_only` moves this process into a fresh network namespace that
has nothing but ``lo`` (we run as root in CI: ``unshare(CLONE_NEWNET)`` on
the main thread, then ``ip link set lo up``); every Ray process started
inside it (GCS, raylets, workers, the driver's threads) inherits it, so a
packet to anything but 127.0.0.1 has no interface to leave by. On leaving,
the thread goes back to the original namespace. Where namespaces are not
allowed (not root), it falls back to :func:`off_loopback_sockets`, an ``ss``
check that every socket of the cluster's processes is on loopback.

:func:`two_node_cluster` is a head node (capture host ``a``) and a second node
(capture host ``b``), one CPU each, each its own raylet and object store
(Ray's ``cluster_utils.Cluster``), with :data:`twinstudio.cluster.QUIET_ENV`
and a HOME holding an empty ``ray_bootstrap_config.yaml`` (Ray skips its
cloud-metadata probe when it finds one).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000


def _libc():
    return ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def loopback_only() -> Iterator[bool]:
    """This thread (and every process it starts) in a network namespace with only ``lo``.

    Yields True when isolated, False when the namespace could not be made (then the
    caller checks sockets with :func:`off_loopback_sockets`).
    """
    libc = _libc()
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            yield False
            return
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
            yield True
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(original)


def interfaces() -> list[str]:
    """The network interfaces this thread sees (``lo`` alone inside :func:`loopback_only`)."""
    import socket

    return sorted(name for _, name in socket.if_nameindex())


def off_loopback_sockets(pids: set[int] | None = None) -> list[str]:
    """``ss`` lines of TCP/UDP sockets (listening or connected) that are not on loopback.

    Restricted to ``pids`` when given (a cluster's processes)."""
    out = subprocess.run(["ss", "-tuanpH"], capture_output=True, text=True, check=True).stdout
    bad = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        local, peer = cols[4], cols[5]
        if pids is not None and not any(f"pid={p}," in line for p in pids):
            continue
        if _loopback(local) and (_loopback(peer) or peer.endswith(":*")):
            continue
        bad.append(line)
    return bad


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    host = host.removeprefix("::ffff:").split("%", 1)[0]
    return host.startswith("127.") or host == "::1"


def ray_home(root: Path) -> Path:
    """A HOME for Ray's processes: ``ray_bootstrap_config.yaml`` = ``{}`` skips the cloud-metadata probe."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "ray_bootstrap_config.yaml").write_text("{}\n")
    return root


@contextlib.contextmanager
def quiet_ray(home: Path) -> Iterator[None]:
    """QUIET_ENV and the bootstrap HOME in this process's environment, restored afterwards."""
    from twinstudio.cluster import QUIET_ENV

    saved = {k: os.environ.get(k) for k in (*QUIET_ENV, "HOME")}
    os.environ.update(QUIET_ENV)
    os.environ["HOME"] = str(ray_home(home))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TwoNodeCluster:
    """A head (capture host ``a``) and a second node (capture host ``b``) on 127.0.0.1, one CPU each."""

    def __init__(self, cpus: int = 1) -> None:
        from ray.cluster_utils import Cluster

        from twinstudio.cluster import host_resource

        self.cpus = cpus
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus, "resources": {host_resource("a"): 1}, "node_ip_address": "127.0.0.1",
            "include_dashboard": False})
        self.b = self.cluster.add_node(num_cpus=cpus, resources={host_resource("b"): 1},
                                       node_ip_address="127.0.0.1")
        self.address = self.cluster.address

    def pids(self) -> set[int]:
        """Every process of the cluster (GCS, raylets, their workers)."""
        import psutil

        roots = []
        for node in self.cluster.list_all_nodes():
            for infos in node.all_processes.values():
                roots += [i.process.pid for i in infos if i.process is not None]
        pids = set(roots)
        for pid in roots:
            with contextlib.suppress(psutil.Error):
                pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        return pids

    def kill_node_b(self) -> None:
        """The second node dies: its raylet and workers are killed (SIGKILL), as when a PC loses power."""
        self.cluster.remove_node(self.b, allow_graceful=False)

    def power_off_b(self) -> None:
        """Node b loses power: every process of it (raylet, object store, Ray workers and whatever
        they started) is killed with SIGKILL at once, then it is removed from the cluster.

        :meth:`kill_node_b` kills the raylet; a Ray worker of that node can still answer one call
        before it notices, as a process on a PC that lost power never would."""
        import signal

        import psutil

        procs = []
        for infos in self.b.all_processes.values():
            for i in infos:
                if i.process is not None:
                    with contextlib.suppress(psutil.Error):
                        p = psutil.Process(i.process.pid)
                        procs += [p, *p.children(recursive=True)]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        self.cluster.remove_node(self.b, allow_graceful=False)

    def add_node_b(self) -> None:
        """A fresh node for capture host ``b`` (the PC is back after :meth:`kill_node_b`); waits until it is up."""
        from twinstudio.cluster import host_resource

        self.b = self.cluster.add_node(num_cpus=self.cpus, resources={host_resource("b"): 1},
                                       node_ip_address="127.0.0.1")
        self.cluster.wait_for_nodes()

    def shutdown(self) -> None:
        self.cluster.shutdown()


@contextlib.contextmanager
def two_node_cluster(home: Path, cpus: int = 1) -> Iterator[TwoNodeCluster]:
    """:class:`TwoNodeCluster` inside :func:`loopback_only`, with a driver connected; all stopped afterwards.

    Where no namespace could be made, every socket of the cluster's processes is checked to be on
    loopback before it is stopped."""
    import ray

    with loopback_only() as isolated, quiet_ray(home):
        if isolated:
            assert interfaces() == ["lo"], interfaces()
        c = TwoNodeCluster(cpus)
        try:
            ray.init(address=c.address, namespace="twinstudio", log_to_driver=False, logging_level="WARNING")
            c.isolated = isolated
            yield c
            if not isolated:
                assert off_loopback_sockets(c.pids() | {os.getpid()}) == []
        finally:
            ray.shutdown()
            c.shutdown()
