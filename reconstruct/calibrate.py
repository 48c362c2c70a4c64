"""Rig calibration from a session's ChArUco takes.

``run_calibrate(session_dir)`` detects the board in every image of the
calibration take, initialises every camera from the rig's lens prior and
``solvePnP``, chains cameras and board poses into one rig frame, and refines
everything jointly — per-camera intrinsics (fx fy cx cy k1 k2 p1 p2 k3),
camera poses and board poses — by a bundle adjustment (``least_squares`` with
a sparse Jacobian), rejecting outlier corners. The result is expressed in the
rig file's frame (a rigid fit of the calibrated camera centres to the rig's
nominal ones; the board fixes the scale). A camera the board never reached is
reported, not invented.

Outputs: ``recon/cameras.json`` and ``recon/colmap/`` (COLMAP text model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import least_squares
from scipy.sparse import lil_matrix

from reconstruct.charuco import BoardDetection, board_corners, detect_board, make_board
from rigs.errors import TwinstudioError
from rigs.fileio import atomic_write_json
from rigs.geometry import Camera, Intrinsics, Pose, rotation_angle_deg
from rigs.rigfile import load_rig

N_INTR = 9  # fx fy cx cy k1 k2 p1 p2 k3


class CalibrationError(TwinstudioError):
    """Calibration cannot be done from this session (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class CalibrationOptions:
    take: str | None = None
    """Calibration take to use (default: the session's latest complete one)."""
    min_corners: int = 8
    """Board views with fewer detected corners are ignored."""
    outlier_px: float = 1.0
    """Corners whose reprojection error exceeds max(outlier_px, 5 x median) are rejected."""
    fix_k3: bool = False
    """Keep k3 = 0 (fewer parameters when views are scarce)."""


@dataclass
class CameraCalibration:
    camera: Camera
    rms_px: float
    views: int
    corners: int


@dataclass
class CalibrationResult:
    cameras: dict[str, CameraCalibration]
    unreached: list[str]  # cameras the board never reached (not solved)
    rms_px: float
    observations: int
    rejected: int
    seconds: float
    out_dir: Path
    ground_truth: dict | None = None
    skipped_images: list[str] = field(default_factory=list)


def detect_take(session_dir: Path, take, board, min_corners: int, on_event=None) -> tuple[dict, list[str]]:
    """Board detections of a take: {(camera, frame): BoardDetection}, plus unreadable image paths."""
    detector = cv2.aruco.CharucoDetector(board)
    found: dict[tuple[str, int], BoardDetection] = {}
    skipped = []
    for cam, frames in take.captured.items():
        for idx, rec in frames.items():
            path = session_dir / rec.path
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if img is None:
                skipped.append(rec.path)
                continue
            det = detect_board(img, board, min_corners, detector)
            if det is not None:
                found[(cam, idx)] = det
        if on_event:
            on_event(cam)
    return found, skipped


def run_calibrate(session_dir: Path | str, options: CalibrationOptions = CalibrationOptions(), *,
                  on_event: Callable[[str], None] | None = None) -> CalibrationResult:
    """Calibrate the rig of a session from its calibration take; writes recon/cameras.json."""
    from capture.session import read_manifest

    t0 = time.perf_counter()
    session_dir = Path(session_dir)
    manifest = read_manifest(session_dir)
    takes = [t for t in manifest.takes.values() if t.kind == "calibration" and t.captured]
    if options.take:
        takes = [t for t in takes if t.id == options.take]
    if not takes:
        raise CalibrationError(f"{session_dir} has no calibration take with frames"
                               + (f" named {options.take}" if options.take else "")
                               + "; shoot one with 'twinstudio capture calibrate'", session=str(session_dir))
    take = takes[-1]
    rig = load_rig(session_dir / "rig.toml")
    board = make_board(rig.calibration.board)
    obj = board_corners(board)
    dets, skipped = detect_take(session_dir, take, board, options.min_corners, on_event)
    nominal = {c.id: c for c in rig.cameras}
    seen_by = {}
    for (cam, view) in dets:
        seen_by.setdefault(view, set()).add(cam)
    # a board view seen by one camera only cannot tie that camera to the others, but still
    # constrains its intrinsics: keep it; cameras need at least one view shared through the graph
    cams = sorted({c for c, _ in dets}, key=list(nominal).index)
    unreached = [c for c in nominal if c not in cams]
    if len(cams) < 2:
        raise CalibrationError(f"the board was detected by {len(cams)} camera(s) only in take {take.id}; "
                               "calibration needs at least two", take=take.id)
    views = sorted({v for _, v in dets})

    # ---- initialisation: nominal intrinsics, PnP per observation, chained poses
    intr0 = {c: nominal[c].intrinsics for c in cams}
    rel = {}
    for (c, v), d in dets.items():
        ok, rvec, tvec = cv2.solvePnP(obj[d.ids], d.corners, intr0[c].K, np.zeros(5), flags=cv2.SOLVEPNP_IPPE)
        if ok:
            rel[(c, v)] = _to_T(cv2.Rodrigues(rvec)[0], tvec.ravel())  # board -> camera
    T_cw = {cams[0]: np.eye(4)}  # camera <- world (world = the reference camera's frame for now)
    T_wb: dict[int, np.ndarray] = {}
    changed = True
    while changed:
        changed = False
        for (c, v), T in sorted(rel.items(), key=lambda kv: -len(dets[kv[0]].ids)):
            if c in T_cw and v not in T_wb:
                T_wb[v] = np.linalg.inv(T_cw[c]) @ T
                changed = True
            elif v in T_wb and c not in T_cw:
                T_cw[c] = T @ np.linalg.inv(T_wb[v])
                changed = True
    isolated = [c for c in cams if c not in T_cw]
    unreached += isolated
    cams = [c for c in cams if c in T_cw]
    views = [v for v in views if v in T_wb]
    obs = [(c, v) for (c, v) in dets if c in T_cw and v in T_wb]

    # ---- bundle adjustment
    ci = {c: i for i, c in enumerate(cams)}
    vi = {v: i for i, v in enumerate(views)}
    n_cam = len(cams)
    x0 = []
    for c in cams:
        k = intr0[c]
        x0 += [k.fx, k.fy, k.cx, k.cy, 0, 0, 0, 0, 0]
    for c in cams[1:]:
        x0 += _pack(T_cw[c])
    for v in views:
        x0 += _pack(T_wb[v])
    x0 = np.array(x0, dtype=np.float64)
    keep = {o: np.ones(len(dets[o].ids), dtype=bool) for o in obs}

    def unpack(x):
        intr = x[: n_cam * N_INTR].reshape(n_cam, N_INTR)
        if options.fix_k3:
            intr = intr.copy()
            intr[:, 8] = 0.0
        ext = np.concatenate([np.zeros(6), x[n_cam * N_INTR: n_cam * N_INTR + (n_cam - 1) * 6]]).reshape(n_cam, 6)
        vw = x[n_cam * N_INTR + (n_cam - 1) * 6:].reshape(len(views), 6)
        return intr, ext, vw

    def residuals(x):
        intr, ext, vw = unpack(x)
        out = []
        for o in obs:
            c, v = o
            d = dets[o]
            m = keep[o]
            out.append((_project(obj[d.ids[m]], vw[vi[v]], ext[ci[c]], intr[ci[c]]) - d.corners[m]).ravel())
        return np.concatenate(out)

    def sparsity():
        rows = sum(int(keep[o].sum()) * 2 for o in obs)
        A = lil_matrix((rows, len(x0)), dtype=int)
        r = 0
        for o in obs:
            c, v = o
            n = int(keep[o].sum()) * 2
            k = ci[c]
            A[r:r + n, k * N_INTR:(k + 1) * N_INTR] = 1
            if k > 0:
                s = n_cam * N_INTR + (k - 1) * 6
                A[r:r + n, s:s + 6] = 1
            s = n_cam * N_INTR + (n_cam - 1) * 6 + vi[v] * 6
            A[r:r + n, s:s + 6] = 1
            r += n
        return A

    x = x0
    rejected = 0
    for _ in range(3):
        sol = least_squares(residuals, x, jac_sparsity=sparsity(), method="trf", x_scale="jac", loss="linear",
                            max_nfev=200)
        x = sol.x
        intr, ext, vw = unpack(x)
        errs = {o: np.linalg.norm(_project(obj[dets[o].ids], vw[vi[o[1]]], ext[ci[o[0]]], intr[ci[o[0]]])
                                  - dets[o].corners, axis=1) for o in obs}
        med = np.median(np.concatenate([e[keep[o]] for o, e in errs.items()]))
        limit = max(options.outlier_px, 5 * med)
        newly = 0
        for o, e in errs.items():
            bad = keep[o] & (e > limit)
            newly += int(bad.sum())
            keep[o] &= ~bad
        rejected += newly
        if newly == 0:
            break

    intr, ext, vw = unpack(x)
    # ---- express in the rig file's frame: rigid fit of camera centres to the nominal ones
    poses = {c: _from_pack(ext[ci[c]]) for c in cams}
    centres = np.array([np.linalg.inv(p)[:3, 3] for p in poses.values()])
    nominal_centres = np.array([nominal[c].pose.center for c in cams])
    R_a, t_a = _rigid_fit(centres, nominal_centres)  # world_rig = R_a @ world_calib + t_a
    A = np.eye(4)
    A[:3, :3], A[:3, 3] = R_a, t_a
    A_inv = np.linalg.inv(A)
    out: dict[str, CameraCalibration] = {}
    total_sq, total_n = 0.0, 0
    for c in cams:
        k = intr[ci[c]]
        T = poses[c] @ A_inv  # camera <- rig world
        spec_w, spec_h = nominal[c].intrinsics.width, nominal[c].intrinsics.height
        cam = Camera(c, Intrinsics(spec_w, spec_h, *map(float, k[:4]), tuple(map(float, k[4:]))),  # type: ignore
                     Pose(T[:3, :3], T[:3, 3]))
        errs = [np.linalg.norm(_project(obj[dets[o].ids[keep[o]]], vw[vi[o[1]]], ext[ci[c]], k)
                               - dets[o].corners[keep[o]], axis=1) for o in obs if o[0] == c]
        e = np.concatenate(errs)
        total_sq += float((e ** 2).sum())
        total_n += len(e)
        out[c] = CameraCalibration(cam, float(np.sqrt((e ** 2).mean())), len(errs), len(e))
    out_dir = session_dir / "recon"
    out_dir.mkdir(exist_ok=True)
    result = CalibrationResult(out, unreached, float(np.sqrt(total_sq / max(total_n, 1))), total_n, rejected,
                               time.perf_counter() - t0, out_dir, skipped_images=skipped)
    result.ground_truth = score_against_ground_truth(session_dir, result)
    _write(result, take.id)
    return result


def _write(result: CalibrationResult, take_id: str) -> None:
    from reconstruct.colmap_io import write_colmap_text

    doc = {"schema": "twinstudio.cameras", "version": 1, "convention": "opencv", "take": take_id,
           "rms_px": result.rms_px, "unreached": result.unreached,
           "cameras": [{**cc.camera.to_dict(), "rms_px": cc.rms_px, "views": cc.views, "corners": cc.corners}
                       for cc in result.cameras.values()]}
    atomic_write_json(result.out_dir / "cameras.json", doc)
    (result.out_dir / "colmap").mkdir(exist_ok=True)
    write_colmap_text(result.out_dir / "colmap", [cc.camera for cc in result.cameras.values()])


def score_against_ground_truth(session_dir: Path, result: CalibrationResult) -> dict | None:
    """Errors against the virtual studio's exact cameras (None for real sessions)."""
    gt_files = sorted((session_dir / ".virtual").glob("*/gt/cameras.json"))
    if not gt_files:
        return None
    gt = {c["id"]: Camera.from_dict(c) for c in json.loads(gt_files[0].read_text())["cameras"]}
    common = [c for c in result.cameras if c in gt]
    if not common or any(gt[c].intrinsics.width != result.cameras[c].camera.intrinsics.width for c in common):
        return None
    est = np.array([result.cameras[c].camera.pose.center for c in common])
    ref = np.array([gt[c].pose.center for c in common])
    R_a, t_a = _rigid_fit(est, ref)
    per = {}
    for c in common:
        e, g = result.cameras[c].camera, gt[c]
        pos = np.linalg.norm(R_a @ e.pose.center + t_a - g.pose.center)
        rot = rotation_angle_deg(e.pose.R @ R_a.T, g.pose.R)
        per[c] = {"position_mm": 1000 * pos, "rotation_deg": rot,
                  "focal_pct": 100 * abs(e.intrinsics.fx - g.intrinsics.fx) / g.intrinsics.fx,
                  "principal_px": float(np.hypot(e.intrinsics.cx - g.intrinsics.cx, e.intrinsics.cy - g.intrinsics.cy))}
    keys = ("position_mm", "rotation_deg", "focal_pct", "principal_px")
    return {"cameras": per, **{f"max_{k}": max(p[k] for p in per.values()) for k in keys},
            **{f"median_{k}": float(np.median([p[k] for p in per.values()])) for k in keys}}


# ----------------------------------------------------------------------------- maths


def _to_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def _pack(T: np.ndarray) -> list[float]:
    return list(cv2.Rodrigues(T[:3, :3])[0].ravel()) + list(T[:3, 3])


def _from_pack(p: np.ndarray) -> np.ndarray:
    return _to_T(cv2.Rodrigues(np.asarray(p[:3], dtype=np.float64))[0], np.asarray(p[3:6]))


def _rodrigues(r: np.ndarray) -> np.ndarray:
    theta = np.linalg.norm(r)
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K


def _project(X_board: np.ndarray, view: np.ndarray, cam: np.ndarray, intr: np.ndarray) -> np.ndarray:
    """Board points [N, 3] -> pixels [N, 2] through a board pose, a camera pose and intrinsics."""
    Xw = X_board @ _rodrigues(view[:3]).T + view[3:6]
    Xc = Xw @ _rodrigues(cam[:3]).T + cam[3:6]
    x = Xc[:, 0] / Xc[:, 2]
    y = Xc[:, 1] / Xc[:, 2]
    fx, fy, cx, cy, k1, k2, p1, p2, k3 = intr
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([fx * xd + cx, fy * yd + cy], axis=1)


def _rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R, t minimising |R src + t - dst| (Kabsch, no scale)."""
    ms, md = src.mean(0), dst.mean(0)
    H = (src - ms).T @ (dst - md)
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1, 1, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T
    return R, md - R @ ms
