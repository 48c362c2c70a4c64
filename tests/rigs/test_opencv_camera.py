"""OpenCV cameras on a synthetic video file: frame order and content, end of video, errors, lifecycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from rigs.drivers import CameraDriver, DriverError, DriverOptions, ShotRequest, camera_driver  # noqa: E402
from rigs.drivers.opencv_camera import OpenCVCamera, format_shutter, parse_shutter  # noqa: E402
from rigs.rigfile import Rig, parse_rig  # noqa: E402

W, H, N = 160, 120, 10


def levels(k: int) -> int:
    """Grey level of frame k: far apart, so JPEG round trips cannot confuse neighbours."""
    return 20 + 22 * k


def frame(k: int) -> np.ndarray:
    """Frame k: grey level levels(k), with a white bar whose position also encodes k."""
    img = np.full((H, W, 3), levels(k), np.uint8)
    img[:, 8 + 14 * k: 14 + 14 * k] = 255
    return img


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "take.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (W, H))
    assert writer.isOpened()
    for k in range(N):
        writer.write(frame(k))
    writer.release()
    return path


def rig_for(address: str, fmt: str = "jpg") -> Rig:
    text = f"""
[rig]
name = "one-file"

[profiles.stills]
shutter = "1/125"

[[cameras]]
id = "filecam"
driver = "opencv"
address = "{address}"
resolution = [{W}, {H}]
focal_mm = 4.0
sensor_mm = [4.8, 3.6]
position = [0, -2, 1]
profile = "stills"
format = "{fmt}"
"""
    return parse_rig(text)  # the camera looks at the volume's centre by default: it sees the volume


def camera(address: str | Path, fmt: str = "jpg") -> OpenCVCamera:
    rig = rig_for(str(address), fmt)
    cam = camera_driver(rig.camera_specs[0], DriverOptions(rig=rig))
    assert isinstance(cam, OpenCVCamera) and isinstance(cam, CameraDriver)
    return cam


def shot(k: int) -> ShotRequest:
    return ShotRequest(take_id="t1", kind="stills", frame=k)


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (H, W, 3)
    return img


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_every_frame_in_order_then_end_of_video(video: Path, fmt: str) -> None:
    cam = camera(video, fmt)
    assert cam.kind == "file"
    with cam:
        cam.configure(cam.options.rig.model.profiles["stills"])  # no exposure control on a file: ignored
        assert cam.read_settings() == {"resolution": f"{W}x{H}"}
        previous = 0.0
        for k in range(N):
            info = cam.trigger(shot(k))
            assert info.exposure_s is None and info.time >= previous
            previous = info.time
            got = cam.fetch()
            assert got.ext == fmt and got.download_s >= 0
            assert got.data.startswith(b"\xff\xd8" if fmt == "jpg" else b"\x89PNG")
            assert cam.fetch() is got  # fetching again returns the same file
            img = decode(got.data)
            background = img[:, 150:]  # right of every bar
            # mean brightness of the background identifies the frame (neighbours are 22 apart)
            assert abs(float(background.mean()) - levels(k)) < 6, (k, background.mean())
            # the bar sits where frame k put it
            assert float(img[:, 9 + 14 * k: 13 + 14 * k].mean()) > 230
            assert abs(float(img.mean()) - float(frame(k).mean())) < 4
        with pytest.raises(DriverError, match="end of video") as err:
            cam.trigger(shot(N))
        assert err.value.camera == "filecam" and not err.value.transient
        with pytest.raises(DriverError, match="without a trigger"):
            cam.fetch()
        assert cam.health().connected


def test_missing_file_fails_at_open_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "take.avi"
    cam = camera(missing)
    with pytest.raises(DriverError) as err:
        cam.open()
    assert str(missing) in str(err.value) and "filecam" in str(err.value)
    assert err.value.camera == "filecam" and not err.value.transient
    assert not cam.health().connected
    cam.close()  # closing a camera that never opened is fine


def test_unreadable_file_is_disconnected(tmp_path: Path) -> None:
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video at all" * 10)
    cam = camera(junk)
    with pytest.raises(DriverError, match="cannot open") as err:
        cam.open()
    assert err.value.disconnected


def test_health_close_and_context_manager(video: Path) -> None:
    cam = camera(video)
    assert cam.health().connected is False
    with pytest.raises(DriverError, match="not open"):
        cam.trigger(shot(0))
    with pytest.raises(RuntimeError):
        with cam:
            assert cam.health().connected
            cam.open()  # opening twice is a no-op
            cam.trigger(shot(0))
            raise RuntimeError("worker crashed")
    health = cam.health()
    assert not health.connected and health.message == "not open"
    cam.close()
    cam.close()  # idempotent
    with cam:  # reopens from the first frame
        cam.trigger(shot(0))
        assert abs(float(decode(cam.fetch().data)[:, 150:].mean()) - levels(0)) < 6
        assert cam.last_trigger is not None


def test_addresses_and_options(video: Path) -> None:
    rig = rig_for(str(video))
    spec = rig.camera_specs[0]
    for address, kind, value in [(0, "device", 0), ("2", "device", 2), ("/dev/video4", "device", "/dev/video4"),
                                 ("rtsp://127.0.0.1/cam", "stream", "rtsp://127.0.0.1/cam"),
                                 (str(video), "file", str(video))]:
        cam = OpenCVCamera(spec.model_copy(update={"address": address}), DriverOptions(rig=rig))
        assert (cam.kind, cam.address) == (kind, value)
    # a relative path is found beside the rig file
    rig_beside = parse_rig(_toml_with("take.avi"), video.parent / "rig.toml")
    cam = OpenCVCamera(rig_beside.camera_specs[0], DriverOptions(rig=rig_beside))
    assert cam.address == str(video)
    with pytest.raises(DriverError, match="opencv_backend"):
        OpenCVCamera(spec, DriverOptions(rig=rig, extra={"opencv_backend": "NOPE"}))
    assert parse_shutter("1/125") == pytest.approx(0.008) and parse_shutter('2"') == 2.0
    assert parse_shutter("fast") is None and format_shutter(1 / 200) == "1/200" and format_shutter(2.0) == "2"


def _toml_with(address: str) -> str:
    return f"""
[rig]
name = "beside"

[[cameras]]
id = "filecam"
driver = "opencv"
address = "{address}"
resolution = [{W}, {H}]
focal_mm = 4.0
sensor_mm = [4.8, 3.6]
position = [0, -2, 1]
"""


class FakeDevice:
    """Stands in for cv2.VideoCapture on a V4L2 webcam: 3 frames already buffered, then 30 fps live."""

    def __init__(self, address, api=None) -> None:
        self.address = address
        self.props = {cv2.CAP_PROP_EXPOSURE: 157.0, cv2.CAP_PROP_AUTO_EXPOSURE: 3.0, cv2.CAP_PROP_FPS: 30.0,
                      cv2.CAP_PROP_FRAME_WIDTH: 640.0, cv2.CAP_PROP_FRAME_HEIGHT: 480.0}
        self.buffered = 3
        self.grabs = 0
        self.opened = True
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def getBackendName(self) -> str:  # noqa: N802
        return "V4L2"

    def get(self, prop: int) -> float:
        return self.props.get(prop, 0.0)

    def set(self, prop: int, value: float) -> bool:
        self.props[prop] = value
        return True

    def grab(self) -> bool:
        self.grabs += 1
        if self.buffered:
            self.buffered -= 1
        else:
            import time
            time.sleep(1 / 30)
        return self.opened

    def retrieve(self):
        return True, frame(self.grabs % N)

    def release(self) -> None:
        self.released = True
        self.opened = False


def test_live_device_drops_stale_frames_sets_and_restores_exposure(monkeypatch: pytest.MonkeyPatch) -> None:
    devices: list[FakeDevice] = []

    def make(address, api=None):
        devices.append(FakeDevice(address, api))
        return devices[-1]

    monkeypatch.setattr(cv2, "VideoCapture", make)
    rig = rig_for("0")
    with OpenCVCamera(rig.camera_specs[0], DriverOptions(rig=rig)) as cam:
        dev = devices[0]
        assert cam.kind == "device" and dev.address == 0
        assert cam.read_settings() == {"resolution": f"{W}x{H}"}  # the requested resolution was set
        cam.configure(rig.model.profiles["stills"])
        assert dev.props[cv2.CAP_PROP_AUTO_EXPOSURE] == 1.0 and dev.props[cv2.CAP_PROP_EXPOSURE] == 80
        assert cam.read_settings()["shutter"] == "1/125"
        info = cam.trigger(shot(0))
        assert dev.grabs == 4  # three buffered frames dropped, then a fresh one
        assert info.exposure_s == pytest.approx(0.008)
        assert abs(float(decode(cam.fetch().data)[:, 150:].mean()) - levels(4)) < 6
        dev.opened = False  # unplugged
        with pytest.raises(DriverError) as err:
            cam.trigger(shot(1))
        assert err.value.disconnected
        assert not cam.health().connected
    assert dev.released
    assert dev.props[cv2.CAP_PROP_AUTO_EXPOSURE] == 3.0 and dev.props[cv2.CAP_PROP_EXPOSURE] == 157.0
