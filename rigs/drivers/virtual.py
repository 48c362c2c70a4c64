"""Virtual camera and light drivers: the virtual studio as if it were hardware.

A :class:`VirtualCamera` "captures" the frames the virtual studio rendered for
its camera (``source="render"``: a folder written by ``twinstudio rig render``,
the way libgphoto2's virtual camera returns files from a folder), or small
synthetic images (``source="pattern"``: for load tests of hundreds of cameras).
Latency, jitter, failures and disconnects can be injected through
:class:`~rigs.drivers.base.DriverOptions`, deterministically per seed.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np

from rigs.drivers.base import (CameraHealth, DriverError, DriverOptions, FetchedFile, ShotRequest,
                               TriggerInfo)
from rigs.rigfile import CameraSpec, LightSpec, SettingsProfile

_KIND_OF_TAKE = {"calib": "calibration", "plates": "plates", "stills": "stills", "motion": "motion"}
_STORAGE_BYTES = 64 * 2**30


class VirtualCamera:
    """One virtual camera (see the module docstring)."""

    def __init__(self, spec: CameraSpec, options: DriverOptions) -> None:
        self.spec = spec
        self.options = options
        self._rng = np.random.default_rng([options.seed, zlib.crc32(spec.id.encode())])
        self._settings: dict[str, str] = {}
        self._found: dict[str, str] = {}
        self._shots = 0
        self._bytes = 0
        self._pending: tuple[ShotRequest, float] | None = None
        self._takes: dict[str, str] = {}
        self._open = False

    # ------------------------------------------------------------------ protocol

    def open(self) -> None:
        o = self.options
        if o.source == "render":
            if not o.render_dir:
                raise DriverError("virtual camera needs a render folder (render_dir)", camera=self.spec.id,
                                  driver="virtual", transient=False)
            manifest = Path(o.render_dir) / "render.json"
            try:
                takes = json.loads(manifest.read_text())["takes"]
            except (OSError, ValueError, KeyError) as e:
                raise DriverError(f"cannot read {manifest}: {e}", camera=self.spec.id, driver="virtual",
                                  transient=False) from e
            self._takes = {_KIND_OF_TAKE[t["id"].split("-")[0]]: t["id"] for t in takes}
        elif o.source != "pattern":
            raise DriverError(f"unknown virtual source {o.source!r} (render, pattern)", camera=self.spec.id,
                              driver="virtual", transient=False)
        # what the body reports before the take configures it (restored by close)
        self._found = {"shutter": "1/60", "aperture": "f/5.6", "iso": "3200", "white_balance": "Auto",
                       "image_format": "JPEG Fine"}
        self._settings = dict(self._found)
        # injected faults (extra): "virtual_disconnect" limits disconnect_after to some cameras;
        # "virtual_settings_stuck" names bodies whose ISO dial is stuck at 3200 (configure cannot fix it)
        self._stuck = self.spec.id in o.extra.get("virtual_settings_stuck", "").split(",")
        self._open = True

    def configure(self, profile: SettingsProfile | None) -> None:
        self._check_connected()
        if profile is None:
            return
        self._settings = {"shutter": profile.shutter, "aperture": profile.aperture, "iso": str(profile.iso),
                          "white_balance": profile.white_balance, "image_format": profile.image_format}
        if self._stuck:
            self._settings["iso"] = "3200"

    def read_settings(self) -> dict[str, str]:
        self._check_connected()
        return dict(self._settings)

    def trigger(self, request: ShotRequest) -> TriggerInfo:
        self._check_connected()
        o = self.options
        if (o.disconnect_after is not None and self._shots >= o.disconnect_after
                and self.spec.id in o.extra.get("virtual_disconnect", self.spec.id).split(",")):
            self._open = False
            raise DriverError("camera disconnected (USB)", camera=self.spec.id, driver="virtual",
                              transient=False, disconnected=True)
        t0 = time.time()
        delay = max(0.0, o.latency_s + o.jitter_s * float(self._rng.standard_normal()))
        if delay:
            time.sleep(delay)
        if o.failure_rate and self._rng.random() < o.failure_rate:
            raise DriverError("capture failed (simulated: camera busy)", camera=self.spec.id, driver="virtual")
        self._shots += 1
        self._pending = (request, t0)
        return TriggerInfo(time=t0, exposure_s=_exposure_of(self._settings.get("shutter")))

    def fetch(self) -> FetchedFile:
        self._check_connected()
        if self._pending is None:
            raise DriverError("fetch without a trigger", camera=self.spec.id, driver="virtual", transient=False)
        request, _ = self._pending
        self._pending = None
        t0 = time.perf_counter()
        if self.options.source == "pattern":
            data, ext = _pattern_jpeg(self.spec.id, request, self.options), "jpg"
        else:
            data, ext = self._rendered(request)
        self._bytes += len(data)
        return FetchedFile(data, ext, time.perf_counter() - t0)

    def health(self) -> CameraHealth:
        if not self._open:
            return CameraHealth(False, message="disconnected")
        return CameraHealth(True, battery_pct=max(0.0, 100.0 - 0.05 * self._shots),
                            storage_free_bytes=_STORAGE_BYTES - self._bytes)

    def close(self) -> None:
        self._settings = dict(self._found)
        self._open = False

    def __enter__(self) -> VirtualCamera:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _check_connected(self) -> None:
        if not self._open:
            raise DriverError("camera is not connected", camera=self.spec.id, driver="virtual",
                              transient=False, disconnected=True)

    def _rendered(self, request: ShotRequest) -> tuple[bytes, str]:
        take = self._takes.get(request.kind)
        if take is None:
            raise DriverError(f"the virtual studio rendered no {request.kind} take "
                              f"(render folder {self.options.render_dir})", camera=self.spec.id,
                              driver="virtual", transient=False)
        index = {"calibration": request.board_index, "motion": request.clip_frame}.get(request.kind)
        index = request.frame if index is None else index
        path = Path(self.options.render_dir) / "takes" / take / self.spec.id / f"{index:06d}.{self.spec.format}"
        try:
            return path.read_bytes(), self.spec.format
        except OSError as e:
            raise DriverError(f"no rendered frame {path}", camera=self.spec.id, driver="virtual",
                              transient=False) from e


def _exposure_of(shutter: str | None) -> float | None:
    """'1/200' -> 0.005 s; '2' or '2s' -> 2.0; None when unknown."""
    if not shutter:
        return None
    s = shutter.strip().rstrip("s")
    try:
        if "/" in s:
            a, b = s.split("/", 1)
            return float(a) / float(b)
        return float(s)
    except ValueError:
        return None


def _pattern_jpeg(camera_id: str, request: ShotRequest, options: DriverOptions) -> bytes:
    """A small deterministic JPEG per (camera, take, frame): textured, so QA sees a sharp image."""
    import cv2

    w = int(options.extra.get("pattern_width", "160"))
    h = w * 3 // 4
    rng = np.random.default_rng([zlib.crc32(f"{camera_id}/{request.take_id}/{request.frame}".encode())])
    img = rng.integers(40, 216, size=(h // 8, w // 8, 3), dtype=np.uint8)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return buf.tobytes()


class VirtualLights:
    """Virtual fixtures: remembers every update (tests and the dry run read ``history``)."""

    def __init__(self, lights: list[LightSpec], options: DriverOptions) -> None:
        self.lights = lights
        self.options = options
        self.levels: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._open = False

    def open(self) -> None:
        self._open = True
        self.levels = {light.id: 0.0 for light in self.lights}

    def apply(self, levels: dict[str, float]) -> None:
        if not self._open:
            raise DriverError("lights are not open", driver="virtual", transient=False)
        known = {light.id for light in self.lights}
        for lid, v in levels.items():
            if lid not in known:
                raise DriverError(f"no such light {lid!r}", light=lid, driver="virtual", transient=False)
            if not 0.0 <= v <= 1.0:
                raise DriverError(f"level {v} outside 0..1", light=lid, driver="virtual", transient=False)
        self.levels = {lid: float(levels.get(lid, 0.0)) for lid in known}
        self.history.append(dict(self.levels))

    def close(self) -> None:
        if self._open:
            self.levels = {lid: 0.0 for lid in self.levels}
        self._open = False

    def __enter__(self) -> VirtualLights:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
