"""Drive GPhoto2Camera against libgphoto2's virtual camera in this (fresh) process; print a JSON result.

Run by tests/rigs/test_gphoto2_camera.py as ``python vcamera_worker.py SCENARIO`` with the environment
of ``virtual_camera_env(jpeg_dir)`` already set, the way a capture worker process is started. The last
stdout line is ``RESULT <json>``.
"""

from __future__ import annotations

import base64
import json
import sys

from rigs.drivers import DriverError, DriverOptions, ShotRequest, camera_driver
from rigs.drivers.gphoto2_camera import ANY_SERIAL_OPTION, GPhoto2Camera
from rigs.rigfile import LIBRARY_DIR, SettingsProfile, load_rig

#: values the virtual camera offers (it has no ISO, white balance or image quality: those are reported missing)
VALID = SettingsProfile(shutter="1/200", aperture="f/11", iso=200, white_balance="Flash", image_format="640x480")


class ExitSpy:
    """Wraps the driver's gphoto2 Camera and records the settings the camera holds when it is exited."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.at_exit: dict[str, str] | None = None

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def exit(self):
        self.at_exit = {n: str(self._inner.get_single_config(n).get_value()) for n in ("shutterspeed", "f-number")}
        return self._inner.exit()


def error_facts(e: DriverError) -> dict:
    return {"type": type(e).__name__, "message": str(e), "transient": e.transient,
            "disconnected": e.disconnected, **{k: getattr(e, k, None) for k in
                                               ("setting", "widget", "requested", "choices", "found")}}


def catch(fn) -> dict | None:
    try:
        fn()
    except DriverError as e:
        return error_facts(e)
    return None


def setup(**spec_changes):
    rig = load_rig(LIBRARY_DIR / "studio-gphoto2-48.toml")
    spec = rig.camera_specs[0].model_copy(update=spec_changes)
    return rig, spec


def session() -> dict:
    rig, spec = setup()
    cam = camera_driver(spec, DriverOptions(rig=rig, extra={ANY_SERIAL_OPTION: "1"}))
    out: dict = {"driver": type(cam).__name__}
    cam.open()
    spy = cam._camera = ExitSpy(cam._camera)
    out["opened"] = {"port": cam.port, "model": cam.model, "serial": cam.serial}
    out["initial"] = cam.read_settings()
    out["studio_profile"] = cam.configure(rig.model.profiles["body"])
    out["after_studio_profile"] = cam.read_settings()
    out["configured"] = cam.configure(VALID)
    out["read_back"] = cam.read_settings()
    out["bad_aperture"] = catch(lambda: cam.configure(VALID.model_copy(update={"aperture": "f/1.4",
                                                                                "shutter": "1/100"})))
    out["bad_shutter"] = catch(lambda: cam.configure(VALID.model_copy(update={"shutter": "1/8000"})))
    out["read_only_size"] = catch(lambda: cam.configure(VALID.model_copy(update={"image_format": "1024x768"})))
    out["after_errors"] = cam.read_settings()
    out["fetch_without_trigger"] = catch(cam.fetch)
    shots = []
    for frame in range(2):
        info = cam.trigger(ShotRequest(take_id="t1", kind="stills", frame=frame, step="flat"))
        got = cam.fetch()
        shots.append({"time": info.time, "exposure_s": info.exposure_s, "ext": got.ext,
                      "download_s": got.download_s, "data": base64.b64encode(got.data).decode()})
    out["shots"] = shots
    out["fetch_twice"] = catch(cam.fetch)
    h = cam.health()
    out["health"] = {"connected": h.connected, "battery_pct": h.battery_pct,
                     "storage_free_bytes": h.storage_free_bytes, "message": h.message}
    cam.close()
    out["at_exit"] = spy.at_exit
    cam.close()  # idempotent
    h = cam.health()
    out["health_closed"] = {"connected": h.connected, "message": h.message}
    out["trigger_closed"] = catch(lambda: cam.trigger(ShotRequest(take_id="t1", kind="stills", frame=9)))
    return out


def wrong_serial() -> dict:
    rig, spec = setup()
    cam = GPhoto2Camera(spec, DriverOptions(rig=rig))
    return {"error": catch(cam.open), "is_open": cam.is_open}


def by_address() -> dict:
    rig, spec = setup(serial=None, address="usb:001,001")
    out: dict = {}
    cam = GPhoto2Camera(spec, DriverOptions(rig=rig))
    spy = None
    try:
        with cam:
            spy = cam._camera = ExitSpy(cam._camera)
            out["opened"] = {"port": cam.port, "serial": cam.serial}
            out["configured"] = cam.configure(VALID)
            raise KeyboardInterrupt  # Ctrl-C in the middle of a take
    except KeyboardInterrupt:
        out["interrupted"] = True
    out["is_open_after"] = cam.is_open
    out["at_exit"] = spy.at_exit if spy else None
    _, spec = setup(address="usb:001,001")  # the port holds a camera, but not the rig's serial
    out["wrong_serial_on_port"] = catch(GPhoto2Camera(spec, DriverOptions(rig=rig)).open)
    _, spec = setup(address="usb:009,009")
    out["empty_port"] = catch(GPhoto2Camera(spec, DriverOptions(rig=rig)).open)
    return out


if __name__ == "__main__":
    result = {"session": session, "wrong_serial": wrong_serial, "by_address": by_address}[sys.argv[1]]()
    print("RESULT " + json.dumps(result))
