"""The per-camera worker process: owns one camera driver, shoots on command,
writes each file once (temp, fsync, rename), hashes it and checks its quality.

Protocol over a multiprocessing Pipe (tuples, first item the command):

* ``("configure", profile_dict | None)`` -> ``("settings", readback)``
* ``("read_settings",)`` -> ``("settings", readback)``
* ``("shoot", request_dict, stem, retries, backoff_s, qa_dict | None)`` ->
  zero or more ``("retry", {error, attempt})`` then ``("shot", result_dict)``
  where result has ``ok``, and either the file's ``path``/``sha256``/``size``/
  timings/``qa``, or ``error``/``disconnected``. An empty ``stem`` (a capture
  host's agent, see capture.hosts) writes nothing: the result carries the
  bytes (``data``, ``ext``) and their ``sha256`` instead of a ``path``
* ``("health",)`` -> ``("health", dict)``
* ``("close",)`` -> ``("closed",)`` and the process ends

The first message the worker sends is ``("ready", camera_id)`` or
``("error", message)`` when the camera could not be opened.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

from capture.qa import frame_qa
from rigs.drivers import camera_driver
from rigs.drivers.base import DriverError, DriverOptions, ShotRequest
from rigs.errors import TwinstudioError
from rigs.fileio import TMP_SUFFIX, fsync_dir
from rigs.procs import die_with_parent
from rigs.rigfile import CameraSpec, QASettings, SettingsProfile


def write_frame(stem: Path, ext: str, data: bytes) -> tuple[Path, str]:
    """Write captured bytes once: temp file, fsync, rename, fsync the folder; returns (path, sha256).

    Refuses to overwrite: captured pixels are never rewritten. Large frames are hashed in a
    second thread while they are written (hashlib releases the GIL), so the two overlap.
    """
    path = stem.with_name(f"{stem.name}.{ext}")
    if path.exists():
        raise FileExistsError(f"{path} already exists; captured files are never rewritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    hasher = None
    if len(data) >= _THREADED_HASH_BYTES:
        hasher = threading.Thread(target=digest.update, args=(data,))
        hasher.start()
    else:
        digest.update(data)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
        if hasher is not None:
            hasher.join()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path, digest.hexdigest()


#: workers run slightly below the orchestrator's priority
_WORKER_NICENESS = 2
#: frames at least this large are hashed in a thread while being written
_THREADED_HASH_BYTES = 1 << 20


def camera_worker(spec_json: str, options: DriverOptions, conn, parent: int | None = None) -> None:
    """Entry point of a camera's worker process; it dies with ``parent`` (the orchestrator's pid)."""
    # first of all: never outlive the orchestrator (a sibling's copy of our pipe keeps EOF from coming)
    die_with_parent(parent=parent)
    spec = CameraSpec.model_validate_json(spec_json)
    # the orchestrator must win the CPU when hundreds of workers wake at once: it fires and collects
    os.nice(_WORKER_NICENESS)
    # driver environment (e.g. libgphoto2's IOLIBS/VCAMERADIR), set before the driver's library loads
    for key, value in options.extra.items():
        if key.startswith("env."):
            os.environ[key[4:]] = value
    try:
        driver = camera_driver(spec, options)
        driver.open()
    except (TwinstudioError, OSError) as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", spec.id))
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the orchestrator went away
                return
            cmd = msg[0]
            if cmd == "close":
                break
            if cmd == "configure":
                conn.send(_settings(driver, SettingsProfile(**msg[1]) if msg[1] else None))
            elif cmd == "read_settings":
                conn.send(_settings(driver, None, apply=False))
            elif cmd == "shoot":
                conn.send(("shot", _shoot(driver, conn, *msg[1:])))
            elif cmd == "health":
                conn.send(("health", asdict(driver.health())))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
    finally:
        try:
            driver.close()
        finally:
            try:
                conn.send(("closed",))
            except (OSError, BrokenPipeError):
                pass


def _settings(driver, profile, apply: bool = True):
    try:
        if apply:
            driver.configure(profile)
        return ("settings", driver.read_settings())
    except DriverError as e:
        return ("settings_error", str(e))


def _shoot(driver, conn, request: dict, stem: str, retries: int, backoff_s: float, qa: dict | None) -> dict:
    req = ShotRequest(**request)
    attempt = 0
    last = ""
    while True:
        attempt += 1
        t_cmd = time.time()
        try:
            info = driver.trigger(req)
            os.sched_yield()  # let the other cameras' workers fire before this one downloads and checks
            got = driver.fetch()
            if stem:
                path, sha = write_frame(Path(stem), got.ext, got.data)
                result = {"ok": True, "path": str(path), "sha256": sha}
            else:  # a host agent's camera: the bytes travel to the head, which writes them into the session
                result = {"ok": True, "data": got.data, "ext": got.ext,
                          "sha256": hashlib.sha256(got.data).hexdigest()}
            result.update({"size": len(got.data), "trigger_time": info.time, "exposure_s": info.exposure_s,
                           "download_s": got.download_s, "attempts": attempt, "latency_s": time.time() - t_cmd})
            if qa is not None:  # no subject on a calibration take or a clean plate: no subject checks
                result["qa"] = frame_qa(got.data, QASettings(**qa),
                                        expect_subject=req.kind not in ("calibration", "plates"))
            health = driver.health()
            result["battery_pct"] = health.battery_pct
            return result
        except DriverError as e:
            last = str(e)
            if e.disconnected or not e.transient or attempt > retries:
                return {"ok": False, "error": last, "attempts": attempt, "disconnected": e.disconnected}
            conn.send(("retry", {"error": last, "attempt": attempt}))
        except FileExistsError as e:
            return {"ok": False, "error": str(e), "attempts": attempt, "disconnected": False}
        time.sleep(backoff_s * 2 ** (attempt - 1))
