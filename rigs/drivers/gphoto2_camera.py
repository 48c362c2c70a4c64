"""Tethered cameras through libgphoto2 (python-gphoto2): DSLRs and mirrorless bodies over USB/PTP.

A :class:`GPhoto2Camera` finds its body by USB port (``spec.address``, e.g.
``"usb:001,004"``) or by serial number (``spec.serial``: every autodetected
camera is opened and its ``serialnumber`` / ``eosserialnumber`` read), maps the
rig's :class:`~rigs.rigfile.SettingsProfile` onto the vendor's config widgets
(``shutterspeed`` / ``f-number`` / ``iso`` / ``whitebalance`` / ``imagequality``
..., with fallbacks across Canon, Nikon, Sony and generic PTP), captures,
downloads and deletes the file, and on close puts back the settings it found.

Setting values are matched loosely, the way people write them: ``"1/200"``
matches a choice ``"1/200"``, ``"1/200s"`` or ``"0.0050s"`` (within 1/6 stop),
``"f/11"`` matches ``"f/11"``, ``"11"`` or ``"f11"``, ISO ``200`` matches
``"200"`` or ``"ISO 200"``, ``"JPEG Fine"`` matches ``"Large Fine JPEG"``.
:meth:`GPhoto2Camera.read_settings` reports values in the profile's spelling
(``"1/200"``, ``"f/11"``, ``"200"``), so a settings guard can compare them with
the profile directly.

libgphoto2 ships a virtual PTP camera (the ``vusb`` port library): with the
environment from :func:`virtual_camera_env` set before libgphoto2 first looks
for cameras in a process, that process sees exactly one camera whose captures
are the JPEGs of a folder. One virtual camera per process, like one worker
process per camera in capture.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gphoto2 as gp

from rigs.drivers.base import CameraHealth, DriverError, DriverOptions, FetchedFile, ShotRequest, TriggerInfo
from rigs.rigfile import CameraSpec, SettingsProfile

log = logging.getLogger(__name__)

DRIVER = "gphoto2"

#: DriverOptions.extra key: "1" accepts the single autodetected camera whatever its serial (tests,
#: libgphoto2's virtual camera)
ANY_SERIAL_OPTION = "gphoto2_any_serial"

#: profile field -> config widgets that hold it, tried in order (Nikon/Canon/Sony/generic PTP names)
SETTING_WIDGETS: dict[str, tuple[str, ...]] = {
    "shutter": ("shutterspeed", "shutterspeed2", "eos-shutterspeed"),
    "aperture": ("f-number", "aperture"),
    "iso": ("iso", "exposureindex"),
    "white_balance": ("whitebalance",),
    # imagesize only stands in for a format when the requested value is a size ("6000x4000")
    "image_format": ("imageformat", "imagequality", "imagesize"),
}
SERIAL_WIDGETS = ("serialnumber", "eosserialnumber")
BATTERY_WIDGET = "batterylevel"

#: how far (in stops) a shutter choice may be from the requested time and still be "the same"
SHUTTER_TOLERANCE_STOPS = 1.0 / 6.0
#: relative tolerance for f-numbers (f/7.1 vs 7.0 on some bodies; neighbours are >= 9 % apart)
APERTURE_TOLERANCE = 0.03

# gphoto2 result codes by what they mean for the caller
_DISCONNECTED_CODES = frozenset({gp.GP_ERROR_IO_USB_FIND, gp.GP_ERROR_UNKNOWN_PORT, gp.GP_ERROR_MODEL_NOT_FOUND,
                                 gp.GP_ERROR_IO_INIT})
_TRANSIENT_CODES = frozenset({gp.GP_ERROR, gp.GP_ERROR_IO, gp.GP_ERROR_IO_READ, gp.GP_ERROR_IO_WRITE,
                              gp.GP_ERROR_IO_UPDATE, gp.GP_ERROR_IO_SERIAL_SPEED, gp.GP_ERROR_IO_USB_CLEAR_HALT,
                              gp.GP_ERROR_IO_USB_CLAIM, gp.GP_ERROR_IO_LOCK, gp.GP_ERROR_TIMEOUT,
                              gp.GP_ERROR_CAMERA_BUSY, gp.GP_ERROR_CORRUPTED_DATA, gp.GP_ERROR_CAMERA_ERROR})
# "this camera has no such widget" / "this call is not implemented by the camlib"
_ABSENT_CODES = frozenset({gp.GP_ERROR_BAD_PARAMETERS, gp.GP_ERROR_NOT_SUPPORTED})


# ---------------------------------------------------------------------------------------- errors


class SettingChoiceError(DriverError):
    """A profile value the camera cannot take: the setting exists but the value is not among its choices
    (or the setting is read-only on this body). Not transient."""

    def __init__(self, message: str, *, camera: str, setting: str, widget: str, requested: str,
                 choices: Sequence[str]) -> None:
        super().__init__(message, camera=camera, driver=DRIVER, transient=False)
        self.setting = setting
        self.widget = widget
        self.requested = requested
        self.choices = tuple(choices)
        self.facts.update(setting=setting, widget=widget, requested=requested, choices=self.choices)


class CameraNotFoundError(DriverError):
    """No attached camera matches the spec's port / serial. ``found`` maps each autodetected port to the
    serial read from it (None: could not be read, e.g. the camera was busy in another process).
    Transient when a camera that could not be read might have been the one."""

    def __init__(self, message: str, *, camera: str, serial: str | None, address: str | None,
                 found: dict[str, str | None], transient: bool = False, disconnected: bool = False) -> None:
        super().__init__(message, camera=camera, driver=DRIVER, transient=transient, disconnected=disconnected)
        self.serial = serial
        self.address = address
        self.found = dict(found)
        self.facts.update(serial=serial, address=address, found=self.found)


def driver_error(e: gp.GPhoto2Error, what: str, camera: str | None) -> DriverError:
    """The :class:`DriverError` for a libgphoto2 error: I/O, timeout and busy errors are transient,
    lost cameras / ports are ``disconnected``, the rest (not supported, bad parameters, ...) are not."""
    code = getattr(e, "code", gp.GP_ERROR)
    text = getattr(e, "string", str(e))
    disconnected = code in _DISCONNECTED_CODES
    transient = code in _TRANSIENT_CODES and not disconnected
    err = DriverError(f"{what}: gphoto2 error {code} ({text})", camera=camera, driver=DRIVER,
                      transient=transient, disconnected=disconnected)
    err.code = code
    err.facts["gphoto2_code"] = code
    return err


# ------------------------------------------------------------------------------- virtual camera


def virtual_camera_env(jpeg_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Environment variables that make libgphoto2 see its virtual PTP camera, whose captures are the
    JPEGs of ``jpeg_dir``.

    Set them in a process before its first camera autodetect / open (best: in the environment of a
    new worker process, ``subprocess``/``multiprocessing`` spawn); libgphoto2 loads its port drivers
    once per process. Raises :class:`DriverError` when the folder holds no JPEG or the installed
    python-gphoto2 has no virtual USB port library.
    """
    folder = Path(jpeg_dir).resolve()
    if not folder.is_dir() or not any(p.suffix.lower() == ".jpg" for p in folder.iterdir()):
        raise DriverError(f"virtual gphoto2 camera: {folder} holds no .jpg file to capture", driver=DRIVER,
                          transient=False)
    iolibs = Path(gp.__file__).parent / "libgphoto2" / "vusb"
    if not any(iolibs.glob("vusb*")):
        raise DriverError(f"virtual gphoto2 camera: no vusb port library in {iolibs} (this python-gphoto2 "
                          f"build does not ship libgphoto2's virtual camera)", driver=DRIVER, transient=False)
    return {"IOLIBS": str(iolibs), "VCAMERADIR": str(folder)}


# ------------------------------------------------------------------------------ value matching


def shutter_seconds(text: str) -> float | None:
    """Exposure time of a shutter-speed string in seconds: '1/200', '1/200s', '0.0050s', '2', '2.5"',
    '1"3' (1.3 s); None for 'Bulb', 'Auto', ..."""
    t = text.strip().lower().replace(" ", "")
    t = re.sub(r"(sec|s)$", "", t)
    t = t.rstrip('"')
    try:
        if m := re.fullmatch(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", t):
            value = float(m.group(1)) / float(m.group(2))
        elif m := re.fullmatch(r"(\d+)\"(\d+)", t):
            value = float(f"{m.group(1)}.{m.group(2)}")
        elif re.fullmatch(r"\d+(?:\.\d+)?", t):
            value = float(t)
        else:
            return None
    except ZeroDivisionError:
        return None
    return value if value > 0 else None


def format_shutter(seconds: float) -> str:
    """Seconds as a profile writes a shutter speed: 0.005 -> '1/200', 2.5 -> '2.5', 0.3 -> '0.3'."""
    if seconds < 1.0:
        n = 1.0 / seconds
        if abs(n - round(n)) <= 0.05 * n:
            return f"1/{round(n)}"
    return f"{seconds:g}"


def aperture_fnumber(text: str) -> float | None:
    """The f-number of 'f/11', 'f11', 'F11', '11', '11.0'; None for 'implicit auto' and the like."""
    t = text.strip().lower().replace(" ", "")
    t = re.sub(r"^f/?", "", t)
    return float(t) if re.fullmatch(r"\d+(?:\.\d+)?", t) and float(t) > 0 else None


def iso_value(text: str) -> int | None:
    """The ISO speed of '200', 'ISO 200', 'ISO200'; None for 'Auto'."""
    t = re.sub(r"^iso", "", text.strip().lower().replace(" ", ""))
    return int(t) if t.isdigit() else None


_SIZE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\d+)\s*$", re.IGNORECASE)
#: white-balance names across vendors -> the spelling a profile uses
_WHITE_BALANCE = {
    "auto": "Auto", "awb": "Auto", "automatic": "Auto",
    "daylight": "Daylight", "sunny": "Daylight", "fineweather": "Daylight", "directsunlight": "Daylight",
    "cloudy": "Cloudy", "overcast": "Cloudy", "shade": "Shade",
    "tungsten": "Tungsten", "incandescent": "Tungsten", "tungstenlight": "Tungsten",
    "fluorescent": "Fluorescent", "flash": "Flash", "speedlight": "Flash",
}


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _squash(text: str) -> str:
    return "".join(_tokens(text))


def _size(text: str) -> str | None:
    m = _SIZE.match(text)
    return f"{int(m.group(1))}x{int(m.group(2))}" if m else None


def _white_balance(text: str) -> str | None:
    return _WHITE_BALANCE.get(_squash(text))


def choose_value(field: str, requested: str, choices: Sequence[str]) -> str | None:
    """The camera choice (exact string) closest to a profile value, or None when none is close enough.

    Exact matches win; then per field: shutter within 1/6 stop (nearest), aperture within 3 %, ISO equal,
    white balance by vendor synonym, image format as equal size ("640x480") or as the choice holding all
    the requested words with the fewest extra ones ("JPEG Fine" -> "Large Fine JPEG"); last, for values
    that are not numbers ("Auto", "Bulb"), equal text ignoring case, spaces and punctuation.
    """
    choices = [str(c) for c in choices]
    req = requested.strip()
    if req in choices:
        return req
    picked: str | None = None
    if field == "shutter":
        picked = _nearest(req, choices, shutter_seconds, max_log2=SHUTTER_TOLERANCE_STOPS)
    elif field == "aperture":
        picked = _nearest(req, choices, aperture_fnumber, max_log2=math.log2(1.0 + APERTURE_TOLERANCE))
    elif field == "iso":
        want = iso_value(req)
        picked = next((c for c in choices if want is not None and iso_value(c) == want), None)
    elif field == "white_balance":
        want = _white_balance(req)
        picked = next((c for c in choices if want is not None and _white_balance(c) == want), None)
    elif field == "image_format":
        want_size = _size(req)
        if want_size is not None:
            picked = next((c for c in choices if _size(c) == want_size), None)
        else:
            want = set(_tokens(req))
            supersets = [c for c in choices if want and want <= set(_tokens(c))]
            if supersets:  # stable: among equally close choices, the camera's first (usually the largest)
                picked = min(supersets, key=lambda c: len(set(_tokens(c)) - want))
    numeric = {"shutter": shutter_seconds, "aperture": aperture_fnumber, "iso": iso_value}.get(field)
    if picked is None and (numeric is None or numeric(req) is None):  # "Auto", "Bulb", "raw + jpeg"...
        picked = next((c for c in choices if _squash(c) == _squash(req) and _squash(req)), None)
    return picked


def _nearest(req: str, choices: Sequence[str], parse: Callable[[str], float | None], *,
             max_log2: float) -> str | None:
    """The choice whose parsed value is nearest to the request's (in log2), if within ``max_log2``."""
    want = parse(req)
    if want is None:
        return None
    scored = [(abs(math.log2(v / want)), i, c) for i, c in enumerate(choices) if (v := parse(c)) is not None]
    best = min(scored, default=None)
    return best[2] if best is not None and best[0] <= max_log2 + 1e-9 else None


def display_value(field: str, raw: str) -> str:
    """A camera value in the profile's spelling: '0.0050s' -> '1/200', '11' -> 'f/11', 'ISO 200' -> '200',
    'Sunny' -> 'Daylight', '640 x 480' -> '640x480'; anything else as the camera says it."""
    raw = str(raw).strip()
    if field == "shutter" and (s := shutter_seconds(raw)) is not None:
        return format_shutter(s)
    if field == "aperture" and (f := aperture_fnumber(raw)) is not None:
        return f"f/{round(f, 1):g}"
    if field == "iso" and (i := iso_value(raw)) is not None:
        return str(i)
    if field == "white_balance" and (wb := _white_balance(raw)) is not None:
        return wb
    if field == "image_format" and (size := _size(raw)) is not None:
        return size
    return raw


def profile_values(profile: SettingsProfile) -> dict[str, str]:
    """A profile's settings as strings, keyed by field (shutter, aperture, iso, white_balance, image_format)."""
    return {"shutter": profile.shutter, "aperture": profile.aperture, "iso": str(profile.iso),
            "white_balance": profile.white_balance, "image_format": profile.image_format}


# ------------------------------------------------------------------------------------ the driver


class GPhoto2Camera:
    """One tethered camera through libgphoto2. Not thread-safe; one instance per worker process.

    ``GPhoto2Camera(spec, options)`` opens nothing; :meth:`open` (or ``with``) does. Every error is a
    :class:`DriverError` (``transient``: worth a retry; ``disconnected``: the camera is gone), with
    :class:`SettingChoiceError` and :class:`CameraNotFoundError` carrying the details.
    """

    def __init__(self, spec: CameraSpec, options: DriverOptions) -> None:
        self.spec = spec
        self.options = options
        self.port: str | None = None  # "usb:001,004" once open
        self.model: str | None = None
        self.serial: str | None = None  # as read from the camera
        self._camera: gp.Camera | None = None
        self._found: dict[str, tuple[str, str]] = {}  # field -> (widget, raw value) at open
        self._applied: dict[str, tuple[str, str]] = {}  # field -> (raw choice set, profile spelling)
        self._exposure_s: float | None = None
        self._last: tuple[str, str] | None = None  # (folder, name) of the last capture, not yet fetched
        self._raw: dict[str, str] = {}  # field -> raw value at the last read_settings
        self._missing: frozenset[str] = frozenset()  # fields the last configure found no setting for
        self._any_serial = options.extra.get(ANY_SERIAL_OPTION) == "1"

    @property
    def is_open(self) -> bool:
        return self._camera is not None

    # ------------------------------------------------------------------ protocol

    def open(self) -> None:
        """Find the camera (by port, else by serial), open it and remember its settings."""
        if self._camera is not None:
            return
        if isinstance(self.spec.address, int):
            raise DriverError(f"gphoto2 address must be a port such as 'usb:001,004', not {self.spec.address!r}",
                              camera=self.spec.id, driver=DRIVER, transient=False)
        detected = self._autodetect()
        if self.spec.address:
            camera = self._open_by_port(detected, str(self.spec.address))
        else:
            camera = self._open_by_serial(detected)
        self._camera = camera
        try:
            self._found = {}
            for field, names in SETTING_WIDGETS.items():
                found = self._find(names)
                if found is not None:
                    self._found[field] = (found[0], str(found[1].get_value()))
            shutter = self._found.get("shutter")
            self._exposure_s = shutter_seconds(shutter[1]) if shutter else None
        except gp.GPhoto2Error as e:
            self._exit_quietly()
            raise driver_error(e, "reading the settings at open", self.spec.id) from e
        except BaseException:
            self._exit_quietly()
            raise
        log.debug("%s: opened %s on %s (serial %s), settings %s", self.spec.id, self.model, self.port,
                  self.serial, {f: v for f, (_, v) in self._found.items()})

    def configure(self, profile: SettingsProfile | None) -> dict[str, str | None]:
        """Apply a settings profile (None: leave the settings as they are).

        Every value is checked against the camera's choices before anything is set; a value that is not
        among them raises :class:`SettingChoiceError` (not transient) and changes nothing. Returns what
        the camera reports afterwards per profile field, in the profile's spelling; None for a setting
        this camera does not have (also logged as a warning).
        """
        camera = self._require_open()
        if profile is None:
            return dict(self.read_settings())
        plan: list[tuple[str, str, gp.CameraWidget, str, str]] = []  # field, widget, w, raw, requested
        missing: list[str] = []
        try:
            for field, requested in profile_values(profile).items():
                found = self._find(SETTING_WIDGETS[field])
                if found is None or (found[0] == "imagesize" and _size(requested) is None):
                    missing.append(field)  # (an image size is no place for "JPEG Fine")
                    continue
                name, widget = found
                plan.append((field, name, widget, self._pick(field, name, widget, requested), requested))
            for field, name, widget, raw, requested in plan:
                if str(widget.get_value()) == raw:
                    continue
                log.debug("%s: %s (%s) %r -> %r (profile %r)", self.spec.id, field, name, widget.get_value(),
                          raw, requested)
                widget.set_value(_typed(widget, raw))
                self._set(camera, name, widget)
        except gp.GPhoto2Error as e:
            raise driver_error(e, "configuring", self.spec.id) from e
        if missing:
            log.warning("%s: camera %s has no setting for %s; left as is", self.spec.id, self.model,
                        ", ".join(missing))
        self._applied = {field: (raw, requested) for field, _, _, raw, requested in plan}
        self._missing = frozenset(missing)
        readback = self.read_settings()
        for field, _, _, raw, requested in plan:
            if self._raw.get(field) != raw:
                log.warning("%s: %s reads back %r after setting %r (profile %r)", self.spec.id, field,
                            readback.get(field), raw, requested)
        return {field: None if field in self._missing else readback.get(field)
                for field in profile_values(profile)}

    def read_settings(self) -> dict[str, str]:
        """The camera's settings under the profile's field names, for those it has, in the profile's
        spelling ('1/200', 'f/11', '200', ...); a value set by :meth:`configure` reads as the profile wrote it."""
        self._require_open()
        out: dict[str, str] = {}
        self._raw = {}
        try:
            for field, names in SETTING_WIDGETS.items():
                found = self._find(names)
                if found is None or field in self._missing:
                    continue
                raw = str(found[1].get_value())
                self._raw[field] = raw
                applied = self._applied.get(field)
                out[field] = applied[1] if applied and applied[0] == raw else display_value(field, raw)
        except gp.GPhoto2Error as e:
            raise driver_error(e, "reading the settings", self.spec.id) from e
        if "shutter" in self._raw:
            self._exposure_s = shutter_seconds(self._raw["shutter"])
        return out

    def trigger(self, request: ShotRequest) -> TriggerInfo:
        """Release the shutter and wait for the camera to store the file; ``time`` is the release."""
        camera = self._require_open()
        if self._last is not None:
            log.warning("%s: the previous capture %s/%s was never fetched", self.spec.id, *self._last)
        t0 = time.time()
        try:
            path = camera.capture(gp.GP_CAPTURE_IMAGE)
        except gp.GPhoto2Error as e:
            raise driver_error(e, f"capture ({request.take_id} frame {request.frame})", self.spec.id) from e
        self._last = (path.folder, path.name)
        log.debug("%s: captured %s/%s in %.3f s", self.spec.id, path.folder, path.name, time.time() - t0)
        return TriggerInfo(time=t0, exposure_s=self._exposure_s)

    def fetch(self) -> FetchedFile:
        """Download the last capture and delete it from the camera (where the camera allows)."""
        camera = self._require_open()
        if self._last is None:
            raise DriverError("fetch without a trigger", camera=self.spec.id, driver=DRIVER, transient=False)
        folder, name = self._last
        t0 = time.perf_counter()
        try:
            cfile = camera.file_get(folder, name, gp.GP_FILE_TYPE_NORMAL)
            data = bytes(memoryview(cfile.get_data_and_size()))
        except gp.GPhoto2Error as e:
            raise driver_error(e, f"downloading {folder}/{name}", self.spec.id) from e
        download_s = time.perf_counter() - t0
        self._last = None
        if camera.get_abilities().file_operations & gp.GP_FILE_OPERATION_DELETE:
            try:
                camera.file_delete(folder, name)
            except gp.GPhoto2Error as e:
                log.debug("%s: could not delete %s/%s from the camera: %s", self.spec.id, folder, name, e)
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        return FetchedFile(data=data, ext="jpg" if ext == "jpeg" else ext, download_s=download_s)

    def health(self) -> CameraHealth:
        """Battery (%) and free storage (bytes, all stores) where the camera reports them. Never raises."""
        camera = self._camera
        if camera is None:
            return CameraHealth(False, message="not open")
        battery: float | None = None
        storage: int | None = None
        notes: list[str] = []
        try:
            found = self._find((BATTERY_WIDGET,))
            if found is not None:
                m = re.search(r"\d+(?:\.\d+)?", str(found[1].get_value()))
                battery = float(m.group()) if m else None
            try:
                infos = camera.get_storageinfo()
            except gp.GPhoto2Error as e:
                if e.code not in _ABSENT_CODES:
                    raise
                infos = []
                notes.append("no storage information")
            free = [int(s.freekbytes) * 1024 for s in infos if s.fields & gp.GP_STORAGEINFO_FREESPACEKBYTES]
            storage = sum(free) if free else None
        except gp.GPhoto2Error as e:
            err = driver_error(e, "health", None)
            return CameraHealth(False, battery, storage, message=err.message)
        except Exception as e:  # health reports, it does not raise
            return CameraHealth(False, battery, storage, message=f"health check failed: {e!r}")
        return CameraHealth(True, battery, storage, message="; ".join(notes))

    def close(self) -> None:
        """Put back the settings found at open (best effort) and release the camera. Idempotent; never
        raises for camera errors (they are logged)."""
        camera = self._camera
        if camera is None:
            return
        try:
            self._restore(camera)
        finally:
            self._exit_quietly()
            self._applied, self._missing, self._last = {}, frozenset(), None

    def __enter__(self) -> GPhoto2Camera:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # ------------------------------------------------------------------ finding the camera

    def _autodetect(self) -> list[tuple[str, str]]:
        try:
            cams = gp.Camera.autodetect()
        except gp.GPhoto2Error as e:
            raise driver_error(e, "camera autodetect", self.spec.id) from e
        detected = [(cams.get_name(i), cams.get_value(i)) for i in range(cams.count())]
        detected = [(model, port) for model, port in detected if port not in ("usb:", "")]
        log.debug("%s: autodetected %s", self.spec.id, detected)
        return detected

    def _open_port(self, model: str, port: str) -> gp.Camera:
        camera = gp.Camera()
        ports = gp.PortInfoList()
        ports.load()
        camera.set_port_info(ports[ports.lookup_path(port)])
        abilities = gp.CameraAbilitiesList()
        abilities.load()
        camera.set_abilities(abilities[abilities.lookup_model(model)])
        camera.init()
        return camera

    def _open_by_port(self, detected: list[tuple[str, str]], port: str) -> gp.Camera:
        spec = self.spec
        model = next((m for m, p in detected if p == port), None)
        if model is None:
            raise CameraNotFoundError(
                f"no camera on port {port} (serial {spec.serial or 'not given'}); cameras found: "
                + (", ".join(f"{m} on {p}" for m, p in detected) or "none"),
                camera=spec.id, serial=spec.serial, address=port, found={p: None for _, p in detected},
                disconnected=True)
        try:
            camera = self._open_port(model, port)
        except gp.GPhoto2Error as e:
            raise driver_error(e, f"opening {model} on {port}", spec.id) from e
        serial = self._read_serials(camera)
        if spec.serial and not self._any_serial and not _serial_matches(spec.serial, serial):
            _exit(camera)
            raise CameraNotFoundError(
                f"camera on port {port} has serial {_show(serial)}, the rig expects {spec.serial!r} "
                f"(serials found: {port}={_show(serial)})", camera=spec.id, serial=spec.serial, address=port,
                found={port: _first(serial)})
        self.port, self.model, self.serial = port, model, _first(serial)
        return camera

    def _open_by_serial(self, detected: list[tuple[str, str]]) -> gp.Camera:
        spec = self.spec
        if not detected:
            raise CameraNotFoundError(f"no camera attached (looking for serial {spec.serial or 'any'})",
                                      camera=spec.id, serial=spec.serial, address=None, found={},
                                      disconnected=True)
        if (not spec.serial or self._any_serial) and len(detected) == 1:
            return self._open_single(detected)
        if not spec.serial:
            raise CameraNotFoundError(
                f"{len(detected)} cameras attached and the rig gives neither serial nor address: "
                + ", ".join(f"{m} on {p}" for m, p in detected),
                camera=spec.id, serial=None, address=None, found={p: None for _, p in detected})
        found: dict[str, str | None] = {}
        unreadable: list[str] = []
        for model, port in detected:
            try:
                camera = self._open_port(model, port)
            except gp.GPhoto2Error as e:  # busy in another worker, or gone since autodetect
                log.debug("%s: cannot open %s on %s to read its serial: %s", spec.id, model, port, e)
                found[port] = None
                unreadable.append(f"{port} ({e.string})")
                continue
            try:
                serials = self._read_serials(camera)
            except gp.GPhoto2Error as e:
                serials = []
                unreadable.append(f"{port} ({e.string})")
            found[port] = _first(serials)
            if _serial_matches(spec.serial, serials):
                self.port, self.model, self.serial = port, model, _first(serials)
                return camera
            _exit(camera)
        listed = ", ".join(f"{p}={s}" for p, s in found.items() if s is not None) or "none"
        msg = f"no camera with serial {spec.serial!r}; serials found: {listed}"
        if unreadable:
            msg += "; could not read: " + ", ".join(unreadable)
        raise CameraNotFoundError(msg, camera=spec.id, serial=spec.serial, address=None, found=found,
                                  transient=bool(unreadable))

    def _open_single(self, detected: list[tuple[str, str]]) -> gp.Camera:
        """The one attached camera, whatever its serial (``gphoto2_any_serial``)."""
        model, port = detected[0]
        try:
            camera = self._open_port(model, port)
        except gp.GPhoto2Error as e:
            raise driver_error(e, f"opening {model} on {port}", self.spec.id) from e
        try:
            serials = self._read_serials(camera)
        except gp.GPhoto2Error:
            serials = []
        if self.spec.serial and not _serial_matches(self.spec.serial, serials):
            log.info("%s: accepting the only camera (%s on %s, serial %s) for serial %s (%s=1)", self.spec.id,
                     model, port, _show(serials), self.spec.serial, ANY_SERIAL_OPTION)
        self.port, self.model, self.serial = port, model, _first(serials)
        return camera

    def _read_serials(self, camera: gp.Camera) -> list[str]:
        out = []
        for name in SERIAL_WIDGETS:
            found = self._find((name,), camera)
            if found is not None and str(found[1].get_value()).strip():
                out.append(str(found[1].get_value()).strip())
        return out

    # ------------------------------------------------------------------ widgets

    def _find(self, names: Sequence[str], camera: gp.Camera | None = None
              ) -> tuple[str, gp.CameraWidget] | None:
        """The first of ``names`` the camera has, as (name, widget); None when it has none of them."""
        camera = camera or self._camera
        config = None
        for name in names:
            try:
                return name, camera.get_single_config(name)
            except gp.GPhoto2Error as e:
                if e.code == gp.GP_ERROR_BAD_PARAMETERS:  # no such widget
                    continue
                if e.code != gp.GP_ERROR_NOT_SUPPORTED:
                    raise
            # this camlib cannot fetch single widgets: look it up in the whole tree (fetched once)
            if config is None:
                config = camera.get_config()
            try:
                return name, config.get_child_by_name(name)
            except gp.GPhoto2Error:
                continue
        return None

    def _set(self, camera: gp.Camera, name: str, widget: gp.CameraWidget) -> None:
        try:
            camera.set_single_config(name, widget)
        except gp.GPhoto2Error as e:
            if e.code != gp.GP_ERROR_NOT_SUPPORTED:
                raise
            config = camera.get_config()
            config.get_child_by_name(name).set_value(widget.get_value())
            camera.set_config(config)

    def _pick(self, field: str, name: str, widget: gp.CameraWidget, requested: str) -> str:
        """The raw value to set ``widget`` to for a profile value; raises SettingChoiceError."""
        kind = widget.get_type()
        current = str(widget.get_value())
        if kind in (gp.GP_WIDGET_RADIO, gp.GP_WIDGET_MENU):
            choices = [str(c) for c in widget.get_choices()]
        elif kind == gp.GP_WIDGET_RANGE:
            lo, hi, step = widget.get_range()
            choices = [f"{lo:g}..{hi:g} (step {step:g})"]
            number = _number(field, requested)
            if number is None or not lo - 1e-9 <= number <= hi + 1e-9:
                raise self._choice_error(field, name, requested, choices)
            return f"{number:g}"
        else:  # text (and anything else): the camera will say whether it takes the value
            choices = []
        if choices:
            raw = choose_value(field, requested, choices)
            if raw is None:
                raise self._choice_error(field, name, requested, choices)
        else:
            raw = choose_value(field, requested, [current]) or requested  # keep the camera's spelling
        if widget.get_readonly() and raw != current:
            raise SettingChoiceError(
                f"{field} ({name}) is read-only on this camera: it is {current!r}, the profile asks "
                f"{requested!r} (choices: {', '.join(choices) or 'none'})",
                camera=self.spec.id, setting=field, widget=name, requested=requested, choices=choices)
        return raw

    def _choice_error(self, field: str, name: str, requested: str, choices: list[str]) -> SettingChoiceError:
        return SettingChoiceError(
            f"{field} ({name}): {requested!r} is not among the camera's choices: {', '.join(choices)}",
            camera=self.spec.id, setting=field, widget=name, requested=requested, choices=choices)

    def _restore(self, camera: gp.Camera) -> None:
        for field, (name, raw) in self._found.items():
            try:
                found = self._find((name,), camera)
                if found is None or str(found[1].get_value()) == raw or found[1].get_readonly():
                    continue
                widget = found[1]
                widget.set_value(_typed(widget, raw))
                self._set(camera, name, widget)
                log.debug("%s: restored %s (%s) to %r", self.spec.id, field, name, raw)
            except gp.GPhoto2Error as e:
                log.warning("%s: could not restore %s (%s) to %r: %s", self.spec.id, field, name, raw, e)

    def _exit_quietly(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            _exit(camera)
            log.debug("%s: closed", self.spec.id)

    def _require_open(self) -> gp.Camera:
        if self._camera is None:
            raise DriverError("camera is not open", camera=self.spec.id, driver=DRIVER, transient=False)
        return self._camera


# ------------------------------------------------------------------------------------ helpers


def _exit(camera: gp.Camera) -> None:
    try:
        camera.exit()
    except gp.GPhoto2Error as e:
        log.debug("camera.exit failed: %s", e)


def _typed(widget: gp.CameraWidget, raw: str) -> object:
    """``raw`` as the Python type the widget's set_value takes."""
    kind = widget.get_type()
    if kind == gp.GP_WIDGET_RANGE:
        return float(raw)
    if kind in (gp.GP_WIDGET_TOGGLE, gp.GP_WIDGET_DATE):
        return int(float(raw))
    return raw


def _number(field: str, text: str) -> float | None:
    parse = {"shutter": shutter_seconds, "aperture": aperture_fnumber, "iso": iso_value}.get(field)
    if parse is None:
        try:
            return float(text)
        except ValueError:
            return None
    value = parse(text)
    return None if value is None else float(value)


def _serial_key(serial: str) -> str:
    return serial.strip().lower().lstrip("0")


def _serial_matches(wanted: str, serials: Sequence[str]) -> bool:
    return bool(wanted) and any(_serial_key(s) == _serial_key(wanted) for s in serials)


def _first(serials: Sequence[str]) -> str | None:
    return serials[0] if serials else None


def _show(serials: Sequence[str]) -> str:
    return "/".join(repr(s) for s in serials) if serials else "unknown"


__all__ = ["ANY_SERIAL_OPTION", "CameraNotFoundError", "GPhoto2Camera", "SETTING_WIDGETS", "SettingChoiceError",
           "choose_value", "display_value", "driver_error", "shutter_seconds", "virtual_camera_env"]
