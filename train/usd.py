"""The twin as an OpenUSD scene, for render teams (film, games, e-commerce pipelines).

``write_usd(sources, "twin.usdz")`` writes one stage (``.usdz``, ``.usdc`` or
``.usda``) holding::

    /Twin                     Xform (the default prim), kind "assembly"
    /Twin/Splat               UsdVol.ParticleField3DGaussianSplat: the trained twin
    /Twin/Mesh                UsdGeom.Mesh with vertex colours (primvars:displayColor)
    /Twin/Cameras/<id>        UsdGeom.Camera: every rig camera
    /Twin/Motion/Tracks       UsdGeom.Points: the motion take's 3D tracks, time-sampled per frame

Stage metadata: ``upAxis = "Z"``, ``metersPerUnit = 1`` (the studio frame as it
is: metres, Z up, no axis flip), ``timeCodesPerSecond`` the capture's frame
rate with one time code per captured frame. The root layer's
``customLayerData["twinstudio"]`` holds the subject's pseudonymous id, the
consent terms, the AI disclosure and where the twin came from (the bundle
manifest's sha256 when exported from a bundle; the session manifest's and the
splat PLY's sha256 always).

Conventions of the splat (written into the layer's documentation too):

* ``positions``: Gaussian centres, metres, studio frame;
* ``orientations``: unit quaternions (GfQuatf: real w, imaginary x y z), rotating
  the kernel's axes into the studio frame (the PLY's ``rot_0..3`` normalised);
* ``scales``: *linear* standard deviations in metres (the PLY's ``exp(scale_i)``);
* ``opacities``: opacity in [0, 1] *after* the sigmoid (the PLY's ``sigmoid(opacity)``);
* ``radiance:sphericalHarmonicsCoefficients``: per particle the ``(degree + 1)^2``
  RGB coefficients, contiguous, band-major (index ``l * (l + 1) + m`` for
  ``l = 0..degree``, ``m = -l..l``), exactly the 3DGS / gsplat real-SH basis and
  signs; radiance ``= 0.5 + sum_k c_k Y_k(d)`` with ``d`` the unit direction from
  the camera centre to the Gaussian, clamped at 0 (the PLY's ``f_dc`` first, then
  its ``f_rest`` regrouped from channel-major);
* ``radiance:sphericalHarmonicsDegree``: 0 to 3.

Cameras: the undistorted pinhole of each rig camera (the bundle's images are
undistorted). Focal length and apertures are in tenths of a scene unit as USD
specifies (decimetres here: a 36 mm-wide film back is 0.36), so that
``horizontalAperture / focalLength = width / fx``; the principal point goes
through the aperture offsets; the clipping range brackets the twin. The
OpenCV intrinsics, the distortion of the raw stills and the image size in
pixels are in each camera prim's ``customData["twinstudio"]``.

:func:`check_usd` runs every registered ``UsdValidation`` validator and the
checks they lack (array lengths, an extent that holds every Gaussian, value
ranges, each camera reproducing its OpenCV projection).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rigs.errors import TwinstudioError
from rigs.geometry import Camera, Intrinsics

USD_SCHEMA = "twinstudio.usd"
USD_VERSION = 1
#: the film back the cameras are written with (mm): only the ratio to the focal length matters
FILM_WIDTH_MM = 36.0
#: track points are shown as spheres of this width (metres)
TRACK_WIDTH_M = 0.006
#: the twin's Gaussian kernel reaches 3 standard deviations (UsdVol's ParticleFieldKernelGaussianEllipsoidAPI)
KERNEL_SIGMAS = 3.0
#: zip entries get this modification time, so the same twin gives the same usdz bytes (1980-01-01)
_ZIP_EPOCH = 315532800
#: the reprojection a written camera must reproduce (pixels)
CAMERA_TOLERANCE_PX = 0.01

CONVENTIONS = """twinstudio digital twin (OpenUSD). Units: metres (metersPerUnit 1), Z up, the capture studio's frame.
/Twin/Splat (ParticleField3DGaussianSplat): positions in metres; orientations unit quaternions (w, x, y, z);
scales linear standard deviations in metres (exp of the PLY's log scales); opacities in [0, 1] after the
sigmoid (not logits); radiance:sphericalHarmonicsCoefficients per particle (degree+1)^2 RGB coefficients,
band-major (index l*(l+1)+m), the 3DGS/gsplat real SH basis: radiance = 0.5 + sum c_k Y_k(dir), clamped at 0.
/Twin/Cameras: undistorted pinholes; focalLength and apertures in tenths of a scene unit; principal point
through the aperture offsets; customData twinstudio holds the OpenCV K, distortion and pixel size.
/Twin/Motion/Tracks: 3D tracks, one time code per captured frame (timeCodesPerSecond = capture fps), ids per frame.
AI disclosure: every image or video made from this twin must be disclosed as AI-generated."""


class UsdExportError(TwinstudioError):
    """The twin cannot be written as USD, or a USD file fails its checks: names the file and the part."""

    exit_code = 2


@dataclass
class TwinSources:
    """Where a twin's parts are, and what the scene's metadata says."""

    splat: Path
    cameras: Path | None = None
    mesh: Path | None = None
    motion: Path | None = None  # trajectories.npz
    subject_id: str = ""
    consent: dict | None = None
    ai_disclosure: dict | None = None
    provenance: dict = field(default_factory=dict)
    origin: str = ""  # what the sources were read from (a session, a bundle)


@dataclass
class UsdResult:
    path: Path
    gaussians: int
    sh_degree: int
    cameras: int
    mesh_faces: int
    motion_frames: int
    bytes: int
    seconds: float
    problems: list[str]


# ----------------------------------------------------------------------------- sources


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def sources_from_bundle(bundle: Path) -> TwinSources:
    """The parts of a bundle folder (its MANIFEST.json's terms and sha256 become the metadata)."""
    manifest_path = bundle / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise UsdExportError(f"{manifest_path}: cannot read the bundle manifest ({e})", path=str(manifest_path)) from e
    splat = bundle / "splat" / "splat.ply"
    if not splat.is_file():
        raise UsdExportError(f"{splat}: the bundle has no splat", path=str(splat))
    return TwinSources(
        splat=splat, cameras=_first(bundle / "cameras" / "cameras.json"), mesh=_first(bundle / "geometry" / "mesh.ply"),
        motion=_first(bundle / "motion" / "trajectories.npz"),
        subject_id=str(manifest.get("subject", {}).get("id", "")), consent=manifest.get("consent"),
        ai_disclosure=manifest.get("ai_disclosure"),
        provenance={"bundle_manifest_sha256": sha256_file(manifest_path),
                    "bundle_provenance": manifest.get("provenance", {})},
        origin=f"bundle {bundle.name}")


def sources_from_session(session: Path, run: str = "twin") -> TwinSources:
    """The parts of a session with a trained run (its consent record and manifest become the metadata)."""
    from capture.consent import load_consents
    from train.handoff.bundle import AI_LABEL, AI_REQUIREMENT, consent_terms

    run_dir = session / "train" / run
    splat = run_dir / "splat.ply"
    if not splat.is_file():
        raise UsdExportError(f"{splat}: no trained twin; run 'twinstudio train run {session} --run {run}' first",
                             path=str(splat))
    ds_path = session / "train" / "dataset" / "transforms.json"
    take = None
    if ds_path.is_file():
        take = json.loads(ds_path.read_text()).get("twinstudio", {}).get("take")
    mesh = _first(session / "recon" / "mesh" / take / "mesh.ply") if take else None
    motions = sorted((session / "recon" / "motion").glob("*/trajectories.npz"))
    records = load_consents(session)
    rec = records[-1] if records else None
    return TwinSources(
        splat=splat, cameras=_first(session / "recon" / "cameras.json"), mesh=mesh,
        motion=motions[-1] if motions else None, subject_id=rec.subject_id if rec else "",
        consent=consent_terms(rec) if rec else None,
        ai_disclosure={"label": AI_LABEL, "requirement": AI_REQUIREMENT},
        provenance={"session_manifest_sha256": sha256_file(session / "session.json")
                    if (session / "session.json").is_file() else None, "run": run},
        origin=f"session {session.name}")


def export_usd(source: Path | str, out: Path | str, *, run: str = "twin",
               on_event: Callable[[dict], None] | None = None) -> UsdResult:
    """Write the USD scene of a session, a bundle folder or a bundle ``.tar`` to ``out``."""
    source, out = Path(source), Path(out)
    if source.is_file() and source.suffix == ".tar":
        with tempfile.TemporaryDirectory(prefix=".usd-", dir=out.parent if out.parent.is_dir() else None) as tmp:
            _extract_bundle_parts(source, Path(tmp))
            return write_usd(sources_from_bundle(Path(tmp)), out, on_event=on_event)
    if (source / "MANIFEST.json").is_file():
        return write_usd(sources_from_bundle(source), out, on_event=on_event)
    if (source / "session.json").is_file():
        return write_usd(sources_from_session(source, run), out, on_event=on_event)
    raise UsdExportError(f"{source}: neither a session (session.json), a bundle folder (MANIFEST.json) nor a "
                         "bundle archive (.tar)", path=str(source))


def _extract_bundle_parts(archive: Path, dst: Path) -> None:
    wanted = {"MANIFEST.json", "splat/splat.ply", "cameras/cameras.json", "geometry/mesh.ply",
              "motion/trajectories.npz"}
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
            tar.extractall(dst, members=members, filter="data")
    except (OSError, tarfile.TarError) as e:
        raise UsdExportError(f"{archive}: cannot read the bundle archive ({e})", path=str(archive)) from e


# ----------------------------------------------------------------------------- writing


def write_usd(sources: TwinSources, out: Path | str, *,
              on_event: Callable[[dict], None] | None = None) -> UsdResult:
    """Write the twin's stage to ``out`` (``.usdz``, ``.usdc`` or ``.usda``) atomically, then check it."""
    from pxr import Sdf, Usd, UsdGeom

    from train.splat_ply import read_splat_ply

    t0 = time.perf_counter()
    emit = on_event or (lambda ev: None)
    out = Path(out)
    if out.suffix not in (".usdz", ".usdc", ".usda"):
        raise UsdExportError(f"{out}: the USD file must end in .usdz, .usdc or .usda", path=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    emit({"event": "stage", "stage": "usd: read", "status": "running"})
    params = read_splat_ply(sources.splat)
    cameras = _read_cameras(sources.cameras) if sources.cameras else {}
    mesh = _read_mesh(sources.mesh) if sources.mesh else None
    motion = _read_motion(sources.motion) if sources.motion else None

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        layer_path = tmp_dir / ("twin.usdc" if out.suffix != ".usda" else "twin.usda")
        emit({"event": "stage", "stage": "usd: write", "status": "running"})
        stage = Usd.Stage.CreateNew(str(layer_path))
        UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
        UsdGeom.SetStageMetersPerUnit(stage, 1.0)
        root = UsdGeom.Xform.Define(stage, "/Twin")
        Usd.ModelAPI(root).SetKind("assembly")
        stage.SetDefaultPrim(root.GetPrim())
        layer = stage.GetRootLayer()
        layer.documentation = CONVENTIONS
        lo, hi = _write_splat(stage, params)
        if mesh is not None:
            _write_mesh(stage, *mesh)
        if cameras:
            _write_cameras(stage, cameras, lo, hi)
        if motion is not None:
            _write_motion(stage, *motion)
        layer.customLayerData = {"twinstudio": _metadata(sources, params)}
        layer.Save()
        del stage
        if out.suffix == ".usdz":
            emit({"event": "stage", "stage": "usd: package", "status": "running"})
            packed = tmp_dir / out.name
            _write_usdz(layer_path, packed)
            final_src = packed
        else:
            final_src = layer_path
        os.replace(final_src, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    emit({"event": "stage", "stage": "usd: check", "status": "running"})
    problems = check_usd(out)
    return UsdResult(out, params.n, params.sh_degree, len(cameras), 0 if mesh is None else len(mesh[1]),
                     0 if motion is None else len(motion[0]), out.stat().st_size,
                     round(time.perf_counter() - t0, 3), problems)


def _write_usdz(layer_path: Path, out: Path) -> None:
    """A usdz holding the one layer (stored, 64-byte aligned by Sdf's writer), with a fixed timestamp."""
    from pxr import Sdf

    os.utime(layer_path, (_ZIP_EPOCH, _ZIP_EPOCH))
    writer = Sdf.ZipFileWriter.CreateNew(str(out))
    writer.AddFile(str(layer_path), layer_path.name)
    if not writer.Save():
        raise UsdExportError(f"{out}: could not write the usdz package", path=str(out))


def _vt(kind, a: np.ndarray):
    return kind.FromNumpy(np.ascontiguousarray(a))


def _write_splat(stage, p) -> tuple[np.ndarray, np.ndarray]:
    from pxr import UsdVol, Vt

    splat = UsdVol.ParticleField3DGaussianSplat.Define(stage, "/Twin/Splat")
    scales = np.exp(p.log_scales.astype(np.float32))
    opac = (1.0 / (1.0 + np.exp(-p.opacity_logits.astype(np.float64)))).astype(np.float32)
    q = p.quats.astype(np.float64)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    splat.CreatePositionsAttr(_vt(Vt.Vec3fArray, p.means))
    splat.CreateOrientationsAttr(_vt(Vt.QuatfArray, q[:, [1, 2, 3, 0]]))  # GfQuatf's memory: x y z w
    splat.CreateScalesAttr(_vt(Vt.Vec3fArray, scales))
    splat.CreateOpacitiesAttr(_vt(Vt.FloatArray, opac))
    splat.CreateRadianceSphericalHarmonicsDegreeAttr(int(p.sh_degree))
    splat.CreateRadianceSphericalHarmonicsCoefficientsAttr(_vt(Vt.Vec3fArray, p.sh_coeffs().reshape(-1, 3)))
    reach = KERNEL_SIGMAS * scales.max(axis=1, initial=0.0)[:, None] if p.n else np.zeros((0, 1), np.float32)
    lo = (p.means - reach).min(axis=0) if p.n else np.zeros(3, np.float32)
    hi = (p.means + reach).max(axis=0) if p.n else np.zeros(3, np.float32)
    splat.CreateExtentAttr(_vt(Vt.Vec3fArray, np.stack([lo, hi]).astype(np.float32)))
    return lo.astype(np.float64), hi.astype(np.float64)


def _read_mesh(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    import trimesh

    try:
        m = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises whatever its parsers raise
        raise UsdExportError(f"{path}: cannot read the mesh ({e})", path=str(path)) from e
    colors = None
    vc = getattr(m.visual, "vertex_colors", None) if m.visual.kind == "vertex" else None
    if vc is not None and len(vc) == len(m.vertices):
        colors = np.asarray(vc)[:, :3].astype(np.float32) / 255.0
    return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int32), colors


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _write_mesh(stage, vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray | None) -> None:
    from pxr import UsdGeom, Vt

    mesh = UsdGeom.Mesh.Define(stage, "/Twin/Mesh")
    mesh.CreatePointsAttr(_vt(Vt.Vec3fArray, vertices))
    mesh.CreateFaceVertexCountsAttr(_vt(Vt.IntArray, np.full(len(faces), 3, np.int32)))
    mesh.CreateFaceVertexIndicesAttr(_vt(Vt.IntArray, faces.reshape(-1).astype(np.int32)))
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    mesh.CreateExtentAttr(UsdGeom.PointBased.ComputeExtent(mesh.GetPointsAttr().Get()))
    if colors is not None:  # displayColor is linear; the mesh's vertex colours are sRGB
        pv = mesh.CreateDisplayColorPrimvar(UsdGeom.Tokens.vertex)
        pv.Set(_vt(Vt.Vec3fArray, _srgb_to_linear(colors)))


def _read_cameras(path: Path) -> dict[str, Camera]:
    from reconstruct.inputs import read_cameras

    try:
        return read_cameras(path)
    except TwinstudioError as e:
        raise UsdExportError(str(e), path=str(path)) from e


def _prim_name(camera_id: str, taken: set[str]) -> str:
    from pxr import Tf

    name = Tf.MakeValidIdentifier(camera_id)
    base, i = name, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def camera_apertures(intr: Intrinsics) -> dict[str, float]:
    """USD camera lens values (tenths of a metre) of an OpenCV pinhole whose pixel centres are at integers.

    A pixel u (OpenCV) is at ``u + 0.5`` from the image's left edge, so the principal
    point sits ``cx + 0.5 - width / 2`` pixels right of the image's centre (and
    ``cy + 0.5 - height / 2`` below it). USD's offsets shift the view window (a positive
    horizontal offset looks further right, so the image content and the principal point
    move left): a principal point right of centre is a negative horizontal offset, one
    below centre (image y down, USD's y up) a positive vertical offset. Checked through
    OpenUSD's own frustum (:func:`project_with_usd_camera`)
    """
    focal = FILM_WIDTH_MM / 100.0 * intr.fx / intr.width  # tenths of a metre (decimetres)
    return {"focalLength": focal, "horizontalAperture": intr.width * focal / intr.fx,
            "verticalAperture": intr.height * focal / intr.fy,
            "horizontalApertureOffset": -(intr.cx + 0.5 - intr.width / 2.0) * focal / intr.fx,
            "verticalApertureOffset": (intr.cy + 0.5 - intr.height / 2.0) * focal / intr.fy}


def usd_camera_matrix(cam: Camera) -> np.ndarray:
    """Camera-to-world [4, 4] (column vectors) of the USD camera: OpenCV's axes with y and z flipped."""
    return cam.pose.inverse_matrix() @ np.diag([1.0, -1.0, -1.0, 1.0])


def _write_cameras(stage, cameras: dict[str, Camera], lo: np.ndarray, hi: np.ndarray) -> None:
    from pxr import Gf, UsdGeom

    UsdGeom.Scope.Define(stage, "/Twin/Cameras")
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    taken: set[str] = set()
    for cid in sorted(cameras):
        cam = cameras[cid]
        c = UsdGeom.Camera.Define(stage, f"/Twin/Cameras/{_prim_name(cid, taken)}")
        c.CreateProjectionAttr(UsdGeom.Tokens.perspective)
        for name, value in camera_apertures(cam.intrinsics).items():
            c.GetPrim().GetAttribute(name).Set(float(value))
        depth = cam.pose.transform(corners)[:, 2]
        far = float(max(depth.max(), 0.1) * 1.5)
        near = float(min(max(depth.min() * 0.5, 0.01), far / 10))
        c.CreateClippingRangeAttr(Gf.Vec2f(near, far))
        c.AddTransformOp().Set(Gf.Matrix4d(usd_camera_matrix(cam).T.tolist()))
        i = cam.intrinsics
        c.GetPrim().SetCustomDataByKey("twinstudio", {
            "cameraId": cid, "width": int(i.width), "height": int(i.height),
            "opencvK": [float(v) for v in (i.fx, i.fy, i.cx, i.cy)],
            "opencvDistortion": [float(v) for v in i.dist],
            "pixelCentres": "OpenCV: the top-left pixel's centre is (0, 0)"})


def _read_motion(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        with np.load(path) as z:
            points, times, frames, ids = z["points"], z["times"], z["frames"], z["track_ids"]
    except (OSError, ValueError, KeyError) as e:
        raise UsdExportError(f"{path}: cannot read the motion tracks ({e})", path=str(path)) from e
    if points.ndim != 3 or points.shape[0] != len(frames) or points.shape[0] != len(times):
        raise UsdExportError(f"{path}: points {points.shape} do not match {len(frames)} frames", path=str(path))
    return frames.astype(np.int64), times.astype(np.float64), points.astype(np.float32), ids.astype(np.int64)


def frame_rate(times: np.ndarray) -> float:
    """Frames per second from the frames' times (the median step); 24 when there is no step."""
    steps = np.diff(times)
    steps = steps[np.isfinite(steps) & (steps > 0)]
    return round(1.0 / float(np.median(steps)), 6) if len(steps) else 24.0


def _write_motion(stage, frames: np.ndarray, times: np.ndarray, points: np.ndarray, ids: np.ndarray) -> None:
    from pxr import UsdGeom, Vt

    fps = frame_rate(times)
    stage.SetTimeCodesPerSecond(fps)
    stage.SetFramesPerSecond(fps)
    stage.SetStartTimeCode(float(frames[0]))
    stage.SetEndTimeCode(float(frames[-1]))
    UsdGeom.Xform.Define(stage, "/Twin/Motion")
    tracks = UsdGeom.Points.Define(stage, "/Twin/Motion/Tracks")
    pa, ia, ea = tracks.CreatePointsAttr(), tracks.CreateIdsAttr(), tracks.CreateExtentAttr()
    wa = tracks.CreateWidthsAttr()
    for k, f in enumerate(frames):
        live = np.isfinite(points[k]).all(axis=1)
        p = points[k][live]
        pa.Set(_vt(Vt.Vec3fArray, p), float(f))
        ia.Set(_vt(Vt.Int64Array, ids[live]), float(f))
        wa.Set(_vt(Vt.FloatArray, np.full(len(p), TRACK_WIDTH_M, np.float32)), float(f))
        box = (np.stack([p.min(axis=0), p.max(axis=0)]) + [[-TRACK_WIDTH_M / 2], [TRACK_WIDTH_M / 2]]
               if len(p) else np.zeros((2, 3)))
        ea.Set(_vt(Vt.Vec3fArray, box.astype(np.float32)), float(f))
    tracks.GetPrim().SetCustomDataByKey("twinstudio", {
        "frames": [int(f) for f in frames], "times_s": [float(t) for t in times], "fps": fps,
        "timeCodes": "one per captured frame: the time code is the frame number"})


def _metadata(sources: TwinSources, params) -> dict:
    from pxr import Vt

    def clean(v):
        """customLayerData holds strings, numbers, string arrays and dictionaries: nothing else."""
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            if all(isinstance(x, str) for x in v):
                return Vt.StringArray(list(v))
            return json.dumps(v)
        if isinstance(v, (str, bool, int, float)):
            return v
        return str(v)

    doc = {"schema": USD_SCHEMA, "version": USD_VERSION, "subject_id": sources.subject_id,
           "origin": sources.origin, "consent": sources.consent or {}, "ai_disclosure": sources.ai_disclosure or {},
           "splat": {"gaussians": params.n, "sh_degree": params.sh_degree,
                     "ply_sha256": sha256_file(sources.splat)},
           "provenance": sources.provenance, "conventions": CONVENTIONS}
    return clean(doc)


# ----------------------------------------------------------------------------- reading back and checking


def read_usd_splat(path: Path | str):
    """The splat of a twin USD file as :class:`train.splat_ply.SplatParams` (logits and logs again)."""
    from pxr import Usd, UsdVol

    from train.splat_ply import SplatParams

    stage = _open(path)
    prim = stage.GetPrimAtPath("/Twin/Splat")
    if not prim or not prim.IsA(UsdVol.ParticleField3DGaussianSplat):
        raise UsdExportError(f"{path}: no /Twin/Splat Gaussian splat", path=str(path))
    s = UsdVol.ParticleField3DGaussianSplat(prim)
    t = Usd.TimeCode.Default()
    pos = np.asarray(s.GetPositionsAttr().Get(t), np.float32)
    quat = np.asarray(s.GetOrientationsAttr().Get(t), np.float32)[:, [3, 0, 1, 2]]
    scales = np.asarray(s.GetScalesAttr().Get(t), np.float32)
    opac = np.asarray(s.GetOpacitiesAttr().Get(t), np.float32)
    deg = int(s.GetRadianceSphericalHarmonicsDegreeAttr().Get(t))
    sh = np.asarray(s.GetRadianceSphericalHarmonicsCoefficientsAttr().Get(t), np.float32)
    sh = sh.reshape(len(pos), (deg + 1) ** 2, 3)
    with np.errstate(divide="ignore"):
        logits = np.log(opac) - np.log1p(-opac)
    return SplatParams(pos, np.log(scales), quat, logits, sh[:, 0], sh[:, 1:])


def _open(path: Path | str):
    from pxr import Tf, Usd

    p = Path(path)
    if not p.is_file():
        raise UsdExportError(f"{p}: no such USD file", path=str(p))
    try:
        stage = Usd.Stage.Open(str(p))
    except Tf.ErrorException as e:
        raise UsdExportError(f"{p}: not a USD file OpenUSD can open ({str(e).strip()})", path=str(p)) from e
    if stage is None:
        raise UsdExportError(f"{p}: not a USD file OpenUSD can open", path=str(p))
    return stage


def project_with_usd_camera(stage, camera_path: str, points: np.ndarray, width: int, height: int,
                            time_code: float | None = None) -> np.ndarray:
    """Pixels (OpenCV: the top-left pixel's centre at (0, 0)) of world points seen by a USD camera.

    Goes through OpenUSD's own camera model (``UsdGeom.Camera.GetCamera`` and its
    frustum's view and projection matrices), not through this module's arithmetic.
    """
    from pxr import Usd, UsdGeom

    cam = UsdGeom.Camera(stage.GetPrimAtPath(camera_path))
    gf = cam.GetCamera(Usd.TimeCode.Default() if time_code is None else Usd.TimeCode(time_code))
    frustum = gf.frustum
    m = np.array(frustum.ComputeViewMatrix() * frustum.ComputeProjectionMatrix())  # row vectors
    ph = np.c_[np.asarray(points, np.float64), np.ones(len(points))] @ m
    ndc = ph[:, :2] / ph[:, 3:4]
    return np.c_[(ndc[:, 0] + 1.0) / 2.0 * width - 0.5, (1.0 - ndc[:, 1]) / 2.0 * height - 0.5]


def check_usd(path: Path | str) -> list[str]:
    """Problems of a twin USD file: every registered UsdValidation validator's errors, then ours."""
    from pxr import UsdValidation

    stage = _open(path)
    problems: list[str] = []
    validators = UsdValidation.ValidationRegistry().GetOrLoadAllValidators()
    for err in UsdValidation.ValidationContext(validators).Validate(stage):
        if err.GetType() == UsdValidation.ValidationErrorType.Error:
            problems.append(f"{err.GetName()}: {err.GetMessage()}")
    problems += _own_checks(stage)
    return problems


def _own_checks(stage) -> list[str]:
    from pxr import Usd, UsdGeom, UsdVol

    out: list[str] = []
    if UsdGeom.GetStageUpAxis(stage) != UsdGeom.Tokens.z:
        out.append(f"stage: upAxis is {UsdGeom.GetStageUpAxis(stage)}, expected Z")
    if UsdGeom.GetStageMetersPerUnit(stage) != 1.0:
        out.append(f"stage: metersPerUnit is {UsdGeom.GetStageMetersPerUnit(stage)}, expected 1")
    meta = stage.GetRootLayer().customLayerData.get("twinstudio")
    if not isinstance(meta, dict):
        out.append("layer: no customLayerData 'twinstudio' (subject, consent, AI disclosure)")
    else:
        for key in ("subject_id", "consent", "ai_disclosure"):
            if not meta.get(key):
                out.append(f"layer: customLayerData twinstudio.{key} is missing or empty")
    t = Usd.TimeCode.Default()
    for prim in stage.Traverse():
        where = str(prim.GetPath())
        if prim.IsA(UsdVol.ParticleField3DGaussianSplat):
            out += _check_splat(UsdVol.ParticleField3DGaussianSplat(prim), where, t)
        elif prim.IsA(UsdGeom.Mesh):
            out += _check_mesh(UsdGeom.Mesh(prim), where, t)
        elif prim.IsA(UsdGeom.Camera):
            out += _check_camera(stage, prim, where)
        elif prim.IsA(UsdGeom.Points):
            pts = UsdGeom.Points(prim)
            for tc in pts.GetPointsAttr().GetTimeSamples() or [None]:
                tc = t if tc is None else Usd.TimeCode(tc)
                n, ids = len(pts.GetPointsAttr().Get(tc) or []), pts.GetIdsAttr().Get(tc)
                if ids is not None and len(ids) != n:
                    out.append(f"{where}: {len(ids)} ids for {n} points at time {tc.GetValue()}")
    return out


def _check_splat(s, where: str, t) -> list[str]:
    out: list[str] = []
    pos = np.asarray(s.GetPositionsAttr().Get(t) or [], np.float32).reshape(-1, 3)
    n = len(pos)
    deg = s.GetRadianceSphericalHarmonicsDegreeAttr().Get(t)
    if deg is None or not 0 <= deg <= 3:
        out.append(f"{where}: radiance:sphericalHarmonicsDegree is {deg}, expected 0 to 3")
        deg = 0
    arrays = {"orientations": (s.GetOrientationsAttr(), n), "scales": (s.GetScalesAttr(), n),
              "opacities": (s.GetOpacitiesAttr(), n),
              "radiance:sphericalHarmonicsCoefficients": (s.GetRadianceSphericalHarmonicsCoefficientsAttr(),
                                                          n * (deg + 1) ** 2)}
    values = {}
    for name, (attr, want) in arrays.items():
        v = attr.Get(t)
        got = 0 if v is None else len(v)
        if got != want:
            out.append(f"{where}: {name} has {got} values, expected {want} for {n} Gaussians")
        values[name] = np.asarray(v) if v is not None else None
    if not np.isfinite(pos).all():
        out.append(f"{where}: positions are not all finite")
    op, sc, q = values["opacities"], values["scales"], values["orientations"]
    if op is not None and len(op) and not ((op >= 0) & (op <= 1)).all():
        out.append(f"{where}: opacities outside [0, 1] (logits written instead of opacities?)")
    if sc is not None and len(sc) and not (np.asarray(sc) > 0).all():
        out.append(f"{where}: scales not all > 0 (log scales written instead of linear ones?)")
    if q is not None and len(q):
        norms = np.linalg.norm(np.asarray(q, np.float64).reshape(-1, 4), axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            out.append(f"{where}: orientations are not unit quaternions")
    ext = s.GetExtentAttr().Get(t)
    if ext is None or len(ext) != 2:
        out.append(f"{where}: no extent (ComputeExtentFromPlugins computes none for this prim)")
    elif n:
        lo, hi = np.asarray(ext[0]), np.asarray(ext[1])
        if (pos < lo - 1e-6).any() or (pos > hi + 1e-6).any():
            out.append(f"{where}: the extent {lo.tolist()} .. {hi.tolist()} does not hold every Gaussian")
    return out


def _check_mesh(m, where: str, t) -> list[str]:
    out: list[str] = []
    pts = m.GetPointsAttr().Get(t) or []
    counts = np.asarray(m.GetFaceVertexCountsAttr().Get(t) or [], np.int64)
    idx = np.asarray(m.GetFaceVertexIndicesAttr().Get(t) or [], np.int64)
    if counts.sum() != len(idx):
        out.append(f"{where}: faceVertexCounts sum to {counts.sum()} but there are {len(idx)} faceVertexIndices")
    if len(idx) and (idx.min() < 0 or idx.max() >= len(pts)):
        out.append(f"{where}: faceVertexIndices reach {idx.max()} but there are {len(pts)} points")
    col = m.GetDisplayColorPrimvar()
    if col and col.HasValue() and len(col.Get(t)) != len(pts):
        out.append(f"{where}: {len(col.Get(t))} displayColor values for {len(pts)} points")
    if m.GetExtentAttr().Get(t) is None:
        out.append(f"{where}: no extent")
    return out


def _check_camera(stage, prim, where: str) -> list[str]:
    from pxr import UsdGeom

    out: list[str] = []
    c = UsdGeom.Camera(prim)
    focal, hap, vap = (c.GetFocalLengthAttr().Get(), c.GetHorizontalApertureAttr().Get(),
                       c.GetVerticalApertureAttr().Get())
    if not (focal and focal > 0 and hap and hap > 0 and vap and vap > 0):
        out.append(f"{where}: focalLength {focal} and apertures {hap} x {vap} must be > 0")
        return out
    near, far = c.GetClippingRangeAttr().Get()
    if not 0 < near < far:
        out.append(f"{where}: clipping range {near} .. {far} is not 0 < near < far")
    info = prim.GetCustomDataByKey("twinstudio")
    if not isinstance(info, dict) or "opencvK" not in info:
        return out
    fx, fy, cx, cy = info["opencvK"]
    w, h = int(info["width"]), int(info["height"])
    xf = np.array(UsdGeom.Xformable(prim).ComputeLocalToWorldTransform(0)).T  # column vectors
    # sample points in front of the camera, and their OpenCV projection through K
    uv = np.array([[0.0, 0.0], [w - 1.0, 0.0], [0.0, h - 1.0], [w - 1.0, h - 1.0], [w / 2, h / 3]])
    depth = (near + far) / 4
    cam_cv = np.c_[(uv[:, 0] - cx) / fx * depth, (uv[:, 1] - cy) / fy * depth, np.full(len(uv), depth)]
    world = (xf @ np.c_[cam_cv * [1, -1, -1], np.ones(len(uv))].T).T[:, :3]
    got = project_with_usd_camera(stage, str(prim.GetPath()), world, w, h)
    err = float(np.abs(got - uv).max())
    if err > CAMERA_TOLERANCE_PX:
        out.append(f"{where}: the USD camera projects {err:.4f} px away from its OpenCV intrinsics "
                   f"(> {CAMERA_TOLERANCE_PX} px)")
    return out


__all__ = ["CONVENTIONS", "TwinSources", "UsdExportError", "UsdResult", "camera_apertures", "check_usd",
           "export_usd", "frame_rate", "project_with_usd_camera", "read_usd_splat", "sources_from_bundle",
           "sources_from_session", "usd_camera_matrix", "write_usd"]
