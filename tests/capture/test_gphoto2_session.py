"""A take on gphoto2 cameras through the orchestrator, against libgphoto2's virtual PTP camera:
one worker process per camera, the settings guard applying the rig's profile."""

from __future__ import annotations

import cv2
import numpy as np

from capture.consent import add_consent
from capture.orchestrator import CaptureOptions, run_take
from capture.session import Session
from rigs.drivers.gphoto2_camera import virtual_camera_env
from tests.capture.conftest import consent

RIG = """
[rig]
name = "two-dslrs"

[profiles.body]
shutter = "1/200"
aperture = "f/11"

[[cameras]]
id = "camA"
driver = "gphoto2"
serial = "0001"
resolution = [640, 480]
focal_mm = 35.0
position = [0.0, -3.0, 1.0]
profile = "body"

[[cameras]]
id = "camB"
driver = "gphoto2"
serial = "0002"
resolution = [640, 480]
focal_mm = 35.0
position = [0.0, 3.0, 1.0]
profile = "body"
"""


def test_stills_on_virtual_ptp_cameras(tmp_path):
    jpegs = tmp_path / "vcamera"
    jpegs.mkdir()
    img = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8), (0, 0), 1)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    (jpegs / "shot.jpg").write_bytes(data)
    rig_file = tmp_path / "rig.toml"
    rig_file.write_text(RIG)
    s = Session.create(tmp_path / "s", rig_file, "subj-001")
    add_consent(s.path, consent())
    env = {f"env.{k}": v for k, v in virtual_camera_env(jpegs).items()}
    opts = CaptureOptions(extra={**env, "gphoto2_any_serial": "1"}, start_method="spawn")
    rec = run_take(s, "stills", opts)
    assert rec.status == "complete" and set(rec.captured) == {"camA", "camB"}
    for cam in ("camA", "camB"):
        r = rec.captured[cam][0]
        assert (s.path / r.path).read_bytes() == data  # the file the camera "shot", byte for byte
        assert r.exposure_s == 1 / 200
    settings = Session.open(s.path).manifest.settings
    assert settings["camA"]["shutter"] == "1/200" and settings["camA"]["aperture"] == "f/11"
