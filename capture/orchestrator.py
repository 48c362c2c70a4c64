"""Runs takes: consent and disk checks, the settings guard, lights, and all
cameras fired in parallel from one worker process per camera.

A take's frames are fired one after another; for each frame every camera is
told to shoot at once, and results are journaled as they arrive (one fsync
per batch of arrivals). A camera that fails is retried with backoff by its
worker; one that still fails is recorded as failed for that frame and the
other cameras' frames are kept; ``reshoot`` fires only the missing ones.

A rig with ``[[hosts]]`` runs over several capture PCs: each host's agent
(capture.hosts, a Ray actor on that host) runs the camera pool of its
cameras; the frames come back through Ray, are checked against the sha256
their host computed, and are written and journaled here, on the head. It
needs Ray connected in this process (``twinstudio capture ... --address``).

Kinds of take: ``calibration`` (the ChArUco board at the rig's poses),
``plates`` (clean plates: the empty studio under every lighting step of the
stills, for keying the subject's edges against the backdrop), ``stills``
(the subject under every lighting step) and ``motion``. On a hardware rig
the technician is asked (``CaptureOptions.prompt``) to place the board for
each calibration pose and to clear the stage before a plates take.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

from capture.consent import require_consent
from capture.events import (CameraUpdate, CaptureEvent, FrameStarted, HostUpdate, Message, QAWarning, TakeFinished,
                            TakeProgress, TakeStarted)
from capture.hosts import HostAgents, HostFleet, fleet_driver_fields
from capture.qa import take_qa_flags
from capture.session import FramePlan, Session, TakeRecord, recover
from capture.worker import camera_worker, write_frame
from rigs.drivers import light_driver
from rigs.drivers.base import DriverOptions
from rigs.errors import TwinstudioError
from rigs.rigfile import CameraSpec, Rig

EventSink = Callable[[CaptureEvent], None]
KINDS = ("calibration", "plates", "stills", "motion")


class CaptureError(TwinstudioError):
    """A take cannot start or cannot go on (exit code 2): disk space, settings, no cameras."""

    exit_code = 2


@dataclass(frozen=True)
class CaptureOptions:
    """How takes run. Driver fault injection applies to virtual cameras only."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    failure_rate: float = 0.0
    disconnect_after: int | None = None
    source: str = "render"  # virtual cameras: "render" (the virtual studio) or "pattern"
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    frames: int | None = None  # motion frames (default: the rig's)
    qa: bool = True
    check_disk: bool = True
    start_method: str = "fork"  # worker processes: fork starts hundreds quickly on Linux
    render_scale: float = 1.0  # virtual studio render scale (tests use small images)
    prompt: Callable[[str], None] | None = None  # hardware calibration and plates: wait for the technician
    # rigs with [[hosts]]: host agents kept between takes (capture.hosts.HostAgents); None: each take
    # starts its own agents and ends them
    agents: HostAgents | None = None


def plan_frames(rig: Rig, kind: str, options: CaptureOptions) -> list[FramePlan]:
    """The frames of a take of ``kind`` for this rig."""
    if kind == "calibration":
        return [FramePlan(index=i, board_index=i) for i in range(rig.calibration.poses)]
    if kind in ("plates", "stills"):
        # plates: the empty studio under the stills' lighting steps, frame for frame (no clip frame: nobody)
        subject = 0 if kind == "stills" else None
        steps = rig.preset_steps()
        if not steps:
            return [FramePlan(index=0, clip_frame=subject)]
        return [FramePlan(index=i, step=s.name, clip_frame=subject) for i, s in enumerate(steps)]
    if kind == "motion":
        n = options.frames or rig.motion.frames
        preset = rig.motion_preset
        step = rig.preset_steps(preset)[0].name if preset else ""
        return [FramePlan(index=i, step=step, clip_frame=i, time=i / rig.motion.fps) for i in range(n)]
    raise CaptureError(f"unknown take kind {kind!r}; use one of {', '.join(KINDS)}")


def estimate_take_bytes(rig: Rig, cameras: Iterable[CameraSpec], frames: int) -> int:
    """A generous estimate of a take's size on disk (JPEG ~1 byte/pixel, PNG 3 bytes/pixel)."""
    per = sum(c.resolution[0] * c.resolution[1] * (3 if c.format == "png" else 1) for c in cameras)
    return int(per * frames * 1.2)


def check_disk(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise CaptureError(f"not enough disk space in {path}: the take needs about {needed / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB are free", needed_bytes=needed, free_bytes=free)


class CameraPool:
    """One worker process per camera. A context manager: workers are closed on exit."""

    def __init__(self, rig: Rig, cameras: list[CameraSpec], driver_options: DriverOptions,
                 start_method: str = "fork") -> None:
        self.rig = rig
        self.specs = {c.id: c for c in cameras}
        self.driver_options = driver_options
        self.ctx = mp.get_context(start_method)
        self.conns: dict[str, object] = {}
        self.procs: dict[str, mp.Process] = {}
        self.unavailable: dict[str, str] = {}
        self._selector: selectors.BaseSelector | None = None

    def __enter__(self) -> CameraPool:
        # the worker checks that its parent is still this process; a forkserver's children have another parent
        me = os.getpid() if self.ctx.get_start_method() in ("fork", "spawn") else None
        for cid, spec in self.specs.items():
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(target=camera_worker,
                                 args=(spec.model_dump_json(), self.driver_options, child, me),
                                 name=f"camera-{cid}", daemon=True)
            p.start()
            child.close()
            self.conns[cid], self.procs[cid] = parent, p
        deadline = time.monotonic() + max(self.rig.trigger.timeout, 5.0) + 0.05 * len(self.specs)
        pending = dict(self.conns)
        while pending:
            ready = wait(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for cid in [c for c, conn in pending.items() if conn in ready]:
                try:
                    msg = pending.pop(cid).recv()
                except EOFError:
                    msg = ("error", "worker exited")
                if msg[0] != "ready":
                    self.unavailable[cid] = msg[1]
        for cid in pending:
            self.unavailable[cid] = "did not open in time"
        for cid in self.unavailable:
            self._stop(cid)
        return self

    def __exit__(self, *exc: object) -> None:
        for cid in list(self.conns):
            self._stop(cid)

    def _stop(self, cid: str) -> None:
        conn, proc = self.conns.pop(cid, None), self.procs.pop(cid, None)
        if conn is not None:
            try:
                conn.send(("close",))
            except (OSError, BrokenPipeError):
                pass
        if proc is not None:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
        if conn is not None:
            conn.close()

    @property
    def cameras(self) -> list[str]:
        return list(self.conns)

    def request_all(self, message: tuple, cameras: Iterable[str] | None = None,
                    timeout: float = 30.0) -> dict[str, tuple]:
        """Send one command to cameras and wait for every reply."""
        cams = [c for c in (cameras or self.cameras) if c in self.conns]
        for c in cams:
            self.conns[c].send(message)
        return {c: r for c, r in self.replies(cams, timeout)}

    def replies(self, cameras: list[str], timeout: float):
        """Yield (camera, reply) as replies arrive; ("timeout",) for cameras that never answer.

        ``retry`` notices are passed through; the final reply of a camera ends its wait. One epoll
        selector per call: hundreds of cameras cost one registration each, not one per wake-up.
        """
        sel = selectors.DefaultSelector()
        for c in cameras:
            sel.register(self.conns[c], selectors.EVENT_READ, c)
        self._selector = sel
        left = len(cameras)
        deadline = time.monotonic() + timeout
        try:
            while left:
                ready = sel.select(timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                for key, _ in ready:
                    cid = key.data
                    try:
                        msg = key.fileobj.recv()
                    except EOFError:
                        msg = ("shot", {"ok": False, "error": "worker died", "attempts": 0, "disconnected": True})
                    if msg[0] != "retry":
                        sel.unregister(key.fileobj)
                        left -= 1
                    yield cid, msg
            for key in list(sel.get_map().values()):
                yield key.data, ("timeout",)
        finally:
            self._selector = None
            sel.close()

    def configure(self, profiles: dict[str, dict | None], timeout: float) -> dict[str, tuple]:
        """Configure cameras from settings profiles (camera -> profile dict); returns each read-back."""
        cams = [c for c in profiles if c in self.conns]
        for c in cams:
            self.conns[c].send(("configure", profiles[c]))
        return {c: r for c, r in self.replies(cams, timeout)}

    def fire(self, commands: dict[str, tuple]) -> None:
        """Send every camera its shoot command, back to back (pickled once per camera)."""
        for cid, cmd in commands.items():
            try:
                self.conns[cid].send(("shoot", *cmd))
            except (BrokenPipeError, OSError):
                pass  # the worker died: replies() reads its EOF and reports it

    def more_ready(self) -> bool:
        """Whether another reply is already waiting (inside :meth:`replies`)."""
        return self._selector is not None and bool(self._selector.select(timeout=0))


def _lights(rig: Rig, opts: DriverOptions):
    groups: dict[str, list] = {}
    for light in rig.lights:
        groups.setdefault(light.driver, []).append(light)
    return [light_driver(name, lights, opts) for name, lights in groups.items()]


def prepare_virtual_studio(session: Session, kinds: tuple[str, ...], options: CaptureOptions,
                           on_event: EventSink | None = None) -> Path:
    """Render the virtual studio for several kinds of take in one pass (each camera's rays and
    backdrop are then computed once) into ``<session>/.virtual/studio``; returns that folder."""
    from rigs.virtual.render import RenderOptions, run_render

    rig = session.rig
    out = session.path / ".virtual" / "studio"
    if not (out / "render.json").exists():
        if on_event:
            on_event(Message(f"virtual studio: rendering {', '.join(kinds)} for {len(rig.camera_specs)} cameras"))
        run_render(session.path / "rig.toml", out,
                   RenderOptions(takes=tuple(kinds), frames=options.frames, scale=options.render_scale))  # type: ignore[arg-type]
    return out


def _render_dir_for(session: Session, kind: str, options: CaptureOptions, on_event: EventSink | None) -> Path:
    """A virtual-studio render holding ``kind``: the shared one when it has it, else one of its own."""
    import json

    shared = session.path / ".virtual" / "studio" / "render.json"
    if shared.exists() and kind in {t["kind"] for t in json.loads(shared.read_text())["takes"]}:
        return shared.parent
    own = session.path / ".virtual" / kind
    if not (own / "render.json").exists():
        from rigs.virtual.render import RenderOptions, run_render

        if on_event:
            on_event(Message(f"virtual studio: rendering the {kind} take for {len(session.rig.camera_specs)} "
                             "cameras"))
        run_render(session.path / "rig.toml", own,
                   RenderOptions(takes=(kind,), frames=options.frames, scale=options.render_scale))  # type: ignore[arg-type]
    return own


def _driver_options(session: Session, rig: Rig, kind: str, options: CaptureOptions,
                    on_event: EventSink | None) -> DriverOptions:
    render_dir = None
    if rig.is_virtual and options.source == "render":
        render_dir = _render_dir_for(session, kind, options, on_event)
    return DriverOptions(rig=rig, session_dir=str(session.path), latency_s=options.latency_s,
                         jitter_s=options.jitter_s, failure_rate=options.failure_rate,
                         disconnect_after=options.disconnect_after, source=options.source,
                         render_dir=str(render_dir) if render_dir else None, seed=options.seed,
                         extra=dict(options.extra))


def run_take(session: Session, kind: str, options: CaptureOptions = CaptureOptions(), *,
             on_event: EventSink | None = None) -> TakeRecord:
    """Shoot a new take of ``kind`` ("calibration", "plates", "stills", "motion"); returns its record.

    Holds the session's writer lock throughout (SessionLocked when another process writes it)."""
    with session.writing():
        rig = session.rig
        require_consent(session.path, "capture")
        frames = plan_frames(rig, kind, options)
        if options.check_disk:
            check_disk(session.path, estimate_take_bytes(rig, rig.camera_specs, len(frames)))
        drv = _driver_options(session, rig, kind, options, on_event)
        take_id = session.next_take_id(kind)
        start = {"ev": "take_start", "take": take_id, "kind": kind, "cameras": [c.id for c in rig.camera_specs],
                 "frames": [f.model_dump() for f in frames], "t": time.time()}
        if rig.hosts:
            _require_ray(rig)
            start["hosts"] = {c.id: c.host for c in rig.camera_specs}
        session.record([start])
        return _shoot_take(session, take_id, None, drv, options, on_event)


def reshoot(session: Session, take_id: str, options: CaptureOptions = CaptureOptions(), *,
            on_event: EventSink | None = None) -> TakeRecord:
    """Fire only the cameras and frames a take is missing (under the session's writer lock)."""
    with session.writing():
        take = session.take(take_id)
        require_consent(session.path, "capture")
        missing = take.missing()
        if not missing:
            if take.status == "open":  # e.g. its take_end was torn off by a crash: close it for real
                _end_take(session, take_id, session.rig)
            elif on_event:
                on_event(Message(f"{take_id} has no missing frames: nothing to reshoot"))
            return session.take(take_id)
        rig = session.rig
        if options.check_disk:
            specs = [s for s in rig.camera_specs if s.id in {c for c, _ in missing}]
            check_disk(session.path, estimate_take_bytes(rig, specs, len(take.frames)))
        if rig.hosts:
            _require_ray(rig)
        drv = _driver_options(session, rig, take.kind, options, on_event)
        session.record([{"ev": "take_reopen", "take": take_id, "t": time.time()}])
        return _shoot_take(session, take_id, set(missing), drv, options, on_event)


def _require_ray(rig: Rig) -> None:
    """A multi-host rig needs Ray connected in this process (the CLI connects; capture never does)."""
    import ray

    if not ray.is_initialized():
        raise CaptureError(f"rig {rig.name!r} runs over capture hosts {', '.join(rig.hosts)}: Ray must be connected "
                           "first; pass --address to 'twinstudio capture ...' (omitted: an embedded local Ray "
                           "with every host on this machine), or call twinstudio.cluster.connect() around the take",
                           rig=rig.name, hosts=rig.hosts)


def _open_cameras(rig: Rig, specs: list[CameraSpec], drv: DriverOptions, options: CaptureOptions):
    """The take's cameras: a local pool, or one agent per capture host for a rig with ``[[hosts]]``."""
    if rig.hosts:
        return HostFleet(rig, specs, fleet_driver_fields(drv), options.start_method, options.agents)
    return CameraPool(rig, specs, drv, options.start_method)


def resume(session: Session, options: CaptureOptions = CaptureOptions(), *,
           on_event: EventSink | None = None) -> dict:
    """After a crash: rebuild from journal + files, then complete the takes that were interrupted.

    A torn final journal line is cut off first (kept beside the journal, see
    :meth:`Session.writing`); ``torn`` in the result names where it went."""
    with session.writing():
        counts = recover(session)
        if on_event:
            if session.torn_aside is not None:
                on_event(Message(f"journal: a torn final line (the crash hit mid-write) was cut off and kept in "
                                 f"{session.torn_aside.name}", "warning"))
            on_event(Message(f"recovered: {counts['adopted']} frame(s) adopted from disk, "
                             f"{counts['discarded']} half-written file(s) discarded, {counts['lost']} lost"
                             + (f", {counts['unlisted']} in take folders the journal does not know (kept)"
                                if counts["unlisted"] else "")))
        completed = []
        for take in list(session.manifest.takes.values()):
            if take.status == "open":
                reshoot(session, take.id, options, on_event=on_event)
                completed.append(take.id)
        session.save()
        return {**counts, "completed": completed,
                "torn": session.torn_aside.name if session.torn_aside is not None else None}


def _shoot_take(session: Session, take_id: str, only: set[tuple[str, int]] | None, drv: DriverOptions,
                options: CaptureOptions, on_event: EventSink | None) -> TakeRecord:
    rig = drv.rig
    take = session.take(take_id)
    emit = on_event or (lambda ev: None)
    wanted = {c for c, _ in only} if only is not None else set(take.cameras)
    specs = [s for s in rig.camera_specs if s.id in wanted]
    todo = [f for f in take.frames if only is None or any((c, f.index) in only for c in wanted)]
    total = sum(1 for c in wanted for f in todo if only is None or (c, f.index) in only)
    done = 0
    t_start = time.time()
    emit(TakeStarted(take_id, take.kind, tuple(s.id for s in specs), len(todo)))
    steps = {s.name: s for s in rig.preset_steps()}
    qa = rig.qa.model_dump() if options.qa else None
    lights = _lights(rig, drv)
    try:
        for lt in lights:
            lt.open()
        with _open_cameras(rig, specs, drv, options) as pool:
            fleet = pool if isinstance(pool, HostFleet) else None
            host_of = {s.id: s.host or "" for s in specs}
            if fleet is not None:
                for h in fleet.hosts:
                    emit(HostUpdate(h, "down" if h in fleet.down else "ready", tuple(fleet.by_host[h]), take_id,
                                    error=fleet.down.get(h, "")))
            for cid, why in pool.unavailable.items():
                session.record([{"ev": "frame_failed", "take": take_id, "camera": cid, "frame": f.index,
                                 "error": f"camera unavailable: {why}", "t": time.time()} for f in todo])
                emit(CameraUpdate(cid, "disconnected", take_id, -1, error=why, host=host_of.get(cid, "")))
            try:
                _settings_guard(session, rig, pool, emit)
            except CaptureError:
                session.record([{"ev": "take_end", "take": take_id, "status": "blocked", "skew_s": None,
                                 "qa_flags": ["blocked by the settings guard"], "t": time.time()}])
                session.save()
                raise
            if take.kind == "plates" and todo and not rig.is_virtual and options.prompt:
                options.prompt(f"clear the stage: clean plates of the empty studio, {len(todo)} lighting "
                               f"step{'s' if len(todo) != 1 else ''}; then continue")
            current_step = None
            gone: set[str] = set()  # cameras that disconnected during this take
            t0: float | None = None  # motion: when the take's clock started
            for f in todo:
                if fleet is not None:  # cameras of a host that dropped out earlier in this take
                    lost = [c for c in fleet.host_of if c not in pool.unavailable and fleet.down_reason(c)
                            and (only is None or (c, f.index) in only)]
                    session.record([{"ev": "frame_failed", "take": take_id, "camera": c, "frame": f.index,
                                     "error": fleet.down_reason(c), "t": time.time()} for c in lost])
                cams = [c for c in pool.cameras if only is None or (c, f.index) in only]
                if gone & set(cams):
                    session.record([{"ev": "frame_failed", "take": take_id, "camera": c, "frame": f.index,
                                     "error": "camera disconnected earlier in the take", "t": time.time()}
                                    for c in sorted(gone & set(cams))])
                    cams = [c for c in cams if c not in gone]
                if not cams:
                    continue
                if f.step and f.step != current_step:
                    for lt in lights:
                        lt.apply({k: v for k, v in steps[f.step].levels.items()
                                  if k in {light.id for light in lt.lights}})
                    emit(Message(f"lights: {f.step}"))
                    time.sleep(rig.trigger.settle)
                    current_step = f.step
                if take.kind == "calibration" and not rig.is_virtual and options.prompt:
                    options.prompt(f"place the board for pose {f.index + 1}/{len(take.frames)}, then continue")
                if take.kind == "motion" and only is None:
                    if t0 is None:  # the schedule starts with the first frame, after the lights have settled
                        t0 = time.monotonic() - f.time
                    delay = t0 + f.time - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                if fleet is not None:
                    done = _fire_hosts(session, fleet, take, f, cams, qa, emit, done, total, gone)
                else:
                    done = _fire(session, pool, take, f, cams, qa, emit, done, total, gone)
        take, status, missing, skew = _end_take(session, take_id, rig)
    finally:
        for lt in lights:
            lt.close()
    emit(TakeFinished(take_id, status, sum(len(v) for v in take.captured.values()),
                      tuple(f"{c}/{i}" for c, i in missing), skew, time.time() - t_start))
    return session.take(take_id)


def _end_take(session: Session, take_id: str, rig: Rig):
    """Journal a take's end (complete or incomplete, skew, QA flags) and rewrite the manifest."""
    take = session.take(take_id)
    missing = take.missing()
    skew = take.trigger_skew()
    flags = take_qa_flags(missing, skew, rig.qa)
    status = "complete" if not missing else "incomplete"
    session.record([{"ev": "take_end", "take": take_id, "status": status, "skew_s": skew,
                     "qa_flags": flags, "t": time.time()}])
    session.save()
    return session.take(take_id), status, missing, skew


def _fire(session: Session, pool: CameraPool, take: TakeRecord, f: FramePlan, cams: list[str], qa,
          emit: EventSink, done: int, total: int, gone: set[str]) -> int:
    """Fire one frame on the cameras; journal results as they arrive. Returns frames done so far;
    cameras that report a disconnect are added to ``gone``."""
    rig = pool.rig
    request = {"take_id": take.id, "kind": take.kind, "frame": f.index, "step": f.step,
               "clip_frame": f.clip_frame, "board_index": f.board_index}
    retries, backoff = rig.trigger.retries, rig.trigger.backoff
    emit(FrameStarted(take.id, f.index, len(cams), f.step))
    pool.fire({c: (request, str(session.frame_stem(take.id, c, f.index)), retries, backoff, qa) for c in cams})
    for c in cams:
        emit(CameraUpdate(c, "firing", take.id, f.index))
    timeout = rig.trigger.timeout * (retries + 1) + backoff * 2 ** (retries + 1) + 5.0
    batch: list[dict] = []
    updates: list[CaptureEvent] = []
    replies = pool.replies(cams, timeout)
    pending = len(cams)
    for cid, msg in replies:
        if msg[0] == "retry":
            updates.append(CameraUpdate(cid, "retrying", take.id, f.index, error=msg[1]["error"]))
        else:
            pending -= 1
            res = msg[1] if msg[0] == "shot" else {"ok": False, "error": "no answer (timeout)", "attempts": 0}
            if res["ok"]:
                rec = {k: res.get(k) for k in ("sha256", "size", "trigger_time", "exposure_s", "download_s",
                                                "attempts", "qa")}
                rec["path"] = Path(res["path"]).relative_to(session.path).as_posix()
                batch.append({"ev": "frame", "take": take.id, "camera": cid, "frame": f.index, "record": rec})
                updates.append(CameraUpdate(cid, "ok", take.id, f.index, latency_s=res.get("latency_s"),
                                            battery_pct=res.get("battery_pct")))
                for flag in (res.get("qa") or {}).get("flags", []):
                    updates.append(QAWarning(take.id, cid, f.index, flag))
            else:
                state = "disconnected" if res.get("disconnected") else "failed"
                if res.get("disconnected"):
                    gone.add(cid)
                batch.append({"ev": "frame_failed", "take": take.id, "camera": cid, "frame": f.index,
                              "error": res["error"]})
                updates.append(CameraUpdate(cid, state, take.id, f.index, error=res["error"]))
        if batch and (pending == 0 or not pool.more_ready()):
            # group commit: one fsync for every result that has arrived, then the events
            now = time.time()
            session.record([{**e, "t": now} for e in batch])
            done += sum(1 for e in batch if e["ev"] == "frame")
            batch = []
            for ev in updates:
                emit(ev)
            updates = []
            emit(TakeProgress(take.id, done, total))
    for ev in updates:
        emit(ev)
    return done


def _fire_hosts(session: Session, fleet: HostFleet, take: TakeRecord, f: FramePlan, cams: list[str], qa,
                emit: EventSink, done: int, total: int, gone: set[str]) -> int:
    """Fire one frame on every capture host at once; check, write and journal each host's frames as its
    delivery arrives (sha256 checked against its host's, written here, one fsync of the journal per
    host). A host that dies or does not answer is dropped: its cameras are missing for this frame and
    the rest of the take, with a reason naming it. Returns frames done so far; cameras that report a
    disconnect are added to ``gone``, as in :func:`_fire`."""
    rig = fleet.rig
    request = {"take_id": take.id, "kind": take.kind, "frame": f.index, "step": f.step,
               "clip_frame": f.clip_frame, "board_index": f.board_index}
    retries, backoff = rig.trigger.retries, rig.trigger.backoff
    timeout = rig.trigger.timeout * (retries + 1) + backoff * 2 ** (retries + 1) + 5.0
    emit(FrameStarted(take.id, f.index, len(cams), f.step))
    deliveries = fleet.shoot(request, cams, retries, backoff, qa, timeout)
    for c in cams:
        emit(CameraUpdate(c, "firing", take.id, f.index, host=fleet.host_of[c]))
    dispatch: dict[str, dict[str, float]] = {}
    for d in deliveries:
        batch: list[dict] = []
        updates: list[CaptureEvent] = []
        hcams = [c for c in cams if fleet.host_of[c] == d.host]
        if d.error:
            fleet.drop(d.host, d.error)
            why = fleet.down_reason(hcams[0]) if hcams else d.error
            batch += [{"ev": "frame_failed", "take": take.id, "camera": c, "frame": f.index, "error": why}
                      for c in hcams]
            updates += [CameraUpdate(c, "disconnected", take.id, f.index, error=why, host=d.host) for c in hcams]
            updates.append(HostUpdate(d.host, "down", tuple(fleet.by_host[d.host]), take.id, f.index,
                                      error=d.error))
        else:
            dispatch[d.host] = {"ms": d.dispatch_ms, "at": d.received, "fired": d.fired,
                                "late_ms": max(0.0, (d.received - d.fire_at) * 1000.0)}
            updates += [CameraUpdate(c, "retrying", take.id, f.index, error=n["error"], host=d.host)
                        for c, n in d.retries]
            written = fleet.writer.map(lambda cr: _land(session, take.id, f.index, *cr), d.results.items())
            for cid, (res, err) in zip(d.results, written):
                if err is None:
                    rec = {k: res.get(k) for k in ("sha256", "size", "trigger_time", "exposure_s", "download_s",
                                                    "attempts", "qa")}
                    rec["path"] = res["path"]
                    batch.append({"ev": "frame", "take": take.id, "camera": cid, "frame": f.index, "record": rec})
                    updates.append(CameraUpdate(cid, "ok", take.id, f.index, latency_s=res.get("latency_s"),
                                                battery_pct=res.get("battery_pct"), host=d.host))
                    updates += [QAWarning(take.id, cid, f.index, flag)
                                for flag in (res.get("qa") or {}).get("flags", [])]
                else:
                    state = "disconnected" if res.get("disconnected") else "failed"
                    if res.get("disconnected"):
                        gone.add(cid)
                    batch.append({"ev": "frame_failed", "take": take.id, "camera": cid, "frame": f.index,
                                  "error": err})
                    updates.append(CameraUpdate(cid, state, take.id, f.index, error=err, host=d.host))
            updates.append(HostUpdate(d.host, "ok", tuple(fleet.by_host[d.host]), take.id, f.index,
                                      dispatch_ms=d.dispatch_ms))
        now = time.time()
        session.record([{**e, "t": now} for e in batch])  # group commit: one fsync per host's delivery
        done += sum(1 for e in batch if e["ev"] == "frame")
        for ev in updates:
            emit(ev)
        emit(TakeProgress(take.id, done, total))
    if dispatch:
        session.record([{"ev": "dispatch", "take": take.id, "frame": f.index, "hosts": dispatch,
                         "t": time.time()}])
    return done


def _land(session: Session, take_id: str, frame: int, camera: str, res: dict) -> tuple[dict, str | None]:
    """A frame that came from a capture host: check its sha256 against the host's, write it into the
    session once. Returns (result with ``path`` relative to the session, None) or (result, error)."""
    import hashlib

    if not res.get("ok"):
        return res, res.get("error", "failed")
    data = res.pop("data")
    got = hashlib.sha256(data).hexdigest()
    if got != res["sha256"]:
        return res, (f"sha256 mismatch on arrival from its host: {got[:12]}..., the host computed "
                     f"{res['sha256'][:12]}... (damaged in transfer)")
    try:
        path, _ = write_frame(session.frame_stem(take_id, camera, frame), res["ext"], data)
    except FileExistsError as e:
        return res, str(e)
    res["path"] = path.relative_to(session.path).as_posix()
    return res, None


def _settings_guard(session: Session, rig: Rig, pool: CameraPool | HostFleet, emit: EventSink) -> None:
    """Read every camera's settings back; correct mismatches; block the take if any remain."""
    profiles = {s.id: (rig.model.profiles.get(s.profile) if s.profile else None) for s in rig.camera_specs}
    cams = [c for c in pool.cameras if profiles.get(c) is not None]
    if not cams:
        return
    read = pool.request_all(("read_settings",), cams)
    wrong = {c: _mismatch(profiles[c], r) for c, r in read.items()}
    wrong = {c: m for c, m in wrong.items() if m}
    if wrong:
        fixed = pool.configure({c: profiles[c].model_dump() for c in wrong}, rig.trigger.timeout)
        still = {c: _mismatch(profiles[c], r) for c, r in fixed.items()}
        still = {c: m for c, m in still.items() if m}
        session.record([{"ev": "settings", "camera": c, "readback": r[1] if r[0] == "settings" else {},
                         "corrected": c not in still, "t": time.time()} for c, r in fixed.items()])
        corrected = sorted(set(wrong) - set(still))
        if corrected:
            emit(Message(f"settings corrected on {', '.join(corrected)}", "warning"))
        if still:
            lines = "; ".join(f"{c}: " + ", ".join(still[c]) for c in sorted(still))
            raise CaptureError(f"take blocked: camera settings differ from the rig's profile and could not "
                               f"be corrected: {lines}", cameras=sorted(still))


def _mismatch(profile, reply: tuple) -> list[str]:
    if reply[0] != "settings":
        return [f"cannot read settings ({reply[1] if len(reply) > 1 else reply[0]})"]
    want = {"shutter": profile.shutter, "aperture": profile.aperture, "iso": str(profile.iso),
            "white_balance": profile.white_balance, "image_format": profile.image_format}
    got = reply[1]
    return [f"{k} is {got[k]!r}, profile says {v!r}" for k, v in want.items() if k in got and got[k] != v]


__all__ = ["CameraPool", "HostFleet", "CaptureError", "CaptureOptions", "estimate_take_bytes", "plan_frames",
           "prepare_virtual_studio", "reshoot", "resume", "run_take"]
