"""Studio hardware and geometry: rig files, camera and light drivers, the virtual studio."""

from rigs.errors import RigError, ShapeError, TwinstudioError

__all__ = ["RigError", "ShapeError", "TwinstudioError"]
