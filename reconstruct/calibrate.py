"""Rig calibration from a calibration take (ChArUco board).

``run_calibrate(root)`` detects the board in every image of the calibration
take (a session's, or a virtual render folder's), initialises every camera
from the rig's lens prior and ``solvePnP``, chains cameras and board poses
into one frame through the views they share, and refines everything jointly —
per-camera intrinsics (fx fy cx cy k1 k2 p1 p2 k3), camera poses and board
poses — by a bundle adjustment, rejecting outlier corners. The result is
expressed in the rig file's frame (a rigid fit of the calibrated camera
centres to the rig's nominal ones; the board fixes the scale). A camera the
board never reached, or reached in too few views, is reported, not invented.

The bundle adjustment is Levenberg–Marquardt on dense normal equations: a rig
has a few thousand parameters at most (24 cameras x 15 + 96 board poses x 6 =
936 for ``virtual-ring-24``) while it has tens of thousands of corners. The
Jacobian is sparse and is built by central differences one parameter *slot*
at a time (a corner depends on its own camera and board pose only), so one
Jacobian costs 42 vectorised projections of all corners.

Outputs: ``recon/cameras.json`` and ``recon/colmap/`` (COLMAP text model).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from scipy.linalg import cho_factor, cho_solve
from scipy.sparse import csr_matrix
from threadpoolctl import threadpool_limits

from reconstruct.charuco import BoardDetection, board_corners, detect_board, make_board
from reconstruct.inputs import (
    GroundTruth,
    ReconstructError,
    find_take,
    intrinsics_for_size,
    left_out_summary,
    verified_images,
    write_cameras,
)
from rigs.geometry import Camera, Intrinsics, Pose, rotation_angle_deg
from rigs.rigfile import BoardSpec, load_rig

N_INTR = 9  # fx fy cx cy k1 k2 p1 p2 k3


class CalibrationError(ReconstructError):
    """Calibration cannot be done from this take (exit code 2)."""


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
    huber_px: float | None = 0.3
    """Corner errors beyond this weigh linearly, not quadratically (Huber); None: plain least squares."""
    min_views: int = 3
    """A camera that saw the board in fewer views is reported, not solved (its lens would be guessed)."""
    workers: int | None = None
    """Detection processes (default: one per CPU core, at most 8)."""


@dataclass(frozen=True)
class CalibrationProgress:
    """Event: detection or adjustment moved on."""

    stage: str  # "detect" | "adjust"
    done: int
    total: int
    detail: str = ""


@dataclass
class CameraCalibration:
    camera: Camera
    rms_px: float
    views: int
    corners: int


@dataclass
class RigSolution:
    cameras: dict[str, CameraCalibration]
    unreached: dict[str, str]  # camera -> why it was not solved
    rms_px: float
    observations: int
    rejected: int
    views: int
    iterations: int
    board_poses: dict[int, Pose]  # board view -> board-to-world, rig frame


@dataclass
class CalibrationResult(RigSolution):
    """A rig solution from a capture's calibration take, as written to ``cameras.json``."""

    seconds: float = 0.0
    out_dir: Path = Path("recon")
    take: str = ""
    skipped_images: dict[str, str] = field(default_factory=dict)  # image -> why it was left out
    ground_truth: dict | None = None
    image_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # camera -> (width, height) read
    verify_seconds: float = 0.0  # checking the take's frames against its manifest, before detection


def detect_images(images: dict[tuple[str, int], Path], spec: BoardSpec, min_corners: int = 8,
                  workers: int | None = None,
                  on_event: Callable[[CalibrationProgress], None] | None = None,
                  sizes: dict[tuple[str, int], tuple[int, int]] | None = None,
                  ) -> tuple[dict[tuple[str, int], BoardDetection], list[str]]:
    """Board detections ``{(camera, frame): detection}`` of the images, plus the unreadable images.

    ``sizes``, when given, receives every decoded image's (width, height).
    """
    items = sorted(images.items())
    workers = max(1, min(workers or os.cpu_count() or 1, 8, len(items)))
    chunks = [items[i::workers] for i in range(workers)]
    found: dict[tuple[str, int], BoardDetection] = {}
    skipped: list[str] = []
    done = 0
    if workers == 1:
        results = (_detect_one(spec, min_corners, key, path) for key, path in items)
        pool = None
    else:
        # workers die with this process (a SIGKILLed CLI leaves no detector running on)
        pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init,
                                   initargs=(os.getpid(),))
        results = (r for rs in pool.map(_detect_chunk, [spec] * workers, [min_corners] * workers, chunks,
                                        chunksize=1) for r in rs)
    try:
        for key, det, bad, size in results:
            done += 1
            if bad:
                skipped.append(bad)
            else:
                if sizes is not None:
                    sizes[key] = size
                if det is not None:
                    found[key] = det
            if on_event and (done % 24 == 0 or done == len(items)):
                on_event(CalibrationProgress("detect", done, len(items), f"{len(found)} board views"))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return found, sorted(skipped)


def _worker_init(parent: int) -> None:
    from rigs.procs import die_with_parent

    die_with_parent(parent=parent)


_detectors: dict = {}


def _detect_one(spec: BoardSpec, min_corners: int, key, path: Path):
    if spec not in _detectors:
        board = make_board(spec)
        _detectors[spec] = (board, cv2.aruco.CharucoDetector(board))
    board, detector = _detectors[spec]
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        return key, None, str(path), None
    return key, detect_board(img, board, min_corners, detector), None, (img.shape[1], img.shape[0])


def _detect_chunk(spec: BoardSpec, min_corners: int, items: list) -> list:
    return [_detect_one(spec, min_corners, key, path) for key, path in items]


def run_calibrate(root: Path | str, options: CalibrationOptions = CalibrationOptions(), *,
                  out_dir: Path | str | None = None,
                  on_event: Callable[[CalibrationProgress], None] | None = None) -> CalibrationResult:
    """Calibrate the rig from a calibration take; writes ``cameras.json`` and ``colmap/``.

    ``root``: a session folder or a virtual render folder (both hold
    ``rig.toml`` and ``takes/``). ``out_dir`` defaults to ``root/recon``.
    A session needs its subject's consent to ``capture`` in force (the board
    images are part of the capture). Frames that fail verification against
    the session's (or render's) manifest, or cannot be decoded, are left out
    and listed in ``skipped_images`` with the reason. Every camera is solved
    at the size of the images it actually delivered: the rig file's lens
    prior is scaled to it.
    """
    from capture.consent import require_session_consent

    t0 = time.perf_counter()
    root = Path(root)
    if not (root / "rig.toml").is_file():
        raise CalibrationError(f"{root}: no rig.toml (not a session or render folder)", path=str(root))
    require_session_consent(root, "capture")
    take = find_take(root, "calibration", options.take)
    rig = load_rig(root / "rig.toml")
    checked = verified_images(root, take, workers=options.workers)
    skipped = dict(checked.left_out)
    images = {(cam, f): p for cam, frames in checked.images.items() for f, p in frames.items()}
    if not images:
        why = f" ({left_out_summary(skipped)})" if skipped else "; shoot it with 'twinstudio capture calibrate'"
        raise CalibrationError(f"take {take} holds no usable images{why}", take=take,
                               path=str(root / "takes" / take), left_out=skipped or None)
    read: dict[tuple[str, int], tuple[int, int]] = {}
    dets, unreadable = detect_images(images, rig.calibration.board, options.min_corners, options.workers,
                                     on_event, sizes=read)
    skipped.update({p: "cannot be decoded" for p in unreadable})
    nominal, sizes, dets, size_issues, refused = _at_image_size(rig.cameras, dets, read, images)
    skipped.update(size_issues)
    obj = board_corners(make_board(rig.calibration.board))
    try:
        sol = solve_rig(dets, obj, nominal, options, take=take)
    except CalibrationError as e:
        extra = "; ".join([f"{c}: {why}" for c, why in refused.items()]
                          + ([left_out_summary(skipped)] if skipped else []))
        if extra:
            e.facts["left_out"] = dict(sorted(skipped.items()))
            e.message = f"{e.message}; {extra}"
            e.args = (e.message,)
        raise
    sol.unreached.update({c: why for c, why in refused.items() if c in sol.unreached})
    result = CalibrationResult(**vars(sol), seconds=time.perf_counter() - t0,
                               out_dir=Path(out_dir) if out_dir else root / "recon", take=take,
                               skipped_images=dict(sorted(skipped.items())), image_sizes=sizes,
                               verify_seconds=checked.seconds)
    gt = GroundTruth.find(root)
    if gt is not None:
        result.ground_truth = score_cameras({c: cc.camera for c, cc in result.cameras.items()}, gt.cameras())
    _write(result)
    return result


def _at_image_size(cameras: list[Camera], dets: dict, read: dict[tuple[str, int], tuple[int, int]],
                   images: dict[tuple[str, int], Path]):
    """The rig's cameras with their lens prior scaled to the size of the images they delivered.

    Returns (nominal cameras by id, {camera: (width, height)}, the detections
    kept, {image: why left out}, {camera: why refused}). A camera's images of
    a size other than its most common one are left out; a camera whose images
    have another aspect ratio than its rig-file resolution is refused (its
    lens prior does not describe them).
    """
    by_cam: dict[str, dict[tuple[int, int], int]] = {}
    for (c, _), wh in read.items():
        by_cam.setdefault(c, {})
        by_cam[c][wh] = by_cam[c].get(wh, 0) + 1
    sizes = {c: max(counts, key=lambda wh: (counts[wh], wh)) for c, counts in by_cam.items()}
    issues: dict[str, str] = {}
    keep = {}
    for key, d in dets.items():
        if read.get(key) == sizes.get(key[0]):
            keep[key] = d
    for key, wh in read.items():
        if wh != sizes[key[0]]:
            w, h = sizes[key[0]]
            issues[str(images[key])] = f"{wh[0]}x{wh[1]}, the camera's other images are {w}x{h}"
    nominal: dict[str, Camera] = {}
    refused: dict[str, str] = {}
    for cam in cameras:
        wh = sizes.get(cam.id)
        intr = intrinsics_for_size(cam.intrinsics, *wh) if wh else cam.intrinsics
        if intr is None:  # another aspect ratio: the rig's lens prior does not describe these images
            for key in [k for k in keep if k[0] == cam.id]:
                del keep[key]
            i = cam.intrinsics
            refused[cam.id] = (f"its images are {wh[0]}x{wh[1]}, the rig file's resolution {i.width}x{i.height} "
                               "has another aspect ratio")
            intr = cam.intrinsics
        nominal[cam.id] = Camera(cam.id, intr, cam.pose)
    return nominal, sizes, keep, issues, refused


def solve_rig(dets: dict[tuple[str, int], BoardDetection], obj: np.ndarray, nominal: dict[str, Camera],
              options: CalibrationOptions = CalibrationOptions(), *, take: str = "") -> RigSolution:
    """Cameras and board poses from board detections ``{(camera, view): detection}``.

    ``obj``: the board's corners [M, 3] (board coordinates, metres);
    ``nominal``: the rig file's cameras (image size, lens prior, nominal pose
    that fixes the output frame). Raises CalibrationError when fewer than two
    cameras can be tied together.
    """
    order = list(nominal)
    unknown = sorted({c for c, _ in dets} - set(order))
    if unknown:
        raise CalibrationError(f"detections of camera(s) not in the rig: {', '.join(unknown)}", cameras=unknown)
    views_of: dict[str, set[int]] = {}
    for c, v in dets:
        views_of.setdefault(c, set()).add(v)
    unreached = {c: "the board was never detected" for c in order if c not in views_of}
    for c, vs in views_of.items():
        if len(vs) < options.min_views:
            unreached[c] = f"the board was detected in {len(vs)} view(s), calibration needs {options.min_views}"
    dets = {o: d for o, d in dets.items() if o[0] not in unreached}
    cams = [c for c in order if c in views_of and c not in unreached]
    if len(cams) < 2:
        raise CalibrationError(f"only {len(cams)} camera(s) saw the board in {options.min_views} or more views"
                               + (f" in take {take}" if take else "") + "; calibration needs at least two",
                               take=take, cameras=cams)
    T_cw, T_wb = _initial_poses(dets, obj, nominal, cams)
    if len(T_cw) < 2:
        raise CalibrationError("no board view is shared between cameras: each camera saw the board alone"
                               + (f" in take {take}" if take else ""), take=take, cameras=cams)
    for c in cams:
        if c not in T_cw:
            unreached[c] = "shares no board view with the other cameras"
    cams = [c for c in cams if c in T_cw]
    views = sorted(v for v in T_wb)
    ci = {c: i for i, c in enumerate(cams)}
    vi = {v: i for i, v in enumerate(views)}
    pairs = sorted(o for o in dets if o[0] in ci and o[1] in vi)
    obs_all = Observations(
        np.concatenate([np.full(len(dets[o].ids), ci[o[0]]) for o in pairs]),
        np.concatenate([np.full(len(dets[o].ids), vi[o[1]]) for o in pairs]),
        np.concatenate([obj[dets[o].ids] for o in pairs]),
        np.concatenate([dets[o].corners for o in pairs]))
    intr0 = np.array([[nominal[c].intrinsics.fx, nominal[c].intrinsics.fy, nominal[c].intrinsics.cx,
                       nominal[c].intrinsics.cy, 0, 0, 0, 0, 0] for c in cams], dtype=np.float64)
    state = RigState(intr0, np.array([_pack(T_cw[c]) for c in cams]), np.array([_pack(T_wb[v]) for v in views]))
    # the initial chain can hold a flipped PnP solution; start from the corners it already explains
    err = np.linalg.norm(project_observations(state, obs_all) - obs_all.uv, axis=1)
    keep = err < max(20.0, 3 * np.median(err))
    iterations = 0
    for _ in range(6):
        state, it = bundle_adjust(state, obs_all.subset(keep), fix_k3=options.fix_k3, huber_px=options.huber_px)
        iterations += it
        err = np.linalg.norm(project_observations(state, obs_all) - obs_all.uv, axis=1)
        limit = max(options.outlier_px, 5 * float(np.median(err[keep])))
        new_keep = err <= limit
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    obs = obs_all.subset(keep)
    e = err[keep]

    # ---- express in the rig file's frame: rigid fit of camera centres to the nominal ones
    poses = {c: _from_pack(state.cams[ci[c]]) for c in cams}
    centres = np.array([np.linalg.inv(p)[:3, 3] for p in poses.values()])
    R_a, t_a = _rigid_fit(centres, np.array([nominal[c].pose.center for c in cams]))
    A = np.eye(4)
    A[:3, :3], A[:3, 3] = R_a, t_a
    A_inv = np.linalg.inv(A)
    out: dict[str, CameraCalibration] = {}
    for c in cams:
        k = state.intr[ci[c]]
        T = poses[c] @ A_inv  # camera <- rig world
        mine = obs.cam == ci[c]
        n_views = len(np.unique(obs.view[mine]))
        w, h = nominal[c].intrinsics.width, nominal[c].intrinsics.height
        cam = Camera(c, Intrinsics(w, h, *map(float, k[:4]), tuple(map(float, k[4:]))),  # type: ignore[arg-type]
                     Pose(T[:3, :3], T[:3, 3]))
        out[c] = CameraCalibration(cam, float(np.sqrt((e[mine] ** 2).mean())) if mine.any() else float("nan"),
                                   n_views, int(mine.sum()))
    boards = {v: Pose(*_split(A @ _from_pack(state.views[vi[v]]))) for v in views}
    return RigSolution(out, unreached, float(np.sqrt((e ** 2).mean())), int(keep.sum()), int((~keep).sum()),
                       len(views), iterations, boards)


def _initial_poses(dets: dict, obj: np.ndarray, nominal: dict[str, Camera],
                   cams: list[str]) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """Camera and board poses chained through shared board views from per-view PnP.

    The reference camera is the one with most corners; the chain grows along
    the (camera, view) links with most corners first.
    """
    rel = {}
    for (c, v), d in dets.items():
        if c not in cams:
            continue
        K = nominal[c].intrinsics.K
        ok, rvec, tvec = cv2.solvePnP(obj[d.ids], d.corners, K, np.zeros(5), flags=cv2.SOLVEPNP_IPPE)
        if ok:
            rvec, tvec = cv2.solvePnPRefineLM(obj[d.ids], d.corners, K, np.zeros(5), rvec, tvec)
            rel[(c, v)] = _to_T(cv2.Rodrigues(rvec)[0], tvec.ravel())  # board -> camera
    corners: dict[str, int] = {}
    for (c, _), d in dets.items():
        corners[c] = corners.get(c, 0) + len(d.ids)
    ref = max(cams, key=lambda c: corners.get(c, 0))
    T_cw = {ref: np.eye(4)}  # camera <- world (world = the reference camera's frame for now)
    T_wb: dict[int, np.ndarray] = {}
    links = sorted(rel.items(), key=lambda kv: -len(dets[kv[0]].ids))
    changed = True
    while changed:
        changed = False
        for (c, v), T in links:
            if c in T_cw and v not in T_wb:
                T_wb[v] = np.linalg.inv(T_cw[c]) @ T
                changed = True
                break
            if v in T_wb and c not in T_cw:
                T_cw[c] = T @ np.linalg.inv(T_wb[v])
                changed = True
                break
    return T_cw, T_wb


def _write(result: CalibrationResult) -> None:
    from reconstruct.colmap_io import write_colmap_text

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    cams = [cc.camera for cc in result.cameras.values()]
    write_cameras(out / "cameras.json", cams, method="calibration", take=result.take,
                  rms_px=round(result.rms_px, 5), board_views=result.views, observations=result.observations,
                  rejected=result.rejected, unreached=result.unreached, skipped_images=result.skipped_images,
                  seconds=round(result.seconds, 2), verify_seconds=round(result.verify_seconds, 3),
                  ground_truth=result.ground_truth,
                  per_camera={c: {"rms_px": round(cc.rms_px, 5) if np.isfinite(cc.rms_px) else None,
                                  "views": cc.views, "corners": cc.corners}
                              for c, cc in result.cameras.items()})
    write_colmap_text(out / "colmap", cams)


def score_cameras(est: dict[str, Camera], gt: dict[str, Camera]) -> dict | None:
    """Errors of calibrated cameras against exact ones, after a rigid fit of the camera centres.

    Per camera: position (mm), rotation (deg), focal length (%), principal
    point (px); plus the median and maximum of each. None when no camera is
    common or image sizes differ.
    """
    common = [c for c in est if c in gt]
    if len(common) < 2 or any(gt[c].intrinsics.width != est[c].intrinsics.width for c in common):
        return None
    R_a, t_a = _rigid_fit(np.array([est[c].pose.center for c in common]),
                          np.array([gt[c].pose.center for c in common]))
    per = {}
    for c in common:
        e, g = est[c], gt[c]
        pos = np.linalg.norm(R_a @ e.pose.center + t_a - g.pose.center)
        per[c] = {"position_mm": float(1000 * pos),
                  "rotation_deg": float(rotation_angle_deg(e.pose.R @ R_a.T, g.pose.R)),
                  "focal_pct": float(100 * max(abs(e.intrinsics.fx - g.intrinsics.fx) / g.intrinsics.fx,
                                               abs(e.intrinsics.fy - g.intrinsics.fy) / g.intrinsics.fy)),
                  "principal_px": float(np.hypot(e.intrinsics.cx - g.intrinsics.cx, e.intrinsics.cy - g.intrinsics.cy))}
    keys = ("position_mm", "rotation_deg", "focal_pct", "principal_px")
    return {"cameras": per, **{f"max_{k}": max(p[k] for p in per.values()) for k in keys},
            **{f"median_{k}": float(np.median([p[k] for p in per.values()])) for k in keys}}


# ----------------------------------------------------------------------------- baseline


def opencv_baseline(dets: dict[tuple[str, int], BoardDetection], obj: np.ndarray,
                    nominal: dict[str, Camera]) -> dict[str, Camera]:
    """The textbook pipeline, for comparison: ``cv2.calibrateCamera`` per camera, then extrinsics
    chained by pairwise ``cv2.stereoCalibrate`` (intrinsics fixed) along the pairs that share most
    corners, from the camera with most corners, skipping a pair whose stereo RMS exceeds 1 px (it
    did not converge); expressed in the rig frame like ``solve_rig``.
    Cameras with fewer than 3 views, or not linked to the chain, are left out.
    """
    by_cam: dict[str, list[int]] = {}
    for c, v in sorted(dets):
        by_cam.setdefault(c, []).append(v)
    intr: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, views in by_cam.items():
        if len(views) < 3:
            continue
        i = nominal[c].intrinsics
        _, K, dist, _, _ = cv2.calibrateCamera(
            [obj[dets[(c, v)].ids].astype(np.float32) for v in views],
            [dets[(c, v)].corners.astype(np.float32) for v in views], (i.width, i.height),
            i.K.copy(), np.zeros(5), flags=cv2.CALIB_USE_INTRINSIC_GUESS)
        intr[c] = (K, dist.ravel()[:5])
    # pairwise relative poses, strongest pairs first
    pairs = []
    cams = list(intr)
    for a_i, a in enumerate(cams):
        for b in cams[a_i + 1:]:
            shared = sorted(set(by_cam[a]) & set(by_cam[b]))
            obj_pts, pa, pb = [], [], []
            for v in shared:
                ids, ia, ib = np.intersect1d(dets[(a, v)].ids, dets[(b, v)].ids, return_indices=True)
                if len(ids) >= 6:
                    obj_pts.append(obj[ids].astype(np.float32))
                    pa.append(dets[(a, v)].corners[ia].astype(np.float32))
                    pb.append(dets[(b, v)].corners[ib].astype(np.float32))
            if obj_pts:
                pairs.append((sum(len(o) for o in obj_pts), a, b, obj_pts, pa, pb))
    pairs.sort(key=lambda p: -p[0])
    ref = max(cams, key=lambda c: sum(len(dets[(c, v)].ids) for v in by_cam[c])) if cams else None
    T_cw = {ref: np.eye(4)} if ref else {}
    failed: set[tuple[str, str]] = set()
    grown = True
    while grown:
        grown = False
        for _, a, b, obj_pts, pa, pb in pairs:
            if (a in T_cw) == (b in T_cw) or (a, b) in failed:
                continue
            size = (nominal[a].intrinsics.width, nominal[a].intrinsics.height)
            out = cv2.stereoCalibrate(obj_pts, pa, pb, intr[a][0], intr[a][1], intr[b][0], intr[b][1], size,
                                      flags=cv2.CALIB_FIX_INTRINSIC)
            if out[0] > 1.0:  # a pair that did not converge (RMS in px): chain through another one
                failed.add((a, b))
                continue
            T_ba = _to_T(out[5], out[6].ravel())  # camera b <- camera a
            if a in T_cw:
                T_cw[b] = T_ba @ T_cw[a]
            else:
                T_cw[a] = np.linalg.inv(T_ba) @ T_cw[b]
            grown = True
            break
    if len(T_cw) < 2:
        return {}
    solved = list(T_cw)
    centres = np.array([np.linalg.inv(T_cw[c])[:3, 3] for c in solved])
    R_a, t_a = _rigid_fit(centres, np.array([nominal[c].pose.center for c in solved]))
    A = np.eye(4)
    A[:3, :3], A[:3, 3] = R_a, t_a
    out_cams = {}
    for c in solved:
        K, dist = intr[c]
        T = T_cw[c] @ np.linalg.inv(A)
        i = nominal[c].intrinsics
        out_cams[c] = Camera(c, Intrinsics(i.width, i.height, K[0, 0], K[1, 1], K[0, 2], K[1, 2],
                                           tuple(float(x) for x in dist)), Pose(T[:3, :3], T[:3, 3]))
    return out_cams


# ----------------------------------------------------------------------------- bundle adjustment


@dataclass
class Observations:
    """Board corners seen by cameras, one row per corner."""

    cam: np.ndarray  # [N] camera index
    view: np.ndarray  # [N] board view index
    X: np.ndarray  # [N, 3] corner in board coordinates, metres
    uv: np.ndarray  # [N, 2] detected pixel

    def subset(self, keep: np.ndarray) -> Observations:
        return Observations(self.cam[keep], self.view[keep], self.X[keep], self.uv[keep])


@dataclass
class RigState:
    """Everything the bundle adjustment estimates."""

    intr: np.ndarray  # [C, 9] fx fy cx cy k1 k2 p1 p2 k3
    cams: np.ndarray  # [C, 6] camera <- world, Rodrigues + translation
    views: np.ndarray  # [V, 6] world <- board, Rodrigues + translation

    def copy(self) -> RigState:
        return RigState(self.intr.copy(), self.cams.copy(), self.views.copy())


def project_observations(state: RigState, obs: Observations) -> np.ndarray:
    """Pixels [N, 2] of every observed corner through its board pose, camera pose and intrinsics."""
    return _distort_pixels(_to_camera(state, obs, _to_world(state, obs)), state.intr[obs.cam])


def _to_world(state: RigState, obs: Observations) -> np.ndarray:
    Rv = _rodrigues_batch(state.views[:, :3])
    return np.einsum("nij,nj->ni", Rv[obs.view], obs.X) + state.views[obs.view, 3:]


def _to_camera(state: RigState, obs: Observations, Xw: np.ndarray) -> np.ndarray:
    Rc = _rodrigues_batch(state.cams[:, :3])
    return np.einsum("nij,nj->ni", Rc[obs.cam], Xw) + state.cams[obs.cam, 3:]


def _distort_pixels(Xc: np.ndarray, k: np.ndarray) -> np.ndarray:
    x = Xc[:, 0] / Xc[:, 2]
    y = Xc[:, 1] / Xc[:, 2]
    fx, fy, cx, cy, k1, k2, p1, p2, k3 = k.T
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([fx * xd + cx, fy * yd + cy], axis=1)


def _rodrigues_batch(r: np.ndarray) -> np.ndarray:
    """Rotation matrices [M, 3, 3] from Rodrigues vectors [M, 3]."""
    theta = np.linalg.norm(r, axis=1)
    small = theta < 1e-12
    k = r / np.where(small, 1.0, theta)[:, None]
    K = np.zeros((len(r), 3, 3))
    K[:, 0, 1], K[:, 0, 2] = -k[:, 2], k[:, 1]
    K[:, 1, 0], K[:, 1, 2] = k[:, 2], -k[:, 0]
    K[:, 2, 0], K[:, 2, 1] = -k[:, 1], k[:, 0]
    s, c = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    R = np.eye(3)[None] + s * K + (1 - c) * (K @ K)
    R[small] = np.eye(3)
    return R


# finite-difference steps per parameter slot: intrinsics (pixels, distortion), Rodrigues, translation (m)
_INTR_STEP = np.array([1e-3, 1e-3, 1e-3, 1e-3, 1e-7, 1e-7, 1e-8, 1e-8, 1e-7])
_POSE_STEP = np.array([1e-7, 1e-7, 1e-7, 1e-7, 1e-7, 1e-7])


@dataclass(frozen=True)
class _Layout:
    """Where each free parameter sits in the solution vector (-1: held fixed)."""

    intr: np.ndarray  # [C, 9]
    cams: np.ndarray  # [C, 6]
    views: np.ndarray  # [V, 6]
    size: int

    @classmethod
    def make(cls, n_cam: int, n_view: int, fixed_cam: int, fix_k3: bool) -> _Layout:
        free_i = np.ones((n_cam, N_INTR), bool)
        if fix_k3:
            free_i[:, 8] = False
        free_c = np.ones((n_cam, 6), bool)
        free_c[fixed_cam] = False  # the gauge: the world frame is this camera's frame
        free_v = np.ones((n_view, 6), bool)
        n = 0
        out = []
        for free in (free_i, free_c, free_v):
            idx = np.full(free.shape, -1)
            idx[free] = np.arange(n, n + free.sum())
            n += int(free.sum())
            out.append(idx)
        return cls(*out, n)

    def apply(self, state: RigState, dx: np.ndarray) -> RigState:
        s = state.copy()
        for arr, idx in ((s.intr, self.intr), (s.cams, self.cams), (s.views, self.views)):
            m = idx >= 0
            arr[m] += dx[idx[m]]
        return s


def _jacobian(state: RigState, obs: Observations, layout: _Layout) -> csr_matrix:
    """Sparse Jacobian of the residuals, by central differences one parameter *slot* at a time.

    A residual depends on its own camera and its own board view only, so moving
    slot ``s`` of every camera at once and differencing gives column ``s`` of
    every camera's block in two projections of all corners.
    """
    n = len(obs.cam)
    rows, cols, vals = [], [], []
    r_idx = np.arange(2 * n).reshape(n, 2)
    Xw = _to_world(state, obs)
    Xc = _to_camera(state, obs, Xw)
    # each stage is recomputed only from the first one a slot moves
    stages = {"intr": lambda st: _distort_pixels(Xc, st.intr[obs.cam]),
              "cams": lambda st: _distort_pixels(_to_camera(st, obs, Xw), st.intr[obs.cam]),
              "views": lambda st: project_observations(st, obs)}
    for field_, steps, owner, idx in (("intr", _INTR_STEP, obs.cam, layout.intr),
                                      ("cams", _POSE_STEP, obs.cam, layout.cams),
                                      ("views", _POSE_STEP, obs.view, layout.views)):
        project = stages[field_]
        for s, h in enumerate(steps):
            col = idx[owner, s]
            live = col >= 0
            if not live.any():
                continue
            plus, minus = state.copy(), state.copy()
            getattr(plus, field_)[:, s] += h
            getattr(minus, field_)[:, s] -= h
            d = (project(plus) - project(minus)) / (2 * h)
            rows.append(r_idx[live].ravel())
            cols.append(np.repeat(col[live], 2))
            vals.append(d[live].ravel())
    return csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(2 * n, layout.size))


def bundle_adjust(state: RigState, obs: Observations, *, fixed_cam: int = 0, fix_k3: bool = False,
                  max_iter: int = 50, tol: float = 1e-10, huber_px: float | None = None) -> tuple[RigState, int]:
    """Levenberg–Marquardt on every camera's intrinsics and pose and every board pose.

    Normal equations are formed densely (a rig has a few thousand parameters at
    most) and solved by Cholesky with Marquardt's diagonal damping. With
    ``huber_px``, each corner's error is weighed by Huber's function
    (iteratively reweighted): the detector's occasional half-pixel corner on an
    oblique or blurred board pulls less. Returns the refined state and the
    iterations run.
    """
    with threadpool_limits(1):  # a few hundred parameters: threaded BLAS only spins, and collapses under load
        return _levenberg_marquardt(state, obs, fixed_cam, fix_k3, max_iter, tol, huber_px)


def _levenberg_marquardt(state: RigState, obs: Observations, fixed_cam: int, fix_k3: bool, max_iter: int,
                         tol: float, huber_px: float | None) -> tuple[RigState, int]:
    layout = _Layout.make(len(state.intr), len(state.views), fixed_cam, fix_k3)
    if fix_k3:
        state = state.copy()
        state.intr[:, 8] = 0.0

    def residuals(st: RigState) -> tuple[np.ndarray, np.ndarray, float]:
        """Residuals [2N], per-row IRLS weights [2N] (Huber on each corner's error) and the robust cost."""
        res = project_observations(st, obs) - obs.uv
        if huber_px is None:
            return res.ravel(), np.ones(res.size), float((res ** 2).sum())
        e = np.linalg.norm(res, axis=1)
        big = e > huber_px
        w = np.where(big, huber_px / np.maximum(e, 1e-12), 1.0)
        rho = np.where(big, 2 * huber_px * e - huber_px ** 2, e ** 2)
        return res.ravel(), np.repeat(w, 2), float(rho.sum())

    r, w, cost = residuals(state)
    lam = 1e-3
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        J = _jacobian(state, obs, layout)
        Jw = J.multiply(w[:, None]).tocsr()  # J^T W J and J^T W r
        A = (Jw.T @ J).toarray()
        g = Jw.T @ r
        d = np.maximum(np.diag(A), 1e-12)
        improved = False
        for _ in range(12):
            try:
                c, low = cho_factor(A + lam * np.diag(d))
                dx = -cho_solve((c, low), g)
            except np.linalg.LinAlgError:
                lam *= 10
                continue
            trial = layout.apply(state, dx)
            r_t, w_t, cost_t = residuals(trial)
            if cost_t < cost:
                improved = True
                break
            lam *= 10
        if not improved:
            break
        done = cost - cost_t < tol * cost
        state, r, w, cost = trial, r_t, w_t, cost_t
        lam = max(lam / 10, 1e-9)
        if done:
            break
    return state, iterations


# ----------------------------------------------------------------------------- maths


def _to_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def _split(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return T[:3, :3].copy(), T[:3, 3].copy()


def _pack(T: np.ndarray) -> list[float]:
    return list(cv2.Rodrigues(T[:3, :3])[0].ravel()) + list(T[:3, 3])


def _from_pack(p: np.ndarray) -> np.ndarray:
    return _to_T(cv2.Rodrigues(np.asarray(p[:3], dtype=np.float64))[0], np.asarray(p[3:6]))


def _rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R, t minimising |R src + t - dst| (Kabsch, no scale)."""
    ms, md = src.mean(0), dst.mean(0)
    H = (src - ms).T @ (dst - md)
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1, 1, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T
    return R, md - R @ ms
