"""ChArUco corner detection for calibration takes.

OpenCV 4.10's ``CharucoDetector`` finds the board and interpolates its inner
corners, but reports them about 0.45 px right of and below the true saddle
points (it does so on its own generated board images too, see
``tests/rigs/test_studio.py``). Every detection is therefore refined with
``cv2.cornerSubPix`` in a window sized from the detected corner spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rigs.rigfile import BoardSpec


@dataclass(frozen=True)
class BoardDetection:
    """Corners of one board seen in one image: ids into the board's corners, pixels (OpenCV convention)."""

    ids: np.ndarray  # [N] int
    corners: np.ndarray  # [N, 2] float64 pixels


def make_board(spec: BoardSpec) -> cv2.aruco.CharucoBoard:
    d = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, spec.dictionary))
    return cv2.aruco.CharucoBoard(tuple(spec.squares), spec.square, spec.marker, d)


def board_corners(board: cv2.aruco.CharucoBoard) -> np.ndarray:
    """Inner corners in board coordinates, [N, 3] metres (x right, y down, z into the board)."""
    return np.asarray(board.getChessboardCorners(), dtype=np.float64)


def detect_board(gray: np.ndarray, board: cv2.aruco.CharucoBoard, min_corners: int = 6,
                 detector: cv2.aruco.CharucoDetector | None = None) -> BoardDetection | None:
    """The board's corners in a grayscale image, refined to sub-pixel; None when too few are seen."""
    detector = detector or cv2.aruco.CharucoDetector(board)
    corners, ids, _, _ = detector.detectBoard(gray)
    if ids is None or len(ids) < min_corners:
        return None
    ids = ids.ravel().astype(int)
    pts = corners.reshape(-1, 2).astype(np.float32)
    win = _window(pts, ids, board)
    refined = cv2.cornerSubPix(gray, pts.reshape(-1, 1, 2).copy(), (win, win), (-1, -1),
                               (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_COUNT, 50, 1e-4)).reshape(-1, 2)
    # a refinement that wandered off (e.g. onto a marker edge) keeps the detector's corner (+ its offset)
    moved = np.linalg.norm(refined - pts, axis=1)
    bad = moved > max(1.5, 0.5 * win)
    refined[bad] = pts[bad] - 0.45
    return BoardDetection(ids, refined.astype(np.float64))


def _window(pts: np.ndarray, ids: np.ndarray, board: cv2.aruco.CharucoBoard) -> int:
    """Half window for cornerSubPix: about a third of the smallest square seen, 2..6 px."""
    cols = board.getChessboardSize()[0] - 1
    pos = {int(i): p for i, p in zip(ids, pts)}
    spacing = [np.linalg.norm(pos[i] - pos[i + 1]) for i in pos if i + 1 in pos and (i + 1) % cols != 0]
    if not spacing:
        return 3
    return int(np.clip(np.min(spacing) * 0.3, 2, 6))
