"""GPhoto2Camera: value matching and error mapping in this process; end to end against libgphoto2's
virtual PTP camera, each scenario in a fresh worker process (libgphoto2 loads its port drivers once per
process, so the virtual camera's environment must be set before the process starts).

The virtual camera ("GP VC", autodetected as a Nikon D750 on usb:001,001, serial "0.1") has shutterspeed
(decimal seconds), f-number and a read-only imagesize, a battery level (50 %) and storage info; it has no
ISO, white balance or image quality, and every capture returns the same JPEG of its folder.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import gphoto2 as gp
import numpy as np
import pytest

from rigs.drivers import CameraDriver, DriverError, DriverOptions, camera_driver
from rigs.drivers import gphoto2_camera as g
from rigs.rigfile import LIBRARY_DIR, load_rig

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).parent / "data" / "gphoto2" / "vcamera_worker.py"

VC_SHUTTER = ["1.0000s", "0.1000s", "0.0500s", "0.0200s", "0.0100s", "0.0050s", "0.0025s", "0.0012s", "0.0001s"]
VC_APERTURE = ["f/2.8", "f/3.5", "f/4", "f/4.5", "f/5", "f/5.6", "f/6.3", "f/7.1", "f/8", "f/9", "f/10", "f/11",
               "f/13", "f/14", "f/16", "f/18", "f/20", "f/22"]


@pytest.fixture(scope="module")
def rig():
    return load_rig(LIBRARY_DIR / "studio-gphoto2-48.toml")


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> Path:
    """Three small JPEGs of distinct content: what the virtual camera captures."""
    folder = tmp_path_factory.mktemp("vcamera")
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # [H, W, 3]
        cv2.putText(img, str(i), (20, 38), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 3)
        assert cv2.imwrite(str(folder / f"shot{i}.jpg"), img)
    return folder


def run_worker(scenario: str, jpeg_dir: Path) -> dict:
    env = {**os.environ, **g.virtual_camera_env(jpeg_dir), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(WORKER), scenario], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, proc.stdout + proc.stderr
    return json.loads(results[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def session(jpeg_dir) -> dict:
    t0 = time.time()
    out = run_worker("session", jpeg_dir)
    out["_window"] = (t0, time.time())
    return out


# ------------------------------------------------------------------ end to end (virtual camera)


def test_opens_the_single_virtual_camera_with_any_serial(session):
    assert session["driver"] == "GPhoto2Camera"
    assert session["opened"] == {"port": "usb:001,001", "model": "Nikon DSC D750", "serial": "0.1"}
    # only the settings the camera has, in the profile's spelling
    assert session["initial"] == {"shutter": "1/100", "aperture": "f/2.8", "image_format": "640x480"}


def test_configure_reads_back_and_reports_missing_settings(session):
    assert session["configured"] == {"shutter": "1/200", "aperture": "f/11", "iso": None, "white_balance": None,
                                     "image_format": "640x480"}
    assert session["read_back"] == {"shutter": "1/200", "aperture": "f/11", "image_format": "640x480"}
    # the studio's real profile: "JPEG Fine" is no image size, so image_format is missing too, not an error
    assert session["studio_profile"] == {"shutter": "1/200", "aperture": "f/11", "iso": None,
                                         "white_balance": None, "image_format": None}
    assert session["after_studio_profile"] == {"shutter": "1/200", "aperture": "f/11"}


def test_values_the_camera_cannot_take_raise_and_change_nothing(session):
    bad = session["bad_aperture"]
    assert bad["type"] == "SettingChoiceError" and not bad["transient"]
    assert (bad["setting"], bad["widget"], bad["requested"]) == ("aperture", "f-number", "f/1.4")
    assert bad["choices"] == VC_APERTURE
    assert "aperture" in bad["message"] and "'f/1.4'" in bad["message"] and "f/2.8, f/3.5" in bad["message"]
    shutter = session["bad_shutter"]
    assert (shutter["setting"], shutter["requested"], shutter["choices"]) == ("shutter", "1/8000", VC_SHUTTER)
    ro = session["read_only_size"]
    assert ro["setting"] == "image_format" and ro["widget"] == "imagesize" and "read-only" in ro["message"]
    # checked before anything was set: the shutter of the rejected profile (1/100) was not applied
    assert session["after_errors"] == session["read_back"]


def test_trigger_and_fetch_return_the_virtual_cameras_jpegs(session, jpeg_dir):
    sources = {p.read_bytes(): p for p in jpeg_dir.iterdir()}
    t_start, t_end = session["_window"]
    shots = session["shots"]
    assert len(shots) == 2
    for shot in shots:
        data = base64.b64decode(shot["data"])
        assert data in sources, "fetched bytes are not one of VCAMERADIR's files"
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(img, cv2.imread(str(sources[data])))
        assert shot["ext"] == "jpg"
        assert t_start <= shot["time"] <= t_end
        assert 0.0 <= shot["download_s"] < 5.0
        assert shot["exposure_s"] == pytest.approx(1 / 200)
    assert shots[0]["time"] < shots[1]["time"]
    assert session["fetch_without_trigger"]["message"].endswith("fetch without a trigger")
    assert session["fetch_twice"] is not None  # a capture is fetched once


def test_health_reports_battery_and_storage(session):
    assert session["health"] == {"connected": True, "battery_pct": 50.0,
                                 "storage_free_bytes": session["health"]["storage_free_bytes"], "message": ""}
    assert session["health"]["storage_free_bytes"] > 100 * 2**20
    assert session["health_closed"] == {"connected": False, "message": "not open"}


def test_close_restores_the_settings_found_at_open(session):
    assert session["at_exit"] == {"shutterspeed": "0.0100s", "f-number": "f/2.8"}
    closed = session["trigger_closed"]
    assert closed["type"] == "DriverError" and "not open" in closed["message"] and not closed["transient"]


def test_wrong_serial_lists_the_serials_found(jpeg_dir):
    out = run_worker("wrong_serial", jpeg_dir)
    err = out["error"]
    assert err["type"] == "CameraNotFoundError" and not err["transient"]
    assert err["message"].startswith("cam01: ") and "'3041700'" in err["message"]
    assert "usb:001,001=0.1" in err["message"]
    assert err["found"] == {"usb:001,001": "0.1"}
    assert out["is_open"] is False


def test_by_address_context_manager_restores_on_ctrl_c(jpeg_dir):
    out = run_worker("by_address", jpeg_dir)
    assert out["opened"] == {"port": "usb:001,001", "serial": "0.1"}
    assert out["configured"]["aperture"] == "f/11"
    assert out["interrupted"] and out["is_open_after"] is False
    assert out["at_exit"] == {"shutterspeed": "0.0100s", "f-number": "f/2.8"}
    wrong = out["wrong_serial_on_port"]
    assert wrong["type"] == "CameraNotFoundError"
    assert "'3041700'" in wrong["message"] and "'0.1'" in wrong["message"]
    empty = out["empty_port"]
    assert empty["disconnected"] and "usb:009,009" in empty["message"] and "usb:001,001" in empty["message"]


# ------------------------------------------------------------------ in process (no camera is touched)


@pytest.mark.parametrize("field, requested, choices, expected", [
    ("shutter", "1/200", ["1/250", "1/200s", "1/160"], "1/200s"),
    ("shutter", "1/200", VC_SHUTTER, "0.0050s"),
    ("shutter", "1/800", VC_SHUTTER, "0.0012s"),
    ("shutter", "1/8000", VC_SHUTTER, None),
    ("shutter", "1/125", VC_SHUTTER, None),
    ("shutter", "2", ['2.5"', '2"', '1"6'], '2"'),
    ("shutter", "1.3", ['1"3', '1"6'], '1"3'),
    ("shutter", "Bulb", ["bulb", "30"], "bulb"),
    ("aperture", "f/11", ["8", "11", "13"], "11"),
    ("aperture", "f/11", ["f8", "f11"], "f11"),
    ("aperture", "11", VC_APERTURE, "f/11"),
    ("aperture", "f/7.1", ["7.1", "8.0"], "7.1"),
    ("aperture", "f/1.4", VC_APERTURE, None),  # not "f/14"
    ("iso", "200", ["Auto", "100", "200"], "200"),
    ("iso", "200", ["ISO 100", "ISO 200"], "ISO 200"),
    ("iso", "2000", ["200", "20000"], None),
    ("white_balance", "Flash", ["Auto", "Daylight", "Flash"], "Flash"),
    ("white_balance", "Daylight", ["Auto", "Sunny", "Cloudy"], "Sunny"),
    ("white_balance", "Flash", ["Auto", "Daylight"], None),
    ("image_format", "JPEG Fine", ["NEF (Raw)", "JPEG Basic", "JPEG Normal", "JPEG Fine", "NEF+Fine"],
     "JPEG Fine"),
    ("image_format", "JPEG Fine", ["Large Fine JPEG", "Large Normal JPEG", "Medium Fine JPEG", "RAW"],
     "Large Fine JPEG"),
    ("image_format", "640x480", ["640x480", "1024x768"], "640x480"),
    ("image_format", "JPEG Fine", ["640x480", "1024x768"], None),
])
def test_choose_value(field, requested, choices, expected):
    assert g.choose_value(field, requested, choices) == expected


@pytest.mark.parametrize("field, raw, shown", [
    ("shutter", "0.0050s", "1/200"), ("shutter", "0.0012s", "1/833"), ("shutter", "1.0000s", "1"),
    ("shutter", "1/200", "1/200"), ("shutter", "30", "30"), ("shutter", "Bulb", "Bulb"),
    ("aperture", "11", "f/11"), ("aperture", "f/5.6", "f/5.6"), ("aperture", "implicit auto", "implicit auto"),
    ("iso", "ISO 200", "200"), ("iso", "Auto", "Auto"),
    ("white_balance", "Sunny", "Daylight"), ("image_format", "640 x 480", "640x480"),
])
def test_display_value(field, raw, shown):
    assert g.display_value(field, raw) == shown


@pytest.mark.parametrize("code, transient, disconnected", [
    (gp.GP_ERROR_IO, True, False), (gp.GP_ERROR_TIMEOUT, True, False), (gp.GP_ERROR_CAMERA_BUSY, True, False),
    (gp.GP_ERROR_IO_USB_CLAIM, True, False), (gp.GP_ERROR_IO_USB_FIND, False, True),
    (gp.GP_ERROR_UNKNOWN_PORT, False, True), (gp.GP_ERROR_MODEL_NOT_FOUND, False, True),
    (gp.GP_ERROR_NOT_SUPPORTED, False, False), (gp.GP_ERROR_NO_SPACE, False, False),
])
def test_gphoto2_errors_map_to_driver_errors(code, transient, disconnected):
    err = g.driver_error(gp.GPhoto2Error(code), "capture", "cam07")
    assert isinstance(err, DriverError)
    assert (err.transient, err.disconnected) == (transient, disconnected)
    assert (err.camera, err.driver) == ("cam07", "gphoto2")
    assert str(err).startswith("cam07: capture: gphoto2 error") and str(code) in str(err)


def test_registry_builds_an_unopened_driver(rig):
    cam = camera_driver(rig.camera_specs[0], DriverOptions(rig=rig))
    assert isinstance(cam, g.GPhoto2Camera) and isinstance(cam, CameraDriver)
    assert not cam.is_open
    assert cam.health().connected is False
    with pytest.raises(DriverError, match="not open"):
        cam.read_settings()
    cam.close()  # closing an unopened driver is fine


def test_numeric_address_is_refused_before_any_usb_access(rig):
    spec = rig.camera_specs[0].model_copy(update={"address": 3})
    with pytest.raises(DriverError, match="usb:001,004") as info:
        g.GPhoto2Camera(spec, DriverOptions(rig=rig)).open()
    assert not info.value.transient


def test_virtual_camera_env(tmp_path, jpeg_dir):
    env = g.virtual_camera_env(jpeg_dir)
    assert env["VCAMERADIR"] == str(jpeg_dir.resolve())
    assert Path(env["IOLIBS"]).name == "vusb" and any(Path(env["IOLIBS"]).glob("vusb*"))
    with pytest.raises(DriverError, match="no .jpg"):
        g.virtual_camera_env(tmp_path)
