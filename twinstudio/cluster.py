"""Ray for twinstudio: the embedded local Ray (nothing to start) or a cluster's address.

Ray is the engine of batches and of rigs spread over several capture PCs;
nothing here schedules anything itself. This module only

* connects: :func:`connect` starts an embedded Ray in this process (bound to
  127.0.0.1, no dashboard) or joins a cluster given its address;
* keeps Ray quiet: by default Ray binds every interface and calls out (usage
  reports, cloud metadata probes). :data:`QUIET_ENV` is set in this process
  before Ray starts, so the Ray processes it starts inherit it, and
  :func:`node_command` prints the ``ray start`` line with the same settings
  for a studio's nodes;
* describes what the cluster can run: :func:`cluster_nodes` and
  :func:`placeable`, so that work no node can take is reported at once
  (Ray would keep a task that asks for a GPU pending forever on a cluster
  without one).

Capture hosts are nodes started with a custom resource named
:func:`host_resource` (``capture-host:<name>``), one unit per host.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from capture.hosts import HOST_RESOURCE_PREFIX, host_resource
from rigs.errors import TwinstudioError

#: what keeps Ray from calling out; set on every process of a cluster (head, nodes, driver)
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # a report that slips through goes to a closed port on this machine
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",
    # without it, --node-ip-address 127.0.0.1 still binds the machine's routable address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}

#: Ray's namespace for twinstudio's named actors
NAMESPACE = "twinstudio"


class ClusterError(TwinstudioError):
    """Ray cannot be started or reached, or the cluster cannot run what was asked (exit code 2)."""

    exit_code = 2


def apply_quiet_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put :data:`QUIET_ENV` into ``env`` (default: this process's environment); returns it."""
    target = os.environ if env is None else env
    for k, v in QUIET_ENV.items():
        target[k] = v
    return target  # type: ignore[return-value]


def node_command(*, head: bool, address: str | None = None, host: str | None = None, cpus: int | None = None,
                 gpus: int | None = None, ip: str | None = None) -> str:
    """The shell line that starts one node of a studio cluster with twinstudio's settings (README)."""
    import json
    import shlex

    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in QUIET_ENV.items())
    args = ["ray", "start"]
    args += ["--head", "--port=6379"] if head else [f"--address={address or 'HEAD_IP:6379'}"]
    if ip:
        args.append(f"--node-ip-address={ip}")
    if cpus is not None:
        args.append(f"--num-cpus={cpus}")
    if gpus is not None:
        args.append(f"--num-gpus={gpus}")
    if host:
        args.append("--resources=" + shlex.quote(json.dumps({host_resource(host): 1})))
    if head:
        args.append("--include-dashboard=false")
    return f"{env} {' '.join(args)}"


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster and what it has."""

    node_id: str
    ip: str
    hostname: str
    resources: dict[str, float] = field(default_factory=dict)
    head: bool = False

    @property
    def hosts(self) -> list[str]:
        """The capture hosts this node stands for."""
        return sorted(k.split(":", 1)[1] for k in self.resources if k.startswith(HOST_RESOURCE_PREFIX))

    def describe(self) -> str:
        cpu, gpu = self.resources.get("CPU", 0), self.resources.get("GPU", 0)
        extra = f", capture host {', '.join(self.hosts)}" if self.hosts else ""
        return f"{self.hostname or self.ip}{' (head)' if self.head else ''}: {cpu:g} CPU, {gpu:g} GPU{extra}"


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in (n.get("Resources") or {}).items()
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        out.append(Node(node_id=n["NodeID"], ip=n.get("NodeManagerAddress", ""),
                        hostname=n.get("NodeManagerHostname", ""), resources=res,
                        head="node:__internal_head__" in (n.get("Resources") or {})))
    return out


def placeable(demand: dict[str, float], nodes: list[Node]) -> bool:
    """Whether some single node has (in total) every resource of ``demand``."""
    return any(all(node.resources.get(k, 0.0) >= v for k, v in demand.items() if v > 0) for node in nodes)


def why_unplaceable(demand: dict[str, float], nodes: list[Node]) -> str:
    want = ", ".join(f"{v:g} {k}" for k, v in sorted(demand.items()) if v > 0)
    have = "; ".join(n.describe() for n in nodes) or "no alive node"
    return f"needs {want} on one node; the cluster has {have}"


@dataclass(frozen=True)
class Connection:
    address: str          # what was joined ("local" for the embedded Ray)
    embedded: bool
    nodes: list[Node]


@contextlib.contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            resources: dict[str, float] | None = None) -> Iterator[Connection]:
    """Ray for the length of the block.

    ``address`` None starts an embedded Ray in this process, bound to 127.0.0.1
    and without a dashboard, and stops it afterwards; an address
    (``HOST:PORT`` or ``ray://...``) joins a studio cluster and leaves it
    running. Where Ray is already initialised in this process (a test, a
    notebook), that connection is used as it is and left alone.
    """
    apply_quiet_env()
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a dependency
        raise ClusterError(f"Ray is not installed ({e}); run 'make setup'") from e
    if ray.is_initialized():
        yield Connection(address="existing", embedded=False, nodes=cluster_nodes())
        return
    try:
        if address is None:
            # "local": always a new Ray, never the newest one started on this machine (ray.init's default)
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                     include_dashboard=False, _node_ip_address="127.0.0.1", namespace=NAMESPACE,
                     log_to_driver=False, logging_level="WARNING")
        else:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e}. Is 'ray start --head' running "
                           "there, with the same RAY_AUTH_MODE as here?", address=address) from e
    except Exception as e:  # ray raises plain Exceptions for start-up failures
        where = f"the Ray cluster at {address}" if address else "an embedded Ray on this machine"
        raise ClusterError(f"cannot start {where}: {e}", address=address) from e
    try:
        yield Connection(address=address or "local", embedded=address is None, nodes=cluster_nodes())
    finally:
        ray.shutdown()


__all__ = ["ClusterError", "Connection", "NAMESPACE", "Node", "QUIET_ENV", "apply_quiet_env", "cluster_nodes",
           "connect", "host_resource", "node_command", "placeable", "why_unplaceable"]
