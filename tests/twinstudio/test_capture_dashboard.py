"""The capture dashboard renders event-fed state; rendered into a StringIO console
with a fake clock, so it is tested like any other output."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from rich.console import Console

from twinstudio.capture_dashboard import DashboardState, LiveDashboard, PlainLog, render_dashboard
from capture.events import (
    CameraUpdate,
    CaptureEvent,
    Message,
    QAWarning,
    TakeFinished,
    TakeProgress,
    TakeStarted,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cam_ids(n: int) -> tuple[str, ...]:
    digits = max(2, len(str(n)))
    return tuple(f"cam{i:0{digits}d}" for i in range(1, n + 1))


def take_events(n: int = 24, take: str = "t001") -> Iterator[tuple[float, CaptureEvent]]:
    """(seconds to advance the clock first, event) for a one-frame take of n cameras.

    The 7th camera retries, fails and goes missing; the 13th writes its frame, then
    disconnects;
    every other camera is ok with latency 100+i ms and battery 100-(i mod 90) %.
    """
    cams = cam_ids(n)
    bad, lost = cams[6], cams[12]
    yield 0.0, TakeStarted(take=take, kind="turntable", cameras=cams, frames=1)
    yield 0.0, Message("lights set to scene 'neutral'")
    done = 0
    for i, cam in enumerate(cams, start=1):
        yield 0.0, CameraUpdate(cam, "firing", take, 0)
        if cam == bad:
            yield 0.0, CameraUpdate(cam, "retrying", take, 0, error="timeout", battery_pct=55.0)
            yield 0.0, CameraUpdate(cam, "retrying", take, 0, error="timeout")
            yield 0.0, CameraUpdate(cam, "failed", take, 0, error="no file after 3 retries")
            yield 0.0, CameraUpdate(cam, "missing", take, 0, error="no file after 3 retries")
            continue
        yield 0.0, CameraUpdate(
            cam, "ok", take, 0, latency_s=0.100 + i / 1000, battery_pct=100.0 - i % 90
        )
        done += 1
        yield 0.5, TakeProgress(take, done=done, total=n, missing=0)
    yield 0.0, CameraUpdate(lost, "disconnected", take, 0, error="usb link lost")
    yield 0.0, TakeProgress(take, done=done, total=n, missing=n - done)
    yield 0.0, QAWarning(take, "cam03", 0, "blurry: sharpness 12 < 40")
    yield 0.0, Message(f"{lost} disconnected, check the usb hub", level="warning")
    yield 0.5, TakeFinished(
        take, "incomplete", frames=done, missing=(f"{bad}/0",), skew_s=0.0032, seconds=12.0
    )


def feed(state: DashboardState, clock: FakeClock, events, stop=None) -> None:
    for dt, event in events:
        clock.now += dt
        state.handle(event)
        if stop is not None and stop(event):
            return


def render(renderable, width: int = 100) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    console.print(renderable)
    text = ANSI.sub("", console.file.getvalue())
    assert all(len(line) <= width for line in text.splitlines())
    return text


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def finished_state(clock: FakeClock) -> DashboardState:
    state = DashboardState(clock, session="studio-a")
    feed(state, clock, take_events())
    return state


def test_state_folds_events(finished_state: DashboardState) -> None:
    state = finished_state
    assert list(state.cameras) == list(cam_ids(24))
    cam07 = state.cameras["cam07"]
    assert cam07.state == "missing" and cam07.frames == 0
    assert cam07.failures == {"retrying": 2, "failed": 1, "missing": 1}
    assert cam07.last_error == "no file after 3 retries" and cam07.battery_pct == 55.0
    cam13 = state.cameras["cam13"]
    assert cam13.state == "disconnected" and cam13.frames == 1 and cam13.failure_count == 1
    cam05 = state.cameras["cam05"]
    assert cam05.state == "ok" and cam05.latency_s == pytest.approx(0.105)
    assert cam05.battery_pct == 95.0
    take = state.take
    assert take is not None
    assert (take.take, take.kind, take.status) == ("t001", "turntable", "incomplete")
    assert (take.done, take.total, take.missing) == (23, 24, 1)
    assert state.elapsed_s() == pytest.approx(12.0)  # 23 x 0.5 s + 0.5 s, then frozen
    assert state.eta_s() is None
    assert [f.take for f in state.finished] == ["t001"]
    assert state.qa_count == 1 and len(state.messages) == 2


def test_eta_from_progress_rate(clock: FakeClock) -> None:
    state = DashboardState(clock)
    assert state.elapsed_s() is None and state.eta_s() is None
    state.handle(TakeStarted("t1", "static", cam_ids(4), frames=10))
    assert state.take is not None and state.take.total == 40
    assert state.eta_s() is None  # nothing done yet
    clock.now += 10.0
    state.handle(TakeProgress("t1", done=10, total=40))
    assert state.elapsed_s() == pytest.approx(10.0)
    assert state.eta_s() == pytest.approx(30.0)


def test_new_take_resets_per_take_counters(finished_state: DashboardState) -> None:
    finished_state.handle(TakeStarted("t002", "static", ("cam01", "cam07"), frames=3))
    cam07 = finished_state.cameras["cam07"]
    assert (cam07.state, cam07.frames, cam07.failure_count) == ("idle", 0, 0)
    assert cam07.battery_pct == 55.0  # battery persists
    assert finished_state.elapsed_s() == 0.0
    assert len(finished_state.cameras) == 24  # cameras are not forgotten


def test_keeps_last_eight_messages(clock: FakeClock) -> None:
    state = DashboardState(clock)
    for i in range(12):
        state.handle(Message(f"note number {i:02d}"))
        state.handle(QAWarning("t", "cam01", i, f"qa number {i:02d}"))
    state.handle(object())  # unknown events are ignored
    text = render(render_dashboard(state, width=100))
    assert "note number 11" in text and "note number 04" in text
    assert "note number 03" not in text
    assert "qa number 11" in text and "qa number 03" not in text
    assert "QA warnings (12)" in text


def test_render_mid_take_shows_elapsed_and_eta(clock: FakeClock) -> None:
    state = DashboardState(clock, session="studio-a")
    # stop after the 18th frame is on disk: 18 x 0.5 s = 9 s, 6 left at 2 per s -> 3 s
    feed(state, clock, take_events(), stop=lambda e: isinstance(e, TakeProgress) and e.done == 18)
    text = render(render_dashboard(state, width=100))
    assert "studio-a" in text and "t001" in text and "turntable" in text
    assert "18/24  75%" in text
    assert "elapsed 0:09" in text and "ETA 0:03" in text
    assert "running" in text
    assert "cam19 ok" in text and "cam20 idle" in text
    assert "cam07 missing" in text


def test_render_finished_take_at_width_100(finished_state: DashboardState) -> None:
    text = render(render_dashboard(finished_state, width=100))
    for cam in cam_ids(24):
        assert cam in text
    assert "cam07 missing" in text and "cam13 disconnected" in text and "cam05 ok" in text
    assert "105ms f1 x1" not in text
    assert "105ms f1 x0 95%" in text  # latency, frames, failures, battery of cam05
    assert "--ms f0 x4 55%" in text  # cam07: no latency, 4 failure updates
    assert "cam07 missing frame 0: no file after 3 retries" in text
    assert "cam13 disconnected frame 0: usb link lost" in text
    assert "23/24  96%" in text and "missing 1" in text
    assert "elapsed 0:12" in text and "ETA done" in text
    assert "incomplete" in text
    assert "blurry: sharpness 12 < 40" in text and "cam03" in text
    assert "lights set to scene 'neutral'" in text and "check the usb hub" in text
    assert "skew 3.2 ms" in text and "23 frames" in text and "cam07/0" in text
    # five tiles per row at 100 columns: cam01..cam05 share a line
    first = next(line for line in text.splitlines() if "cam01" in line)
    assert "cam05" in first and "cam06" not in first


def test_render_width_160_puts_panels_side_by_side(finished_state: DashboardState) -> None:
    text = render(render_dashboard(finished_state, width=160), width=160)
    first = next(line for line in text.splitlines() if "cam01" in line)
    assert "cam08" in first and "cam09" not in first
    assert any("QA warnings" in line and "Messages" in line for line in text.splitlines())
    # without a width the layout follows the console
    auto = render(render_dashboard(finished_state), width=160)
    assert auto == text


def test_render_200_cameras_within_width(clock: FakeClock) -> None:
    state = DashboardState(clock)
    feed(state, clock, take_events(200))
    for width in (100, 160):
        text = render(render_dashboard(state, width=width), width=width)
        for cam in ("cam001", "cam099", "cam200"):
            assert cam in text
        assert all(cam in text for cam in cam_ids(200))
        assert "cam007 missing" in text


def test_render_empty_state() -> None:
    text = render(render_dashboard(DashboardState(FakeClock())))
    assert "waiting for a take" in text and "no cameras yet" in text


def test_plain_log_lines(clock: FakeClock) -> None:
    out = io.StringIO()
    log = PlainLog(Console(file=out, width=100))
    for _, event in take_events():
        log(event)
    text = out.getvalue()
    assert "\x1b[" not in text  # not a terminal: no colours
    lines = text.splitlines()
    assert lines[0] == "take t001 started: turntable, 24 cameras x 1 frames"
    assert "take t001 camera cam07 retrying (frame 0): timeout" in lines
    assert "take t001 camera cam07 failed (frame 0): no file after 3 retries" in lines
    assert "take t001 camera cam07 missing (frame 0): no file after 3 retries" in lines
    assert "take t001 camera cam13 disconnected (frame 0): usb link lost" in lines
    progress = [line for line in lines if " progress " in line]
    assert len(progress) == 9  # 10 %, 20 %, ... 90 % of 24 frames
    assert "take t001 progress 50% (12/24)" in progress
    assert "QA warning take t001 camera cam03 frame 0: blurry: sharpness 12 < 40" in lines
    assert "warning: cam13 disconnected, check the usb hub" in lines
    assert lines[-1].startswith("take t001 incomplete  23 frames  missing 1  skew 3.2 ms")
    assert not any("cam05" in line for line in lines)  # ok shots are not logged


def test_plain_log_colours_on_terminal_and_file_argument() -> None:
    term = Console(file=io.StringIO(), width=100, force_terminal=True)
    PlainLog(term)(CameraUpdate("cam01", "failed", "t1", 3, error="timeout"))
    assert "\x1b[" in term.file.getvalue()
    out = io.StringIO()
    log = PlainLog(file=out)
    log(TakeStarted("t1", "static", ("cam01",), frames=10))
    log(TakeProgress("t1", done=5, total=10, missing=1))
    log(TakeProgress("t1", done=5, total=10, missing=1))  # same step: no new line
    assert out.getvalue().splitlines() == [
        "take t1 started: static, 1 cameras x 10 frames",
        "take t1 progress 50% (5/10, 1 missing)",
    ]


def test_live_dashboard_runs_and_leaves_summary(clock: FakeClock) -> None:
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    with LiveDashboard(console=console, clock=clock, session="studio-a") as dash:
        for dt, event in take_events():
            clock.now += dt
            dash(event)
    text = ANSI.sub("", console.file.getvalue())
    assert "Finished takes" in text
    assert "t001 incomplete  23 frames  missing 1  skew 3.2 ms" in text
    assert dash.state.take is not None and dash.state.take.status == "incomplete"


def test_live_dashboard_outside_context_only_updates_state(clock: FakeClock) -> None:
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    dash = LiveDashboard(console=console, clock=clock)
    dash(Message("hello"))
    assert console.file.getvalue() == ""
    assert [m.text for m in dash.state.messages] == ["hello"]
