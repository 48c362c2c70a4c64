"""The ChArUco calibration board of the virtual studio.

Board coordinates follow OpenCV's ``CharucoBoard``: origin at the board's
top-left outer corner, x along the squares to the right, y down, z into the
board (the printed side faces -z). ``board.getChessboardCorners()`` are the
3D corner positions in this frame. A board pose is board-to-world:
``X_world = R @ X_board + t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from rigs.geometry import Pose
from rigs.rigfile import BoardSpec, Volume

#: texels per square of the generated board image (the finest mip level)
TEXELS_PER_SQUARE = 96


@dataclass(frozen=True)
class ChArUcoBoard:
    """A ChArUco board and its texture pyramid (level 0 = finest)."""

    spec: BoardSpec

    @cached_property
    def cv_board(self) -> cv2.aruco.CharucoBoard:
        d = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, self.spec.dictionary))
        return cv2.aruco.CharucoBoard(tuple(self.spec.squares), self.spec.square, self.spec.marker, d)

    @property
    def size_m(self) -> tuple[float, float]:
        """Width and height of the printed area, metres."""
        return self.spec.squares[0] * self.spec.square, self.spec.squares[1] * self.spec.square

    @cached_property
    def corners(self) -> np.ndarray:
        """Inner chessboard corners in board coordinates, [N, 3] metres."""
        return np.asarray(self.cv_board.getChessboardCorners(), dtype=np.float64)

    @cached_property
    def pyramid(self) -> list[np.ndarray]:
        """Linear-reflectance texture pyramid, each [h, w] float32 in 0.04..0.85."""
        sx, sy = self.spec.squares
        img = self.cv_board.generateImage((sx * TEXELS_PER_SQUARE, sy * TEXELS_PER_SQUARE),
                                          marginSize=0, borderBits=1)
        # matte print: black ink is not 0 and white paper is not 1
        tex = (0.04 + (img.astype(np.float32) / 255.0) * 0.81).astype(np.float32)
        levels = [tex]
        while min(levels[-1].shape) > 8:
            levels.append(cv2.resize(levels[-1], (levels[-1].shape[1] // 2, levels[-1].shape[0] // 2),
                                     interpolation=cv2.INTER_AREA))
        return levels

    def mesh(self, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        """The board as two world-space triangles: vertices [4, 3], triangles [2, 3]."""
        w, h = self.size_m
        local = np.array([[0, 0, 0], [w, 0, 0], [w, h, 0], [0, h, 0]], dtype=np.float64)
        return local @ pose.R.T + pose.t, np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)

    def reflectance(self, xy_board: np.ndarray, footprint_m: np.ndarray) -> np.ndarray:
        """Board reflectance at board points [N, 2] (metres) seen with a pixel footprint [N] (metres).

        Trilinear sampling of the texture pyramid, so that the board is
        filtered like a real lens would: no aliasing, unbiased edges.
        """
        texel = self.spec.square / TEXELS_PER_SQUARE
        lod = np.clip(np.log2(np.maximum(footprint_m / texel, 1e-6)), 0, len(self.pyramid) - 1)
        lo = np.floor(lod).astype(np.int32)
        frac = (lod - lo).astype(np.float32)
        out = np.zeros(len(xy_board), dtype=np.float32)
        for level in np.unique(lo):
            sel = lo == level
            a = _bilinear(self.pyramid[level], xy_board[sel] / (texel * 2**level))
            nxt = min(level + 1, len(self.pyramid) - 1)
            b = _bilinear(self.pyramid[nxt], xy_board[sel] / (texel * 2**nxt))
            out[sel] = a * (1 - frac[sel]) + b * frac[sel]
        return out


def _bilinear(img: np.ndarray, xy_texel: np.ndarray) -> np.ndarray:
    """Sample a 2D image at continuous texel coordinates (texel i spans [i, i+1))."""
    h, w = img.shape
    x = xy_texel[:, 0] - 0.5
    y = xy_texel[:, 1] - 0.5
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx = (x - x0).astype(np.float32)
    fy = (y - y0).astype(np.float32)
    x0c, x1c = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    y0c, y1c = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    top = img[y0c, x0c] * (1 - fx) + img[y0c, x1c] * fx
    bot = img[y1c, x0c] * (1 - fx) + img[y1c, x1c] * fx
    return top * (1 - fy) + bot * fy


def board_poses(board: ChArUcoBoard, volume: Volume, n: int, seed: int = 0, reach: float = 1.8,
                tilt_deg: float = 35.0) -> list[Pose]:
    """``n`` board poses inside the capture volume, as a technician would hold it.

    The board's centre wanders over the stage (up to ``reach`` times the
    volume's radius from its axis, heights 0.5–1.8 m), it turns about the
    vertical axis so that every camera of a ring sees it in several poses, and
    it tilts up to ``tilt_deg``. Walking beyond the capture volume carries the
    board towards the edges of each camera's image, which is what separates a
    camera's principal point from its rotation (boards kept in the volume's
    centre leave ~0.5 px / 0.035 deg of that ambiguity on virtual-ring-24).
    Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    w, h = board.size_m
    poses = []
    for i in range(n):
        yaw = 2 * np.pi * i / n + rng.uniform(-0.3, 0.3)
        tilt = np.radians(rng.uniform(-tilt_deg, tilt_deg))
        roll = np.radians(rng.uniform(-25, 25))
        r = volume.radius * reach * np.sqrt(rng.uniform())
        a = rng.uniform(0, 2 * np.pi)
        centre = np.array([volume.center[0] + r * np.cos(a), volume.center[1] + r * np.sin(a),
                           rng.uniform(0.5, min(1.8, volume.height - 0.2))])
        # printed side (-z of the board) faces the horizontal direction `yaw`
        facing = np.array([np.cos(yaw), np.sin(yaw), 0.0])
        z_b = -facing  # board z points away from the viewer it faces
        x_b = np.cross(np.array([0.0, 0.0, 1.0]), z_b)
        x_b /= np.linalg.norm(x_b)
        y_b = np.cross(z_b, x_b)  # points down
        R = np.stack([x_b, y_b, z_b], axis=1)
        R = R @ _rot_x(tilt) @ _rot_z(roll)
        t = centre - R @ np.array([w / 2, h / 2, 0.0])
        poses.append(Pose(R, t))
    return poses


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _rot_z(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
