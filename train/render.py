"""Images of a twin from its bundle: the views a licensed render asks for, drawn from the bundle's splat.

Views (every one a square ``size`` x ``size`` image, camera conventions as
:mod:`train.preview`: ``viewmat`` world-to-camera in OpenCV axes, ``K`` with
pixel centres at +0.5):

* :func:`rig_views`: the bundle's rig cameras, each from its calibrated pose
  with its vertical field of view, cropped square about the image centre;
* :func:`orbit_views`: ``n`` cameras on a circle around the subject at its
  mid-height, framed so that the whole subject (the Gaussians of opacity
  >= 0.5, 1st to 99th percentile) fits with a margin;
* :func:`camera_file_views`: the cameras of a ``cameras.json`` (OpenCV, the
  file format of :mod:`reconstruct.inputs`), framed as rig views.

:func:`render_views` draws them with :func:`train.exports.render_splat`: gsplat
on a GPU, the project's CPU rasteriser otherwise. ``splat.ply`` carries one
lighting preset baked in; :meth:`BundleTwin.lit` swaps in another captured
preset's colours from ``splat/lighting.npz``.
:func:`render_licensed` is ``twinstudio render``: licence checked, every image
labelled, watermarked, signed (C2PA) and metered in the usage ledger.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigs.errors import TwinstudioError
from rigs.geometry import Camera, look_at

#: every lighting preset's f_dc in a bundle (train.exports.write_lighting)
LIGHTING = "splat/lighting.npz"
#: the background of a render: white, as e-commerce pictures are
RENDER_BACKGROUND = (1.0, 1.0, 1.0)
#: the part of the frame the subject may fill in an orbit view
ORBIT_FILL = 0.85


class RenderError(TwinstudioError):
    """A render cannot be made: names the bundle, view or file."""

    exit_code = 2


@dataclass(frozen=True)
class View:
    name: str
    viewmat: np.ndarray  # [4, 4] world-to-camera, OpenCV axes
    K: np.ndarray  # [3, 3], pixel centres at +0.5
    size: int


@dataclass
class BundleTwin:
    """What a render needs from a bundle: its manifest (bytes and parsed), splat and cameras."""

    path: Path
    manifest_bytes: bytes
    manifest: dict
    params: object  # train.splat_ply.SplatParams
    cameras: dict[str, Camera]
    lighting: dict[str, np.ndarray] | None = None  # preset -> f_dc [N, 3] (splat/lighting.npz)
    baked: str | None = None  # the preset baked into splat.ply

    def lit(self, preset: str | None):
        """The splat under ``preset`` (its f_dc swapped in), or as baked into splat.ply when None."""
        if preset is None or preset == self.baked:
            return self.params
        if not self.lighting:
            raise RenderError(f"{self.path}: the bundle has no lighting presets (splat/lighting.npz); it shows "
                              f"the twin under {self.baked or 'the lighting baked into splat.ply'} only")
        if preset not in self.lighting:
            raise RenderError(f"lighting preset {preset!r} is not in the bundle (it has "
                              f"{', '.join(self.lighting)})")
        return dataclasses.replace(self.params, sh_dc=self.lighting[preset])

    @property
    def manifest_sha256(self) -> str:
        import hashlib

        return hashlib.sha256(self.manifest_bytes).hexdigest()


def load_bundle_twin(bundle: Path | str) -> BundleTwin:
    """Read the manifest, splat and cameras of a bundle folder or ``.tar`` (integrity is the caller's check)."""
    import tempfile

    from reconstruct.inputs import read_cameras
    from train.splat_ply import read_splat_ply

    bundle = Path(bundle)
    wanted = {"MANIFEST.json", "splat/splat.ply", "cameras/cameras.json"}
    lighting_bytes = None
    if bundle.is_file():
        from train.handoff.integrity import iter_tar

        found: dict[str, bytes] = {}
        for name, _, f in iter_tar(bundle):
            if name in wanted or name == LIGHTING:
                found[name] = f.read()
        lighting_bytes = found.pop(LIGHTING, None)
        missing = sorted(wanted - set(found))
        if missing:
            raise RenderError(f"{bundle}: the bundle has no {', '.join(missing)}", path=str(bundle))
        with tempfile.TemporaryDirectory(prefix=".render-") as tmp:
            for name in ("splat/splat.ply", "cameras/cameras.json"):
                (Path(tmp) / Path(name).name).write_bytes(found[name])
            params = read_splat_ply(Path(tmp) / "splat.ply")
            cameras = read_cameras(Path(tmp) / "cameras.json")
        manifest_bytes = found["MANIFEST.json"]
    elif bundle.is_dir():
        missing = sorted(n for n in wanted if not (bundle / n).is_file())
        if missing:
            raise RenderError(f"{bundle}: the bundle has no {', '.join(missing)}", path=str(bundle))
        manifest_bytes = (bundle / "MANIFEST.json").read_bytes()
        if (bundle / LIGHTING).is_file():
            lighting_bytes = (bundle / LIGHTING).read_bytes()
        params = read_splat_ply(bundle / "splat" / "splat.ply")
        cameras = read_cameras(bundle / "cameras" / "cameras.json")
    else:
        raise RenderError(f"{bundle}: no such bundle (a folder or a .tar)", path=str(bundle))
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as e:
        raise RenderError(f"{bundle}: MANIFEST.json is not valid JSON ({e})", path=str(bundle)) from e
    twin = BundleTwin(bundle, manifest_bytes, manifest, params, cameras)
    if lighting_bytes is not None:
        try:
            with np.load(io.BytesIO(lighting_bytes)) as z:
                names, dc = [str(x) for x in z["presets"]], np.asarray(z["f_dc"], np.float32)
                twin.baked = str(z["baked"])
        except (OSError, ValueError, KeyError) as e:
            raise RenderError(f"{bundle}: {LIGHTING} is unreadable ({e})", path=str(bundle)) from e
        if dc.shape != (len(names), params.n, 3):
            raise RenderError(f"{bundle}: {LIGHTING} holds f_dc {dc.shape}, expected "
                              f"({len(names)}, {params.n}, 3)", path=str(bundle))
        twin.lighting = dict(zip(names, dc))
    return twin


def _check_size(size: int) -> int:
    if not 16 <= int(size) <= 8192:
        raise RenderError(f"image size {size} px: expected 16 to 8192")
    return int(size)


def _square_K(fy: float, height: int, size: int) -> np.ndarray:
    f = fy * size / height
    return np.array([[f, 0.0, size / 2.0], [0.0, f, size / 2.0], [0.0, 0.0, 1.0]])


def rig_views(cameras: dict[str, Camera], size: int, ids: Sequence[str] | None = None) -> list[View]:
    """The rig cameras ``ids`` (all, sorted, by default) as square views with their vertical field of view."""
    size = _check_size(size)
    ids = sorted(cameras) if ids is None else list(ids)
    unknown = [i for i in ids if i not in cameras]
    if unknown:
        raise RenderError(f"no camera {', '.join(map(repr, unknown))} in the bundle (it has "
                          f"{', '.join(sorted(cameras))})")
    return [View(i, cameras[i].pose.matrix, _square_K(cameras[i].intrinsics.fy, cameras[i].intrinsics.height, size),
                 size) for i in ids]


def camera_file_views(path: Path | str, size: int) -> list[View]:
    """The cameras of a ``cameras.json`` file as square views."""
    from reconstruct.inputs import read_cameras

    try:
        cams = read_cameras(path)
    except TwinstudioError as e:
        raise RenderError(str(e), path=str(path)) from e
    if not cams:
        raise RenderError(f"{path}: no cameras", path=str(path))
    return rig_views(cams, size)


def subject_box(params) -> tuple[np.ndarray, np.ndarray]:
    """The subject's box (1st and 99th percentile of the Gaussians of opacity >= 0.5), metres."""
    opaque = params.opacity_logits >= 0.0
    pts = params.means[opaque] if opaque.sum() >= 10 else params.means
    if len(pts) == 0:
        raise RenderError("the splat has no Gaussians")
    return np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)


def orbit_views(params, n: int, size: int, *, fov_deg: float = 30.0, elevation_deg: float = 5.0,
                start_deg: float = -90.0) -> list[View]:
    """``n`` views on a circle around the subject (z up), looking at its mid-height, the subject framed whole."""
    size = _check_size(size)
    if n < 1:
        raise RenderError(f"orbit needs at least 1 view, got {n}")
    lo, hi = subject_box(params)
    centre = (lo + hi) / 2.0
    half = 0.5 * float(np.linalg.norm(hi - lo))  # the box's bounding sphere
    distance = half / math.sin(math.radians(fov_deg) / 2.0 * ORBIT_FILL)
    f = 0.5 * size / math.tan(math.radians(fov_deg) / 2.0)
    K = np.array([[f, 0.0, size / 2.0], [0.0, f, size / 2.0], [0.0, 0.0, 1.0]])
    el = math.radians(elevation_deg)
    views = []
    for i in range(n):
        a = math.radians(start_deg + 360.0 * i / n)
        pos = centre + distance * np.array([math.cos(el) * math.cos(a), math.cos(el) * math.sin(a), math.sin(el)])
        views.append(View(f"orbit-{i:03d}", look_at(pos, centre).matrix, K.copy(), size))
    return views


def render_views(params, views: Sequence[View], *, device: str = "cpu",
                 background: Sequence[float] = RENDER_BACKGROUND) -> Iterator[tuple[View, np.ndarray]]:
    """Each view drawn from the splat: ``(view, RGB uint8 [size, size, 3])``, one at a time."""
    from train.exports import render_splat

    for v in views:
        rgb = render_splat(params, v.viewmat, v.K, v.size, v.size, device=device, background=tuple(background))
        yield v, np.clip(np.rint(np.asarray(rgb) * 255.0), 0, 255).astype(np.uint8)




# ----------------------------------------------------------------------------- licensed renders


@dataclass(frozen=True)
class LicensedRender:
    """What :func:`render_licensed` made: the files (in the order made), their serials and the licence's use."""

    out: Path
    licence_id: str
    files: list[Path]
    serials: list[int]
    images_left: int
    seconds: float


def render_licensed(bundle: Path | str, licence: Path | str, out: Path | str, views: Sequence[View], *,
                    purpose: str, market: str, fmt: str = "jpeg", label: bool = True, device: str = "cpu",
                    lighting: str | None = None,
                    licensee: str | None = None, ledger: Path | str | None = None, key: Path | str | None = None,
                    pubkey: Path | str | None = None, trusted_keys: Path | str | None = None,
                    revocations: Path | str | None = None, accept_stale_revocations: bool = False,
                    chain_dir: Path | str | None = None,
                    on_image: Callable[[int, int, Path], None] | None = None) -> LicensedRender:
    """Render ``views`` of the bundle's twin under ``licence``; every image marked twice and metered.

    Refused before anything is drawn, naming each reason, unless the licence is
    the studio's, verifies with the bundle and allows ``len(views)`` more images
    for ``purpose`` in ``market`` today, and the bundle's consent covers
    ``generate`` (:func:`train.handoff.licence.authorise_use`). Each image gets
    the visible AI label (unless ``label`` is False), the invisible watermark
    (licence tag and serial) and C2PA credentials signed with the studio's chain
    (:func:`train.marking.mark_image`); it is recorded in the usage ledger
    *before* its file is written (a crash may leave a metered image unwritten,
    never an unmetered one), then written atomically as
    ``<licence>-<serial>-<view>.<fmt>``. Serials continue the licence's count.
    ``lighting`` picks a captured preset (the bundle's ``splat/lighting.npz``);
    by default the one baked into splat.ply.
    """
    import hashlib
    import time

    from rigs.fileio import atomic_write_bytes
    from train.handoff.bundle import AI_REQUIREMENT
    from train.handoff.ledger import Ledger
    from train.handoff.licence import authorise_use
    from train.marking import mark_image
    from train.marking.credentials import load_c2pa_chain
    from train.preview import label_image

    t0 = time.perf_counter()
    out = Path(out)
    fmt = fmt.lower()
    if fmt not in ("jpeg", "png"):
        raise RenderError(f"format {fmt!r}: expected jpeg or png")
    if not views:
        raise RenderError("no views to render")
    auth = authorise_use(licence, bundle, purpose=purpose, market=market, n=len(views), licensee=licensee,
                         ledger=ledger, pubkey=pubkey, trusted_keys=trusted_keys, revocations=revocations,
                         accept_stale_revocations=accept_stale_revocations)
    lic = auth.licence
    chain = load_c2pa_chain(chain_dir)
    twin = load_bundle_twin(bundle)
    params = twin.lit(lighting)
    book = Ledger(ledger, key=key)
    subject = str(twin.manifest.get("subject", {}).get("id", ""))
    out.mkdir(parents=True, exist_ok=True)
    files, serials = [], []
    for i, (view, rgb) in enumerate(render_views(params, views, device=device)):
        serial = auth.images_used + i + 1
        if label:
            rgb = label_image(rgb)
        data = mark_image(rgb, fmt, bundle_sha256=twin.manifest_sha256, licence_id=lic.id, image_serial=serial,
                          disclosure=AI_REQUIREMENT, chain=chain, subject_id=subject or None)
        book.record(lic, image=str(serial), image_sha256=hashlib.sha256(data).hexdigest(), purpose=purpose,
                    market=market)
        path = out / f"{lic.id}-{serial:06d}-{view.name}.{'jpg' if fmt == 'jpeg' else 'png'}"
        atomic_write_bytes(path, data)
        files.append(path)
        serials.append(serial)
        if on_image is not None:
            on_image(i + 1, len(views), path)
    return LicensedRender(out, lic.id, files, serials, auth.images_left, round(time.perf_counter() - t0, 2))


__all__ = ["BundleTwin", "LicensedRender", "RENDER_BACKGROUND", "RenderError", "View", "camera_file_views",
           "LIGHTING", "load_bundle_twin", "orbit_views", "render_licensed", "render_views", "rig_views",
           "subject_box"]
