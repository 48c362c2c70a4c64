"""Camera and light drivers, registered by name.

A rig file names a driver per camera and per light; :func:`camera_driver`
and :func:`light_driver` import the implementation only when it is used, so a
driver whose library is missing does not break the others, and the error
says how to install it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rigs.drivers.base import (CameraDriver, CameraHealth, DriverError, DriverOptions, DriverUnavailable,
                               FetchedFile, LightDriver, ShotRequest, TriggerInfo)
from rigs.rigfile import CAMERA_DRIVERS, LIGHT_DRIVERS, CameraSpec, LightSpec

#: driver name -> (module, factory, install hint)
_CAMERAS = {
    "virtual": ("rigs.drivers.virtual", "VirtualCamera", ""),
    "gphoto2": ("rigs.drivers.gphoto2_camera", "GPhoto2Camera", "pip install gphoto2 (python-gphoto2)"),
    "opencv": ("rigs.drivers.opencv_camera", "OpenCVCamera", "pip install opencv-python-headless"),
}
_LIGHTS = {
    "virtual": ("rigs.drivers.virtual", "VirtualLights", ""),
    "sacn": ("rigs.drivers.sacn_lights", "SacnLights", "pip install sacn"),
}
assert tuple(_CAMERAS) == CAMERA_DRIVERS and tuple(_LIGHTS) == LIGHT_DRIVERS


def _load(table: dict, name: str) -> Callable:
    module, attr, hint = table[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise DriverUnavailable(f"driver {name!r} needs a library that is not installed ({e.name}): {hint}",
                                driver=name) from e
    return getattr(mod, attr)


def camera_driver(spec: CameraSpec, options: DriverOptions) -> CameraDriver:
    """A (not yet opened) driver for one camera of the rig."""
    return _load(_CAMERAS, spec.driver)(spec, options)


def light_driver(name: str, lights: list[LightSpec], options: DriverOptions) -> LightDriver:
    """A (not yet opened) driver for all the rig's lights of driver ``name``."""
    return _load(_LIGHTS, name)(lights, options)


def available_drivers() -> dict[str, str]:
    """Every registered driver with "ok" or why it cannot be used here."""
    out = {}
    for kind, table in (("camera", _CAMERAS), ("light", _LIGHTS)):
        for name in table:
            try:
                _load(table, name)
                out[f"{kind}:{name}"] = "ok"
            except DriverUnavailable as e:
                out[f"{kind}:{name}"] = str(e)
    return out


__all__ = ["CameraDriver", "CameraHealth", "DriverError", "DriverOptions", "DriverUnavailable", "FetchedFile",
           "LightDriver", "ShotRequest", "TriggerInfo", "available_drivers", "camera_driver", "light_driver"]
