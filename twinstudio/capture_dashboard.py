"""Live terminal dashboard and plain-text log for a running capture.

Both consume the events of :mod:`capture.events` and nothing else (the core never
imports the UI; the UI only knows events):

* :class:`DashboardState` folds events into plain state (no rich, no I/O);
* :func:`render_dashboard` turns a state into a rich renderable (it only renders);
* :class:`LiveDashboard` is an ``on_event`` callback that drives a ``rich.live.Live``;
* :class:`PlainLog` is the ``--plain`` callback for logs and CI: one line per
  meaningful event.

Units: latencies and skews are stored in seconds (as in the events) and shown in
milliseconds; times come from the injected ``clock`` (seconds, monotonic).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from rich import box, get_console
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.constrain import Constrain
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from capture.events import (
    CameraUpdate,
    CaptureEvent,
    HostUpdate,
    Message,
    QAWarning,
    TakeFinished,
    TakeProgress,
    TakeStarted,
)

__all__ = [
    "CameraStatus",
    "DashboardState",
    "HostStatus",
    "LiveDashboard",
    "PlainLog",
    "TakeStatus",
    "render_dashboard",
]

#: Camera states counted as failures in a camera's tile.
FAILURE_STATES: tuple[str, ...] = ("retrying", "failed", "missing", "disconnected")

#: Colour of each state word.
STATE_STYLES: dict[str, str] = {
    "ok": "green",
    "firing": "yellow",
    "retrying": "yellow",
    "failed": "bold red",
    "missing": "bold red",
    "disconnected": "bold red",
    "idle": "dim",
}

#: Colour of each capture host state.
HOST_STYLES: dict[str, str] = {"starting": "dim", "ready": "cyan", "firing": "yellow", "ok": "green",
                               "down": "bold red"}

MESSAGE_STYLES: dict[str, str] = {"info": "cyan", "warning": "yellow", "error": "bold red"}

TILE_WIDTH = 19  # characters per camera tile ("cam200 disconnected")
TILE_GAP = 1
PANEL_LINES = 8  # QA warnings and messages kept and shown
FINISHED_SHOWN = 5  # finished takes listed under the grid
PROBLEMS_SHOWN = 6  # cameras in trouble listed with their last error


# --------------------------------------------------------------------------- state


@dataclass
class CameraStatus:
    """What the dashboard knows about one camera.

    ``frames`` and ``failures`` count the current take (reset by ``TakeStarted``);
    ``battery_pct`` and ``last_error`` persist across takes.
    """

    camera: str
    state: str = "idle"
    latency_s: float | None = None  # last known trigger-to-disk latency
    battery_pct: float | None = None
    last_error: str = ""
    last_frame: int | None = None
    frames_ok: set[int] = field(default_factory=set)  # frame indices on disk
    failures: Counter[str] = field(default_factory=Counter)  # state -> count

    @property
    def frames(self) -> int:
        """Frames captured by this camera in the current take."""
        return len(self.frames_ok)

    @property
    def failure_count(self) -> int:
        """Total failed/retrying/missing/disconnected updates in the current take."""
        return sum(self.failures.values())

    def reset_take(self) -> None:
        self.state = "idle"
        self.last_frame = None
        self.frames_ok = set()
        self.failures = Counter()


@dataclass
class HostStatus:
    """A capture host of a multi-host rig: its cameras, its agent's state, its last frame's dispatch."""

    host: str
    cameras: tuple[str, ...] = ()
    state: str = "starting"
    dispatch_ms: float | None = None  # head sent the last frame's command -> the agent received it
    last_frame: int | None = None
    error: str = ""


@dataclass
class TakeStatus:
    """The take the dashboard is following. Times are ``clock()`` readings (s)."""

    take: str
    kind: str = ""
    cameras: int = 0
    frames_per_camera: int = 0
    done: int = 0
    total: int = 0
    missing: int = 0
    started_at: float = 0.0
    finished_at: float | None = None
    status: str = "running"  # "running" | "complete" | "incomplete"


class DashboardState:
    """Everything the dashboard shows, folded from capture events.

    Args:
        clock: monotonic time source in seconds; inject a fake one in tests.
        session: a label shown in the header (studio/session name), may be empty.
        keep: how many QA warnings and messages to keep (oldest dropped first).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        session: str = "",
        keep: int = PANEL_LINES,
    ) -> None:
        self.clock = clock
        self.session = session
        self.cameras: dict[str, CameraStatus] = {}
        self.hosts: dict[str, HostStatus] = {}  # multi-host rigs only
        self.take: TakeStatus | None = None
        self.qa_warnings: deque[QAWarning] = deque(maxlen=keep)
        self.messages: deque[Message] = deque(maxlen=keep)
        self.finished: list[TakeFinished] = []
        self.qa_count = 0  # all QA warnings seen, not only the kept ones

    # -- updates

    def handle(self, event: CaptureEvent) -> None:
        """Fold one event into the state; events of unknown types are ignored."""
        if isinstance(event, TakeStarted):
            self._take_started(event)
        elif isinstance(event, CameraUpdate):
            self._camera_update(event)
        elif isinstance(event, HostUpdate):
            host = self.hosts.setdefault(event.host, HostStatus(event.host))
            host.state = event.state
            host.cameras = event.cameras or host.cameras
            if event.dispatch_ms is not None:
                host.dispatch_ms = event.dispatch_ms
            if event.frame >= 0:
                host.last_frame = event.frame
            host.error = event.error
        elif isinstance(event, TakeProgress):
            take = self._take_for(event.take)
            take.done, take.total, take.missing = event.done, event.total, event.missing
        elif isinstance(event, QAWarning):
            self.qa_warnings.append(event)
            self.qa_count += 1
        elif isinstance(event, Message):
            self.messages.append(event)
        elif isinstance(event, TakeFinished):
            take = self._take_for(event.take)
            take.status = event.status
            take.finished_at = self.clock()
            take.done = event.frames
            take.missing = len(event.missing)
            self.finished.append(event)

    __call__ = handle

    def _take_started(self, event: TakeStarted) -> None:
        self.take = TakeStatus(
            take=event.take,
            kind=event.kind,
            cameras=len(event.cameras),
            frames_per_camera=event.frames,
            total=len(event.cameras) * event.frames,
            started_at=self.clock(),
        )
        for cam in self.cameras.values():
            cam.reset_take()
        for cam_id in event.cameras:
            self.camera(cam_id)

    def _camera_update(self, event: CameraUpdate) -> None:
        cam = self.camera(event.camera)
        cam.state = event.state
        cam.last_frame = event.frame
        if event.latency_s is not None:
            cam.latency_s = event.latency_s
        if event.battery_pct is not None:
            cam.battery_pct = event.battery_pct
        if event.error:
            cam.last_error = event.error
        if event.state == "ok":
            cam.frames_ok.add(event.frame)
        elif event.state in FAILURE_STATES:
            cam.failures[event.state] += 1

    def _take_for(self, take_id: str) -> TakeStatus:
        if self.take is None or self.take.take != take_id:
            # An event for a take we did not see start (e.g. attached late).
            self.take = TakeStatus(take=take_id, started_at=self.clock())
        return self.take

    def camera(self, camera_id: str) -> CameraStatus:
        """The status record of ``camera_id``, created (idle) on first use."""
        cam = self.cameras.get(camera_id)
        if cam is None:
            cam = self.cameras[camera_id] = CameraStatus(camera_id)
        return cam

    # -- derived values

    def elapsed_s(self) -> float | None:
        """Seconds since the current take started (frozen when it finished)."""
        if self.take is None:
            return None
        end = self.take.finished_at if self.take.finished_at is not None else self.clock()
        return max(0.0, end - self.take.started_at)

    def eta_s(self) -> float | None:
        """Seconds left in the current take at the rate so far; None when unknown."""
        take = self.take
        if take is None or take.finished_at is not None or take.total <= 0:
            return None
        elapsed = self.elapsed_s() or 0.0
        if take.done <= 0 or elapsed <= 0.0:
            return None
        remaining = max(0, take.total - take.done)
        return remaining * elapsed / take.done

    def state_counts(self) -> Counter[str]:
        """Number of cameras in each state."""
        return Counter(cam.state for cam in self.cameras.values())


# --------------------------------------------------------------------------- formatting


def format_duration(seconds: float | None) -> str:
    """``M:SS`` (or ``H:MM:SS``) for a duration in seconds; ``--:--`` when unknown."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return "--:--"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_ms(seconds: float | None, digits: int = 1) -> str:
    """A duration given in seconds, written in milliseconds (``"3.2 ms"``)."""
    return "n/a" if seconds is None else f"{seconds * 1000:.{digits}f} ms"


def _percent(done: int, total: int) -> float:
    return 100.0 * done / total if total > 0 else 0.0


def _take_summary(fin: TakeFinished) -> Text:
    style = "green" if fin.status == "complete" else "bold red"
    line = Text.assemble((fin.take, "bold"), " ", (fin.status, style))
    line.append(f"  {fin.frames} frames  missing {len(fin.missing)}")
    line.append(f"  skew {format_ms(fin.skew_s)}  {fin.seconds:.1f} s")
    if fin.missing:
        shown = ", ".join(fin.missing[:4])
        more = f" +{len(fin.missing) - 4}" if len(fin.missing) > 4 else ""
        line.append(f"  ({shown}{more})", style="dim")
    return line


# --------------------------------------------------------------------------- rendering


def _header(state: DashboardState, width: int) -> RenderableType:
    take = state.take
    title = Text("twinstudio capture", style="bold")
    if state.session:
        title.append(f" · {state.session}")
    if take is None:
        body: RenderableType = Text("waiting for a take…", style="dim")
        return Panel(body, title=title, title_align="left", box=box.ROUNDED)

    line1 = Text.assemble(("take ", "dim"), (take.take, "bold"))
    if take.kind:
        line1.append(f" ({take.kind})")
    if take.cameras:
        line1.append(f" · {take.cameras} cameras × {take.frames_per_camera} frames")
    status_style = {"running": "yellow", "complete": "green"}.get(take.status, "bold red")
    line1.append(" · ")
    line1.append(take.status, style=status_style)
    counts = state.state_counts()
    for name in ("ok", "firing", "retrying", "failed", "missing", "disconnected"):
        if counts.get(name):
            line1.append(f" · {counts[name]} ")
            line1.append(name, style=STATE_STYLES[name])

    pct = _percent(take.done, take.total)
    stats = Text(f"{take.done}/{take.total} {pct:3.0f}%")
    if take.missing:
        stats.append(f" · missing {take.missing}", style="bold red")
    stats.append(f" · elapsed {format_duration(state.elapsed_s())}")
    eta = "done" if take.finished_at is not None else format_duration(state.eta_s())
    stats.append(f" · ETA {eta}")

    inner = max(10, width - 4)  # panel border + padding
    bar_width = max(10, inner - stats.cell_len - 1)
    bar = ProgressBar(
        total=max(take.total, 1),
        completed=min(take.done, max(take.total, 1)),
        width=bar_width,
        complete_style="red" if take.missing else "yellow",
        finished_style="green",
    )
    row = Table.grid(padding=(0, 1))
    row.add_column(no_wrap=True)
    row.add_column(no_wrap=True)
    row.add_row(bar, stats)
    return Panel(Group(line1, row), title=title, title_align="left", box=box.ROUNDED)


def _tile(cam: CameraStatus) -> tuple[Text, Text]:
    """The two lines of a camera's tile, each exactly ``TILE_WIDTH`` cells."""
    top = Text.assemble(
        (cam.camera, "bold"), " ", (cam.state, STATE_STYLES.get(cam.state, "magenta"))
    )
    bottom = Text()
    latency = "--ms" if cam.latency_s is None else f"{cam.latency_s * 1000:.0f}ms"
    bottom.append(latency, style="cyan" if cam.latency_s is not None else "dim")
    bottom.append(f" f{cam.frames}")
    fails = cam.failure_count
    bottom.append(f" x{fails}", style="red" if fails else "dim")
    if cam.battery_pct is None:
        bottom.append(" --%", style="dim")
    else:
        b = cam.battery_pct
        bottom.append(f" {b:.0f}%", style="red" if b < 20 else "yellow" if b < 40 else "green")
    for line in (top, bottom):
        line.truncate(TILE_WIDTH, overflow="ellipsis", pad=True)
    return top, bottom


def _camera_grid(state: DashboardState, width: int) -> RenderableType:
    """Tiles laid out several per row; built as plain lines (a Table of 200 cells is
    ten times slower to render, and this redraws several times a second)."""
    cams = list(state.cameras.values())
    if not cams:
        return Text("no cameras yet", style="dim")
    per_row = max(1, (width + TILE_GAP) // (TILE_WIDTH + TILE_GAP))
    gap = " " * TILE_GAP
    lines: list[Text] = []
    for start in range(0, len(cams), per_row):
        tiles = [_tile(cam) for cam in cams[start : start + per_row]]
        lines.append(Text(gap).join(top for top, _ in tiles))
        lines.append(Text(gap).join(bottom for _, bottom in tiles))
    for line in lines:
        line.no_wrap = True
        line.overflow = "crop"
    return Group(*lines)


def _hosts(state: DashboardState) -> RenderableType:
    """One line per capture host: state, cameras, last dispatch time, last frame, why it is down."""
    lines = []
    for h in state.hosts.values():
        n = len(h.cameras)
        line = Text.assemble((h.host, "bold"), " ", (h.state, HOST_STYLES.get(h.state, "magenta")),
                             f" · {n} camera{'s' if n != 1 else ''}")
        if h.dispatch_ms is not None:
            line.append(f" · dispatch {h.dispatch_ms:.1f} ms", style="cyan")
        if h.last_frame is not None:
            line.append(f" · frame {h.last_frame}")
        if h.cameras:
            first, last = h.cameras[0], h.cameras[-1]
            line.append(f" · {first}–{last}" if n > 1 else f" · {first}", style="dim")
        if h.error:
            line.append(f": {h.error}", style="red")
        line.no_wrap, line.overflow = True, "ellipsis"
        lines.append(line)
    return Group(*lines)


def _problems(state: DashboardState) -> RenderableType | None:
    bad = [c for c in state.cameras.values() if c.state in FAILURE_STATES]
    if not bad:
        return None
    lines = []
    for cam in bad[:PROBLEMS_SHOWN]:
        line = Text.assemble((cam.camera, "bold"), " ", (cam.state, STATE_STYLES[cam.state]))
        if cam.last_frame is not None:
            line.append(f" frame {cam.last_frame}")
        if cam.last_error:
            line.append(f": {cam.last_error}", style="dim")
        lines.append(line)
    if len(bad) > PROBLEMS_SHOWN:
        lines.append(Text(f"+{len(bad) - PROBLEMS_SHOWN} more cameras in trouble", style="red"))
    return Group(*lines)


def _qa_panel(state: DashboardState) -> Panel:
    lines: list[Text] = []
    for w in state.qa_warnings:
        lines.append(
            Text.assemble((f"{w.take} {w.camera} f{w.frame} ", "yellow"), w.message)
        )
    body: RenderableType = Group(*lines) if lines else Text("none", style="dim")
    title = f"QA warnings ({state.qa_count})"
    return Panel(body, title=title, title_align="left", box=box.ROUNDED, border_style="yellow")


def _messages_panel(state: DashboardState) -> Panel:
    lines: list[Text] = []
    for m in state.messages:
        lines.append(Text.assemble((f"{m.level:<7} ", MESSAGE_STYLES.get(m.level, "")), m.text))
    body: RenderableType = Group(*lines) if lines else Text("none", style="dim")
    return Panel(body, title="Messages", title_align="left", box=box.ROUNDED)


def _finished_panel(state: DashboardState) -> Panel | None:
    if not state.finished:
        return None
    shown = state.finished[-FINISHED_SHOWN:]
    lines: list[Text] = [_take_summary(fin) for fin in shown]
    earlier = len(state.finished) - len(shown)
    if earlier:
        lines.insert(0, Text(f"(+{earlier} earlier takes)", style="dim"))
    return Panel(Group(*lines), title="Finished takes", title_align="left", box=box.ROUNDED)


class _AutoWidth:
    """Renders the dashboard at whatever width the console offers."""

    def __init__(self, state: DashboardState) -> None:
        self.state = state

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield render_dashboard(self.state, width=options.max_width)


def render_dashboard(state: DashboardState, width: int | None = None) -> RenderableType:
    """The dashboard for ``state`` as a rich renderable.

    With ``width`` (columns) the layout — tiles per row, side-by-side panels — is
    chosen for that width now and the result is a snapshot that no longer reads
    ``state``; without it the layout follows the console width at render time.
    """
    if width is None:
        return _AutoWidth(state)
    width = max(20, width)
    parts: list[RenderableType] = [_header(state, width)]
    if state.hosts:
        parts.append(Rule(f"Hosts ({len(state.hosts)}) · dispatch: head to agent", align="left", style="dim"))
        parts.append(_hosts(state))
    legend = "ms latency · f frames · x failures · battery"
    parts.append(Rule(f"Cameras ({len(state.cameras)}) · {legend}", align="left", style="dim"))
    parts.append(_camera_grid(state, width))
    problems = _problems(state)
    if problems is not None:
        parts.append(problems)
    qa, msgs = _qa_panel(state), _messages_panel(state)
    if width >= 140:
        side = Table.grid(expand=True, padding=(0, 1, 0, 0))
        side.add_column(ratio=1)
        side.add_column(ratio=1)
        side.add_row(qa, msgs)
        parts.append(side)
    else:
        parts.extend([qa, msgs])
    finished = _finished_panel(state)
    if finished is not None:
        parts.append(finished)
    return Constrain(Group(*parts), width=width)


# --------------------------------------------------------------------------- consumers


class LiveDashboard:
    """A live terminal dashboard usable directly as a capture's ``on_event``.

    ::

        with LiveDashboard() as dash:
            run_capture(..., on_event=dash)

    Args:
        state: the state to fold events into; a new one (with ``clock``/``session``)
            when omitted.
        console: where to draw; rich's default console when omitted.
        clock: time source for a new state (seconds, monotonic).
        session: header label for a new state.
        refresh_per_second: redraw rate of the live display. A background redraw
            keeps elapsed/ETA moving between events; an event redraws at once when
            it starts/ends a take or the last redraw is older than one period, so
            a burst of camera updates does not stall the capture on drawing.
        transient: erase the dashboard on exit (default: leave the final frame).

    Call it from the thread that runs the capture; the lock only keeps rich's
    refresh thread from drawing a half-updated state.
    """

    def __init__(
        self,
        state: DashboardState | None = None,
        *,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        session: str = "",
        refresh_per_second: float = 8.0,
        transient: bool = False,
    ) -> None:
        self.state = state if state is not None else DashboardState(clock, session=session)
        self._lock = threading.Lock()
        self._started = False
        self._period_s = 1.0 / refresh_per_second
        self._last_refresh = -math.inf  # time.monotonic() of the last event-driven redraw
        self._console = console if console is not None else get_console()
        self.live = Live(
            console=self._console,
            refresh_per_second=refresh_per_second,
            transient=transient,
            get_renderable=self._renderable,
        )

    @property
    def console(self) -> Console:
        return self._console

    def _renderable(self) -> RenderableType:
        with self._lock:
            return render_dashboard(self.state, width=self._console.width)

    def __enter__(self) -> LiveDashboard:
        self.live.start(refresh=True)
        self._started = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._started = False
        self.live.stop()

    def __call__(self, event: CaptureEvent) -> None:
        """Fold ``event`` into the state and redraw (if the display is running)."""
        with self._lock:
            self.state.handle(event)
        if not self._started:
            return
        now = time.monotonic()  # real time: throttles drawing, unrelated to state.clock
        milestone = isinstance(event, (TakeStarted, TakeFinished))
        if milestone or now - self._last_refresh >= self._period_s:
            self._last_refresh = now
            self.live.refresh()


class PlainLog:
    """The ``--plain`` consumer: one concise line per meaningful event.

    Logs take starts and ends, cameras that fail/retry/go missing/disconnect, QA
    warnings, messages, and progress each time it crosses a multiple of
    ``progress_step_pct``. Colours only when the output is a terminal.

    Args:
        console: where to write; when omitted a console on ``file`` (or stdout).
        file: a text stream for a new console (ignored when ``console`` is given).
        progress_step_pct: progress is logged every this many percent.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        file: TextIO | None = None,
        progress_step_pct: int = 10,
    ) -> None:
        if progress_step_pct <= 0:
            raise ValueError(f"progress_step_pct must be > 0, got {progress_step_pct}")
        self.console = console if console is not None else Console(file=file, highlight=False)
        self.progress_step_pct = progress_step_pct
        self._progress_logged: dict[str, int] = {}  # take -> last step printed

    def line(self, event: CaptureEvent) -> Text | None:
        """The line logged for ``event``, or None when it is not worth a line."""
        if isinstance(event, TakeStarted):
            self._progress_logged[event.take] = 0
            return Text(
                f"take {event.take} started: {event.kind}, "
                f"{len(event.cameras)} cameras x {event.frames} frames",
                style="bold",
            )
        if isinstance(event, CameraUpdate):
            if event.state not in FAILURE_STATES:
                return None
            text = Text(f"take {event.take} camera {event.camera} ")
            text.append(event.state, style=STATE_STYLES[event.state])
            text.append(f" (frame {event.frame})")
            if event.error:
                text.append(f": {event.error}")
            return text
        if isinstance(event, TakeProgress):
            if event.total <= 0:
                return None
            pct = _percent(event.done, event.total)
            step = int(pct // self.progress_step_pct) * self.progress_step_pct
            if step <= self._progress_logged.get(event.take, 0):
                return None
            self._progress_logged[event.take] = step
            text = Text(f"take {event.take} progress {pct:.0f}% ({event.done}/{event.total}")
            text.append(f", {event.missing} missing)" if event.missing else ")")
            return text
        if isinstance(event, HostUpdate):
            if event.state not in ("ready", "down"):
                return None
            text = Text(f"host {event.host} ")
            text.append(event.state, style=HOST_STYLES[event.state])
            text.append(f" ({len(event.cameras)} cameras)")
            if event.error:
                text.append(f": {event.error}")
            return text
        if isinstance(event, QAWarning):
            return Text.assemble(
                ("QA warning", "yellow"),
                f" take {event.take} camera {event.camera} frame {event.frame}: {event.message}",
            )
        if isinstance(event, Message):
            return Text.assemble(
                (event.level, MESSAGE_STYLES.get(event.level, "")), f": {event.text}"
            )
        if isinstance(event, TakeFinished):
            self._progress_logged.pop(event.take, None)
            return Text.assemble("take ", _take_summary(event))
        return None

    def __call__(self, event: CaptureEvent) -> None:
        """Print the line for ``event``, if any."""
        text = self.line(event)
        if text is not None:
            self.console.print(text, soft_wrap=True, highlight=False)
