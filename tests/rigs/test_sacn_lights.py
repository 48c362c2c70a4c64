"""sACN lights against a real sacn receiver on 127.0.0.1: presets, blackout, sync, keepalive, errors.

sacn 1.11 always sends to port 5568, so the receiver listens there (bound to 127.0.0.1 only) and
the driver sends from another port; a file lock keeps two test runs on this machine from sharing
the port. The receiver calls back when a universe's data *changes*, so every check waits (with a
timeout) for an expected frame that differs from the one before.
"""

from __future__ import annotations

import fcntl
import math
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sacn = pytest.importorskip("sacn")
from sacn.receiving.receiver_socket_base import ReceiverSocketBase  # noqa: E402
from sacn.receiving.receiver_socket_udp import ReceiverSocketUDP  # noqa: E402

from rigs.drivers import DriverError, DriverOptions, light_driver  # noqa: E402
from rigs.drivers.sacn_lights import SacnLights, SacnSettings  # noqa: E402
from rigs.rigfile import Rig, load_rig, parse_rig  # noqa: E402

HOST = "127.0.0.1"
PORT = 5568  # where sacn 1.11 sends, whatever the sender's bind port
TIMEOUT_S = 3.0

TWO_UNIVERSES = """
[rig]
name = "two-universes"

[[cameras]]
id = "cam01"
driver = "virtual"
resolution = [64, 48]
focal_mm = 35.0
position = [0, -3, 1]

[[lights]]
id = "a1"
driver = "sacn"
position = [1, -2, 2.5]
universe = 1
channel = 1
channels = 2

[[lights]]
id = "a2"
driver = "sacn"
position = [-1, -2, 2.5]
universe = 1
channel = 100

[[lights]]
id = "b1"
driver = "sacn"
position = [1, 2, 2.5]
universe = 2
channel = 510
channels = 3

[[lights]]
id = "b2"
driver = "sacn"
position = [-1, 2, 2.5]
universe = 2
channel = 7
channels = 2

[presets.warm]
levels = { a1 = 0.5, a2 = 1.0, b1 = 0.25, b2 = 0.75 }
"""


# --------------------------------------------------------------------------- helpers


class _LoopbackSocket(ReceiverSocketUDP):
    """sacn's receiver socket, bound to 127.0.0.1 only (sacn binds every interface on Linux)."""

    def __init__(self, address: str, port: int) -> None:
        ReceiverSocketBase.__init__(self, listener=None)
        self._bind_address = address
        self._bind_port = port
        self._enabled_flag = True
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((address, port))


class DmxRecorder:
    """A started sacn.sACNreceiver that keeps the latest DMX frame per universe."""

    def __init__(self, universes: list[int]) -> None:
        sock = _LoopbackSocket(HOST, PORT)
        self.receiver = sacn.sACNreceiver(bind_address=HOST, bind_port=PORT, socket=sock)
        sock._listener = self.receiver._handler  # the handler is made inside the receiver
        self.latest: dict[int, tuple[int, ...]] = {}
        self.sync_addr: dict[int, int] = {}
        self.changes: dict[int, int] = {u: 0 for u in universes}
        self._cond = threading.Condition()
        for u in universes:
            self.receiver.register_listener("universe", self._on_packet, universe=u)
        self.receiver.start()

    def _on_packet(self, packet) -> None:
        with self._cond:
            self.latest[packet.universe] = tuple(packet.dmxData)
            self.sync_addr[packet.universe] = packet.syncAddr
            self.changes[packet.universe] = self.changes.get(packet.universe, 0) + 1
            self._cond.notify_all()

    def wait_for(self, universe: int, expected: tuple[int, ...], timeout: float = TIMEOUT_S) -> None:
        """Wait until ``universe`` holds ``expected``; fail showing the first differing slots otherwise."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.latest.get(universe) == expected, timeout)
            got = self.latest.get(universe)
        if not ok:
            if got is None:
                pytest.fail(f"universe {universe}: nothing received within {timeout} s")
            diff = [(i + 1, g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e][:8]
            pytest.fail(f"universe {universe}: (channel, got, expected) differ at {diff}")

    def stop(self) -> None:
        self.receiver.stop()


@pytest.fixture()
def port_lock() -> Iterator[None]:
    """Only one test on this machine listens on 127.0.0.1:5568 at a time."""
    with open(Path(tempfile.gettempdir()) / "twinstudio-sacn-5568.lock", "w") as f:
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another process holds the sACN test port for over 60 s")
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture()
def recorder(port_lock: None) -> Iterator[DmxRecorder]:
    rec = DmxRecorder([1, 2])
    try:
        yield rec
    finally:
        rec.stop()


def options(rig: Rig, **extra: str) -> DriverOptions:
    """Unicast to 127.0.0.1 from an ephemeral local port."""
    base = {"sacn_destination": HOST, "sacn_bind_address": HOST, "sacn_bind_port": "0"}
    return DriverOptions(rig=rig, extra={**base, **extra})


def expected_frames(rig: Rig, levels: dict[str, float]) -> dict[int, tuple[int, ...]]:
    """What the driver documents: dimmer = round(level*255), slot 2 = 128, further slots 0."""
    frames: dict[int, list[int]] = {}
    for light in rig.lights:
        slots = frames.setdefault(light.universe, [0] * 512)
        slots[light.channel - 1] = round(levels.get(light.id, 0.0) * 255)
        if light.channels > 1:
            slots[light.channel] = 128
    return {u: tuple(s) for u, s in frames.items()}


@pytest.fixture(scope="module")
def studio() -> Rig:
    return load_rig("studio-gphoto2-48")


# --------------------------------------------------------------------------- tests


def test_every_preset_step_of_the_studio_reaches_the_receiver(studio: Rig, recorder: DmxRecorder) -> None:
    steps = studio.preset_steps()
    assert [s.name for s in steps] == ["flat", "key-fill-rim"] + [f"olat-led{i}" for i in range(1, 9)]
    lights = light_driver("sacn", list(studio.lights), options(studio))
    assert isinstance(lights, SacnLights)
    assert lights.universes == [1]
    try:
        lights.open()
        previous = None
        for step in steps:
            frame = expected_frames(studio, step.levels)[1]
            if frame == previous:  # the receiver only reports changes: go through another frame first
                lights.apply({lid: 1 / 255 for lid in step.levels})
                recorder.wait_for(1, expected_frames(studio, {lid: 1 / 255 for lid in step.levels})[1])
            lights.apply(step.levels)
            recorder.wait_for(1, frame)
            assert recorder.sync_addr[1] == 63999  # data held for the sync packet
            assert lights.levels == {light.id: step.levels.get(light.id, 0.0) for light in studio.lights}
            previous = frame
        # spot checks of the mapping itself
        flat = expected_frames(studio, steps[0].levels)[1]
        assert flat[:16] == (153, 128) * 8 and not any(flat[16:])
        kfr = lights.dmx_frames(steps[1].levels)[1]
        assert kfr[:8] == (255, 128, 0, 128, 89, 128, 0, 128)
    finally:
        lights.close()
    recorder.wait_for(1, (0,) * 512)  # blackout, colour channels included
    assert not lights.is_open


def test_two_universes_update_together_and_black_out(recorder: DmxRecorder) -> None:
    rig = parse_rig(TWO_UNIVERSES)
    levels = rig.preset_steps("warm")[0].levels
    with SacnLights(list(rig.lights), options(rig)) as lights:
        assert lights.universes == [1, 2]
        lights.apply(levels)
        want = lights.dmx_frames(levels)
        assert want == expected_frames(rig, levels)  # b1's third slot is 0
        for u in (1, 2):
            recorder.wait_for(u, want[u])
        assert want[1][0:2] == (128, 128) and want[1][99] == 255
        assert want[2][509:512] == (64, 128, 0) and want[2][6:8] == (191, 128)
        lights.apply({"b2": 1.0})  # missing ids go dark
        for u, frame in expected_frames(rig, {"b2": 1.0}).items():
            recorder.wait_for(u, frame)
    for u in (1, 2):
        recorder.wait_for(u, (0,) * 512)


def test_context_manager_blacks_out_on_an_exception(studio: Rig, recorder: DmxRecorder) -> None:
    lights = SacnLights(list(studio.lights), options(studio))
    with pytest.raises(RuntimeError, match="boom"):
        with lights:
            lights.apply({"led4": 0.5})
            recorder.wait_for(1, expected_frames(studio, {"led4": 0.5})[1])
            raise RuntimeError("boom")
    recorder.wait_for(1, (0,) * 512)
    assert not lights.is_open
    lights.close()  # idempotent
    with pytest.raises(DriverError, match="not open"):
        lights.apply({"led1": 1.0})


def test_invalid_levels_raise_before_anything_is_sent(studio: Rig, recorder: DmxRecorder) -> None:
    with SacnLights(list(studio.lights), options(studio)) as lights:
        lights.apply({"led2": 0.2})
        frame = expected_frames(studio, {"led2": 0.2})[1]
        recorder.wait_for(1, frame)
        with pytest.raises(DriverError, match="led9") as err:
            lights.apply({"led1": 1.0, "led9": 0.5})
        assert err.value.light == "led9" and not err.value.transient
        for bad in (1.5, -0.1, math.nan, "bright", True):
            with pytest.raises(DriverError, match="outside 0..1") as err:
                lights.apply({"led3": bad})
            assert err.value.light == "led3"
        assert lights.levels["led2"] == 0.2  # the last good levels are kept
        time.sleep(0.1)  # a wrong frame would have arrived by now
        assert recorder.latest[1] == frame and recorder.changes[1] == 1


def test_sync_packets_and_keepalive_go_unicast_to_the_destination(studio: Rig, port_lock: None) -> None:
    """Raw packets: each flush is a data packet with the sync address plus a sync packet, repeated."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, PORT))
    sock.settimeout(0.05)
    data = sync = 0
    try:
        with SacnLights(list(studio.lights), options(studio, sacn_keepalive_s="0.2")) as lights:
            lights.apply({"led1": 1.0})
            deadline = time.monotonic() + TIMEOUT_S
            while (data < 3 or sync < 3) and time.monotonic() < deadline:
                try:
                    packet = sock.recv(2048)
                except TimeoutError:
                    continue
                vector = packet[18:22]
                if vector == bytes((0, 0, 0, 4)):  # E1.31 data
                    assert packet[125:127] == bytes((0, 255)) and int.from_bytes(packet[109:111], "big") == 63999
                    data += 1
                elif vector == bytes((0, 0, 0, 8)):  # E1.31 extended: synchronisation
                    assert int.from_bytes(packet[45:47], "big") == 63999
                    sync += 1
    finally:
        sock.close()
    assert data >= 3 and sync >= 3, (data, sync)


def test_options_are_checked_at_construction(studio: Rig) -> None:
    rig = parse_rig(TWO_UNIVERSES)
    with pytest.raises(DriverError, match="sync universe 2"):
        SacnLights(list(rig.lights), options(rig, sacn_sync_universe="2"))
    with pytest.raises(DriverError, match="sacn_bind_port"):
        SacnLights(list(studio.lights), options(studio, sacn_bind_port="http"))
    with pytest.raises(DriverError, match="sacn_fixed_values"):
        SacnLights(list(studio.lights), options(studio, sacn_fixed_values="128,300"))
    s = SacnSettings.from_extra({})
    assert (s.bind_address, s.bind_port, s.destination, s.sync_universe) == ("0.0.0.0", 5568, None, 63999)
    assert s.universe_discovery
    assert not SacnSettings.from_extra({"sacn_destination": HOST}).universe_discovery  # no broadcast when unicast
    three = SacnLights(list(rig.lights), options(rig, sacn_fixed_values="10,20"))
    assert three.dmx_frames({})[2][509:512] == (0, 10, 20)
