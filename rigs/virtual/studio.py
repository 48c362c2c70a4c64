"""The virtual studio: renders the synthetic person, the cyclorama and the
ChArUco board from any rig camera under any lighting state, on the CPU.

Rendering is open3d ray casting with one ray per pixel through the camera's
distorted pixel centres (so lens distortion is exact), diffuse plus
Blinn-Phong specular shading from the rig's lights at the active levels,
shadows cast by the subject and the board, and sensor noise with a fixed seed.

Speed comes from what does not change: per camera, the rays and the static
backdrop (its depth and each light's irradiance on it) are computed once and
reused for every frame and lighting state; per frame only the rays inside the
image rectangle of the subject/board are cast against the moving geometry, and
only the backdrop pixels whose path to a light crosses the capture volume are
tested for shadows.

Every image comes with its exact ground truth: z-depth (metres) and the
subject mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d

from rigs.geometry import Camera, Pose, pixel_rays
from rigs.rigfile import PresetStep, Rig
from rigs.virtual.board import ChArUcoBoard
from rigs.virtual.person import Person, PosedPerson, build_person

#: radiant intensity of a light at power 1 and level 1: irradiance 1 at ~3.5 m
LIGHT_INTENSITY = 12.0
#: height of the cyclorama wall, metres
WALL_HEIGHT = 4.2
#: reflectance of the studio ceiling (black rigging)
CEILING_ALBEDO = 0.03
#: white paper margin around the printed board, in squares
BOARD_MARGIN_SQUARES = 0.5
_SRGB_LUT_SIZE = 4096


@dataclass(frozen=True)
class RenderedImage:
    """One rendered image with its exact ground truth."""

    rgb: np.ndarray  # [H, W, 3] uint8, sRGB, RGB order
    depth: np.ndarray  # [H, W] float32 z-depth in metres (camera frame), inf where nothing is hit
    mask: np.ndarray  # [H, W] bool, True on the subject


@dataclass(frozen=True)
class FrameState:
    """What stands in the capture volume at one instant."""

    posed: PosedPerson | None = None
    board_pose: Pose | None = None  # board-to-world (see rigs.virtual.board)


@dataclass
class _Dynamic:
    scene: o3d.t.geometry.RaycastingScene
    bbox: np.ndarray  # [8, 3] corners of the moving geometry's bounding box
    person_id: int | None
    board_id: int | None
    posed: PosedPerson | None
    vertex_normals: np.ndarray | None
    board_pose: Pose | None


@dataclass
class CameraView:
    """Per-camera cache: rays, static backdrop geometry and its irradiance per light."""

    camera: Camera
    dirs: np.ndarray  # [P, 3] float32 unit ray directions, world
    rays: np.ndarray  # [P, 6] float32 open3d rays (origin, direction)
    z_per_t: np.ndarray  # [P] float32, z-depth per unit ray length
    static_t: np.ndarray  # [P] float32 ray length to the backdrop
    static_albedo: np.ndarray  # [P, 3] float32 linear
    static_irr: np.ndarray  # [L, P] float32 irradiance of each light at level 1
    static_pos: np.ndarray  # [P, 3] float32
    static_nrm: np.ndarray  # [P, 3] float32
    shadow_candidates: list[np.ndarray]  # per light: pixel indices whose light path crosses the volume
    background: dict[str, np.ndarray] = field(default_factory=dict)  # step name -> [P, 3] float32 linear


class VirtualStudio:
    """Renders a rig's virtual studio. Build once per process; not thread-safe."""

    def __init__(self, rig: Rig, person: Person | None = None) -> None:
        self.rig = rig
        v = rig.virtual
        self.person = person if person is not None else build_person(v.seed)
        self.board = ChArUcoBoard(rig.calibration.board)
        self.light_ids = [light.id for light in rig.lights]
        self.light_pos = np.array([light.position for light in rig.lights], dtype=np.float32).reshape(-1, 3)
        self.light_int = np.array([LIGHT_INTENSITY * light.power for light in rig.lights], dtype=np.float32)
        self._static = o3d.t.geometry.RaycastingScene()
        self._static_albedo: list[np.ndarray] = []
        floor_rgb = v.floor_rgb if v.floor_rgb is not None else v.backdrop_rgb
        for verts, tris, albedo in _cyclorama(v.backdrop_radius, WALL_HEIGHT, rig.volume.center):
            self._static.add_triangles(o3d.core.Tensor(verts.astype(np.float32)), o3d.core.Tensor(tris))
            self._static_albedo.append(np.asarray(albedo, dtype=np.float32))
        self._static_albedo[0] = np.asarray(v.backdrop_rgb, dtype=np.float32)
        self._static_albedo[1] = np.asarray(floor_rgb, dtype=np.float32)
        self._noise = _NoiseBank(v.noise_sigma, v.seed)
        lin = np.linspace(0.0, 1.0, _SRGB_LUT_SIZE)
        self._srgb_lut = np.round(255.0 * _linear_to_srgb(lin)).astype(np.uint8)
        vol = rig.volume
        margin = 0.3
        self._volume_box = (np.array([vol.center[0] - vol.radius - margin, vol.center[1] - vol.radius - margin,
                                      0.0]),
                            np.array([vol.center[0] + vol.radius + margin, vol.center[1] + vol.radius + margin,
                                      vol.height + margin]))

    # ------------------------------------------------------------------ scene parts

    def frame(self, state: FrameState) -> _Dynamic:
        """Prepare the moving geometry of one instant (shared by all cameras)."""
        scene = o3d.t.geometry.RaycastingScene()
        pts = []
        person_id = board_id = None
        normals = None
        if state.posed is not None:
            verts = state.posed.vertices
            person_id = scene.add_triangles(o3d.core.Tensor(verts.astype(np.float32)),
                                            o3d.core.Tensor(state.posed.triangles.astype(np.uint32)))
            normals = _vertex_normals(verts, state.posed.triangles)
            pts.append(verts)
        if state.board_pose is not None:
            bv, bt = self._board_mesh(state.board_pose)
            board_id = scene.add_triangles(o3d.core.Tensor(bv.astype(np.float32)),
                                           o3d.core.Tensor(bt.astype(np.uint32)))
            pts.append(bv)
        if pts:
            allp = np.concatenate(pts)
            lo, hi = allp.min(0), allp.max(0)
            bbox = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        else:
            bbox = np.zeros((0, 3))
        return _Dynamic(scene, bbox, person_id, board_id, state.posed, normals, state.board_pose)

    def _board_mesh(self, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        w, h = self.board.size_m
        m = BOARD_MARGIN_SQUARES * self.board.spec.square
        local = np.array([[-m, -m, 0], [w + m, -m, 0], [w + m, h + m, 0], [-m, h + m, 0]])
        return local @ pose.R.T + pose.t, np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)

    def view(self, camera: Camera) -> CameraView:
        """Cast the camera's rays at the static backdrop and cache what does not change."""
        origin, dirs = pixel_rays(camera.intrinsics, camera.pose)
        dirs = dirs.astype(np.float32)
        rays = np.empty((len(dirs), 6), dtype=np.float32)
        rays[:, :3] = origin
        rays[:, 3:] = dirs
        ans = self._static.cast_rays(o3d.core.Tensor(rays))
        t = ans["t_hit"].numpy()
        gid = ans["geometry_ids"].numpy()
        nrm = ans["primitive_normals"].numpy()
        hit = np.isfinite(t)
        pos = origin.astype(np.float32) + dirs * np.where(hit, t, 0.0)[:, None]
        # face the normals towards the camera
        flip = np.sum(nrm * dirs, axis=1) > 0
        nrm[flip] *= -1
        albedo = np.zeros((len(t), 3), dtype=np.float32)
        for g, a in enumerate(self._static_albedo):
            albedo[gid == g] = a
        z_per_t = (dirs @ camera.pose.R[2].astype(np.float32)).astype(np.float32)
        irr = np.zeros((len(self.light_ids), len(t)), dtype=np.float32)
        cands = []
        lo, hi = self._volume_box
        for i, lp in enumerate(self.light_pos):
            L = lp[None, :] - pos
            d2 = np.einsum("ij,ij->i", L, L)
            ndl = np.einsum("ij,ij->i", nrm, L) / np.sqrt(d2)
            irr[i] = np.where(hit, self.light_int[i] * np.clip(ndl, 0, None) / d2, 0.0)
            cands.append(np.flatnonzero((irr[i] > 0) & _segments_hit_box(pos, lp, lo, hi)))
        return CameraView(camera, dirs, rays, z_per_t, t.astype(np.float32), albedo, irr, pos, nrm, cands)

    # ------------------------------------------------------------------ rendering

    def render(self, view: CameraView, dyn: _Dynamic, step: PresetStep, noise_key: int = 0,
               noise: bool = True) -> RenderedImage:
        """Render one image of ``view.camera`` at the instant ``dyn`` under ``step``."""
        cam = view.camera
        w, h = cam.intrinsics.width, cam.intrinsics.height
        levels = np.array([step.levels.get(lid, 0.0) for lid in self.light_ids], dtype=np.float32)
        ambient = np.float32(self.rig.virtual.ambient)
        bg = view.background.get(step.name)
        if bg is None:
            bg = view.static_albedo * (ambient + np.tensordot(levels, view.static_irr, axes=1))[:, None]
            view.background[step.name] = bg
        radiance = bg.copy()
        t_all = view.static_t.copy()
        mask = np.zeros(w * h, dtype=bool)

        idx = self._dynamic_pixels(view, dyn)
        if len(idx):
            ans = dyn.scene.cast_rays(o3d.core.Tensor(view.rays[idx]))
            t = ans["t_hit"].numpy()
            front = np.isfinite(t) & (t < view.static_t[idx])
            idx, t = idx[front], t[front]
            gid = ans["geometry_ids"].numpy()[front]
            prim = ans["primitive_ids"].numpy()[front]
            bary = ans["primitive_uvs"].numpy()[front]
            gnrm = ans["primitive_normals"].numpy()[front]
            t_all[idx] = t
            d = view.dirs[idx]
            pos = view.rays[idx, :3] + d * t[:, None]
            n = len(idx)
            nrm = gnrm.copy()
            albedo = np.empty((n, 3), dtype=np.float32)
            ks = np.zeros(n, dtype=np.float32)
            shin = np.ones(n, dtype=np.float32)
            if dyn.person_id is not None:
                sel = gid == dyn.person_id
                if sel.any():
                    tri = self.person.triangles[prim[sel]]
                    b0 = 1.0 - bary[sel, 0] - bary[sel, 1]
                    wts = np.stack([b0, bary[sel, 0], bary[sel, 1]], axis=1)[:, :, None]  # [n, 3, 1]
                    vn = np.sum(dyn.vertex_normals[tri] * wts, axis=1)
                    nrm[sel] = vn / np.linalg.norm(vn, axis=1, keepdims=True)
                    uv = np.sum(self.person.vertex_uv[tri] * wts, axis=1)
                    albedo[sel] = self.person.albedo(uv)
                    ks[sel] = self.person.triangle_specular[prim[sel]]
                    shin[sel] = self.person.triangle_shininess[prim[sel]]
                    mask[idx[sel]] = True
            if dyn.board_id is not None:
                sel = gid == dyn.board_id
                if sel.any():
                    bp = dyn.board_pose
                    local = (pos[sel] - bp.t) @ bp.R  # board coordinates
                    cos = np.abs(np.einsum("ij,j->i", d[sel], bp.R[:, 2]))
                    footprint = t[sel] / cam.intrinsics.fx / np.maximum(cos, 0.15)
                    refl = self._board_reflectance(local[:, :2], footprint)
                    back = np.einsum("ij,j->i", d[sel], bp.R[:, 2]) < 0  # printed side faces -z
                    refl[back] = 0.25
                    albedo[sel] = refl[:, None]
                    ks[sel] = 0.02
                    shin[sel] = 10.0
            flip = np.einsum("ij,ij->i", nrm, d) > 0
            nrm[flip] *= -1
            radiance[idx] = self._shade(pos, nrm, -d, albedo, ks, shin, levels, ambient, dyn)

        # subject and board shadows on the backdrop
        if self.rig.virtual.shadows and len(dyn.bbox):
            not_dyn = np.ones(w * h, dtype=bool)
            not_dyn[idx] = False
            for i, cand in enumerate(view.shadow_candidates):
                if levels[i] <= 0 or not len(cand):
                    continue
                cand = cand[not_dyn[cand]]
                occ = self._occluded(view.static_pos[cand], view.static_nrm[cand], self.light_pos[i], dyn)
                if occ.any():
                    hit = cand[occ]
                    radiance[hit] -= view.static_albedo[hit] * (levels[i] * view.static_irr[i, hit])[:, None]

        rgb = self._sensor(radiance.reshape(h, w, 3), noise_key if noise else None)
        depth = (t_all * view.z_per_t).reshape(h, w)
        return RenderedImage(rgb, depth.astype(np.float32), mask.reshape(h, w))

    def _board_reflectance(self, xy: np.ndarray, footprint: np.ndarray) -> np.ndarray:
        w, h = self.board.size_m
        inside = (xy[:, 0] >= 0) & (xy[:, 0] <= w) & (xy[:, 1] >= 0) & (xy[:, 1] <= h)
        out = np.full(len(xy), 0.85, dtype=np.float32)  # white paper margin
        if inside.any():
            out[inside] = self.board.reflectance(xy[inside], footprint[inside])
        return out

    def _dynamic_pixels(self, view: CameraView, dyn: _Dynamic) -> np.ndarray:
        """Flat indices of the pixels whose rays may hit the moving geometry."""
        intr = view.camera.intrinsics
        w, h = intr.width, intr.height
        if not len(dyn.bbox):
            return np.zeros(0, dtype=np.int64)
        uv, z = view.camera.project(dyn.bbox)
        if np.any(z <= 0.05):
            return np.arange(w * h)
        margin = 0.03 * max(w, h) + 4
        x0, y0 = np.floor(uv.min(0) - margin).astype(int)
        x1, y1 = np.ceil(uv.max(0) + margin).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        if x0 > x1 or y0 > y1:
            return np.zeros(0, dtype=np.int64)
        ys, xs = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        return (ys * w + xs).ravel()

    def _occluded(self, pos: np.ndarray, nrm: np.ndarray, light: np.ndarray, dyn: _Dynamic) -> np.ndarray:
        """Whether the moving geometry blocks the light at surface points [N, 3]."""
        origin = pos + nrm * 1e-3
        L = light[None, :] - origin
        dist = np.linalg.norm(L, axis=1)
        rays = np.empty((len(pos), 6), dtype=np.float32)
        rays[:, :3] = origin
        rays[:, 3:] = L / dist[:, None]
        occ = dyn.scene.test_occlusions(o3d.core.Tensor(rays), tfar=float(dist.max()))
        occ = occ.numpy().astype(bool)
        if occ.any():  # test_occlusions uses one tfar: recheck the hits against each own distance
            sub = np.flatnonzero(occ)
            t = dyn.scene.cast_rays(o3d.core.Tensor(rays[sub]))["t_hit"].numpy()
            occ[sub] = t < dist[sub]
        return occ

    def _shade(self, pos, nrm, to_eye, albedo, ks, shin, levels, ambient, dyn) -> np.ndarray:
        """Diffuse + Blinn-Phong radiance [N, 3] at surface points with shadows."""
        diffuse = np.full(len(pos), ambient, dtype=np.float32)
        spec = np.zeros(len(pos), dtype=np.float32)
        for i, lp in enumerate(self.light_pos):
            if levels[i] <= 0:
                continue
            L = lp[None, :] - pos
            d2 = np.einsum("ij,ij->i", L, L)
            ldir = L / np.sqrt(d2)[:, None]
            ndl = np.einsum("ij,ij->i", nrm, ldir)
            lit = ndl > 0
            if self.rig.virtual.shadows and lit.any():
                sub = np.flatnonzero(lit)
                lit[sub[self._occluded(pos[sub], nrm[sub], lp, dyn)]] = False
            e = np.where(lit, levels[i] * self.light_int[i] * ndl / d2, 0.0).astype(np.float32)
            diffuse += e
            hv = ldir + to_eye
            hv /= np.linalg.norm(hv, axis=1, keepdims=True)
            ndh = np.clip(np.einsum("ij,ij->i", nrm, hv), 0, 1)
            spec += ks * ndh ** shin * e
        return albedo * diffuse[:, None] + spec[:, None]

    def _sensor(self, radiance: np.ndarray, noise_key: int | None) -> np.ndarray:
        """Linear radiance [H, W, 3] -> sRGB uint8 with the rig's exposure and sensor noise."""
        scale = (_SRGB_LUT_SIZE - 1) * self.rig.virtual.exposure
        code = np.clip(radiance * scale, 0, _SRGB_LUT_SIZE - 1).astype(np.uint16)
        img = self._srgb_lut[code]
        if noise_key is not None and self.rig.virtual.noise_sigma > 0:
            img = self._noise.apply(img, noise_key)
        return img


class _NoiseBank:
    """Gaussian sensor noise (in 8-bit digital numbers) drawn once, shifted per image."""

    def __init__(self, sigma: float, seed: int) -> None:
        self.sigma = sigma
        self.seed = seed
        self._bank: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def apply(self, img: np.ndarray, key: int) -> np.ndarray:
        import cv2

        h, w = img.shape[:2]
        if (h, w) not in self._bank:
            rng = np.random.default_rng(self.seed)
            n = np.round(rng.standard_normal((h, w, 3), dtype=np.float32) * self.sigma)
            n = np.clip(n, -127, 127).astype(np.int16)
            self._bank[(h, w)] = (np.clip(n, 0, None).astype(np.uint8), np.clip(-n, 0, None).astype(np.uint8))
        pos, neg = self._bank[(h, w)]
        rng = np.random.default_rng([self.seed, key])
        dy, dx = int(rng.integers(h)), int(rng.integers(w))
        pos = np.roll(pos, (dy, dx), axis=(0, 1))
        neg = np.roll(neg, (dy, dx), axis=(0, 1))
        return cv2.subtract(cv2.add(img, pos), neg)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def _vertex_normals(verts: np.ndarray, tris: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals [V, 3] float32."""
    v = verts.astype(np.float32)
    fn = np.cross(v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]])
    vn = np.zeros_like(v)
    for k in range(3):
        np.add.at(vn, tris[:, k], fn)
    vn /= np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)
    return vn


def _segments_hit_box(p: np.ndarray, q: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether segments p[i] -> q cross the axis-aligned box [lo, hi]; [N] bool."""
    d = (q[None, :] - p).astype(np.float64)
    tmin = np.zeros(len(p))
    tmax = np.ones(len(p))
    for a in range(3):
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d[:, a]
            t0 = (lo[a] - p[:, a]) * inv
            t1 = (hi[a] - p[:, a]) * inv
        near = np.where(np.isnan(t0), -np.inf, np.minimum(t0, t1))
        far = np.where(np.isnan(t1), np.inf, np.maximum(t0, t1))
        tmin = np.maximum(tmin, near)
        tmax = np.minimum(tmax, far)
    return tmin <= tmax


def _cyclorama(radius: float, height: float, center: tuple[float, float], n: int = 256):
    """Backdrop wall (inward cylinder), floor disc and ceiling disc as (verts, tris, albedo)."""
    cx, cy = center
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([cx + radius * np.cos(a), cy + radius * np.sin(a)], axis=1)
    j = np.arange(n)
    k = (j + 1) % n
    wall_v = np.concatenate([np.c_[ring, np.zeros(n)], np.c_[ring, np.full(n, height)]])
    wall_t = np.concatenate([np.stack([j, k, n + j], 1), np.stack([k, n + k, n + j], 1)])
    floor_v = np.concatenate([[[cx, cy, 0.0]], np.c_[ring, np.zeros(n)]])
    floor_t = np.stack([np.zeros(n, int), 1 + j, 1 + k], 1)
    ceil_v = floor_v + np.array([0, 0, height])
    return [(wall_v, wall_t.astype(np.uint32), (0.0, 0.0, 0.0)),
            (floor_v, floor_t.astype(np.uint32), (0.0, 0.0, 0.0)),
            (ceil_v, floor_t.astype(np.uint32), (CEILING_ALBEDO,) * 3)]
