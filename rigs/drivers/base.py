"""The protocols every camera and light driver implements, and their errors.

A camera driver drives one camera: ``open`` it, ``configure`` it from the
rig's settings profile (and ``read_settings`` back), ``trigger`` the shutter,
``fetch`` the file it made, report ``health``, ``close`` it. Drivers are used
from one worker process per camera (see capture.orchestrator) and must leave
the camera as they found it when closed (also after an exception).

A light driver drives all the rig's fixtures of its kind at once: ``apply``
sets every fixture's level (0..1) in one synchronised update.

Times are ``time.time()`` seconds; durations in seconds; sizes in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rigs.errors import TwinstudioError
from rigs.rigfile import CameraSpec, LightSpec, Rig, SettingsProfile


class DriverError(TwinstudioError):
    """A driver failed. ``transient`` errors are worth a retry; a ``disconnected`` camera is gone."""

    def __init__(self, message: str, *, camera: str | None = None, light: str | None = None,
                 driver: str | None = None, transient: bool = True, disconnected: bool = False) -> None:
        who = camera or light
        super().__init__(f"{who}: {message}" if who else message, camera=camera, light=light, driver=driver)
        self.camera = camera
        self.light = light
        self.driver = driver
        self.transient = transient
        self.disconnected = disconnected


class DriverUnavailable(TwinstudioError):
    """A driver's library is not installed; the message says how to install it."""

    exit_code = 2


@dataclass(frozen=True)
class ShotRequest:
    """What the orchestrator asks a camera to capture."""

    take_id: str
    kind: str  # "calibration" | "stills" | "motion"
    frame: int  # frame index within the take
    step: str = ""  # lighting step name (stills), "" otherwise
    clip_frame: int | None = None  # virtual studio: motion clip frame posing the subject
    board_index: int | None = None  # virtual studio: calibration board pose


@dataclass(frozen=True)
class TriggerInfo:
    """When the shutter fired and for how long it stayed open."""

    time: float  # time.time() at the shutter release
    exposure_s: float | None = None  # where the driver knows it


@dataclass(frozen=True)
class FetchedFile:
    """The file a camera produced for one trigger, as the camera encoded it."""

    data: bytes
    ext: str  # "jpg", "png", ... (no dot)
    download_s: float  # time spent getting it off the camera


@dataclass(frozen=True)
class CameraHealth:
    connected: bool
    battery_pct: float | None = None
    storage_free_bytes: int | None = None
    message: str = ""


@runtime_checkable
class CameraDriver(Protocol):
    """One camera. Not thread-safe; one instance per worker process."""

    spec: CameraSpec

    def open(self) -> None: ...

    def configure(self, profile: SettingsProfile | None) -> None:
        """Apply a settings profile (None: leave the camera's settings as they are)."""

    def read_settings(self) -> dict[str, str]:
        """The camera's current settings under the profile's field names (shutter, aperture, iso, ...)."""

    def trigger(self, request: ShotRequest) -> TriggerInfo: ...

    def fetch(self) -> FetchedFile:
        """The file of the last trigger."""

    def health(self) -> CameraHealth: ...

    def close(self) -> None:
        """Restore the settings found at open and release the camera (idempotent)."""


@runtime_checkable
class LightDriver(Protocol):
    """All fixtures of one driver kind in a rig."""

    lights: list[LightSpec]

    def open(self) -> None: ...

    def apply(self, levels: dict[str, float]) -> None:
        """Set every fixture's level (0..1; missing ids: 0) in one synchronised update."""

    def close(self) -> None:
        """Leave the fixtures as found (or dark) and release the network/device (idempotent)."""


@dataclass(frozen=True)
class DriverOptions:
    """Options every driver factory receives: where it runs and how the virtual ones misbehave."""

    rig: Rig
    session_dir: str | None = None
    #: virtual cameras: mean added latency per shot (s), its jitter (s, std), the probability that
    #: a shot fails, after how many shots a camera disconnects (None: never), and the image source:
    #: "render" (the virtual studio's rendered frames) or "pattern" (small synthetic images)
    latency_s: float = 0.0
    jitter_s: float = 0.0
    failure_rate: float = 0.0
    disconnect_after: int | None = None
    source: str = "render"
    render_dir: str | None = None
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)
