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
#: backdrop shadows are traced on a grid about this many cells wide, then interpolated (soft shadows)
SHADOW_GRID_CELLS = 320
#: white paper margin around the printed board, in squares
BOARD_MARGIN_SQUARES = 0.5
_SRGB_LUT_SIZE = 4096


@dataclass(frozen=True)
class RenderedImage:
    """One rendered image with its exact ground truth."""

    rgb: np.ndarray  # [H, W, 3] uint8, sRGB, RGB order
    depth: np.ndarray  # [H, W] float32 z-depth in metres (camera frame), inf where nothing is hit
    mask: np.ndarray  # [H, W] bool, True on the subject
    foreground: np.ndarray  # [H, W] bool, True on the moving geometry (subject and board)


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
    """Per-camera cache: rays, the static backdrop and its irradiance from each light.

    Shadows on the backdrop are soft (the studio's lights are large): they are
    traced on a grid of every ``shadow_step``-th pixel (about 320 cells across
    the image) and interpolated.
    """

    camera: Camera
    rays: np.ndarray  # [P, 6] float32 open3d rays (camera centre, unit direction)
    z_per_t: np.ndarray  # [P] float32, z-depth per unit of ray length
    static_t: np.ndarray  # [P] float32 ray length to the backdrop (inf: none)
    static_albedo: np.ndarray  # [P, 3] float32 linear
    static_irr: np.ndarray  # [L, P] float32 irradiance of each light at level 1
    shadow_step: int  # pixels between shadow grid cells
    shadow_grid: tuple[int, int]  # (rows, cols) of the shadow grid
    shadow_cells: list[np.ndarray]  # per light: grid cells whose path to the light crosses the volume
    shadow_rays: list[np.ndarray]  # per light: [m, 6] float32 rays from those cells, the light at t = 1
    background: dict[str, np.ndarray] = field(default_factory=dict)  # step -> [P, 3] uint8 sRGB, no shadows
    instant: _Instant | None = None  # the last instant seen from this camera

    @property
    def dirs(self) -> np.ndarray:
        """Unit ray directions [P, 3] (a view into ``rays``)."""
        return self.rays[:, 3:]


@dataclass
class _Instant:
    """What one camera sees of one instant, independent of the light levels."""

    dyn: _Dynamic
    idx: np.ndarray  # [n] pixels showing the moving geometry
    albedo: np.ndarray  # [n, 3]
    diffuse: np.ndarray  # [L, n] irradiance per light at level 1, shadows applied
    specular: np.ndarray  # [L, n] specular radiance per light at level 1
    depth: np.ndarray  # [P] float32 z-depth
    mask: np.ndarray  # [P] bool subject
    foreground: np.ndarray  # [P] bool subject or board
    shadowed: np.ndarray  # [m] backdrop pixels in the shadow of at least one light
    shadow_irr: np.ndarray  # [L, m] backdrop irradiance per light at level 1, shadows applied


class VirtualStudio:
    """Renders a rig's virtual studio. Build once per process; not thread-safe."""

    def __init__(self, rig: Rig, person: Person | None = None, noise_seed: int | None = None) -> None:
        self.rig = rig
        v = rig.virtual
        self.person = person if person is not None else build_person(v.seed)
        self.board = ChArUcoBoard(rig.calibration.board)
        self.light_ids = [light.id for light in rig.lights]
        self.light_pos = np.array([light.position for light in rig.lights], dtype=np.float32).reshape(-1, 3)
        self.light_int = np.array([LIGHT_INTENSITY * light.power for light in rig.lights], dtype=np.float32)
        aim = rig.volume.focus.astype(np.float32)
        axis = aim[None, :] - self.light_pos
        self.light_axis = axis / np.maximum(np.linalg.norm(axis, axis=1, keepdims=True), 1e-9)
        self.light_falloff = np.array([_BEAM_EXPONENT[light.kind] for light in rig.lights], dtype=np.float32)
        self._static = o3d.t.geometry.RaycastingScene()
        self._static_albedo: list[np.ndarray] = []
        floor_rgb = v.floor_rgb if v.floor_rgb is not None else v.backdrop_rgb
        albedos = [v.backdrop_rgb, floor_rgb, (CEILING_ALBEDO,) * 3]
        for (verts, tris), albedo in zip(_cyclorama(v.backdrop_radius, WALL_HEIGHT, rig.volume.center), albedos):
            self._static.add_triangles(o3d.core.Tensor(verts.astype(np.float32)), o3d.core.Tensor(tris))
            self._static_albedo.append(np.asarray(albedo, dtype=np.float32))
        self._noise = _NoiseBank(v.noise_sigma, v.seed if noise_seed is None else noise_seed)
        lin = np.linspace(0.0, 1.0, _SRGB_LUT_SIZE)
        self._srgb_lut = np.round(255.0 * _linear_to_srgb(lin)).astype(np.uint8)
        vol = rig.volume
        margin = 0.3
        box = o3d.geometry.TriangleMesh.create_box(2 * (vol.radius + margin), 2 * (vol.radius + margin),
                                                   vol.height + margin)
        box.translate((vol.center[0] - vol.radius - margin, vol.center[1] - vol.radius - margin, 0.0))
        self._volume_box = o3d.t.geometry.RaycastingScene()
        self._volume_box.add_triangles(o3d.t.geometry.TriangleMesh.from_legacy(box))

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
        rays = _camera_rays(camera)
        ans = self._static.cast_rays(o3d.core.Tensor(rays))
        t = ans["t_hit"].numpy()
        gid = ans["geometry_ids"].numpy()
        nrm = ans["primitive_normals"].numpy()
        hit = np.isfinite(t)
        pos = rays[:, :3] + rays[:, 3:] * np.where(hit, t, 0.0)[:, None]
        flip = np.einsum("ij,ij->i", nrm, rays[:, 3:]) > 0  # face the normals towards the camera
        nrm[flip] *= -1
        albedo = np.zeros((len(t), 3), dtype=np.float32)
        for g, a in enumerate(self._static_albedo):
            albedo[gid == g] = a
        z_per_t = (rays[:, 3:] @ camera.pose.R[2].astype(np.float32)).astype(np.float32)
        irr = np.zeros((len(self.light_ids), len(t)), dtype=np.float32)
        for i in range(len(self.light_ids)):
            irr[i] = np.where(hit, self._irradiance(i, pos, nrm)[0], 0.0)
        # shadow grid: every step-th pixel of every step-th row
        w, h = camera.intrinsics.width, camera.intrinsics.height
        step = max(1, round(w / SHADOW_GRID_CELLS))
        grid = (h + step - 1) // step, (w + step - 1) // step
        gpix = (np.arange(0, h, step)[:, None] * w + np.arange(0, w, step)[None, :]).ravel()
        g_origin = pos[gpix] + nrm[gpix] * 1e-3
        g_rays = np.empty((len(gpix), 6), dtype=np.float32)
        g_rays[:, :3] = g_origin
        cells, cell_rays = [], []
        for i in range(len(self.light_ids)):
            # unnormalised directions: the light is at t = 1 on every ray
            g_rays[:, 3:] = self.light_pos[i][None, :] - g_origin
            crosses = self._volume_box.test_occlusions(o3d.core.Tensor(g_rays), tfar=1.0).numpy()
            c = np.flatnonzero((irr[i, gpix] > 0) & crosses.astype(bool))
            cells.append(c)
            cell_rays.append(g_rays[c])
        return CameraView(camera, rays, z_per_t, t.astype(np.float32), albedo, irr, step, grid, cells,
                          cell_rays)

    def _irradiance(self, i: int, pos: np.ndarray, nrm: np.ndarray) -> tuple[np.ndarray, ...]:
        """Light i at level 1 on surface points: irradiance [N], unit directions to it [N, 3], distances [N]."""
        L = self.light_pos[i][None, :] - pos
        d2 = np.einsum("ij,ij->i", L, L)
        dist = np.sqrt(d2)
        ldir = L / dist[:, None]
        ndl = np.einsum("ij,ij->i", nrm, ldir)
        beam = np.maximum(-(ldir @ self.light_axis[i]), 0) ** self.light_falloff[i]
        e = self.light_int[i] * beam * np.maximum(ndl, 0) / d2
        return e.astype(np.float32), ldir, dist

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
            lin = view.static_albedo * (ambient + np.tensordot(levels, view.static_irr, axes=1))[:, None]
            bg = self._to_srgb(lin)
            view.background[step.name] = bg
        inst = view.instant
        if inst is None or inst.dyn is not dyn:
            inst = view.instant = self._instant(view, dyn)
        img = bg.copy()
        if len(inst.idx):
            rad = inst.albedo * (ambient + np.tensordot(levels, inst.diffuse, axes=1))[:, None]
            rad += np.tensordot(levels, inst.specular, axes=1)[:, None]
            img[inst.idx] = self._to_srgb(rad)
        if len(inst.shadowed):
            rad = view.static_albedo[inst.shadowed] * (ambient + np.tensordot(levels, inst.shadow_irr, axes=1))[:, None]
            img[inst.shadowed] = self._to_srgb(rad)
        rgb = img.reshape(h, w, 3)
        if noise and self.rig.virtual.noise_sigma > 0:
            rgb = self._noise.apply(rgb, noise_key)
        return RenderedImage(rgb, inst.depth.reshape(h, w), inst.mask.reshape(h, w), inst.foreground.reshape(h, w))

    @staticmethod
    def backdrop_depth(view: CameraView) -> np.ndarray:
        """z-depth of the empty studio from this camera, [H, W] float32 metres (inf: nothing)."""
        intr = view.camera.intrinsics
        return (view.static_t * view.z_per_t).reshape(intr.height, intr.width)

    def _instant(self, view: CameraView, dyn: _Dynamic) -> _Instant:
        """Cast the moving geometry from this camera; light each hit by every light at level 1."""
        cam = view.camera
        n_pix = cam.intrinsics.width * cam.intrinsics.height
        n_lights = len(self.light_ids)
        depth = view.static_t * view.z_per_t
        mask = np.zeros(n_pix, dtype=bool)
        foreground = np.zeros(n_pix, dtype=bool)
        idx = self._dynamic_pixels(view, dyn)
        empty = np.zeros((n_lights, 0), dtype=np.float32)
        albedo = np.zeros((0, 3), dtype=np.float32)
        diffuse = specular = empty
        if len(idx):
            ans = dyn.scene.cast_rays(o3d.core.Tensor(view.rays[idx]))
            t = ans["t_hit"].numpy()
            front = np.isfinite(t) & (t < view.static_t[idx])
            idx, t = idx[front], t[front]
            gid = ans["geometry_ids"].numpy()[front]
            prim = ans["primitive_ids"].numpy()[front]
            bary = ans["primitive_uvs"].numpy()[front]
            nrm = ans["primitive_normals"].numpy()[front]
            depth[idx] = t * view.z_per_t[idx]
            foreground[idx] = True
            d = view.dirs[idx]
            pos = view.rays[idx, :3] + d * t[:, None]
            n = len(idx)
            albedo = np.empty((n, 3), dtype=np.float32)
            ks = np.zeros(n, dtype=np.float32)
            shin = np.ones(n, dtype=np.float32)
            if dyn.person_id is not None:
                sel = np.flatnonzero(gid == dyn.person_id)
                if len(sel):
                    tri = self.person.triangles[prim[sel]]
                    wts = np.stack([1.0 - bary[sel, 0] - bary[sel, 1], bary[sel, 0], bary[sel, 1]], axis=1)
                    vn = np.einsum("nk,nkc->nc", wts, dyn.vertex_normals[tri])
                    nrm[sel] = vn / np.linalg.norm(vn, axis=1, keepdims=True)
                    albedo[sel] = self.person.albedo(np.einsum("nk,nkc->nc", wts, self.person.vertex_uv[tri]))
                    ks[sel] = self.person.triangle_specular[prim[sel]]
                    shin[sel] = self.person.triangle_shininess[prim[sel]]
                    mask[idx[sel]] = True
            if dyn.board_id is not None:
                sel = np.flatnonzero(gid == dyn.board_id)
                if len(sel):
                    bp = dyn.board_pose
                    local = (pos[sel] - bp.t.astype(np.float32)) @ bp.R.astype(np.float32)
                    cos_v = d[sel] @ bp.R[:, 2].astype(np.float32)
                    footprint = t[sel] / cam.intrinsics.fx / np.maximum(np.abs(cos_v), 0.15)
                    refl = self._board_reflectance(local[:, :2], footprint)
                    refl[cos_v < 0] = 0.25  # the back of the board: the printed side faces -z
                    albedo[sel] = refl[:, None]
                    ks[sel] = 0.02
                    shin[sel] = 10.0
            flip = np.einsum("ij,ij->i", nrm, d) > 0
            nrm[flip] *= -1
            diffuse, specular = self._light_surface(pos, nrm, d, ks, shin, dyn)
        # shadows of the moving geometry on the backdrop
        shadowed = np.zeros(0, dtype=np.int64)
        shadow_irr = empty
        if self.rig.virtual.shadows and len(dyn.bbox):
            free = np.ones(n_pix, dtype=bool)
            free[idx] = False
            w, h = cam.intrinsics.width, cam.intrinsics.height
            shaded = []  # per light: (pixels, lit fraction there)
            for i, cells in enumerate(view.shadow_cells):
                if len(cells):
                    occ = self._occluded_rays(view.shadow_rays[i], dyn)
                    if occ.any():
                        pix, frac = _soft_shadow(cells[occ], view.shadow_grid, view.shadow_step, w, h)
                        keep = free[pix]
                        shaded.append((i, pix[keep], frac[keep]))
            if shaded:
                shadowed = np.unique(np.concatenate([p for _, p, _ in shaded]))
                shadow_irr = view.static_irr[:, shadowed].copy()
                for i, pix, frac in shaded:
                    shadow_irr[i, np.searchsorted(shadowed, pix)] *= frac
        return _Instant(dyn, idx, albedo, diffuse, specular, depth.astype(np.float32), mask, foreground,
                        shadowed, shadow_irr)

    def _light_surface(self, pos, nrm, d, ks, shin, dyn: _Dynamic) -> tuple[np.ndarray, np.ndarray]:
        """Diffuse irradiance and specular radiance of every light at level 1 on moving surface points.

        pos, nrm, d: [n, 3] points, unit normals facing the camera, view rays; ks, shin: [n].
        Returns two [L, n] float32 arrays, shadows applied.
        """
        lv = self.light_pos[None, :, :] - pos[:, None, :]  # [n, L, 3]
        d2 = np.einsum("nlc,nlc->nl", lv, lv)
        ldir = lv / np.sqrt(d2)[:, :, None]
        ndl = np.einsum("nc,nlc->nl", nrm, ldir)
        beam = np.maximum(-np.einsum("nlc,lc->nl", ldir, self.light_axis), 0) ** self.light_falloff[None, :]
        e = (self.light_int[None, :] * beam * np.maximum(ndl, 0) / d2).astype(np.float32)  # [n, L]
        if self.rig.virtual.shadows:
            pi, li = np.nonzero(e > 0)
            if len(pi):
                rays = np.empty((len(pi), 6), dtype=np.float32)
                rays[:, :3] = pos[pi] + nrm[pi] * 1e-3
                rays[:, 3:] = self.light_pos[li] - rays[:, :3]  # the light at t = 1
                occ = self._occluded_rays(rays, dyn)
                e[pi[occ], li[occ]] = 0.0
        hv = ldir - d[:, None, :]
        hv /= np.linalg.norm(hv, axis=2, keepdims=True)
        ndh = np.clip(np.einsum("nc,nlc->nl", nrm, hv), 0, 1)
        spec = ks[:, None] * ndh ** shin[:, None] * e
        return np.ascontiguousarray(e.T), np.ascontiguousarray(spec.T.astype(np.float32))

    def _to_srgb(self, radiance: np.ndarray) -> np.ndarray:
        """Linear radiance [..., 3] -> sRGB uint8 with the rig's exposure (no noise)."""
        scale = (_SRGB_LUT_SIZE - 1) * self.rig.virtual.exposure
        return self._srgb_lut[np.minimum(radiance * scale, _SRGB_LUT_SIZE - 1).astype(np.uint16)]  # radiance >= 0

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

    @staticmethod
    def _occluded_rays(rays: np.ndarray, dyn: _Dynamic) -> np.ndarray:
        """Occlusion of rays whose (unnormalised) direction reaches the light at t = 1."""
        return dyn.scene.test_occlusions(o3d.core.Tensor(rays), tfar=1.0).numpy().astype(bool)


#: beam falloff exponent (cos^k about the light's axis, aimed at the volume's centre) per fixture kind
_BEAM_EXPONENT = {"softbox": 1.5, "panel": 1.0, "ring": 1.0, "fresnel": 6.0, "spot": 10.0}


class _NoiseBank:
    """Gaussian sensor noise (8-bit digital numbers): one field of twice the image size
    drawn once, and a window of it chosen per image from a seeded offset."""

    def __init__(self, sigma: float, seed: int) -> None:
        self.sigma = sigma
        self.seed = seed
        self._bank: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def apply(self, img: np.ndarray, key: int) -> np.ndarray:
        import cv2

        h, w = img.shape[:2]
        if (h, w) not in self._bank:
            rng = np.random.default_rng(self.seed)
            n = np.round(rng.standard_normal((2 * h, 2 * w, 3), dtype=np.float32) * self.sigma)
            self._bank[(h, w)] = (np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8))
        pos, neg = self._bank[(h, w)]
        rng = np.random.default_rng([self.seed, key])
        dy, dx = int(rng.integers(h)), int(rng.integers(w))
        return cv2.subtract(cv2.add(img, pos[dy:dy + h, dx:dx + w]), neg[dy:dy + h, dx:dx + w])


def _camera_rays(camera: Camera, step: int = 4) -> np.ndarray:
    """open3d rays [P, 6] float32 through every pixel centre (row-major), honouring distortion.

    The exact (float64 Newton) undistortion is solved on a grid every ``step``
    pixels and interpolated bilinearly in between: the undistortion map is so
    smooth that this is within 1e-3 px of exact for real lenses, at a fraction
    of the cost.
    """
    import cv2

    intr = camera.intrinsics
    w, h = intr.width, intr.height
    gx = np.arange(0, -(-(w - 1) // step) * step + 1, step, dtype=np.float64)
    gy = np.arange(0, -(-(h - 1) // step) * step + 1, step, dtype=np.float64)
    u, v = np.meshgrid(gx, gy)
    _, d = pixel_rays(intr, Pose(), np.stack([u.ravel(), v.ravel()], axis=1))
    xy = (d[:, :2] / d[:, 2:3]).reshape(len(gy), len(gx), 2).astype(np.float32)
    mx = np.tile((np.arange(w, dtype=np.float32) / step)[None, :], (h, 1))
    my = np.tile((np.arange(h, dtype=np.float32) / step)[:, None], (1, w))
    xy = cv2.remap(xy, mx, my, cv2.INTER_LINEAR).reshape(-1, 2)
    d_cam = np.empty((len(xy), 3), dtype=np.float32)
    d_cam[:, :2] = xy
    d_cam[:, 2] = 1.0
    d_cam /= np.linalg.norm(d_cam, axis=1, keepdims=True)
    rays = np.empty((len(xy), 6), dtype=np.float32)
    rays[:, :3] = camera.pose.center
    rays[:, 3:] = d_cam @ camera.pose.R.astype(np.float32)
    return rays


def _soft_shadow(cells: np.ndarray, grid: tuple[int, int], step: int, w: int, h: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels near occluded shadow-grid cells and their lit fraction (bilinear between cells).

    ``cells`` are flat indices into the (rows, cols) grid whose cell (r, c)
    sits on pixel (r*step, c*step). Returns flat pixel indices [n] and the lit
    fraction in [0, 1) there.
    """
    import cv2

    rows, cols = grid
    r, c = np.divmod(cells, cols)
    r0, r1 = max(int(r.min()) - 1, 0), min(int(r.max()) + 1, rows - 1)
    c0, c1 = max(int(c.min()) - 1, 0), min(int(c.max()) + 1, cols - 1)
    lit = np.ones((r1 - r0 + 1, c1 - c0 + 1), dtype=np.float32)
    lit[r - r0, c - c0] = 0.0
    y0, y1 = r0 * step, min(r1 * step, h - 1)
    x0, x1 = c0 * step, min(c1 * step, w - 1)
    mx = (np.arange(x0, x1 + 1, dtype=np.float32) - x0) / step
    my = (np.arange(y0, y1 + 1, dtype=np.float32) - y0) / step
    frac = cv2.remap(lit, np.tile(mx, (len(my), 1)), np.tile(my[:, None], (1, len(mx))), cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)
    yy, xx = np.nonzero(frac < 1.0)
    return (yy + y0) * w + (xx + x0), frac[yy, xx]


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


def _cyclorama(radius: float, height: float, center: tuple[float, float], n: int = 256):
    """Backdrop wall (a cylinder), floor disc and ceiling disc as (verts, tris)."""
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
    return [(wall_v, wall_t.astype(np.uint32)), (floor_v, floor_t.astype(np.uint32)),
            (ceil_v, floor_t.astype(np.uint32))]
