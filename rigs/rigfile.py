"""Rig files: the TOML description of a studio, validated once at the boundary.

A rig file names its cameras (driver, address or serial, resolution, lens,
pose prior), its lights (DMX universe/channel, position), lighting presets,
trigger and motion settings, the calibration board and, for virtual rigs, the
virtual studio's settings. A rig run over several capture PCs declares them as
``[[hosts]]`` and names each camera's (and optionally each light's) ``host``;
without ``[[hosts]]`` a rig runs on one machine. :func:`load_rig` returns a frozen :class:`Rig` or
raises :class:`~rigs.errors.RigError` naming the file, the dotted key and the
line.

Units: lengths in metres and durations in seconds when given as numbers; a
string may carry its unit (``"120 cm"``, ``"200 ms"``). Angles are degrees
(rig files are meant for people) and their keys end in ``_deg``.
"""

from __future__ import annotations

import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator)

from rigs.errors import RigError
from rigs.geometry import Camera, Intrinsics, Pose, look_at

#: schema version of rig files this code reads
RIG_SCHEMA_VERSION = 1

#: camera and light drivers a rig file may name (see rigs.drivers)
CAMERA_DRIVERS = ("virtual", "gphoto2", "opencv")
LIGHT_DRIVERS = ("virtual", "sacn")

LIBRARY_DIR = Path(__file__).parent / "library"

_UNITS = {
    "length": {"m": 1.0, "cm": 0.01, "mm": 0.001},
    "duration": {"s": 1.0, "ms": 0.001, "us": 1e-6, "min": 60.0},
}
_QTY = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*([a-zA-Zµ]+)\s*$")


def _quantity(kind: str, limit: float):
    """A validator turning a number (SI unit) or "<number> <unit>" into a float."""

    def parse(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError(f"expected a {kind}, got a boolean")
        if isinstance(v, (int, float)):
            value = float(v)
        elif isinstance(v, str):
            m = _QTY.match(v)
            if not m:
                raise ValueError(f"expected a {kind} such as '1.5 {next(iter(_UNITS[kind]))}', got {v!r}")
            unit = m.group(2).replace("µ", "u")
            if unit not in _UNITS[kind]:
                raise ValueError(f"wrong unit {unit!r} for a {kind}; use one of "
                                 + ", ".join(_UNITS[kind]))
            value = float(m.group(1)) * _UNITS[kind][unit]
        else:
            raise ValueError(f"expected a {kind} (number or string with unit), got {type(v).__name__}")
        if abs(value) > limit:
            si = next(iter(_UNITS[kind]))
            raise ValueError(f"{value:g} {si} is implausible for a studio {kind} "
                             f"(limit {limit:g} {si}); numbers are in {si}: wrong unit?")
        return value

    return BeforeValidator(parse)


def _one_of(kind: str, names: tuple[str, ...]):
    """A validator accepting only the registered ``names`` of a kind of driver."""

    def check(v: str) -> str:
        if v not in names:
            raise ValueError(f"unknown {kind} {v!r}; known: {', '.join(names)}")
        return v

    return AfterValidator(check)


CameraDriver = Annotated[str, _one_of("camera driver", CAMERA_DRIVERS)]
LightDriver = Annotated[str, _one_of("light driver", LIGHT_DRIVERS)]
Length = Annotated[float, _quantity("length", 100.0)]
Duration = Annotated[float, _quantity("duration", 3600.0)]
Vec3 = tuple[Length, Length, Length]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class RigInfo(_Strict):
    name: str
    description: str = ""
    version: int = RIG_SCHEMA_VERSION

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RIG_SCHEMA_VERSION:
            raise ValueError(f"rig schema version {v} is not supported (this twinstudio reads {RIG_SCHEMA_VERSION})")
        return v


class Volume(_Strict):
    """The capture volume: an upright cylinder standing on the floor."""

    center: tuple[Length, Length] = (0.0, 0.0)
    radius: Length = Field(1.0, gt=0)
    height: Length = Field(2.0, gt=0)

    def sample_points(self, n_height: int = 5, n_azimuth: int = 8) -> np.ndarray:
        """Points on the cylinder's surface and axis, [N, 3] metres."""
        zs = np.linspace(0.0, self.height, n_height)
        az = np.linspace(0.0, 2 * np.pi, n_azimuth, endpoint=False)
        cx, cy = self.center
        ring = [(cx + self.radius * np.cos(a), cy + self.radius * np.sin(a), z) for z in zs for a in az]
        axis = [(cx, cy, z) for z in zs]
        return np.array(ring + axis)

    @property
    def focus(self) -> np.ndarray:
        """Centre of the volume at mid-height: where cameras look by default. [3]"""
        return np.array([self.center[0], self.center[1], self.height / 2.0])


class SettingsProfile(_Strict):
    """Camera settings a tethered camera is set to before every take."""

    shutter: str = "1/125"
    aperture: str = "f/8"
    iso: int = Field(100, gt=0)
    white_balance: str = "Daylight"
    image_format: str = "JPEG Fine"


#: a capture host's name: a plain identifier (it becomes the Ray resource ``capture-host:<name>``)
HOST_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]*$"


class HostSpec(_Strict):
    """A capture PC of a rig spread over several hosts (``[[hosts]]``)."""

    name: Annotated[str, Field(pattern=HOST_NAME_PATTERN, max_length=63)]
    description: str = ""


class CameraSpec(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    driver: CameraDriver
    host: str | None = None  # the capture host that drives it (rigs with [[hosts]])
    address: str | int | None = None
    serial: str | None = None
    resolution: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]
    focal_mm: float = Field(gt=0)
    sensor_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (36.0, 24.0)
    principal_offset_px: tuple[float, float] = (0.0, 0.0)
    distortion: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)
    position: Vec3
    look_at: Vec3 | None = None
    roll_deg: float = 0.0
    profile: str | None = None
    format: Literal["jpg", "png"] = "jpg"

    @property
    def intrinsics(self) -> Intrinsics:
        """Nominal intrinsics from the lens prior (exact for virtual cameras)."""
        w, h = self.resolution
        return Intrinsics.from_lens(w, h, self.focal_mm, self.sensor_mm,
                                    self.principal_offset_px, self.distortion)


class LightSpec(_Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    driver: LightDriver = "virtual"
    host: str | None = None  # the capture host it is wired to (rigs with [[hosts]])
    kind: Literal["softbox", "spot", "fresnel", "panel", "ring"] = "softbox"
    position: Vec3
    power: float = Field(1.0, gt=0, description="relative output at level 1.0")
    universe: int | None = Field(None, ge=1, le=63999)
    channel: int | None = Field(None, ge=1, le=512)
    channels: int = Field(1, ge=1, le=512, description="DMX footprint: channels used from `channel` on")


class PresetSpec(_Strict):
    """A lighting preset: fixed levels, or a one-light-at-a-time sequence."""

    levels: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] | None = None
    sequence: list[str] | None = None
    level: float = Field(1.0, ge=0.0, le=1.0, description="level of each light in a sequence")


class PresetStep(BaseModel):
    """One lighting state: a preset, or one step of a sequence preset."""

    model_config = ConfigDict(frozen=True)
    preset: str
    name: str  # "flat", or "olat-L3" for a sequence step
    levels: dict[str, float]


class TriggerSettings(_Strict):
    timeout: Duration = 10.0
    retries: int = Field(2, ge=0)
    backoff: Duration = 0.5
    stagger: Duration = 0.0
    settle: Duration = 0.3


class MotionSettings(_Strict):
    fps: float = Field(24.0, gt=0, le=1000)
    frames: int = Field(24, ge=1)
    preset: str | None = None


class BoardSpec(_Strict):
    """A ChArUco calibration board (cv2.aruco)."""

    squares: tuple[Annotated[int, Field(ge=3)], Annotated[int, Field(ge=3)]] = (7, 5)
    square: Length = 0.08
    marker: Length = 0.06
    dictionary: str = "DICT_5X5_100"

    @field_validator("dictionary")
    @classmethod
    def _dictionary(cls, v: str) -> str:
        import cv2

        if not v.startswith("DICT_") or not hasattr(cv2.aruco, v):
            raise ValueError(f"unknown ArUco dictionary {v!r} (e.g. DICT_5X5_100)")
        return v


class CalibrationSettings(_Strict):
    board: BoardSpec = BoardSpec()
    poses: int = Field(12, ge=1, description="board poses in a calibration take")


class VirtualSettings(_Strict):
    seed: int = 0
    noise_sigma: float = Field(1.5, ge=0, description="sensor noise, 8-bit digital numbers")
    backdrop_rgb: tuple[float, float, float] = (0.10, 0.55, 0.18)
    floor_rgb: tuple[float, float, float] | None = None  # default: painted like the backdrop
    ambient: float = Field(0.12, ge=0)
    exposure: float = Field(1.0, gt=0)
    shadows: bool = True
    backdrop_radius: Length = 4.5


class QASettings(_Strict):
    """Per-frame and per-take quality thresholds (capture.qa)."""

    min_sharpness: float = Field(150.0, ge=0, description="variance of the Laplacian, sharpest tile, 640 px wide")
    max_clipped_highlights: float = Field(0.02, ge=0, le=1, description="fraction of pixels at >= 250")
    max_clipped_shadows: float = Field(0.25, ge=0, le=1, description="fraction of pixels at <= 5")
    min_coverage: float = Field(0.01, ge=0, le=1, description="fraction of the image showing the subject")
    backdrop_hue_deg: float = Field(135.0, ge=0, lt=360, description="hue of the keyable backdrop")
    backdrop_hue_tolerance_deg: float = Field(30.0, gt=0, le=180)
    max_skew: Duration = 0.05


class RigModel(_Strict):
    rig: RigInfo
    hosts: list[HostSpec] = []
    volume: Volume = Volume()
    cameras: list[CameraSpec]
    lights: list[LightSpec] = []
    presets: dict[str, PresetSpec] = {}
    profiles: dict[str, SettingsProfile] = {}
    trigger: TriggerSettings = TriggerSettings()
    motion: MotionSettings = MotionSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    virtual: VirtualSettings = VirtualSettings()
    qa: QASettings = QASettings()


class Rig:
    """A validated rig. Cameras, lights and presets keep their file order."""

    def __init__(self, model: RigModel, path: Path | None = None) -> None:
        self.model = model
        self.path = path

    name = property(lambda self: self.model.rig.name)
    volume = property(lambda self: self.model.volume)
    camera_specs = property(lambda self: self.model.cameras)
    lights = property(lambda self: self.model.lights)
    presets = property(lambda self: self.model.presets)
    trigger = property(lambda self: self.model.trigger)
    motion = property(lambda self: self.model.motion)
    calibration = property(lambda self: self.model.calibration)
    virtual = property(lambda self: self.model.virtual)
    qa = property(lambda self: self.model.qa)

    @property
    def hosts(self) -> list[str]:
        """Names of the capture hosts (``[[hosts]]``), in file order; empty for a single-host rig."""
        return [h.name for h in self.model.hosts]

    def cameras_by_host(self) -> dict[str, list[str]]:
        """Camera ids of each capture host, in file order (empty for a single-host rig)."""
        out: dict[str, list[str]] = {h: [] for h in self.hosts}
        for c in self.model.cameras:
            if c.host is not None:
                out[c.host].append(c.id)
        return out

    @cached_property
    def cameras(self) -> list[Camera]:
        """Nominal cameras (lens prior + pose prior), in file order."""
        return [Camera(c.id, c.intrinsics, camera_pose(c, self.volume)) for c in self.model.cameras]

    def camera(self, camera_id: str) -> Camera:
        for c in self.cameras:
            if c.id == camera_id:
                return c
        raise KeyError(camera_id)

    @property
    def is_virtual(self) -> bool:
        return all(c.driver == "virtual" for c in self.model.cameras)

    def preset_steps(self, preset: str | None = None) -> list[PresetStep]:
        """Lighting states of one preset (or of all, in file order)."""
        names = [preset] if preset else list(self.presets)
        steps: list[PresetStep] = []
        all_off = {light.id: 0.0 for light in self.lights}
        for name in names:
            p = self.presets[name]
            if p.sequence:
                for lid in p.sequence:
                    steps.append(PresetStep(preset=name, name=f"{name}-{lid}",
                                            levels={**all_off, lid: p.level}))
            else:
                steps.append(PresetStep(preset=name, name=name, levels={**all_off, **(p.levels or {})}))
        return steps

    @property
    def motion_preset(self) -> str | None:
        """The preset lighting motion takes (motion.preset, else the first preset)."""
        return self.motion.preset or next(iter(self.presets), None)


def camera_pose(spec: CameraSpec, volume: Volume) -> Pose:
    """World-to-camera pose from a camera's position / look_at / roll prior."""
    target = np.array(spec.look_at) if spec.look_at is not None else volume.focus
    pose = look_at(np.array(spec.position), target)
    if spec.roll_deg:
        a = np.radians(spec.roll_deg)
        rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
        pose = Pose(rz @ pose.R, rz @ pose.t)
    return pose


# --------------------------------------------------------------------------- loading


def library_rigs() -> list[Path]:
    """The rig files shipped in rigs/library, sorted by name."""
    return sorted(LIBRARY_DIR.glob("*.toml"))


def resolve_rig_path(name_or_path: str | Path) -> Path:
    """A path, or the name of a library rig (``virtual-ring-24``)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    lib = LIBRARY_DIR / f"{p.name.removesuffix('.toml')}.toml"
    if lib.exists():
        return lib
    known = ", ".join(x.stem for x in library_rigs())
    raise RigError(f"no such rig file (library rigs: {known})", path=p)


def load_rig(path: str | Path) -> Rig:
    """Read, validate and return a rig. Raises RigError naming file, key and line."""
    path = resolve_rig_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RigError(f"cannot read rig file: {e}", path=path) from e
    return parse_rig(text, path)


def parse_rig(text: str, path: Path | str = "<rig>") -> Rig:
    """Validate the TOML text of a rig file (``path`` is used in messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        raise RigError(f"not valid TOML: {e}", path=path, line=int(m.group(1)) if m else None) from e
    except RecursionError:
        raise RigError("nested too deeply to be a rig file (arrays or tables thousands of levels deep)",
                       path=path) from None
    lines = _KeyLines(text)
    try:
        model = RigModel.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err["loc"])
        loc = _strip_pydantic_loc(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}"
        elif err["type"] == "missing":
            msg = f"missing required key {loc[-1]!r}"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        raise RigError(msg, path=path, key=_dotted(loc, data), line=lines.find(loc),
                       camera=_camera_of(loc, data)) from None
    rig = Rig(model, Path(path))
    _check_semantics(rig, data, lines, path)
    return rig


def _strip_pydantic_loc(loc: tuple) -> tuple:
    # pydantic adds validator names such as 'function-before[...]' for annotated types
    return tuple(p for p in loc if not (isinstance(p, str) and "[" in p and p.endswith("]")))


def _dotted(loc: tuple, data: dict) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if i > 0 and loc[i - 1] == "cameras":
                cam = _camera_of(loc[: i + 1], data)
                out += f"[{part}]" + (f"(id={cam})" if cam else "")
            else:
                out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _camera_of(loc: tuple, data: dict) -> str | None:
    if len(loc) >= 2 and loc[0] == "cameras" and isinstance(loc[1], int):
        try:
            return str(data["cameras"][loc[1]]["id"])
        except (KeyError, IndexError, TypeError):
            return None
    return None


def _check_semantics(rig: Rig, data: dict, lines: _KeyLines, path: Path | str) -> None:
    m = rig.model

    def fail(msg: str, loc: tuple, **kw: Any) -> None:
        raise RigError(msg, path=path, key=_dotted(loc, data), line=lines.find(loc), **kw)

    hosts: dict[str, int] = {}
    for i, h in enumerate(m.hosts):
        if h.name in hosts:
            fail(f"duplicate host name {h.name!r} (first at hosts[{hosts[h.name]}])", ("hosts", i, "name"))
        hosts[h.name] = i
    for i, c in enumerate(m.cameras):
        if c.host is not None and c.host not in hosts:
            declared = ", ".join(hosts) or "none: the rig has no [[hosts]]"
            fail(f"camera {c.id!r} names host {c.host!r}, which is not in [[hosts]] (declared: {declared})",
                 ("cameras", i, "host"), camera=c.id)
        if hosts and c.host is None:
            fail(f"camera {c.id!r} names no host; a rig with [[hosts]] needs 'host' on every camera "
                 f"(one of {', '.join(hosts)})", ("cameras", i), camera=c.id)
    for i, light in enumerate(m.lights):
        if light.host is not None and light.host not in hosts:
            declared = ", ".join(hosts) or "none: the rig has no [[hosts]]"
            fail(f"light {light.id!r} names host {light.host!r}, which is not in [[hosts]] (declared: {declared})",
                 ("lights", i, "host"), light=light.id)

    seen: dict[str, int] = {}
    for i, c in enumerate(m.cameras):
        if c.id in seen:
            fail(f"duplicate camera id {c.id!r} (first at cameras[{seen[c.id]}])", ("cameras", i, "id"),
                 camera=c.id)
        seen[c.id] = i
        if c.driver == "gphoto2" and not (c.serial or c.address):
            fail("a gphoto2 camera needs a 'serial' or a USB 'address'", ("cameras", i), camera=c.id)
        if c.driver == "opencv" and c.address is None:
            fail("an opencv camera needs an 'address' (device index, video file or URL)",
                 ("cameras", i), camera=c.id)
        if c.profile is not None and c.profile not in m.profiles:
            fail(f"settings profile {c.profile!r} is not defined under [profiles]",
                 ("cameras", i, "profile"), camera=c.id)
        if c.look_at is not None and np.allclose(c.look_at, c.position):
            fail("look_at equals position", ("cameras", i, "look_at"), camera=c.id)
    serials = {}
    for i, c in enumerate(m.cameras):
        if c.serial:
            if c.serial in serials:
                fail(f"serial {c.serial!r} is also camera {serials[c.serial]!r}'s", ("cameras", i, "serial"),
                     camera=c.id)
            serials[c.serial] = c.id

    # every camera must see the capture volume (its centre, in front, inside the image)
    focus = m.volume.focus[None, :]
    for i, (spec, cam) in enumerate(zip(m.cameras, _safe_cameras(rig, fail))):
        uv, z = cam.project(focus)
        w, h = spec.resolution
        if not (z[0] > 0 and 0 <= uv[0, 0] < w and 0 <= uv[0, 1] < h):
            fail("camera does not see the capture volume (its centre projects outside the image)",
                 ("cameras", i, "look_at" if spec.look_at is not None else "position"), camera=spec.id)

    light_ids: dict[str, int] = {}
    for i, light in enumerate(m.lights):
        if light.id in light_ids:
            fail(f"duplicate light id {light.id!r}", ("lights", i, "id"), light=light.id)
        light_ids[light.id] = i
        if light.driver == "sacn" and (light.universe is None or light.channel is None):
            fail("an sacn light needs 'universe' and 'channel'", ("lights", i), light=light.id)
        if light.channel is not None and light.channel + light.channels - 1 > 512:
            fail(f"DMX channels {light.channel}..{light.channel + light.channels - 1} run past 512",
                 ("lights", i, "channels"), light=light.id)
    used: dict[tuple[int, int], str] = {}
    for i, light in enumerate(m.lights):
        if light.universe is None or light.channel is None:
            continue
        for ch in range(light.channel, light.channel + light.channels):
            other = used.get((light.universe, ch))
            if other is not None:
                fail(f"DMX universe {light.universe} channel {ch} is already used by light {other!r}",
                     ("lights", i, "channel"), light=light.id)
            used[(light.universe, ch)] = light.id

    for name, p in m.presets.items():
        if (p.levels is None) == (p.sequence is None):
            fail("a preset needs exactly one of 'levels' or 'sequence'", ("presets", name))
        for lid in p.levels or {}:
            if lid not in light_ids:
                fail(f"preset {name!r} names light {lid!r}, which is not in [[lights]]",
                     ("presets", name, "levels", lid), light=lid)
        for j, lid in enumerate(p.sequence or []):
            if lid not in light_ids:
                fail(f"preset {name!r} names light {lid!r}, which is not in [[lights]]",
                     ("presets", name, "sequence", j), light=lid)
    if m.motion.preset is not None and m.motion.preset not in m.presets:
        fail(f"motion preset {m.motion.preset!r} is not defined under [presets]", ("motion", "preset"))
    b = m.calibration.board
    if b.marker >= b.square:
        fail("the ArUco marker must be smaller than the square", ("calibration", "board", "marker"))


def _safe_cameras(rig: Rig, fail) -> list[Camera]:
    cams = []
    for i, spec in enumerate(rig.model.cameras):
        try:
            cams.append(Camera(spec.id, spec.intrinsics, camera_pose(spec, rig.volume)))
        except ValueError as e:
            fail(f"cannot aim the camera: {e}", ("cameras", i, "position"), camera=spec.id)
    return cams


class _KeyLines:
    """Maps TOML key paths to the line where they are written (1-based)."""

    _header = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _keyval = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=\s*(.*)$")
    _inline_key = re.compile(r"([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple, int] = {}
        table: tuple = ()
        counts: dict[tuple, int] = {}
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0] if '"' not in raw else raw
            h = self._header.match(line)
            if h:
                key = tuple(self._split(h.group(2)))
                if h.group(1) == "[[":
                    idx = counts.get(key, 0)
                    counts[key] = idx + 1
                    table = key + (idx,)
                else:
                    table = key
                self.lines.setdefault(table, n)
                continue
            kv = self._keyval.match(line)
            if kv:
                path = table + tuple(self._split(kv.group(1)))
                self.lines.setdefault(path, n)
                value = kv.group(2)
                if value.lstrip().startswith("{"):
                    for k in self._inline_key.findall(value):
                        self.lines.setdefault(path + (k.strip('"'),), n)

    @staticmethod
    def _split(dotted: str) -> list[str]:
        return [p.strip().strip('"').strip("'") for p in dotted.split(".")]

    def find(self, loc: tuple) -> int | None:
        """Line of the longest known prefix of ``loc``."""
        for k in range(len(loc), 0, -1):
            n = self.lines.get(tuple(loc[:k]))
            if n is not None:
                return n
        return None
