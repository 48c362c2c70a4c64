"""OpenCV cameras: UVC webcams, capture cards, video files and stream URLs.

A camera's ``address`` in the rig file says what it is:

- an int, or a string of digits (``0``, ``"2"``), or a ``/dev/...`` path: a live device;
- a string with ``://`` (``rtsp://…``, ``http://…``): a stream;
- any other string: a video file; a relative path is looked up next to the rig file first,
  then in the working directory. Every trigger takes the file's next frame; after the last one
  ``trigger`` raises DriverError("end of video", transient=False).

``trigger`` grabs a frame (for live sources after dropping frames already waiting in the
driver's buffer, so the picture is taken now, not some frames ago) and ``fetch`` decodes it and
encodes it as the spec's ``format`` (JPEG quality 95, or PNG). OpenCV cameras have no aperture or
ISO; ``configure`` sets only the exposure time (the profile's ``shutter``) and only on live
devices whose backend supports it (V4L2, DirectShow, Media Foundation); anything else is ignored.

Options (``DriverOptions.extra``, strings): ``opencv_backend`` (``V4L2``, ``FFMPEG``, ``DSHOW``,
``MSMF``, ... : OpenCV's ``CAP_<name>``; default: OpenCV's choice), ``opencv_fourcc`` (pixel
format asked of devices, e.g. ``MJPG``, which many UVC webcams need for 1080p at full rate),
``opencv_flush_buffer`` (``1``/``0``, default 1: drop stale frames before a live trigger).
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import cv2

from rigs.drivers.base import CameraHealth, DriverError, DriverOptions, FetchedFile, ShotRequest, TriggerInfo
from rigs.rigfile import CameraSpec, SettingsProfile

log = logging.getLogger(__name__)

DRIVER = "opencv"
JPEG_QUALITY = 95
PNG_COMPRESSION = 3
#: at most this many buffered frames are dropped before a live trigger (V4L2 queues 4 by default)
MAX_STALE_FRAMES = 6

_SHUTTER = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:/\s*(\d+(?:\.\d*)?))?\s*(?:s|\")?\s*$")


def parse_shutter(text: str) -> float | None:
    """Exposure time in seconds from ``"1/125"``, ``"0.5"``, ``"2s"`` or ``2"``; None if unreadable."""
    m = _SHUTTER.match(text)
    if not m:
        return None
    num = float(m.group(1))
    den = float(m.group(2)) if m.group(2) else 1.0
    return num / den if num > 0 and den > 0 else None


def format_shutter(seconds: float) -> str:
    """``1/125`` below a second, ``2`` (seconds) from one second on."""
    return f"1/{round(1.0 / seconds)}" if seconds < 1.0 else f"{seconds:g}"


class OpenCVCamera:
    """One OpenCV camera (see the module docstring). Not thread-safe; one per worker process."""

    def __init__(self, spec: CameraSpec, options: DriverOptions) -> None:
        self.spec = spec
        self.options = options
        #: "device", "stream" or "file"
        self.kind, self.address = self._resolve_address(spec, options)
        extra = options.extra
        self._api = cv2.CAP_ANY
        if extra.get("opencv_backend"):
            name = extra["opencv_backend"].strip().upper()
            if not isinstance(getattr(cv2, f"CAP_{name}", None), int):
                raise self._error(f"option opencv_backend={extra['opencv_backend']!r}: no OpenCV backend CAP_{name}",
                                  transient=False)
            self._api = getattr(cv2, f"CAP_{name}")
        self._fourcc = extra.get("opencv_fourcc", "").strip()
        if self._fourcc and len(self._fourcc) != 4:
            raise self._error(f"option opencv_fourcc={self._fourcc!r} is not four characters", transient=False)
        self._flush_buffer = extra.get("opencv_flush_buffer", "1").strip().lower() not in ("0", "false", "no", "off")
        self._cap: cv2.VideoCapture | None = None
        self._resolution: tuple[int, int] | None = None  # what the source delivers (w, h)
        self._exposure_s: float | None = None  # set by configure and accepted by the backend
        self._found: dict[int, float] = {}  # device properties at open, restored at close
        self._pending = False  # a grabbed frame waits for fetch
        self._last_file: FetchedFile | None = None
        self._frames = 0  # frames grabbed since open
        #: the last trigger's TriggerInfo (None before the first)
        self.last_trigger: TriggerInfo | None = None

    # ------------------------------------------------------------------ protocol

    def open(self) -> None:
        """Open the source (no-op when open); raises DriverError(disconnected=True) if it cannot be opened."""
        if self._cap is not None:
            return
        if self.kind == "file" and not Path(self.address).is_file():
            raise self._error(f"video file not found: {self.address}", transient=False)
        try:
            cap = cv2.VideoCapture(self.address, self._api)
        except cv2.error as e:
            raise self._error(f"cannot open {self._describe()}: {e}", disconnected=True,
                              transient=self.kind != "file") from e
        if not cap.isOpened():
            cap.release()
            raise self._error(f"cannot open {self._describe()}", disconnected=True, transient=self.kind != "file")
        if self.kind == "device":
            self._found = {p: cap.get(p) for p in (cv2.CAP_PROP_EXPOSURE, cv2.CAP_PROP_AUTO_EXPOSURE)}
            if self._fourcc:
                cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self._fourcc))
            w, h = self.spec.resolution
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, w)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, h)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # fewer stale frames where the backend allows it
        self._resolution = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if self._resolution != tuple(self.spec.resolution):
            log.warning("%s: %s delivers %dx%d, the rig says %dx%d", self.spec.id, self._describe(),
                        *self._resolution, *self.spec.resolution)
        self._cap = cap
        self._pending = False
        self._last_file = None
        self._frames = 0
        log.info("%s: opened %s (%s, %dx%d)", self.spec.id, self._describe(), cap.getBackendName(),
                 *self._resolution)

    def configure(self, profile: SettingsProfile | None) -> None:
        """Set the exposure time from ``profile.shutter`` where a live device supports it; ignore the rest."""
        cap = self._require_open()
        if profile is None:
            return
        if self.kind != "device":
            log.debug("%s: a %s has no exposure control; profile ignored", self.spec.id, self.kind)
            return
        seconds = parse_shutter(profile.shutter)
        if seconds is None:
            log.warning("%s: cannot read shutter %r; exposure left as it is", self.spec.id, profile.shutter)
            return
        backend = cap.getBackendName()
        if backend == "V4L2":  # V4L2: manual mode is 1, exposure_time_absolute is in 100 µs units
            manual, value = 1.0, max(1.0, round(seconds * 10_000))
        elif backend in ("DSHOW", "MSMF"):  # log2 seconds
            manual, value = 0.25, float(round(math.log2(seconds)))
        else:
            log.info("%s: backend %s has no known exposure control; shutter ignored", self.spec.id, backend)
            return
        try:
            ok = cap.set(cv2.CAP_PROP_AUTO_EXPOSURE, manual) and cap.set(cv2.CAP_PROP_EXPOSURE, value)
        except cv2.error as e:
            ok = False
            log.debug("%s: setting the exposure raised %s", self.spec.id, e)
        if ok:
            self._exposure_s = seconds
            log.info("%s: exposure %s s", self.spec.id, format_shutter(seconds))
        else:
            log.info("%s: the device refused manual exposure; shutter ignored", self.spec.id)

    def read_settings(self) -> dict[str, str]:
        """``{"resolution": "1920x1080"}`` plus ``"shutter"`` (e.g. ``"1/125"``) when the exposure is known."""
        self._require_open()
        assert self._resolution is not None
        out = {"resolution": f"{self._resolution[0]}x{self._resolution[1]}"}
        if self._exposure_s is not None:
            out["shutter"] = format_shutter(self._exposure_s)
        return out

    def trigger(self, request: ShotRequest) -> TriggerInfo:
        """Grab the next frame; TriggerInfo.time is ``time.time()`` as the grab of that frame began."""
        cap = self._require_open()
        self._pending = False
        self._last_file = None
        if self.kind == "file":
            t = time.time()
            ok = cap.grab()
        else:
            ok, t = self._grab_fresh(cap)
        if not ok:
            if self.kind == "file":
                raise self._error(f"end of video after {self._frames} frames: {self.address}", transient=False)
            if not cap.isOpened():
                raise self._error(f"{self._describe()} disconnected", disconnected=True)
            raise self._error(f"no frame from {self._describe()}")
        self._pending = True
        self._frames += 1
        self.last_trigger = TriggerInfo(time=t, exposure_s=self._exposure_s if self.kind == "device" else None)
        return self.last_trigger

    def fetch(self) -> FetchedFile:
        """Decode the last grabbed frame and encode it as ``spec.format``; download_s is the time that took."""
        cap = self._require_open()
        if self._last_file is not None:
            return self._last_file
        if not self._pending:
            raise self._error("fetch without a trigger", transient=False)
        t0 = time.perf_counter()
        ok, frame = cap.retrieve()
        if not ok or frame is None:
            raise self._error("the grabbed frame could not be decoded")
        ext = self.spec.format
        params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION,
                                                                                 PNG_COMPRESSION]
        ok, buf = cv2.imencode(f".{ext}", frame, params)
        if not ok:
            raise self._error(f"could not encode the frame as {ext}", transient=False)
        self._pending = False
        self._last_file = FetchedFile(data=buf.tobytes(), ext=ext, download_s=time.perf_counter() - t0)
        return self._last_file

    def health(self) -> CameraHealth:
        """Whether the source is open; never raises."""
        try:
            cap = self._cap
            if cap is None:
                return CameraHealth(connected=False, message="not open")
            if not cap.isOpened():
                return CameraHealth(connected=False, message=f"{self._describe()} is gone")
            return CameraHealth(connected=True, message=f"{cap.getBackendName()}, {self._frames} frames")
        except Exception as e:  # noqa: BLE001 - health must not raise
            return CameraHealth(connected=False, message=f"health check failed: {e}")

    def close(self) -> None:
        """Restore the device's exposure settings found at open and release it (idempotent)."""
        cap = self._cap
        if cap is None:
            return
        self._cap = None
        self._pending = False
        try:
            if self.kind == "device" and self._exposure_s is not None:
                for prop in (cv2.CAP_PROP_AUTO_EXPOSURE, cv2.CAP_PROP_EXPOSURE):
                    if prop in self._found:
                        cap.set(prop, self._found[prop])
        except cv2.error as e:
            log.warning("%s: could not restore the exposure settings: %s", self.spec.id, e)
        finally:
            self._exposure_s = None
            cap.release()
            log.info("%s: closed %s", self.spec.id, self._describe())

    def __enter__(self) -> OpenCVCamera:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _resolve_address(spec: CameraSpec, options: DriverOptions) -> tuple[str, int | str]:
        address = spec.address
        if address is None or isinstance(address, bool):
            raise DriverError("an opencv camera needs an 'address' (device index, video file or URL)",
                              camera=spec.id, driver=DRIVER, transient=False)
        if isinstance(address, int):
            return "device", address
        text = address.strip()
        if text.isdigit():
            return "device", int(text)
        if text.startswith("/dev/"):
            return "device", text
        if "://" in text:
            return "stream", text
        path = Path(text).expanduser()
        rig_path = getattr(options.rig, "path", None)
        if not path.is_absolute() and rig_path is not None:
            beside = Path(rig_path).parent / path
            if beside.exists():
                path = beside
        return "file", str(path)

    def _describe(self) -> str:
        return {"device": "device", "stream": "stream", "file": "video file"}[self.kind] + f" {self.address}"

    def _error(self, message: str, **kw) -> DriverError:
        return DriverError(message, camera=self.spec.id, driver=DRIVER, **kw)

    def _require_open(self) -> cv2.VideoCapture:
        if self._cap is None:
            raise self._error("camera is not open", transient=False)
        return self._cap

    def _grab_fresh(self, cap: cv2.VideoCapture) -> tuple[bool, float]:
        """Grab a live frame, first dropping frames that were already buffered (they return at once)."""
        fps = cap.get(cv2.CAP_PROP_FPS)
        fast = 0.25 / fps if fps and fps > 0 else 0.008  # a buffered frame comes back well within a frame period
        tries = MAX_STALE_FRAMES if self._flush_buffer else 1
        for _ in range(tries):
            t = time.time()
            t0 = time.perf_counter()
            if not cap.grab():
                return False, t
            if time.perf_counter() - t0 > fast:  # we waited for it: a fresh frame
                return True, t
        return True, t
