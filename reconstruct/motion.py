"""Motion: 3D trajectories of surface features through a motion take.

A motion take has no markers, so the trajectories are those of *surface
features*: well-textured corners on the subject (a print corner on the shirt,
a seam crossing on the denim) that the cameras see on their own and that the
calibrated geometry ties together.

``run_motion(root, cameras_path, out_dir, options)`` works frame by frame:

1. **2D tracking** in every camera: pyramidal Lucas-Kanade from the previous
   frame, started at the projection of the track's 3D position predicted at
   constant velocity, with a forward-backward check (``fb_px``); then the
   patch the 2D track started with is aligned to the new frame with an affine
   warp and a gain/offset (:class:`_Patches`), and the track ends when that
   correlation drops under ``track_ncc``. Frame-to-frame LK alone drifts by
   about a tenth of the motion on this subject (a 21 px window spans ~8 cm of
   a curved, turning body); anchoring every step to the first patch cuts the
   drift to a third.
2. **Triangulation** of every live track from its surviving views
   (:func:`triangulate_points`): MSAC over pairs of views, DLT on the inliers,
   Gauss-Newton on the reprojection error of undistorted points. A view that
   reprojects worse than ``reprojection_px`` is dropped for good; a track with
   fewer than ``min_views`` views is lost (NaN from then on, never revived,
   so a track id is one surface point).
3. **New views** of live points (every frame): in a camera that does not see
   a point yet, the patch of the nearest camera that does is aligned
   (affinely) at the point's projection; a correlation of ``join_ncc`` adds the
   view. As the body turns, points pass from camera to camera this way.
4. **New tracks** (first frame, then every ``redetect_every`` frames):
   Shi-Tomasi corners inside the eroded chroma-key mask (the silhouette's own
   corners are not surface points) and away from tracked points, with upright
   SIFT descriptors, matched between neighbouring cameras (epipolar distance,
   mutual ratio test), chained best match first with never two corners of
   one camera in a chain, triangulated, given more views as in 3, and kept
   with at least ``min_new_views`` consistent views: a corner only a few
   cameras agree on is mostly an occlusion (an arm against the torso), not a
   mark on the surface.

Outputs in ``out_dir``: ``trajectories.npz`` (points [T, N, 3] metres, NaN
where lost; times [T] s; frames [T]; track_ids [N]; views [T, N]; rms_px
[T, N]; cameras), ``trajectories.csv`` (one row per track per frame it is
tracked in) and ``motion.json`` (schema ``twinstudio.motion`` 1, with the
scores against ground truth on a virtual capture). Times are seconds from the
first frame: the cameras' median trigger times for a session, else frame /
fps of the rig file.

Scoring (:func:`score_motion`): a surface feature sits on one rigid part of
the virtual person, so its true trajectory is the point of the ground-truth
surface nearest to the track's first position, carried by that part's
transform through the take; errors are 3D distances in every frame.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reconstruct.inputs import (
    GroundTruth,
    ReconstructError,
    find_take,
    intrinsics_for_size,
    read_cameras,
    take_images,
    verified_images,
)
from rigs.errors import ShapeError
from rigs.fileio import atomic_write_bytes, atomic_write_json
from rigs.geometry import Camera, undistort

MOTION_SCHEMA = "twinstudio.motion"
MOTION_VERSION = 1
#: frames a camera waits before it tries again to join a point it did not fit
_JOIN_RETRY = 3


# ----------------------------------------------------------------------------- options, events, results


@dataclass(frozen=True)
class MotionOptions:
    """How to track a motion take. Pixel figures are at the images' own resolution."""

    take: str | None = None
    """Motion take to use (default: the root's latest motion take)."""
    cameras: tuple[str, ...] | None = None
    """Only these cameras (default: every camera of the take)."""
    max_frames: int | None = None
    """Only the take's first this many frames (default: all)."""
    max_tracks: int = 3000
    """Most 3D tracks alive at once (new ones start only below it)."""
    corners_per_camera: int = 800
    """Most 2D features per camera (tracked plus new)."""
    min_views: int = 3
    """A 3D point needs this many consistent views; fewer and the track is lost."""
    min_new_views: int = 5
    """A new track starts with at least this many consistent views (a corner that only a few
    cameras agree on is usually made by an occlusion, not printed on the surface)."""
    reprojection_px: float = 1.0
    """Views reprojecting worse than this are outliers (and dropped from the track)."""
    fb_px: float = 0.5
    """Forward-backward LK error above which a 2D track is dropped."""
    lk_window: int = 21
    """Lucas-Kanade window (pixels, odd)."""
    lk_levels: int = 3
    """Lucas-Kanade pyramid levels above the image."""
    redetect_every: int = 2
    """Detect corners and start new tracks every this many frames (0: on the first frame only)."""
    corner_quality: float = 0.005
    """Shi-Tomasi quality level relative to the image's best corner."""
    corner_spacing_px: float = 6.0
    """Least distance between two features of one camera."""
    mask_erode_px: int = 5
    """Features keep this far inside the subject's silhouette."""
    descriptor_px: float = 16.0
    """SIFT patch size for matching features across cameras."""
    match_ratio: float = 0.85
    """Lowe ratio for cross-camera descriptor matches."""
    max_descriptor_distance: float = 0.6
    """Largest (unit-normalised) SIFT distance of a cross-camera match."""
    epipolar_px: float = 1.5
    """Largest distance of a cross-camera match from its epipolar line."""
    max_pair_angle_deg: float = 50.0
    """Cameras whose optical axes differ by more than this are not matched directly."""
    min_ray_angle_deg: float = 0.0
    """A point's inlier rays must span at least this angle (rejects corners made by occlusion)."""
    patch_half: int = 7
    """Half size of the patches aligned affinely (a 15x15 patch by default)."""
    patch_sigma: float = 0.7
    """Gaussian smoothing (pixels) of the images the patches are aligned on."""
    track_ncc: float = 0.8
    """A 2D track ends when its patch, aligned to the new frame, correlates less than this with its template."""
    join_every_frame: bool = True
    """Look for new views of the live points in every frame (else on detection frames only)."""
    join_rounds: int = 2
    """Rounds of looking for more views of a new point (each round's views are references for the next)."""
    join_ncc: float = 0.85
    """Least correlation of a patch aligned from one camera into another to add that view to a point."""

    def __post_init__(self) -> None:
        checks = {
            "max_frames": self.max_frames is None or self.max_frames >= 1, "max_tracks": self.max_tracks >= 1,
            "corners_per_camera": self.corners_per_camera >= 1, "min_views": self.min_views >= 2,
            "min_new_views": self.min_new_views >= 2, "reprojection_px": self.reprojection_px > 0,
            "fb_px": self.fb_px > 0, "lk_window": self.lk_window >= 5 and self.lk_window % 2 == 1,
            "lk_levels": 0 <= self.lk_levels <= 8, "redetect_every": self.redetect_every >= 0,
            "corner_quality": 0 < self.corner_quality < 1, "corner_spacing_px": self.corner_spacing_px > 0,
            "mask_erode_px": self.mask_erode_px >= 0, "descriptor_px": self.descriptor_px > 1,
            "match_ratio": 0 < self.match_ratio <= 1, "max_descriptor_distance": self.max_descriptor_distance > 0,
            "epipolar_px": self.epipolar_px > 0, "max_pair_angle_deg": 0 < self.max_pair_angle_deg <= 180,
            "min_ray_angle_deg": 0 <= self.min_ray_angle_deg < 180, "patch_half": 2 <= self.patch_half <= 20,
            "patch_sigma": self.patch_sigma >= 0, "track_ncc": -1 <= self.track_ncc < 1,
            "join_rounds": self.join_rounds >= 1, "join_ncc": -1 <= self.join_ncc < 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ReconstructError(f"motion option {name}={getattr(self, name)!r} is out of range",
                                       option=name, value=getattr(self, name))

    def scaled(self, s: float) -> MotionOptions:
        """The options for images ``s`` times the size these were tuned for (sizes of patches,
        windows and spacings scale; error thresholds, in pixels of localisation, do not)."""
        from dataclasses import replace

        def odd(v: int) -> int:
            return max(5, round(v * s) | 1)

        return replace(self, lk_window=odd(self.lk_window), patch_half=max(2, round(self.patch_half * s)),
                       corner_spacing_px=self.corner_spacing_px * s, descriptor_px=max(4.0, self.descriptor_px * s),
                       mask_erode_px=round(self.mask_erode_px * s))


@dataclass(frozen=True)
class MotionProgress:
    """Event: one more frame of the take is tracked."""

    frame: int
    done: int
    total: int
    tracks: int  # live 3D tracks after this frame


@dataclass(frozen=True)
class MotionScore:
    """Accuracy against the virtual studio's ground truth (millimetres)."""

    median_mm: float
    p90_mm: float
    mean_mm: float
    kept_fraction: float  # of the first frame's tracks, the share still tracked in the last frame
    tracks: int
    samples: int  # scored (track, frame) pairs
    errors_m: np.ndarray = field(repr=False)  # [T, N] metres, NaN where the track is lost

    def to_dict(self) -> dict:
        """JSON-ready figures: None (with a reason) where nothing could be scored, never NaN."""
        def mm(v: float) -> float | None:
            return round(v, 4) if math.isfinite(v) else None

        doc = {"median_mm": mm(self.median_mm), "p90_mm": mm(self.p90_mm), "mean_mm": mm(self.mean_mm),
               "kept_fraction": round(self.kept_fraction, 4) if math.isfinite(self.kept_fraction) else 0.0,
               "tracks": self.tracks, "samples": self.samples}
        if not self.samples:
            doc["reason"] = "no tracked point to score" if not self.tracks else "no tracked point had a true position"
        return doc


@dataclass
class MotionReport:
    """What :func:`run_motion` wrote and how it went."""

    take: str
    frames: list[int]
    times: np.ndarray  # [T] seconds from the first frame
    track_ids: np.ndarray  # [N]
    points: np.ndarray  # [T, N, 3] metres, NaN where lost
    views: np.ndarray  # [T, N] inlier views
    rms_px: np.ndarray  # [T, N] RMS reprojection error, NaN where lost
    cameras_used: list[str]
    cameras_skipped: dict[str, str]  # camera -> reason
    views_skipped: list[dict]  # {"camera", "frame", "reason"}
    seconds: float
    out_dir: Path
    time_source: str
    score: MotionScore | None = None
    options: MotionOptions | None = None
    left_out: dict[str, str] = field(default_factory=dict)  # frame file -> why verification left it out
    verify_seconds: float = 0.0
    rescaled: dict[str, str] = field(default_factory=dict)  # camera -> "calibrated size -> image size"

    @property
    def npz_path(self) -> Path:
        return self.out_dir / "trajectories.npz"

    @property
    def csv_path(self) -> Path:
        return self.out_dir / "trajectories.csv"

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / "motion.json"

    @property
    def kept_fraction(self) -> float:
        """Share of the first frame's tracks still tracked in the last frame."""
        return _kept_fraction(self.points)


# ----------------------------------------------------------------------------- triangulation


@dataclass
class Triangulation:
    """Multi-view triangulation of N points seen by C cameras."""

    points: np.ndarray  # [N, 3] world metres; NaN where fewer than min_views views agree
    inliers: np.ndarray  # [N, C] bool: views used for the point
    errors_px: np.ndarray  # [N, C] reprojection error of every observation (NaN where unobserved)

    @property
    def views(self) -> np.ndarray:
        """Inlier views per point. [N] int"""
        return self.inliers.sum(axis=1)

    @property
    def rms_px(self) -> np.ndarray:
        """RMS reprojection error over the inlier views, pixels; NaN where not triangulated. [N]"""
        e2 = np.where(self.inliers, np.nan_to_num(self.errors_px) ** 2, 0.0).sum(axis=1)
        n = self.views
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, np.sqrt(e2 / np.maximum(n, 1)), np.nan)


def triangulate_points(cameras: Sequence[Camera], uv: Sequence[np.ndarray] | np.ndarray, *,
                       threshold_px: float = 1.5, min_views: int = 2, min_angle_deg: float = 0.0,
                       hypotheses: int = 24, seed: int = 0) -> Triangulation:
    """Triangulate N points from their pixels in C cameras, rejecting outlier views.

    ``uv[c]`` is [N, 2] distorted pixels of the points in ``cameras[c]``, NaN
    where the camera does not see the point. Per point: MSAC over pairs of
    views (every pair when there are at most ``hypotheses``, else a seeded
    random sample), DLT over the inliers, Gauss-Newton on the reprojection
    error of undistorted points, inliers re-selected until stable. A view is an
    inlier when it reprojects within ``threshold_px`` in front of the camera;
    points with fewer than ``min_views`` inliers, or whose inlier rays span
    less than ``min_angle_deg``, come back NaN.
    """
    C = len(cameras)
    if C == 0:
        raise ShapeError("cameras", (0,), "at least one camera")
    obs_uv = np.stack([np.asarray(u, dtype=np.float64) for u in uv]) if C else np.zeros((0, 0, 2))
    if obs_uv.ndim != 3 or obs_uv.shape[0] != C or obs_uv.shape[2] != 2:
        raise ShapeError("uv", tuple(obs_uv.shape), f"[{C}, N, 2] (one [N, 2] array per camera)")
    N = obs_uv.shape[1]
    obs = np.isfinite(obs_uv).all(axis=2)  # [C, N]
    xn = np.full_like(obs_uv, np.nan)
    for c, cam in enumerate(cameras):
        k = cam.intrinsics
        sel = obs[c]
        if sel.any():
            xy_d = np.stack([(obs_uv[c, sel, 0] - k.cx) / k.fx, (obs_uv[c, sel, 1] - k.cy) / k.fy], axis=1)
            xn[c, sel] = undistort(xy_d, k.dist_array)
    geo = _Geometry(cameras)
    thr = float(threshold_px)
    points = np.full((N, 3), np.nan)
    inl = np.zeros((C, N), dtype=bool)

    # --- MSAC over pairs of views
    m = obs.sum(axis=0)
    cand = np.flatnonzero(m >= 2)
    if len(cand):
        order = np.argsort(~obs[:, cand], axis=0, kind="stable").T  # [n, C]: observed cameras first
        npairs = m[cand] * (m[cand] - 1) // 2
        table = np.array([(a, b) for b in range(1, C) for a in range(b)], dtype=np.int64).reshape(-1, 2)
        rng = np.random.default_rng(seed)
        best_cost = np.full(len(cand), np.inf)
        best_X = np.full((len(cand), 3), np.nan)
        for h in range(min(hypotheses, int(npairs.max()))):
            k = np.where(npairs <= hypotheses, h, rng.integers(0, np.maximum(npairs, 1)))
            valid = k < npairs
            rows = np.flatnonzero(valid)
            a = order[rows, table[k[rows], 0]]
            b = order[rows, table[k[rows], 1]]
            pts = cand[rows]
            w = np.zeros((len(rows), C), dtype=bool)
            w[np.arange(len(rows)), a] = True
            w[np.arange(len(rows)), b] = True
            X = geo.dlt(xn[:, pts], w.T)
            err = geo.errors(X, xn[:, pts], obs[:, pts])  # [C, n]
            cost = np.where(obs[:, pts], np.minimum(np.nan_to_num(err, nan=np.inf), thr) ** 2, 0.0).sum(0)
            better = cost < best_cost[rows]
            best_cost[rows[better]] = cost[better]
            best_X[rows[better]] = X[better]
        err = geo.errors(best_X, xn[:, cand], obs[:, cand])
        w = obs[:, cand] & (err < thr)

        # --- DLT + Gauss-Newton on the inliers, re-selecting inliers until stable
        X = best_X
        for _ in range(4):
            ok = w.sum(0) >= 2
            X = np.where(ok[:, None], geo.dlt(xn[:, cand], w), np.nan)
            X = geo.refine(X, xn[:, cand], w)
            err = geo.errors(X, xn[:, cand], obs[:, cand])
            w_new = obs[:, cand] & (err < thr)
            if np.array_equal(w_new, w):
                break
            w = w_new
        points[cand] = X
        inl[:, cand] = w

    # --- final figures in distorted pixels
    errors = np.full((C, N), np.nan)
    finite = np.isfinite(points).all(axis=1)
    for c, cam in enumerate(cameras):
        sel = obs[c] & finite
        if sel.any():
            proj, depth = cam.project(points[sel])
            e = np.linalg.norm(proj - obs_uv[c, sel], axis=1)
            errors[c, sel] = np.where(depth > 0, e, np.inf)
    inl &= np.nan_to_num(errors, nan=np.inf) < thr
    bad = inl.sum(axis=0) < min_views
    if min_angle_deg > 0:
        bad |= _ray_span_deg(cameras, points, inl) < min_angle_deg
    points[bad] = np.nan
    inl[:, bad] = False
    return Triangulation(points, inl.T.copy(), errors.T.copy())


def _ray_span_deg(cameras: Sequence[Camera], points: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Largest angle between two rays of the views ``w`` [C, N] onto ``points`` [N, 3], degrees; [N]."""
    centres = np.stack([c.pose.center for c in cameras])  # [C, 3]
    d = points[None, :, :] - centres[:, None, :]
    d /= np.maximum(np.linalg.norm(d, axis=2, keepdims=True), 1e-12)
    d = np.where(w[..., None], np.nan_to_num(d), np.nan)
    cos = np.einsum("cni,dni->ncd", d, d)  # [N, C, C], NaN unless both views count
    with np.errstate(invalid="ignore"):
        least = np.nanmin(np.where(np.isnan(cos), 2.0, cos), axis=(1, 2))
    return np.where(least <= 1.0, np.degrees(np.arccos(np.clip(least, -1, 1))), 0.0)


class _Geometry:
    """Projection matrices of C cameras in normalised (undistorted) coordinates."""

    def __init__(self, cameras: Sequence[Camera]) -> None:
        self.R = np.stack([c.pose.R for c in cameras])  # [C, 3, 3]
        self.t = np.stack([c.pose.t for c in cameras])  # [C, 3]
        self.P = np.concatenate([self.R, self.t[:, :, None]], axis=2)  # [C, 3, 4]
        self.f = np.array([(c.intrinsics.fx + c.intrinsics.fy) / 2 for c in cameras])  # [C] px per unit

    def dlt(self, xn: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Linear triangulation of points [C, n, 2] from the views where ``w`` [C, n]; [n, 3]."""
        x = np.nan_to_num(xn)
        r1 = x[..., 0:1] * self.P[:, None, 2] - self.P[:, None, 0]  # [C, n, 4]
        r2 = x[..., 1:2] * self.P[:, None, 2] - self.P[:, None, 1]
        wf = w[..., None].astype(np.float64)
        r1, r2 = r1 * wf, r2 * wf
        M = np.einsum("cni,cnj->nij", r1, r1) + np.einsum("cni,cnj->nij", r2, r2)  # [n, 4, 4]
        _, vec = np.linalg.eigh(M)
        v = vec[:, :, 0]
        with np.errstate(invalid="ignore", divide="ignore"):
            return v[:, :3] / v[:, 3:4]

    def errors(self, X: np.ndarray, xn: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Reprojection errors [C, n] in (approximate) pixels; inf behind a camera, NaN unobserved."""
        Xc = np.einsum("cij,nj->cni", self.R, X) + self.t[:, None, :]
        z = Xc[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            proj = Xc[..., :2] / z[..., None]
            e = np.linalg.norm(proj - xn, axis=-1) * self.f[:, None]
        e = np.where(z > 0, e, np.inf)
        return np.where(obs, np.where(np.isfinite(X).all(1)[None, :], e, np.inf), np.nan)

    def refine(self, X: np.ndarray, xn: np.ndarray, w: np.ndarray, iterations: int = 5) -> np.ndarray:
        """Gauss-Newton on the pixel reprojection error of the views ``w`` [C, n]; [n, 3]."""
        X = X.copy()
        ok = np.isfinite(X).all(axis=1) & (w.sum(0) >= 2)
        if not ok.any():
            return X
        Xo, xo, wo = X[ok], np.nan_to_num(xn[:, ok]), w[:, ok].astype(np.float64)
        for _ in range(iterations):
            Xc = np.einsum("cij,nj->cni", self.R, Xo) + self.t[:, None, :]
            z = np.where(np.abs(Xc[..., 2]) > 1e-9, Xc[..., 2], 1e-9)
            r = (Xc[..., :2] / z[..., None] - xo) * self.f[:, None, None]  # [C, n, 2]
            # d(x/z, y/z)/dXc, then through R: [C, n, 2, 3]
            dp = np.zeros(Xc.shape[:2] + (2, 3))
            dp[..., 0, 0] = 1 / z
            dp[..., 1, 1] = 1 / z
            dp[..., 0, 2] = -Xc[..., 0] / z**2
            dp[..., 1, 2] = -Xc[..., 1] / z**2
            J = np.einsum("cnkj,cji->cnki", dp, self.R) * self.f[:, None, None, None]
            Jw = J * wo[..., None, None]
            H = np.einsum("cnki,cnkj->nij", Jw, J) + 1e-9 * np.eye(3)
            g = np.einsum("cnki,cnk->ni", Jw, r)
            step = np.linalg.solve(H, g[..., None])[..., 0]
            Xo = Xo - step
            if np.abs(step).max() < 1e-9:
                break
        X[ok] = Xo
        return X


# ----------------------------------------------------------------------------- the stage


def run_motion(root: Path | str, cameras_path: Path | str, out_dir: Path | str,
               options: MotionOptions = MotionOptions(), *,
               on_event: Callable[[MotionProgress], None] | None = None) -> MotionReport:
    """Track surface points of a motion take in 3D and write their trajectories to ``out_dir``.

    Validates the take and cameras before writing anything. Returns the
    trajectories (metres, world frame of ``cameras_path``), per-frame times in
    seconds from the first frame, and, on a virtual capture, the scores.
    Frames that fail verification (:func:`reconstruct.inputs.verified_images`)
    are left out (their views listed with the reason); a camera whose images
    are a resized version of what it was calibrated at is used at their size.
    An empty result (no point tracked) is written with its reason, never NaN.
    """
    t0 = time.perf_counter()
    root = Path(root)
    take = find_take(root, "motion", options.take)
    images = take_images(root, take)
    if not images:
        raise ReconstructError(f"{root / 'takes' / take}: take {take} has no frames", take=take,
                               path=str(root / "takes" / take))
    cams_all = read_cameras(cameras_path)
    skipped: dict[str, str] = {}
    if options.cameras is not None:
        unknown = sorted(set(options.cameras) - set(images))
        if unknown:
            raise ReconstructError(f"take {take} has no camera(s) {', '.join(unknown)}", take=take,
                                   camera=unknown[0])
        images = {c: v for c, v in images.items() if c in options.cameras}
    for cid in images:
        if cid not in cams_all:
            skipped[cid] = f"not in {cameras_path}"
    every = sorted({f for c in images for f in images[c]})
    wanted = every[:options.max_frames] if options.max_frames is not None else every
    checked = verified_images(root, take, cameras=[c for c in images if c not in skipped], frames=wanted)
    left_views = {(Path(p).parent.name, int(Path(p).stem)): why for p, why in checked.left_out.items()
                  if Path(p).stem.isdigit()}
    good = checked.images
    for cid in images:
        if cid not in skipped and not good.get(cid):
            skipped[cid] = "every frame left out by verification"
    rescaled: dict[str, str] = {}
    for cid in images:  # the camera's intrinsics at the size of its images; another aspect ratio: it goes whole
        if cid not in skipped:
            cam, why = _at_image_size(good[cid], cams_all[cid])
            if why:
                skipped[cid] = why
            elif cam is not cams_all[cid]:
                a, b = cams_all[cid].intrinsics, cam.intrinsics
                rescaled[cid] = f"{a.width}x{a.height} -> {b.width}x{b.height}"
                cams_all[cid] = cam
    cams = [cams_all[c] for c in images if c not in skipped]
    frames = sorted({f for c in cams for f in images[c.id]})
    if options.max_frames is not None:
        frames = frames[:options.max_frames]
    if len(cams) < 2:
        raise ReconstructError(f"take {take}: {len(cams)} usable calibrated camera(s) "
                               f"({', '.join(c.id for c in cams) or 'none'}), motion needs at least 2"
                               + (f"; skipped: {', '.join(f'{k} ({v})' for k, v in skipped.items())}"
                                  if skipped else ""), take=take, cameras=len(cams),
                               left_out=checked.left_out or None)
    times, time_source = frame_times(root, take, frames)

    tracker = _Tracker(cams, options)
    views_skipped: list[dict] = []
    per_frame: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for k, f in enumerate(frames):
        imgs: dict[int, np.ndarray] = {}
        for ci, cam in enumerate(tracker.cams):
            if cam.id in skipped:
                continue
            if (cam.id, f) in left_views:
                img, why = None, f"left out: {left_views[(cam.id, f)]}"
            else:
                img, why = _read_image(good[cam.id].get(f), cam)
            if why is None:
                imgs[ci] = img
            elif why.startswith("size"):
                skipped[cam.id] = why  # wrong resolution for its calibration: the whole camera goes
                tracker.drop_camera(ci)
            else:
                views_skipped.append({"camera": cam.id, "frame": f, "reason": why})
        per_frame.append(tracker.step(k, imgs, detect=k == 0 or (options.redetect_every > 0
                                                                  and k % options.redetect_every == 0)))
        if on_event:
            on_event(MotionProgress(frame=f, done=k + 1, total=len(frames), tracks=len(per_frame[-1][0])))
    used = [c.id for c in cams if c.id not in skipped]

    n = tracker.next_id
    T = len(frames)
    points = np.full((T, n, 3), np.nan)
    views = np.zeros((T, n), dtype=np.int16)
    rms = np.full((T, n), np.nan, dtype=np.float32)
    for k, (ids, X, v, r) in enumerate(per_frame):
        points[k, ids], views[k, ids], rms[k, ids] = X, v, r
    track_ids = np.arange(n, dtype=np.int64)

    score = None
    gt = GroundTruth.find(root)
    if gt is not None and (gt.take_dir(take) / "frames.json").is_file():
        score = score_motion(points, frames, gt, take)

    seconds = time.perf_counter() - t0
    report = MotionReport(take=take, frames=frames, times=times, track_ids=track_ids, points=points, views=views,
                          rms_px=rms, cameras_used=used, cameras_skipped=skipped, views_skipped=views_skipped,
                          seconds=seconds, out_dir=Path(out_dir), time_source=time_source, score=score,
                          options=options, left_out=checked.left_out, verify_seconds=checked.seconds,
                          rescaled=rescaled)
    write_trajectories(report)
    return report


def write_trajectories(report: MotionReport) -> None:
    """Write ``trajectories.npz``, ``trajectories.csv`` and ``motion.json`` of a report."""
    import io

    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, points=report.points, times=report.times, frames=np.asarray(report.frames, np.int64),
                        track_ids=report.track_ids, views=report.views, rms_px=report.rms_px,
                        cameras=np.asarray(report.cameras_used))
    atomic_write_bytes(report.npz_path, buf.getvalue(), fsync=False)

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["track", "frame", "time_s", "x", "y", "z", "views", "rms_px"])
    live = np.isfinite(report.points).all(axis=2)  # [T, N]
    for n in range(report.points.shape[1]):
        for k in np.flatnonzero(live[:, n]):
            x, y, z = report.points[k, n]
            r = float(report.rms_px[k, n])
            w.writerow([int(report.track_ids[n]), report.frames[k], repr(float(report.times[k])),
                        repr(float(x)), repr(float(y)), repr(float(z)), int(report.views[k, n]),
                        repr(r) if math.isfinite(r) else ""])
    atomic_write_bytes(report.csv_path, text.getvalue().encode(), fsync=False)

    rms = report.rms_px[live]
    rms = rms[np.isfinite(rms)]
    doc = {"schema": MOTION_SCHEMA, "version": MOTION_VERSION, "take": report.take,
           "frames": len(report.frames), "first_frame": report.frames[0] if report.frames else None,
           "last_frame": report.frames[-1] if report.frames else None,
           "time_source": report.time_source, "tracks": int(report.points.shape[1]),
           "tracks_per_frame": [int(c) for c in live.sum(axis=1)],
           "kept_fraction": round(report.kept_fraction, 4),
           "median_views": float(np.median(report.views[live])) if live.any() else 0.0,
           "median_rms_px": round(float(np.median(rms)), 4) if len(rms) else None,
           "cameras_used": report.cameras_used, "cameras_skipped": report.cameras_skipped,
           "views_skipped": report.views_skipped, "left_out": report.left_out,
           "verify_seconds": round(report.verify_seconds, 3), "rescaled": report.rescaled,
           "seconds": round(report.seconds, 3),
           "files": {"npz": report.npz_path.name, "csv": report.csv_path.name}}
    if not live.any():  # an empty result is a figure with its reason, not NaN
        doc["reason"] = (f"no point was seen consistently by {report.options.min_new_views if report.options else 5}"
                         f" or more of the {len(report.cameras_used)} camera(s) used over {len(report.frames)} "
                         "frame(s)")
    if report.options is not None:
        doc["options"] = asdict(report.options)
    if report.score is not None:
        doc["ground_truth"] = report.score.to_dict()
    atomic_write_json(report.manifest_path, doc, fsync=False)


def frame_times(root: Path | str, take: str, frames: Sequence[int]) -> tuple[np.ndarray, str]:
    """Seconds of each frame from the first one, and where they came from.

    A session's median trigger time across cameras ("trigger") where every
    frame has one, else the planned time of the session ("plan"), else
    frame / fps of the root's rig file ("fps"), else frame / 24 ("assumed").
    """
    root = Path(root)
    idx = list(frames)
    if (root / "session.json").is_file():
        from capture.session import read_manifest
        from rigs.errors import TwinstudioError

        try:
            rec = read_manifest(root).takes.get(take)
        except TwinstudioError:  # a damaged manifest costs the trigger times only
            rec = None
        if rec is not None:
            trig = []
            for f in idx:
                ts = [r[f].trigger_time for r in rec.captured.values() if f in r and r[f].trigger_time is not None]
                trig.append(float(np.median(ts)) if ts else math.nan)
            t = np.asarray(trig)
            if len(t) and np.isfinite(t).all():
                return t - t[0], "trigger"
            plan = {p.index: p.time for p in rec.frames}
            if all(f in plan for f in idx) and any(plan[f] for f in idx):
                t = np.array([plan[f] for f in idx], dtype=np.float64)
                return t - t[0], "plan"
    fps = _rig_fps(root / "rig.toml")
    if fps is not None:
        return (np.asarray(idx, np.float64) - idx[0]) / fps, "fps"
    return (np.asarray(idx, np.float64) - idx[0]) / 24.0, "assumed"


def _rig_fps(path: Path) -> float | None:
    """The motion fps of a rig file, or None where there is none or it does not load."""
    if not path.is_file():
        return None
    from rigs.errors import TwinstudioError
    from rigs.rigfile import load_rig

    try:
        return float(load_rig(path).motion.fps)
    except TwinstudioError:  # an unreadable rig file costs the fps only
        return None


def _at_image_size(frames: dict[int, Path], cam: Camera) -> tuple[Camera, str | None]:
    """The camera at the size of its images (from its first readable one), or why it cannot go with them.

    Images of the calibrated size, or a resized version of it (same aspect
    ratio), are fine: the intrinsics follow them. Another aspect ratio is not.
    """
    import cv2

    for path in frames.values():
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            continue
        h, w = img.shape[:2]
        k = cam.intrinsics
        fit = intrinsics_for_size(k, w, h)
        if fit is None:
            return cam, f"size {w}x{h}, calibrated for {k.width}x{k.height} (another aspect ratio)"
        return (cam if fit is k else Camera(cam.id, fit, cam.pose)), None
    return cam, None


def _read_image(path: Path | None, cam: Camera) -> tuple[np.ndarray | None, str | None]:
    import cv2

    if path is None:
        return None, "missing"
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return None, f"unreadable ({path.name})"
    h, w = img.shape[:2]
    k = cam.intrinsics
    if (w, h) != (k.width, k.height):
        return None, f"size {w}x{h}, calibrated for {k.width}x{k.height}"
    return img, None


# ----------------------------------------------------------------------------- patch alignment


class _Patches:
    """Affine + gain/bias alignment of small square patches, vectorised over patches.

    A template ``T`` is an image sampled on a ``(2 half + 1)^2`` grid of offsets
    ``d`` around a point. Aligning it to an image ``I`` finds the centre ``c``
    and 2x2 map ``A`` minimising ``sum_d w(d) (a I(c + A d) + b - T(d))^2``
    (Gauss-Newton, forward additive; ``w`` a Gaussian weight on the centre,
    ``a, b`` absorb the change of shading). The affine map follows the
    foreshortening of a patch as the surface turns or the viewpoint changes,
    which a translation-only tracker turns into drift.
    """

    def __init__(self, half: int, sigma: float) -> None:
        r = np.arange(-half, half + 1, dtype=np.float64)
        dx, dy = np.meshgrid(r, r)
        self.d = np.stack([dx.ravel(), dy.ravel()], axis=1)  # [P, 2]
        self.w = np.exp(-(self.d ** 2).sum(axis=1) / (2 * (half / 1.5) ** 2))  # [P]
        self.half = half
        self.sigma = sigma

    @property
    def size(self) -> int:
        return len(self.d)

    def prep(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The smoothed image [H, W] and the same with its x/y gradients [H, W, 3], float32."""
        import cv2

        f = gray.astype(np.float32)
        if self.sigma > 0:
            f = cv2.GaussianBlur(f, (0, 0), self.sigma)
        gx = cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3, scale=1 / 8)
        gy = cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3, scale=1 / 8)
        return f, cv2.merge([f, gx, gy])

    def template(self, img: tuple, pts: np.ndarray) -> np.ndarray:
        """Templates [M, P] float32 around points [M, 2] of a prepared image."""
        return _sample(img[0], pts[:, None, :] + self.d[None])

    def align(self, T: np.ndarray, img: tuple, c0: np.ndarray, A0: np.ndarray,
              iterations: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Align templates [M, P] to a prepared image from centres [M, 2] and maps [M, 2, 2].

        Returns centres [M, 2], maps [M, 2, 2] and the weighted NCC [M] of the
        aligned patch (-1 where the alignment failed).
        """
        M = len(T)
        if not M:
            return np.zeros((0, 2)), np.zeros((0, 2, 2)), np.zeros(0)
        d, w = self.d, self.w
        d32, w32 = d.astype(np.float32), w.astype(np.float32)
        c = np.asarray(c0, np.float64).copy()
        A = np.asarray(A0, np.float64).copy()
        a, b = np.ones(M), np.zeros(M)
        T = T.astype(np.float32)
        live = np.ones(M, dtype=bool)
        for _ in range(iterations):
            idx = np.flatnonzero(live)
            if not len(idx):
                break
            q = c[idx, None, :] + d[None] @ A[idx].transpose(0, 2, 1)  # [m, P, 2]
            Ig = _sample(img[1], q)  # [m, P, 3]: image, x and y gradient
            I, gx, gy = Ig[..., 0], Ig[..., 1], Ig[..., 2]
            ai = a[idx, None].astype(np.float32)
            res = ai * I + b[idx, None].astype(np.float32) - T[idx]  # [m, P]
            agx, agy = ai * gx, ai * gy
            J = np.stack([agx, agy, agx * d32[:, 0], agx * d32[:, 1], agy * d32[:, 0], agy * d32[:, 1],
                          I, np.ones_like(I)], axis=-1)  # [m, P, 8]
            Jw = (J * w32[None, :, None]).transpose(0, 2, 1)  # [m, 8, P]
            H = (Jw @ J).astype(np.float64) + 1e-6 * np.eye(8)
            g = (Jw @ res[..., None]).astype(np.float64)
            try:
                step = np.linalg.solve(H, g)[..., 0]
            except np.linalg.LinAlgError:
                step = np.stack([np.linalg.lstsq(h, v, rcond=None)[0][:, 0] for h, v in zip(H, g)])
            c[idx] -= step[:, :2]
            A[idx] -= step[:, 2:6].reshape(-1, 2, 2)
            a[idx] -= step[:, 6]
            b[idx] -= step[:, 7]
            live[idx] = np.abs(step[:, :2]).max(axis=1) > 0.01
        q = c[:, None, :] + d[None] @ A.transpose(0, 2, 1)
        I = _sample(img[0], q).astype(np.float64)
        T = T.astype(np.float64)
        x = I - (I * w).sum(1, keepdims=True) / w.sum()
        y = T - (T * w).sum(1, keepdims=True) / w.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            ncc = (x * y * w).sum(1) / np.sqrt((x * x * w).sum(1) * (y * y * w).sum(1))
        det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
        h, wd = img[0].shape
        m = self.half + 1
        ok = (np.isfinite(c).all(axis=1) & np.isfinite(ncc) & (det > 0.4) & (det < 2.5)
              & (c[:, 0] >= m) & (c[:, 1] >= m) & (c[:, 0] <= wd - 1 - m) & (c[:, 1] <= h - 1 - m))
        return c, A, np.where(ok, ncc, -1.0)


def _sample(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear samples of a float32 image [H, W] or [H, W, K] at points [..., 2] (x, y); [...] or [..., K]."""
    import cv2

    shape = pts.shape[:-1] + img.shape[2:]
    flat = pts.reshape(-1, 2)
    n = len(flat)
    if not n:
        return np.zeros(shape, np.float32)
    cols = 1024
    rows = -(-n // cols)
    mx = np.zeros(rows * cols, np.float32)
    my = np.zeros(rows * cols, np.float32)
    mx[:n], my[:n] = flat[:, 0], flat[:, 1]
    out = cv2.remap(img, mx.reshape(rows, cols), my.reshape(rows, cols), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REPLICATE)
    return out.reshape((rows * cols,) + img.shape[2:])[:n].reshape(shape)


# ----------------------------------------------------------------------------- tracking


@dataclass
class _View:
    """The 2D tracks of one camera."""

    pts: np.ndarray  # [M, 2] float64 pixels
    ids: np.ndarray  # [M] int64 3D track ids
    tpl: np.ndarray  # [M, P] float32 templates from the frame each 2D track started
    A: np.ndarray  # [M, 2, 2] affine map of each template into the current frame

    @classmethod
    def empty(cls, patch_size: int) -> _View:
        return cls(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros((0, patch_size), np.float32),
                   np.zeros((0, 2, 2)))

    def select(self, keep: np.ndarray) -> _View:
        return _View(self.pts[keep], self.ids[keep], self.tpl[keep], self.A[keep])

    def extend(self, pts: np.ndarray, ids: np.ndarray, tpl: np.ndarray) -> _View:
        return _View(np.concatenate([self.pts, pts]), np.concatenate([self.ids, ids]),
                     np.concatenate([self.tpl, tpl]), np.concatenate([self.A, np.tile(np.eye(2), (len(ids), 1, 1))]))


@dataclass
class _Frame:
    """One camera's image at one frame, as the tracker needs it."""

    bgr: np.ndarray
    gray: np.ndarray
    prep: tuple  # _Patches.prep of gray
    mask: np.ndarray | None = None  # uint8 eroded subject mask (detection frames)


class _Tracker:
    """The state of :func:`run_motion` between frames: per camera its 2D tracks (each one view of
    a 3D track id) and last image, per 3D track its last two positions."""

    def __init__(self, cams: list[Camera], options: MotionOptions) -> None:
        import cv2

        self.cams = cams
        self.opt = options
        self.patches = _Patches(options.patch_half, options.patch_sigma)
        C = len(cams)
        axes = np.stack([c.pose.R[2] for c in cams])
        self.angle = np.degrees(np.arccos(np.clip(axes @ axes.T, -1, 1)))  # [C, C]
        self.neighbours = [(i, j) for i in range(C) for j in range(i + 1, C)
                           if self.angle[i, j] <= options.max_pair_angle_deg]
        self.f = np.array([(c.intrinsics.fx + c.intrinsics.fy) / 2 for c in cams])
        self.views = [_View.empty(self.patches.size) for _ in cams]
        self.prev: dict[int, tuple[int, _Frame]] = {}  # camera -> (frame index, its last frame)
        self.next_id = 0
        self.last = np.full((1024, 3), np.nan)  # [cap, 3] position in the last frame
        self.last2 = np.full((1024, 3), np.nan)  # and in the one before
        self.retry = np.zeros((1024, C), np.int64)  # [cap, C] frame from which to try joining again
        self.sift = cv2.SIFT_create()
        self.lk = {"winSize": (options.lk_window, options.lk_window), "maxLevel": options.lk_levels,
                   "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 40, 0.01)}

    def drop_camera(self, c: int) -> None:
        self.views[c] = _View.empty(self.patches.size)
        self.prev.pop(c, None)

    # ---------------------------------------------------------------- one frame

    def step(self, k: int, imgs: dict[int, np.ndarray], detect: bool):
        """Track into frame ``k``; returns (ids, points, views, rms) of the live tracks."""
        import cv2

        frames = {}
        for c, img in imgs.items():
            gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
            frames[c] = _Frame(img, gray, self.patches.prep(gray))
        for c in range(len(self.cams)):
            prev = self.prev.get(c)
            if c in frames and prev is not None and prev[0] == k - 1 and len(self.views[c].ids):
                self._track(c, prev[1], frames[c])
            else:
                self.views[c] = _View.empty(self.patches.size)
        ids, X, nv, rms = self._triangulate_live()
        if detect:
            for fr in frames.values():
                fr.mask = self._mask(fr.bgr)
        if len(ids) and (detect or self.opt.join_every_frame):
            uv = self._observations(ids)
            allow = self.retry[ids].T <= k  # [C, n]: a camera that did not fit a point waits a few frames
            tried = np.zeros_like(allow)
            for c, rows, pts in self._join(X, uv, frames, allow, tried):
                self.views[c] = self.views[c].extend(pts, ids[rows], self.patches.template(frames[c].prep, pts))
                tried[c, rows] = False
            cc, rows = np.nonzero(tried)
            self.retry[ids[rows], cc] = k + _JOIN_RETRY
            ids, X, nv, rms = self._triangulate_live()
        if detect:
            new = self._new_tracks(frames, budget=self.opt.max_tracks - len(ids))
            ids, X = np.concatenate([ids, new[0]]), np.concatenate([X, new[1]])
            nv, rms = np.concatenate([nv, new[2]]), np.concatenate([rms, new[3]])
        for c, fr in frames.items():
            fr.bgr, fr.mask, fr.prep = None, None, ()  # the next frame needs the grey image only
            self.prev[c] = (k, fr)
        for c in [c for c in self.prev if c not in frames]:
            del self.prev[c]
        # positions for the constant-velocity prediction
        self._grow(self.next_id)
        self.last2[:] = self.last
        self.last[:] = np.nan
        self.last[ids] = X
        return ids, X, nv, rms

    def _predict(self, ids: np.ndarray) -> np.ndarray:
        a, b = self.last[ids], self.last2[ids]
        return np.where(np.isfinite(b), 2 * a - b, a)

    def _track(self, c: int, prev: _Frame, cur: _Frame) -> None:
        """Lucas-Kanade from the previous frame (forward-backward checked), then the affine
        alignment of each track's own template, which keeps the track from drifting."""
        import cv2

        v = self.views[c]
        p0 = v.pts.astype(np.float32).reshape(-1, 1, 2)
        guess = p0.copy()
        X = self._predict(v.ids)
        fin = np.flatnonzero(np.isfinite(X).all(axis=1))
        if len(fin):
            uv, z = self.cams[c].project(X[fin])
            good = (z > 0) & np.isfinite(uv).all(axis=1)
            guess[fin[good], 0] = uv[good]
        flags = cv2.OPTFLOW_USE_INITIAL_FLOW
        p1, s1, _ = cv2.calcOpticalFlowPyrLK(prev.gray, cur.gray, p0, guess, flags=flags, **self.lk)
        pb, s2, _ = cv2.calcOpticalFlowPyrLK(cur.gray, prev.gray, p1, p0.copy(), flags=flags, **self.lk)
        p1, pb = p1.reshape(-1, 2).astype(np.float64), pb.reshape(-1, 2)
        ok = (s1.ravel() == 1) & (s2.ravel() == 1) & (np.linalg.norm(pb - v.pts, axis=1) < self.opt.fb_px)
        c1, A, ncc = self.patches.align(v.tpl[ok], cur.prep, p1[ok], v.A[ok])
        rows = np.flatnonzero(ok)
        good = (ncc >= self.opt.track_ncc) & (np.linalg.norm(c1 - p1[ok], axis=1) <= self.opt.reprojection_px)
        v = v.select(rows[good])
        v.pts, v.A = c1[good], A[good]
        self.views[c] = v

    def _observations(self, ids: np.ndarray) -> np.ndarray:
        """[C, n, 2] pixels of tracks ``ids`` (sorted) in every camera, NaN where not tracked."""
        uv = np.full((len(self.cams), len(ids), 2), np.nan)
        for c, v in enumerate(self.views):
            if len(v.ids):
                rows = np.searchsorted(ids, v.ids)
                has = (rows < len(ids)) & (ids[np.minimum(rows, len(ids) - 1)] == v.ids)
                uv[c, rows[has]] = v.pts[has]
        return uv

    def _triangulate_live(self):
        """Re-triangulate every live track from its current views, dropping outlier views and lost tracks."""
        ids = np.unique(np.concatenate([v.ids for v in self.views] + [np.zeros(0, np.int64)]))
        if not len(ids):
            return ids, np.zeros((0, 3)), np.zeros(0, np.int16), np.zeros(0, np.float32)
        tri = triangulate_points(self.cams, list(self._observations(ids)), threshold_px=self.opt.reprojection_px,
                                 min_views=self.opt.min_views, min_angle_deg=self.opt.min_ray_angle_deg)
        for c, v in enumerate(self.views):
            if len(v.ids):
                self.views[c] = v.select(tri.inliers[np.searchsorted(ids, v.ids), c])
        ok = np.isfinite(tri.points).all(axis=1)
        return ids[ok], tri.points[ok], tri.views[ok].astype(np.int16), tri.rms_px[ok].astype(np.float32)

    # ---------------------------------------------------------------- new views and new tracks

    def _mask(self, bgr: np.ndarray) -> np.ndarray:
        import cv2

        from reconstruct.masks import key_mask

        mask = key_mask(bgr).astype(np.uint8) * 255
        r = self.opt.mask_erode_px
        if r > 0:
            mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
        return mask

    def _join(self, X: np.ndarray, uv: np.ndarray, frames: dict[int, _Frame], allow: np.ndarray | None = None,
              tried: np.ndarray | None = None):
        """New views of points X [n, 3] seen at uv [C, n, 2] (NaN where not): in every other camera
        (where ``allow`` [C, n]) whose subject mask the point projects into, the patch of the nearest
        seeing camera aligned at the projection. Yields (camera, point rows, pixels [m, 2]); marks
        the (camera, point) pairs it aligned in ``tried``."""
        o = self.opt
        seen = np.isfinite(uv[..., 0])  # [C, n]
        margin = self.patches.half + 2
        for c, fr in frames.items():
            todo = np.flatnonzero(~seen[c] & seen.any(axis=0) & (True if allow is None else allow[c]))
            if not len(todo):
                continue
            proj, z = self.cams[c].project(X[todo])
            h, w = fr.gray.shape
            inside = (z > 0) & (proj[:, 0] >= margin) & (proj[:, 1] >= margin) & \
                (proj[:, 0] <= w - 1 - margin) & (proj[:, 1] <= h - 1 - margin)
            todo, proj = todo[inside], proj[inside]
            if fr.mask is not None:
                on = fr.mask[np.round(proj[:, 1]).astype(int), np.round(proj[:, 0]).astype(int)] > 0
                todo, proj = todo[on], proj[on]
            ang = np.where(seen[:, todo].T & np.isin(np.arange(len(self.cams)), list(frames))[None, :],
                           self.angle[c][None, :], np.inf)
            ref = ang.argmin(axis=1)
            near = ang[np.arange(len(todo)), ref] <= o.max_pair_angle_deg
            todo, proj, ref = todo[near], proj[near], ref[near]
            if not len(todo):
                continue
            T = np.zeros((len(todo), self.patches.size), np.float32)
            for r in np.unique(ref):
                sel = ref == r
                T[sel] = self.patches.template(frames[r].prep, uv[r, todo[sel]])
            p, _, ncc = self.patches.align(T, fr.prep, proj, np.tile(np.eye(2), (len(todo), 1, 1)))
            if tried is not None:
                tried[c, todo] = True
            good = (ncc >= o.join_ncc) & (np.linalg.norm(p - proj, axis=1) <= o.reprojection_px)
            if good.any():
                yield c, todo[good], p[good]

    def _detect(self, c: int, fr: _Frame) -> dict:
        """New corners of camera c (away from its tracked points), with SIFT descriptors."""
        import cv2

        o = self.opt
        mask = fr.mask.copy()
        r = math.ceil(o.corner_spacing_px)
        for x, y in np.round(self.views[c].pts).astype(int).tolist():
            cv2.circle(mask, (x, y), r, 0, -1)
        want = o.corners_per_camera - len(self.views[c].ids)
        pts = np.zeros((0, 2))
        ys, xs = np.nonzero(mask)
        h, w = fr.gray.shape
        if want > 0 and len(xs):
            # work on the subject's bounding box: Shi-Tomasi and SIFT cost grows with the area
            pad = int(2 * o.descriptor_px)
            x0, y0 = max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0)
            x1, y1 = min(int(xs.max()) + pad + 1, w), min(int(ys.max()) + pad + 1, h)
            sub = np.ascontiguousarray(fr.gray[y0:y1, x0:x1])
            got = cv2.goodFeaturesToTrack(sub, maxCorners=want, qualityLevel=o.corner_quality,
                                          minDistance=o.corner_spacing_px,
                                          mask=np.ascontiguousarray(mask[y0:y1, x0:x1]), blockSize=5)
            if got is not None:
                got = cv2.cornerSubPix(sub, got.astype(np.float32), (4, 4), (-1, -1),
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
                pts = got.reshape(-1, 2).astype(np.float64) + (x0, y0)
                m = self.patches.half + 2
                inside = (pts[:, 0] >= m) & (pts[:, 1] >= m) & (pts[:, 0] <= w - 1 - m) & (pts[:, 1] <= h - 1 - m)
                pts = pts[inside]
        return {"pts": pts, "desc": self._describe(fr.gray, pts)}

    def _describe(self, gray: np.ndarray, pts: np.ndarray) -> np.ndarray:
        """Upright SIFT descriptors at ``pts`` [n, 2], unit-normalised; [n, 128] (NaN where none)."""
        import cv2

        if not len(pts):
            return np.zeros((0, 128), np.float32)
        h, w = gray.shape
        pad = int(2 * self.opt.descriptor_px) + 2
        x0, y0 = max(int(np.floor(pts[:, 0].min())) - pad, 0), max(int(np.floor(pts[:, 1].min())) - pad, 0)
        x1 = min(int(np.ceil(pts[:, 0].max())) + pad + 1, w)
        y1 = min(int(np.ceil(pts[:, 1].max())) + pad + 1, h)
        sub = np.ascontiguousarray(gray[y0:y1, x0:x1])  # SIFT builds its pyramid over the whole image given
        kps = [cv2.KeyPoint(float(x - x0), float(y - y0), self.opt.descriptor_px, 0.0, 0, 0, i)
               for i, (x, y) in enumerate(pts)]
        kps, d = self.sift.compute(sub, kps)
        out = np.full((len(pts), 128), np.nan, np.float32)
        if d is not None:
            out[[kp.class_id for kp in kps]] = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
        return out

    def _new_tracks(self, frames: dict[int, _Frame], budget: int):
        """Match new corners across neighbouring cameras, triangulate, join more views: new tracks."""
        empty = (np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0, np.int16), np.zeros(0, np.float32))
        if budget <= 0 or len(frames) < 2:
            return empty
        C = len(self.cams)
        cams = sorted(frames)
        feats = {c: self._detect(c, frames[c]) for c in cams}
        offset, total = {}, 0
        for c in cams:
            offset[c] = total
            total += len(feats[c]["pts"])
        parent = np.arange(total)

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        norm = {}
        for c in cams:
            k = self.cams[c].intrinsics
            p = feats[c]["pts"]
            xy = np.stack([(p[:, 0] - k.cx) / k.fx, (p[:, 1] - k.cy) / k.fy], axis=1)
            norm[c] = np.concatenate([undistort(xy, k.dist_array), np.ones((len(p), 1))], axis=1)
        # chain pairwise matches into tracks, best matches first, never two corners of one camera in a track
        matches = []
        for i, j in self.neighbours:
            if i in feats and j in feats and len(norm[i]) and len(norm[j]):
                for a, b, dist in self._match_pair(i, j, norm[i], norm[j], feats[i]["desc"], feats[j]["desc"]):
                    matches.append((dist, offset[i] + a, offset[j] + b))
        if not matches:
            return empty
        node_cam = np.concatenate([np.full(len(feats[c]["pts"]), c) for c in cams])
        node_row = np.concatenate([np.arange(len(feats[c]["pts"])) for c in cams])
        cam_bits = {a: 1 << int(node_cam[a]) for a in range(total)}
        for _, a, b in sorted(matches):
            ra, rb = find(a), find(b)
            if ra != rb and not cam_bits[ra] & cam_bits[rb]:
                parent[ra] = rb
                cam_bits[rb] |= cam_bits[ra]
        roots = np.array([find(a) for a in range(total)])
        _, inv, counts = np.unique(roots, return_inverse=True, return_counts=True)
        comp_of = np.full(len(counts), -1)
        comps = np.flatnonzero(counts >= 2)
        n = len(comps)
        comp_of[comps] = np.arange(n)
        uv = np.full((C, n, 2), np.nan)
        for node in np.flatnonzero(comp_of[inv] >= 0):
            c = int(node_cam[node])
            uv[c, comp_of[inv[node]]] = feats[c]["pts"][node_row[node]]
        tri = triangulate_points(self.cams, list(uv), threshold_px=self.opt.reprojection_px, min_views=2)
        uv[~tri.inliers.T] = np.nan
        ok = np.flatnonzero(np.isfinite(tri.points).all(axis=1))
        if not len(ok):
            return empty
        uv, X = uv[:, ok], tri.points[ok]
        for _ in range(self.opt.join_rounds):  # views found in one round are closer references for the next
            added = 0
            for c, rows, pts in self._join(X, uv, frames):
                uv[c, rows] = pts
                added += len(rows)
            if not added:
                break
            tri = triangulate_points(self.cams, list(uv), threshold_px=self.opt.reprojection_px, min_views=2)
            uv[~tri.inliers.T] = np.nan
            X = np.where(np.isfinite(tri.points), tri.points, X)
        tri = triangulate_points(self.cams, list(uv), threshold_px=self.opt.reprojection_px,
                                 min_views=max(self.opt.min_views, self.opt.min_new_views),
                                 min_angle_deg=self.opt.min_ray_angle_deg)
        good = np.flatnonzero(np.isfinite(tri.points).all(axis=1))
        if len(good) > budget:
            order = np.lexsort((tri.rms_px[good], -tri.views[good]))
            good = np.sort(good[order[:budget]])
        if not len(good):
            return empty
        new_ids = np.arange(self.next_id, self.next_id + len(good), dtype=np.int64)
        self.next_id += len(good)
        for c in cams:
            sel = tri.inliers[good, c]
            if sel.any():
                pts = uv[c, good[sel]]
                self.views[c] = self.views[c].extend(pts, new_ids[sel], self.patches.template(frames[c].prep, pts))
        return (new_ids, tri.points[good], tri.views[good].astype(np.int16), tri.rms_px[good].astype(np.float32))

    def _grow(self, n: int) -> None:
        cap = len(self.last)
        if n <= cap:
            return
        new = max(n, 2 * cap)
        for name in ("last", "last2"):
            a = np.full((new, 3), np.nan)
            a[:cap] = getattr(self, name)
            setattr(self, name, a)
        retry = np.zeros((new, self.retry.shape[1]), np.int64)
        retry[:cap] = self.retry
        self.retry = retry

    def _match_pair(self, i: int, j: int, xi: np.ndarray, xj: np.ndarray, di: np.ndarray,
                    dj: np.ndarray) -> list[tuple[int, int, float]]:
        """Mutual, ratio-tested descriptor matches (row in i, row in j, descriptor distance) between
        cameras i and j near their epipolar lines.

        ``xi``, ``xj``: homogeneous undistorted normalised points [n, 3]; ``di``, ``dj``: descriptors.
        """
        Ri, ti = self.cams[i].pose.R, self.cams[i].pose.t
        Rj, tj = self.cams[j].pose.R, self.cams[j].pose.t
        R = Rj @ Ri.T
        t = tj - R @ ti
        E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ R
        lj = xi @ E.T  # [ni, 3] epipolar lines in j
        li = xj @ E  # [nj, 3] epipolar lines in i
        num = np.abs(lj @ xj.T)  # [ni, nj] = |xj^T E xi|
        dist_j = num / np.maximum(np.linalg.norm(lj[:, :2], axis=1), 1e-12)[:, None] * self.f[j]
        dist_i = num / np.maximum(np.linalg.norm(li[:, :2], axis=1), 1e-12)[None, :] * self.f[i]
        near = np.maximum(dist_i, dist_j) <= self.opt.epipolar_px
        D = np.sqrt(np.maximum(2.0 - 2.0 * np.clip(np.nan_to_num(di) @ np.nan_to_num(dj).T, -1, 1), 0))
        D[~near | ~np.isfinite(di[:, :1]) | ~np.isfinite(dj[:, 0])[None, :]] = np.inf
        if not np.isfinite(D).any():
            return []
        inf_col = np.full((len(D), 1), np.inf)
        row2 = np.partition(np.hstack([D, inf_col]), 1, axis=1)[:, :2]  # best, second best per row
        col2 = np.partition(np.vstack([D, np.full((1, D.shape[1]), np.inf)]), 1, axis=0)[:2].T
        best_j, best_i = D.argmin(axis=1), D.argmin(axis=0)
        ratio, cap = self.opt.match_ratio, self.opt.max_descriptor_distance
        a = np.flatnonzero(np.isfinite(row2[:, 0]))
        b = best_j[a]
        keep = (best_i[b] == a) & (row2[a, 0] <= ratio * row2[a, 1]) & (col2[b, 0] <= ratio * col2[b, 1]) \
            & (row2[a, 0] <= cap)
        return list(zip(a[keep].tolist(), b[keep].tolist(), row2[a[keep], 0].tolist()))


# ----------------------------------------------------------------------------- scoring


def _kept_fraction(points: np.ndarray) -> float:
    live = np.isfinite(points).all(axis=2)
    if not live.shape[1] or not live[0].any():
        return 0.0
    return float(live[-1][live[0]].mean())


def ground_truth_trajectories(points: np.ndarray, frames: Sequence[int], gt: GroundTruth,
                              take: str) -> np.ndarray:
    """True positions [T, N, 3] of tracked surface points (NaN where the track is lost).

    Each track is attached, in its first frame, to the nearest point of the
    posed ground-truth surface and that point's rigid part, and carried by
    the part's transform. The person and clip are rebuilt exactly as the
    virtual studio rendered them (checked against the joints of frames.json).
    """
    import open3d as o3d

    from rigs.rigfile import load_rig
    from rigs.virtual.motion import default_clip
    from rigs.virtual.person import build_person

    doc = gt.frames(take)
    if doc.get("kind") not in (None, "motion"):
        raise ReconstructError(f"take {take} is a {doc.get('kind')} take, not a motion take", take=take)
    gframes = {f["index"]: f for f in doc["frames"]}
    missing = [f for f in frames if f not in gframes or "joints" not in gframes[f]]
    if missing:
        raise ReconstructError(f"ground truth of take {take} has no pose for frame(s) {missing[:5]}",
                               take=take, frame=missing[0])
    rig = load_rig(gt.root / "rig.toml")
    person = build_person(rig.virtual.seed)
    # the render poses a motion take's frame i with default_clip(frames of the take, rig fps).params(i)
    clip = default_clip(frames=max(len(doc["frames"]), 1), fps=rig.motion.fps)
    posed = {}
    for f in sorted({int(f) for f in frames}):
        p = person.pose(clip.params(f))
        want = gframes[f]["joints"]
        worst = max(float(np.abs(p.joints[k] - np.asarray(v)).max()) for k, v in want.items())
        if worst > 1e-6:
            raise ReconstructError(f"ground truth of take {take}: the rebuilt pose of frame {f} is {worst:.3g} m "
                                   "off the recorded joints", take=take, frame=f)
        posed[f] = p
    part_joint = [p.joint for p in person.parts]
    T, N = points.shape[:2]
    out = np.full((T, N, 3), np.nan)
    live = np.isfinite(points).all(axis=2)
    first = np.where(live.any(axis=0), live.argmax(axis=0), -1)
    for k in np.unique(first[first >= 0]):
        sel = np.flatnonzero(first == k)
        pp = posed[int(frames[k])]
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(pp.vertices.astype(np.float32)),
                            o3d.core.Tensor(pp.triangles.astype(np.uint32)))
        ans = scene.compute_closest_points(o3d.core.Tensor(points[k, sel].astype(np.float32)))
        surf = ans["points"].numpy().astype(np.float64)
        tri = ans["primitive_ids"].numpy().astype(np.int64)
        # refine the float32 closest point on its triangle in float64
        surf = _closest_on_triangles(points[k, sel], pp.vertices[pp.triangles[tri]])
        part = person.triangle_part[tri]
        for pi in np.unique(part):
            rows = sel[part == pi]
            G0 = pp.joint_transforms[part_joint[pi]]
            local = (surf[part == pi] - G0[:3, 3]) @ G0[:3, :3]
            for kk in range(k, T):
                G = posed[int(frames[kk])].joint_transforms[part_joint[pi]]
                out[kk, rows] = local @ G[:3, :3].T + G[:3, 3]
    out[~live] = np.nan
    return out


def _closest_on_triangles(p: np.ndarray, tri: np.ndarray) -> np.ndarray:
    """Closest points [n, 3] to p [n, 3] on triangles [n, 3, 3] (Ericson's region test)."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = (ab * ap).sum(1), (ac * ap).sum(1)
    bp = p - b
    d3, d4 = (ab * bp).sum(1), (ac * bp).sum(1)
    cp = p - c
    d5, d6 = (ab * cp).sum(1), (ac * cp).sum(1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    with np.errstate(invalid="ignore", divide="ignore"):  # degenerate regions are masked below
        denom = 1.0 / (va + vb + vc)
        v = vb * denom
        w = vc * denom
        out = a + ab * v[:, None] + ac * w[:, None]
        # edge and vertex regions
        t_ab = np.nan_to_num(d1 / (d1 - d3))
        t_ac = np.nan_to_num(d2 / (d2 - d6))
        t_bc = np.nan_to_num((d4 - d3) / ((d4 - d3) + (d5 - d6)))
    e_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    out = np.where(e_bc[:, None], b + (c - b) * t_bc[:, None], out)
    e_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    out = np.where(e_ac[:, None], a + ac * t_ac[:, None], out)
    e_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    out = np.where(e_ab[:, None], a + ab * t_ab[:, None], out)
    out = np.where(((d6 >= 0) & (d5 <= d6))[:, None], c, out)
    out = np.where(((d3 >= 0) & (d4 <= d3))[:, None], b, out)
    out = np.where(((d1 <= 0) & (d2 <= 0))[:, None], a, out)
    return out


def score_motion(points: np.ndarray, frames: Sequence[int], gt: GroundTruth, take: str) -> MotionScore:
    """Score trajectories [T, N, 3] (metres, NaN where lost) of ``frames`` against the ground truth.

    Errors are 3D distances to :func:`ground_truth_trajectories` over every
    (track, frame) pair; ``kept_fraction`` is the share of the first frame's
    tracks still tracked in the last frame.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 3 or points.shape[2] != 3 or points.shape[0] != len(frames):
        raise ShapeError("points", tuple(points.shape), f"[{len(frames)}, N, 3]")
    truth = ground_truth_trajectories(points, frames, gt, take)
    err = np.linalg.norm(points - truth, axis=2)  # [T, N], NaN where lost
    e = err[np.isfinite(err)]
    if not len(e):
        return MotionScore(math.nan, math.nan, math.nan, 0.0, int(points.shape[1]), 0, err)
    return MotionScore(median_mm=float(np.median(e) * 1e3), p90_mm=float(np.percentile(e, 90) * 1e3),
                       mean_mm=float(e.mean() * 1e3), kept_fraction=_kept_fraction(points),
                       tracks=int(points.shape[1]), samples=len(e), errors_m=err)


__all__ = ["MOTION_SCHEMA", "MotionOptions", "MotionProgress", "MotionReport", "MotionScore", "Triangulation",
           "frame_times", "ground_truth_trajectories", "run_motion", "score_motion", "triangulate_points",
           "write_trajectories"]
