"""How many cameras see each part of the capture volume.

The capture volume (an upright cylinder standing on ``z = 0``, see
:class:`rigs.rigfile.Volume`) is cut into height bands x azimuth sectors. Each
cell is a patch of the cylinder's side surface; a camera *sees* a cell when at
least ``min_fraction`` of the cell's sample points project inside its image in
front of it and face it (outward surface normal towards the camera centre).
Occlusion by the subject is ignored: this is a check of the rig's layout,
made from the nominal camera poses in the rig file.

Azimuth is measured in degrees around the volume's axis, counter-clockwise
seen from above, from the world +x axis (``atan2(y, x)``), in ``[0, 360)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rigs.geometry import Camera, distort, undistort

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rigs.rigfile import Rig


@dataclass(frozen=True, eq=False)
class Coverage:
    """Cameras per cell of the capture volume's surface.

    Cell ``[i, j]`` is height band ``band_edges_m[i]..band_edges_m[i+1]``
    (metres above the floor) and azimuth sector
    ``sector_edges_deg[j]..sector_edges_deg[j+1]`` (degrees).
    """

    counts: np.ndarray  # [n_height, n_azimuth] int: cameras seeing each cell
    band_edges_m: np.ndarray  # [n_height + 1] metres, 0 .. volume height
    sector_edges_deg: np.ndarray  # [n_azimuth + 1] degrees, 0 .. 360
    min_count: int  # the smallest entry of ``counts``
    cameras_per_cell: list[list[list[str]]]  # [n_height][n_azimuth] camera ids, rig order

    @property
    def shape(self) -> tuple[int, int]:
        """(n_height, n_azimuth)."""
        return (int(self.counts.shape[0]), int(self.counts.shape[1]))


def _cell_samples(center: tuple[float, float], radius: float, band_edges: np.ndarray,
                  sector_edges_rad: np.ndarray, samples: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Sample points and outward normals on the cylinder surface of every cell.

    Returns points [n_height, n_azimuth, S, 3] and normals of the same shape,
    S = samples[0] * samples[1] (a grid including the cell's edges).
    """
    sz, sa = samples
    fz = np.linspace(0.0, 1.0, sz)  # [sz]
    fa = np.linspace(0.0, 1.0, sa)  # [sa]
    z0, z1 = band_edges[:-1], band_edges[1:]  # [H]
    a0, a1 = sector_edges_rad[:-1], sector_edges_rad[1:]  # [A]
    z = z0[:, None] + (z1 - z0)[:, None] * fz[None, :]  # [H, sz]
    a = a0[:, None] + (a1 - a0)[:, None] * fa[None, :]  # [A, sa]
    H, A = len(z0), len(a0)
    zz = np.broadcast_to(z[:, None, :, None], (H, A, sz, sa)).reshape(H, A, sz * sa)
    aa = np.broadcast_to(a[None, :, None, :], (H, A, sz, sa)).reshape(H, A, sz * sa)
    normals = np.stack([np.cos(aa), np.sin(aa), np.zeros_like(aa)], axis=-1)  # [H, A, S, 3]
    points = normals * radius
    points[..., 0] += center[0]
    points[..., 1] += center[1]
    points[..., 2] = zz
    return points, normals


def _max_field_radius(cam: Camera) -> float:
    """Largest undistorted normalised radius a point may have to count as in view.

    Guards against points far outside the field of view that the distortion
    polynomial folds back into the image: the limit is the smaller of the
    image corners' undistorted radius (+1 %) and the radius where the radial
    distortion stops being monotonic. ``inf`` when neither applies.
    """
    intr = cam.intrinsics
    k1, k2, _, _, k3 = (float(v) for v in intr.dist)
    r = np.linspace(0.0, 4.0, 4001)[1:]
    r2 = r * r
    slope = 1.0 + r2 * (3.0 * k1 + r2 * (5.0 * k2 + r2 * 7.0 * k3))  # d(r * radial) / dr
    fold = float(r[np.argmax(slope <= 0.0)]) if np.any(slope <= 0.0) else float("inf")
    corners = np.array([[-0.5, -0.5], [intr.width - 0.5, -0.5],
                        [-0.5, intr.height - 0.5], [intr.width - 0.5, intr.height - 0.5]])
    xy_d = np.stack([(corners[:, 0] - intr.cx) / intr.fx, (corners[:, 1] - intr.cy) / intr.fy], axis=-1)
    with np.errstate(all="ignore"):
        xy = undistort(xy_d, intr.dist_array)
        ok = np.all(np.isfinite(xy)) and np.allclose(distort(xy, intr.dist_array), xy_d, atol=1e-9)
    corner = float(np.linalg.norm(xy, axis=1).max()) * 1.01 if ok else float("inf")
    return min(fold, corner)


def _visible(cam: Camera, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Which points [N, 3] (with normals [N, 3]) ``cam`` sees; bool [N]."""
    intr = cam.intrinsics
    pc = cam.pose.transform(points)  # [N, 3]
    z = pc[:, 2]
    front = z > 1e-9
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.linalg.norm(pc[:, :2], axis=1) / np.where(front, z, 1.0)
        uv, _ = cam.project(points)
    in_fov = r <= _max_field_radius(cam)
    in_image = ((uv[:, 0] >= -0.5) & (uv[:, 0] < intr.width - 0.5)
                & (uv[:, 1] >= -0.5) & (uv[:, 1] < intr.height - 0.5))
    facing = np.einsum("ij,ij->i", normals, cam.pose.center[None, :] - points) > 0.0
    return front & in_fov & in_image & facing


def volume_coverage(rig: Rig, n_height: int = 4, n_azimuth: int = 8, *,
                    samples: tuple[int, int] = (4, 4), min_fraction: float = 0.9) -> Coverage:
    """Count the cameras that see each band x sector cell of the capture volume's surface.

    A camera sees a cell when at least ``min_fraction`` of the cell's
    ``samples`` (heights x azimuths, edges included) surface points lie in
    front of it, inside its image, on the side of the cylinder facing it.
    Uses the nominal cameras ``rig.cameras``; ignores occlusion.
    Returns a :class:`Coverage` (bands in metres, sectors in degrees).
    """
    if n_height < 1 or n_azimuth < 1:
        raise ValueError(f"n_height and n_azimuth must be >= 1, got {n_height}, {n_azimuth}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    if samples[0] < 1 or samples[1] < 1:
        raise ValueError(f"samples must be >= 1 each, got {samples}")
    vol = rig.volume
    band_edges = np.linspace(0.0, float(vol.height), n_height + 1)
    sector_edges_deg = np.linspace(0.0, 360.0, n_azimuth + 1)
    points, normals = _cell_samples((float(vol.center[0]), float(vol.center[1])), float(vol.radius),
                                    band_edges, np.radians(sector_edges_deg), samples)
    H, A, S, _ = points.shape
    flat_p, flat_n = points.reshape(-1, 3), normals.reshape(-1, 3)
    cams = rig.cameras
    sees = np.zeros((len(cams), H, A), dtype=bool)
    for k, cam in enumerate(cams):
        frac = _visible(cam, flat_p, flat_n).reshape(H, A, S).mean(axis=-1)
        sees[k] = frac >= min_fraction - 1e-12
    counts = sees.sum(axis=0).astype(int)
    per_cell = [[[cams[k].id for k in np.flatnonzero(sees[:, i, j])] for j in range(A)] for i in range(H)]
    return Coverage(counts=counts, band_edges_m=band_edges, sector_edges_deg=sector_edges_deg,
                    min_count=int(counts.min()) if counts.size else 0, cameras_per_cell=per_cell)


def coverage_warnings(cov: Coverage, min_views: int = 3) -> list[str]:
    """One line per cell seen by fewer than ``min_views`` cameras, bottom band first.

    E.g. ``"z 0.0–0.5 m, azimuth 90–135°: seen by 1 camera (cam03)"``.
    """
    out: list[str] = []
    H, A = cov.counts.shape
    for i in range(H):
        for j in range(A):
            n = int(cov.counts[i, j])
            if n >= min_views:
                continue
            z0, z1 = cov.band_edges_m[i], cov.band_edges_m[i + 1]
            a0, a1 = cov.sector_edges_deg[j], cov.sector_edges_deg[j + 1]
            ids = cov.cameras_per_cell[i][j]
            who = f" ({', '.join(ids)})" if ids else ""
            out.append(f"z {z0:.1f}–{z1:.1f} m, azimuth {_deg(a0)}–{_deg(a1)}°: "
                       f"seen by {n} camera{'' if n == 1 else 's'}{who}")
    return out


def _deg(a: float) -> str:
    """Degrees for people: ``90``, ``22.5``."""
    return f"{a:.0f}" if abs(a - round(a)) < 0.05 else f"{a:.1f}"
