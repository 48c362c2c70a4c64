"""Events a capture emits while it runs. The dashboard and the plain logger consume
them; the core never imports a UI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CameraState = Literal["idle", "firing", "ok", "retrying", "failed", "missing", "disconnected"]


@dataclass(frozen=True)
class TakeStarted:
    take: str
    kind: str
    cameras: tuple[str, ...]
    frames: int  # frames per camera in this take


@dataclass(frozen=True)
class FrameStarted:
    """A frame is about to be fired on ``cameras`` cameras (emitted just before the commands go out)."""

    take: str
    frame: int
    cameras: int
    step: str = ""


@dataclass(frozen=True)
class CameraUpdate:
    """A camera's state after a shot (or an attempt)."""

    camera: str
    state: CameraState
    take: str
    frame: int
    latency_s: float | None = None  # trigger to file on disk
    battery_pct: float | None = None
    error: str = ""
    host: str = ""  # the capture host that drives it (multi-host rigs)


HostState = Literal["starting", "ready", "firing", "ok", "down"]


@dataclass(frozen=True)
class HostUpdate:
    """A capture host's agent (multi-host rigs): its cameras, state and the last frame's dispatch time."""

    host: str
    state: HostState
    cameras: tuple[str, ...] = ()
    take: str = ""
    frame: int = -1
    dispatch_ms: float | None = None  # head sends the frame's command -> the agent receives it
    error: str = ""


@dataclass(frozen=True)
class TakeProgress:
    take: str
    done: int  # frames on disk (all cameras)
    total: int
    missing: int = 0


@dataclass(frozen=True)
class QAWarning:
    take: str
    camera: str
    frame: int
    message: str


@dataclass(frozen=True)
class Message:
    """Something the technician should read (lights set, prompts, take summaries)."""

    text: str
    level: Literal["info", "warning", "error"] = "info"


@dataclass(frozen=True)
class TakeFinished:
    take: str
    status: str  # "complete" | "incomplete"
    frames: int
    missing: tuple[str, ...]  # "camera/frame" of the frames still missing
    skew_s: float | None  # worst trigger skew across cameras over the take's frames
    seconds: float


CaptureEvent = (TakeStarted | FrameStarted | CameraUpdate | HostUpdate | TakeProgress | QAWarning | Message
                | TakeFinished)
