"""A rig spread over two capture hosts, on a real two-node Ray cluster (loopback only).

One cluster for the module (tests.raycluster: host ``a`` on the head node, host
``b`` on a second node, each its own raylet and object store): a split rig
captures the same frames, hashes and journal as the same rig on one host; host
b's node killed mid-take leaves exactly its cameras missing, with the host
named, and ``reshoot`` fills them once a fresh node b has joined.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from capture.consent import add_consent
from capture.events import CameraUpdate, HostUpdate
from capture.orchestrator import CaptureError, CaptureOptions, prepare_virtual_studio, reshoot, run_take
from capture.session import Session
from rigs.fileio import sha256_file
from tests.capture.conftest import consent

B_CAMS = [f"cam{n:02d}" for n in range(13, 25)]
SPLIT = "virtual-ring-24-2hosts"


def _session(path: Path, rig: str) -> Session:
    s = Session.create(path, rig, "subj-001")
    add_consent(s.path, consent())
    return s


def _files(s: Session, take: str) -> dict[str, str]:
    return {p.relative_to(s.path).as_posix(): sha256_file(p) for p in (s.path / "takes" / take).rglob("*.jpg")}


def _journal(s: Session) -> list[dict]:
    return [json.loads(line) for line in (s.path / "journal.jsonl").read_text().splitlines()]


def _same_events(journal: list[dict]) -> list[str]:
    """A journal's events without what differs between two captures of the same frames (times, the
    rig's name, the hosts, trigger timings), sorted (arrival order differs), as JSON lines."""
    out = []
    for e in journal:
        e = {k: v for k, v in e.items() if k not in ("t", "crc", "hosts", "skew_s", "rig", "rig_sha256")}
        if e["ev"] == "frame":
            e["record"] = {k: e["record"][k] for k in ("path", "sha256", "size", "attempts", "qa")}
        if "qa_flags" in e:  # a trigger-skew flag is a trigger timing too (a loaded machine can raise one)
            e["qa_flags"] = [f for f in e["qa_flags"] if not f.startswith("trigger skew")]
        if e["ev"] != "dispatch":
            out.append(json.dumps(e, sort_keys=True))
    return sorted(out)


def test_a_split_rig_without_ray_connected_says_to_pass_address(tmp_path) -> None:
    import ray

    if ray.is_initialized():  # pragma: no cover - this module's cluster starts after this test
        pytest.skip("Ray already connected in this process")
    s = _session(tmp_path / "s", SPLIT)
    with pytest.raises(CaptureError, match="--address"):
        run_take(s, "stills", CaptureOptions(source="pattern"))
    assert s.manifest.takes == {}  # refused before the take was journaled


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.raycluster import two_node_cluster

    with two_node_cluster(tmp_path_factory.mktemp("ray-home")) as c:
        yield c


def test_split_rig_captures_the_same_frames_hashes_and_journal_as_one_host(cluster, tmp_path) -> None:
    opts = CaptureOptions(render_scale=0.1)
    one, two = _session(tmp_path / "one", "virtual-ring-24"), _session(tmp_path / "two", SPLIT)
    for s in (one, two):
        prepare_virtual_studio(s, ("stills",), opts)
    single = run_take(one, "stills", opts)
    events: list = []
    split = run_take(two, "stills", opts, on_event=events.append)

    assert single.status == split.status == "complete"
    files = _files(two, split.id)
    assert len(files) == 24 * 8 and files == _files(one, single.id)
    for cam, frames in split.captured.items():
        for i, r in frames.items():
            other = single.captured[cam][i]
            assert (r.path, r.sha256, r.size, r.qa) == (other.path, other.sha256, other.size, other.qa)
            assert files[r.path] == r.sha256  # what the head wrote is what the host hashed
    assert split.hosts == {c: ("a" if c not in B_CAMS else "b") for c in split.cameras}

    # the journals hold the same events (arrival order aside), the split one also the dispatch per frame
    assert _same_events(_journal(two)) == _same_events(_journal(one))
    dispatch = [e for e in _journal(two) if e["ev"] == "dispatch"]
    assert [e["frame"] for e in dispatch] == list(range(8))
    for e in dispatch:
        assert set(e["hosts"]) == {"a", "b"} and all(0 <= h["ms"] < 1000 for h in e["hosts"].values())
        # each agent fired at the frame's one fire time, or at once when its command came after it
        for h in e["hosts"].values():
            assert h["fired"] >= h["at"] and h["late_ms"] >= 0
            if h["late_ms"] > 0:
                assert h["fired"] - h["at"] < 0.001
    assert set(split.dispatch_spread_ms()) == set(range(8))
    for i, hs in split.dispatch.items():
        fired = [h["fired"] for h in hs.values()]
        assert split.dispatch_spread_ms()[i] == pytest.approx((max(fired) - min(fired)) * 1000.0)
    # the dashboard's feed: both hosts, their cameras, per-frame dispatch times
    ok = [e for e in events if isinstance(e, HostUpdate) and e.state == "ok"]
    assert {(e.host, e.frame) for e in ok} == {(h, i) for h in "ab" for i in range(8)}
    assert all(e.dispatch_ms is not None for e in ok)
    assert {e.camera for e in events if isinstance(e, CameraUpdate) and e.host == "b"} == set(B_CAMS)


def test_cameras_that_disconnect_are_journaled_as_on_one_host(cluster, tmp_path) -> None:
    """Every camera disconnects after its second shot: the same failures, in the same words, as on one host."""
    opts = CaptureOptions(source="pattern", disconnect_after=2)
    one, two = _session(tmp_path / "one", "virtual-ring-24"), _session(tmp_path / "two", SPLIT)
    single, split = run_take(one, "stills", opts), run_take(two, "stills", opts)
    assert single.status == split.status == "incomplete"
    assert sorted(split.missing()) == sorted(single.missing()) == sorted(
        (c, i) for c in split.cameras for i in range(2, 8))
    assert split.failures == single.failures
    assert _same_events(_journal(two)) == _same_events(_journal(one))


def test_host_b_dies_mid_take_its_cameras_are_missing_and_reshoot_fills_them(cluster, tmp_path) -> None:
    s = _session(tmp_path / "s", SPLIT)
    opts = CaptureOptions(source="pattern")
    killed: list[int] = []

    def kill_b_after_frame_2(ev) -> None:
        if isinstance(ev, HostUpdate) and ev.host == "b" and ev.state == "ok" and ev.frame == 2 and not killed:
            cluster.power_off_b()
            killed.append(ev.frame)

    events: list = []
    rec = run_take(s, "stills", opts, on_event=lambda ev: (events.append(ev), kill_b_after_frame_2(ev)))
    assert killed == [2]
    assert rec.status == "incomplete"
    # exactly host b's cameras, from the first frame it did not deliver on
    assert sorted(rec.missing()) == sorted((c, i) for c in B_CAMS for i in range(3, 8))
    for c in B_CAMS:
        for i in range(3, 8):
            assert "host b" in rec.failures[c][i], rec.failures[c][i]
    assert any(isinstance(e, HostUpdate) and e.host == "b" and e.state == "down" for e in events)
    manifest = json.loads((s.path / "session.json").read_text())
    assert manifest["takes"][rec.id]["status"] == "incomplete"

    cluster.add_node_b()  # the PC is back: a fresh node, a fresh agent
    fixed = reshoot(s, rec.id, opts)
    assert fixed.status == "complete" and fixed.missing() == []
    files = _files(s, rec.id)
    assert len(files) == 24 * 8
    for cam, frames in fixed.captured.items():
        for i, r in frames.items():
            assert files[r.path] == r.sha256
    # only the gaps were fired again: frames 0-2 of b and all of a are the first take's records
    reshot = [e for e in _journal(s) if e["ev"] == "frame"][len([e for e in _journal(s) if e["ev"] == "frame"])
                                                            - 12 * 5:]
    assert sorted((e["camera"], e["frame"]) for e in reshot) == sorted((c, i) for c in B_CAMS for i in range(3, 8))


def test_a_host_without_a_node_is_missing_from_the_start(cluster, tmp_path) -> None:
    """Host b's node is not in the cluster when the take starts: b's cameras are unavailable, the take
    runs on a, and says which host and resource were missing."""
    import time

    from capture.hosts import alive_host_resources

    cluster.power_off_b()
    try:
        deadline = time.monotonic() + 60
        while "b" in alive_host_resources() and time.monotonic() < deadline:  # until Ray has noticed
            time.sleep(0.2)
        assert alive_host_resources() == {"a"}
        s = _session(tmp_path / "s", SPLIT)
        rec = run_take(s, "stills", CaptureOptions(source="pattern"))
        assert rec.status == "incomplete"
        assert {c for c, _ in rec.missing()} == set(B_CAMS)
        assert all("host b" in why and "capture-host:b" in why for why in rec.failures["cam13"].values()), \
            rec.failures["cam13"]
        assert len(_files(s, rec.id)) == 12 * 8
    finally:
        cluster.add_node_b()


def test_the_cli_joins_the_cluster_by_address_and_fires_both_hosts(cluster, tmp_path) -> None:
    from tests.faults.cli import run as twinstudio

    s = _session(tmp_path / "s", SPLIT)
    out = twinstudio("capture", "stills", "--session", s.path, "--address", cluster.address, "--plain",
                     "--virtual-source", "pattern", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "host a ready (12 cameras)" in out.stdout and "host b ready (12 cameras)" in out.stdout
    rec = Session.open(s.path).take("stills-001")
    assert rec.status == "complete" and len(_files(s, rec.id)) == 24 * 8
    assert sorted(rec.dispatch) == list(range(8)) and all(set(d) == {"a", "b"} for d in rec.dispatch.values())


def test_the_dashboard_shows_hosts() -> None:
    from rich.console import Console

    from twinstudio.capture_dashboard import DashboardState, PlainLog, render_dashboard

    state = DashboardState(clock=lambda: 0.0)
    state.handle(HostUpdate("a", "ok", ("cam01", "cam02"), "stills-001", 3, dispatch_ms=1.25))
    state.handle(HostUpdate("b", "down", ("cam03",), "stills-001", 4, error="its agent died"))
    out = io.StringIO()
    Console(file=out, width=100, force_terminal=False).print(render_dashboard(state, width=100))
    text = out.getvalue()
    assert "a ok · 2 cameras · dispatch 1.2 ms" in text
    assert "b down · 1 camera" in text and "its agent died" in text
    line = PlainLog(file=io.StringIO()).line(HostUpdate("b", "down", ("cam03",), "stills-001", 4, error="gone"))
    assert line is not None and "host b down" in line.plain and "gone" in line.plain


def test_hosts_fire_at_one_time_a_little_after_the_slowest_recent_trip():
    # the fire time every agent is given: the slowest command trip of recent frames plus a margin, bounded
    from capture.hosts import LEAD_FIRST_S, LEAD_MARGIN_S, LEAD_MAX_S, LEAD_MIN_S, LEAD_WINDOW, HostFleet, wait_until

    fleet = HostFleet.__new__(HostFleet)
    fleet.trips = []
    assert fleet.lead_s() == LEAD_FIRST_S
    fleet.trips = [0.003, 0.007, 0.002]
    assert fleet.lead_s() == pytest.approx(0.007 + LEAD_MARGIN_S)
    fleet.trips = [-0.004]  # a host whose clock runs ahead of the head's
    assert fleet.lead_s() == LEAD_MIN_S
    fleet.trips = [0.5]
    assert fleet.lead_s() == LEAD_MAX_S
    assert LEAD_WINDOW >= 20
    # an agent never fires before the fire time, and fires at once when it has passed
    t = time.time() + 0.01
    assert wait_until(t) >= t
    past = time.time() - 1.0
    woke = wait_until(past)
    assert past < woke < past + 1.5
