"""Rigs spread over several capture PCs: one host agent per host, a Ray actor pinned to that host.

Two levels of fan-out keep the trigger spread small: the orchestrator on the
head sends each frame's command to every host's agent at once (Ray actor
calls), and each agent fires its own cameras through the existing
:class:`~capture.orchestrator.CameraPool` (one worker process per camera).
The workers do not write into the session: each shot's bytes and the sha256
the worker computed travel back through Ray, and the head checks the hash on
arrival, writes the file into the session and journals it, so the session
and its journal stay on the head exactly as in a single-host take.

* :class:`HostAgent` runs on a capture host (``ray.remote``, no CPU of its
  own, ``resources={host_resource(name): 1}``: only the node started with that
  custom resource can hold it);
* :class:`HostFleet` is the head's side: it starts one agent per host that has
  cameras in the take, fires them, and turns a host that drops out (its node
  dies: ``RayActorError``; or no answer in time) into a set of cameras that
  are missing for the frames it did not deliver, with a reason naming it.

Lights stay with the head (DMX goes over the network); a light's ``host`` in
the rig file is recorded for the studio's wiring. Ray is imported only here
and only when a multi-host take runs; ``capture``
never connects to Ray itself (the CLI does, see ``twinstudio.cluster``).
Times are ``time.time()`` seconds; dispatch times are reported in ms and
assume the hosts' clocks are synchronised (PTP/NTP, as a studio's are).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rigs.rigfile import CameraSpec, Rig

#: prefix of the custom resource that a capture host's Ray node offers (one unit)
HOST_RESOURCE_PREFIX = "capture-host:"

#: how long a host agent may take to open its cameras, beyond the rig's trigger timeout, s
OPEN_GRACE_S = 30.0

#: scheduled firing: the lead of the fire time over the send (the slowest recent command's trip plus a
#: margin, within these bounds), the frames it is taken over, and the spin at the end of a wait (s)
LEAD_MIN_S, LEAD_MAX_S, LEAD_FIRST_S, LEAD_MARGIN_S, LEAD_WINDOW = 0.002, 0.050, 0.020, 0.002, 50
SPIN_S = 0.002


def host_resource(host: str) -> str:
    """The custom resource that pins a capture host's agent to that host's node."""
    return f"{HOST_RESOURCE_PREFIX}{host}"


def wait_until(t: float) -> float:
    """Sleep until ``time.time()`` is ``t`` (the last 2 ms spinning, for sub-millisecond precision);
    returns the time it woke (at once when ``t`` has passed)."""
    while True:
        now = time.time()
        if now >= t:
            return now
        if t - now > SPIN_S:
            time.sleep(t - now - SPIN_S)


class HostAgent:
    """One capture host's agent (a Ray actor on that host): the camera pool of the host's cameras.

    One agent per host and take: :meth:`open` starts the pool of the take's cameras on the host,
    :meth:`close` ends it, and the head then kills the actor, which frees the host's resource."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.pool = None

    def open(self, rig_text: str, rig_path: str, cameras: list[str], driver: dict[str, Any],
             start_method: str = "fork") -> dict[str, Any]:
        """Start one worker process per camera of a take (closing the last take's first); returns the
        cameras ready and those unavailable (why). The rig comes as its file's text and the driver
        options as a dict, so nothing of the head's in-memory state is shipped."""
        from capture.orchestrator import CameraPool
        from rigs.drivers.base import DriverOptions
        from rigs.rigfile import parse_rig

        self.close()
        rig = parse_rig(rig_text, rig_path)
        specs = [s for s in rig.camera_specs if s.id in set(cameras)]
        self.pool = CameraPool(rig, specs, DriverOptions(rig=rig, **driver), start_method)
        self.pool.__enter__()
        return {"host": self.host, "cameras": self.pool.cameras, "unavailable": dict(self.pool.unavailable),
                "pid": os.getpid()}

    def request_all(self, message: tuple, cameras: list[str], timeout: float) -> dict[str, tuple]:
        """:meth:`CameraPool.request_all` on this host's cameras."""
        return self.pool.request_all(message, cameras, timeout)

    def configure(self, profiles: dict[str, dict | None], timeout: float) -> dict[str, tuple]:
        """:meth:`CameraPool.configure` on this host's cameras."""
        return self.pool.configure(profiles, timeout)

    def shoot(self, sent_at: float, fire_at: float, request: dict, cameras: list[str], retries: int,
              backoff_s: float, qa: dict | None, timeout: float) -> dict[str, Any]:
        """Fire ``cameras`` for one frame at ``fire_at`` (``time.time()``) and wait for every one of them.

        Every host is sent the same ``fire_at``, a little after the command should reach the slowest
        one, so the hosts fire together however unevenly the commands arrive (a command that arrives
        late fires at once). Returns ``received`` (when the command reached this agent), ``fired``
        (when it fired its cameras), ``sent_at`` as given, ``retries`` (camera, notice) seen on the
        way and ``results``: camera -> the worker's result, carrying the frame's bytes (``data``,
        ``ext``) and its ``sha256`` when ``ok``."""
        received = time.time()
        cams = [c for c in cameras if c in self.pool.conns]
        commands = {c: (request, "", retries, backoff_s, qa) for c in cams}
        fired = wait_until(fire_at)
        self.pool.fire(commands)
        results: dict[str, dict] = {}
        notices: list[tuple[str, dict]] = []
        for cid, msg in self.pool.replies(cams, timeout):
            if msg[0] == "retry":
                notices.append((cid, msg[1]))
            else:
                results[cid] = msg[1] if msg[0] == "shot" else {"ok": False, "error": "no answer (timeout)",
                                                                "attempts": 0}
        for cid in cameras:
            results.setdefault(cid, {"ok": False, "error": f"camera not open on host {self.host}", "attempts": 0})
        return {"host": self.host, "sent_at": sent_at, "received": received, "fired": fired, "results": results,
                "retries": notices}

    def close(self) -> bool:
        """Close every camera (workers end); the actor can then be killed."""
        if self.pool is not None:
            self.pool.__exit__(None, None, None)
            self.pool = None
        return True


class HostAgents:
    """Host agents kept between takes (``capture run``, a benchmark): one per host, started on first
    use, ended on exit. Without one (``CaptureOptions.agents`` None) each take starts its own agents
    and ends them, which costs a Ray worker's start per host and take."""

    def __init__(self) -> None:
        self.handles: dict[str, Any] = {}

    def get(self, host: str):
        """The agent of ``host``, started (pinned by its resource) if this holds none."""
        import ray

        if host not in self.handles:
            actor = ray.remote(num_cpus=0, max_restarts=0)(HostAgent)
            self.handles[host] = actor.options(resources={host_resource(host): 1}).remote(host)
        return self.handles[host]

    def forget(self, host: str) -> None:
        """End ``host``'s agent (it died, or hangs); the next :meth:`get` starts a fresh one."""
        import ray

        agent = self.handles.pop(host, None)
        if agent is not None:
            try:
                ray.kill(agent, no_restart=True)
            except Exception:  # noqa: BLE001 - an agent whose node is gone cannot be killed twice
                pass

    def __enter__(self) -> HostAgents:
        return self

    def __exit__(self, *exc: object) -> None:
        for host in list(self.handles):
            self.forget(host)


def alive_host_resources() -> set[str]:
    """The capture hosts some alive node of the connected Ray cluster stands for."""
    import ray

    out = set()
    for n in ray.nodes():
        if n.get("Alive"):
            out |= {k[len(HOST_RESOURCE_PREFIX):] for k in (n.get("Resources") or {})
                    if k.startswith(HOST_RESOURCE_PREFIX)}
    return out


@dataclass
class FrameDelivery:
    """What one host delivered for one frame (``error`` set when it dropped out instead)."""

    host: str
    sent_at: float
    received: float | None = None
    fired: float | None = None
    fire_at: float | None = None
    results: dict[str, dict] = field(default_factory=dict)
    retries: list[tuple[str, dict]] = field(default_factory=list)
    error: str = ""

    @property
    def dispatch_ms(self) -> float | None:
        """Head sent the command -> the agent received it, ms."""
        return None if self.received is None else (self.received - self.sent_at) * 1000.0


class HostFleet:
    """The head's side of a multi-host take: one :class:`HostAgent` per host with cameras in it.

    A context manager like :class:`~capture.orchestrator.CameraPool` (agents are closed and killed
    on exit) with the same ``cameras``/``unavailable``/``request_all``/``configure``; frames are
    fired with :meth:`shoot`. Needs ``ray.is_initialized()``."""

    def __init__(self, rig: Rig, cameras: list[CameraSpec], driver: dict[str, Any], start_method: str = "fork",
                 agents: HostAgents | None = None, writers: int | None = None) -> None:
        self.rig = rig
        self.host_of = {c.id: c.host for c in cameras}
        self.by_host: dict[str, list[str]] = {}
        for c in cameras:
            self.by_host.setdefault(c.host, []).append(c.id)
        self.driver = driver
        self.start_method = start_method
        self.keeper = agents if agents is not None else HostAgents()
        self.own_agents = agents is None  # ended with this take
        self.agents: dict[str, Any] = {}
        self.ready: dict[str, list[str]] = {}  # host -> its cameras that opened
        self.unavailable: dict[str, str] = {}  # camera -> why
        self.down: dict[str, str] = {}  # host -> why it dropped out (this take)
        self.trips: list[float] = []  # the slowest host's command trip of recent frames, s
        # frames arriving from the hosts are written (temp, fsync, rename) in parallel, as the workers of a
        # single-host take write theirs: one thread per camera, so the fsyncs overlap as theirs do
        self.writer = ThreadPoolExecutor(max_workers=writers or max(1, min(64, len(cameras))),
                                         thread_name_prefix="frame-writer")

    def __enter__(self) -> HostFleet:
        alive = alive_host_resources()
        text = self.rig.path.read_text(encoding="utf-8")
        opening = {}
        for host, cams in self.by_host.items():
            if host not in alive:
                self._host_down(host, f"no alive Ray node offers {host_resource(host)} (is 'ray start' with "
                                      "that resource running on the host?)")
                self.keeper.forget(host)
                continue
            self.agents[host] = self.keeper.get(host)
            opening[self.agents[host].open.remote(text, str(self.rig.path), cams, self.driver,
                                                  self.start_method)] = host
        deadline = time.monotonic() + max(self.rig.trigger.timeout, 5.0) + OPEN_GRACE_S
        for host, reply in self._gather(opening, deadline):
            if isinstance(reply, str):
                self._host_down(host, reply)
                self.keeper.forget(host)
            else:
                self.ready[host] = list(reply["cameras"])
                for cid, why in reply["unavailable"].items():
                    self.unavailable[cid] = f"{why} (host {host})"
        return self

    def __exit__(self, *exc: object) -> None:
        """Close every host's cameras; then end the agents (their hosts' resources are free again),
        unless they were lent by a :class:`HostAgents` for the takes to come. One that does not close
        in time is ended in any case."""
        closing = {self.agents[h].close.remote(): h for h in self.agents if h not in self.down}
        for host, reply in self._gather(closing, time.monotonic() + 15.0):
            if reply is not True:
                self.keeper.forget(host)
        if self.own_agents:
            self.keeper.__exit__(None, None, None)
        self.writer.shutdown(wait=True)

    def _host_down(self, host: str, why: str) -> None:
        self.down[host] = why
        self.ready.pop(host, None)
        for cid in self.by_host.get(host, []):
            self.unavailable.setdefault(cid, f"host {host} is down: {why}")

    def drop(self, host: str, why: str) -> None:
        """The host dropped out of this take: its cameras are missing from now on; its agent is ended."""
        self.down[host] = why
        self.ready.pop(host, None)
        self.keeper.forget(host)

    @property
    def cameras(self) -> list[str]:
        """Cameras of hosts still up, that opened, in rig order."""
        up = {c for cams in self.ready.values() for c in cams}
        return [c for c in self.host_of if c in up]

    @property
    def hosts(self) -> list[str]:
        return list(self.by_host)

    def down_reason(self, camera: str) -> str | None:
        """Why ``camera`` is out of this take because of its host, or None when its host is up."""
        host = self.host_of.get(camera)
        return f"host {host} dropped out: {self.down[host]}" if host in self.down else None

    def _gather(self, refs: dict, deadline: float) -> Iterator[tuple[str, Any]]:
        """(host, reply) as replies arrive; the reply is the reason (str) where the host died or timed out."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError

        pending = dict(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                host = pending.pop(ref)
                try:
                    yield host, ray.get(ref)
                except RayActorError as e:
                    yield host, f"its agent died ({type(e).__name__}: the host's Ray node is gone or crashed)"
                except (GetTimeoutError, RayError) as e:
                    yield host, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for host in pending.values():
            yield host, "no answer in time (timeout)"

    def _call(self, method: str, per_host: dict[str, tuple], timeout: float) -> dict[str, tuple]:
        refs = {getattr(self.agents[h], method).remote(*args): h for h, args in per_host.items()}
        out: dict[str, tuple] = {}
        for host, reply in self._gather(refs, time.monotonic() + timeout + 5.0):
            if isinstance(reply, str):  # the cameras (or camera -> profile) are the last-but-one argument
                out.update({c: ("error", f"host {host}: {reply}") for c in per_host[host][-2]})
            else:
                out.update(reply)
        return out

    def request_all(self, message: tuple, cameras: list[str] | None = None,
                    timeout: float = 30.0) -> dict[str, tuple]:
        """Send one command to cameras (on their hosts) and wait for every reply."""
        cams = [c for c in (cameras or self.cameras) if c in set(self.cameras)]
        per = {h: (message, [c for c in cams if self.host_of[c] == h]) for h in self.ready}
        return self._call("request_all", {h: (m, cs, timeout) for h, (m, cs) in per.items() if cs}, timeout)

    def configure(self, profiles: dict[str, dict | None], timeout: float) -> dict[str, tuple]:
        """Configure cameras from profiles (camera -> profile dict); returns each camera's read-back."""
        per: dict[str, dict] = {}
        for c, p in profiles.items():
            if c in set(self.cameras):
                per.setdefault(self.host_of[c], {})[c] = p
        return self._call("configure", {h: (ps, timeout) for h, ps in per.items()}, timeout)

    def shoot(self, request: dict, cameras: list[str], retries: int, backoff_s: float, qa: dict | None,
              timeout: float) -> Iterator[FrameDelivery]:
        """Fire one frame on ``cameras`` (every host at once); yield each host's delivery as it arrives.

        A host whose agent dies or does not answer within ``timeout`` (+5 s) is yielded with ``error``
        set; the caller decides what that means (see :meth:`drop`)."""
        per: dict[str, list[str]] = {}
        for c in cameras:
            per.setdefault(self.host_of[c], []).append(c)
        refs, sent = {}, {}
        fire_at = time.time() + self.lead_s()
        for host, cams in per.items():
            sent[host] = time.time()
            refs[self.agents[host].shoot.remote(sent[host], fire_at, request, cams, retries, backoff_s, qa,
                                                timeout)] = host
        trips = []
        for host, reply in self._gather(refs, time.monotonic() + timeout + 5.0):
            if isinstance(reply, str):
                yield FrameDelivery(host, sent[host], error=reply, fire_at=fire_at)
            else:
                trips.append(reply["received"] - sent[host])
                yield FrameDelivery(host, sent[host], reply["received"], reply["fired"], fire_at,
                                    reply["results"], reply["retries"])
        if trips:
            self.trips = (self.trips + [max(trips)])[-LEAD_WINDOW:]

    def lead_s(self) -> float:
        """How far ahead of the send the hosts are told to fire: the slowest command trip of the
        last frames plus a margin (bounded); 20 ms until there is a trip to go by."""
        if not self.trips:
            return LEAD_FIRST_S
        return min(max(max(self.trips) + LEAD_MARGIN_S, LEAD_MIN_S), LEAD_MAX_S)


def fleet_driver_fields(options) -> dict[str, Any]:
    """A :class:`~rigs.drivers.base.DriverOptions` as the plain dict an agent rebuilds it from (no rig)."""
    return {f.name: getattr(options, f.name) for f in fields(options) if f.name != "rig"}


__all__ = ["FrameDelivery", "HOST_RESOURCE_PREFIX", "HostAgent", "HostAgents", "HostFleet",
           "alive_host_resources", "fleet_driver_fields", "host_resource"]
