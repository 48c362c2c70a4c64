"""The synthetic person of the virtual studio.

An articulated, textured human about 1.75 m tall: 17 rigid body parts hung on
a joint hierarchy (pelvis → spine → chest → neck → head, shoulders → elbows →
wrists, hips → knees → ankles). Each part is a tapered superquadric (a
rounded cylinder for limbs, an ellipsoid for the head) with an analytic
inside test, so ground truth such as "is this point inside the body" is exact.

Conventions: metres, radians, world z up, floor at z = 0; at rest the person
stands at the origin facing -y, so +x is the person's left (see
:mod:`rigs.virtual.motion` for the joint and Euler conventions).

The texture atlas holds one tile per part: a printed shirt and sleeves,
denim trousers, shoes, skin with a face and hair, a birthmark on the left
forearm and a tattoo on the right one. Clothing is rich in features at the
1–10 cm scale so that SIFT matching works from a few metres away; nothing is
green (the backdrop is keyed on green).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np

from rigs.errors import ShapeError
from rigs.virtual.motion import PoseParams, forward_kinematics

#: atlas size (pixels) and tiles per side
ATLAS_SIZE = 2048
_TILES = 5
#: every part's surface is this much inside its analytic shape in `inside()` (metres)
INSIDE_SHRINK = 1e-3


@dataclass(frozen=True)
class Joint:
    """A joint: its parent's name (None for the root) and rest offset from it (metres)."""

    name: str
    parent: str | None
    offset: np.ndarray  # [3]


def skeleton() -> list[Joint]:
    """The joints in topological order; the rest pose is an A-pose (arms 20° out)."""
    s20, c20 = math.sin(math.radians(20)), math.cos(math.radians(20))
    upper, fore = 0.29, 0.25
    joints = [
        Joint("pelvis", None, np.array([0.0, 0.0, 0.97])),
        Joint("spine", "pelvis", np.array([0.0, 0.0, 0.12])),
        Joint("chest", "spine", np.array([0.0, 0.0, 0.20])),
        Joint("neck", "chest", np.array([0.0, 0.0, 0.18])),
        Joint("head", "neck", np.array([0.0, 0.0, 0.09])),
    ]
    for side, sx in (("l", 1.0), ("r", -1.0)):
        joints += [
            Joint(f"shoulder_{side}", "chest", np.array([sx * 0.185, 0.0, 0.13])),
            Joint(f"elbow_{side}", f"shoulder_{side}", np.array([sx * upper * s20, 0.0, -upper * c20])),
            Joint(f"wrist_{side}", f"elbow_{side}", np.array([sx * fore * s20, 0.0, -fore * c20])),
        ]
    for side, sx in (("l", 1.0), ("r", -1.0)):
        joints += [
            Joint(f"hip_{side}", "pelvis", np.array([sx * 0.095, 0.0, -0.06])),
            Joint(f"knee_{side}", f"hip_{side}", np.array([0.0, 0.0, -0.42])),
            Joint(f"ankle_{side}", f"knee_{side}", np.array([0.0, 0.0, -0.41])),
        ]
    return joints


@dataclass(frozen=True)
class Shape:
    """A tapered superquadric in its joint's frame.

    Points p in the joint frame map to shape coordinates q = axes.T @ (p - centre);
    inside when ((qx/(a f))^2 + (qy/(b f))^2)^(1/e) + |qz/c|^(2/e) < 1 with the
    taper f = 1 + taper * qz / c. e = 1 is an ellipsoid, e -> 0 a cylinder.
    """

    centre: np.ndarray  # [3]
    axes: np.ndarray  # [3, 3] columns: the shape's x, y, z axes in the joint frame
    a: float
    b: float
    c: float
    e: float = 1.0
    taper: float = 0.0

    def implicit(self, q: np.ndarray, shrink: float = 0.0) -> np.ndarray:
        """The superquadric function at shape coordinates [N, 3] (< 1 inside)."""
        a, b, c = self.a - shrink, self.b - shrink, self.c - shrink
        f = 1.0 + self.taper * np.clip(q[:, 2] / c, -1, 1)
        r2 = (q[:, 0] / (a * f)) ** 2 + (q[:, 1] / (b * f)) ** 2
        return r2 ** (1.0 / self.e) + np.abs(q[:, 2] / c) ** (2.0 / self.e)

    def surface(self, n_eta: int, n_omega: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Grid vertices [V, 3] (joint frame), triangles [T, 3] and UVs [V, 2] in the unit square."""
        eta = np.linspace(-np.pi / 2, np.pi / 2, n_eta)
        omega = np.linspace(-np.pi, np.pi, n_omega + 1)  # seam column duplicated
        E, W = np.meshgrid(eta, omega, indexing="ij")
        ce = _spow(np.cos(E), self.e)
        se = _spow(np.sin(E), self.e)
        z = self.c * se
        f = 1.0 + self.taper * se
        q = np.stack([self.a * f * ce * np.cos(W), self.b * f * ce * np.sin(W), z], axis=-1).reshape(-1, 3)
        verts = q @ self.axes.T + self.centre
        uv = np.stack([(W + np.pi) / (2 * np.pi), 1.0 - (E + np.pi / 2) / np.pi], axis=-1).reshape(-1, 2)
        cols = n_omega + 1
        i, j = np.meshgrid(np.arange(n_eta - 1), np.arange(n_omega), indexing="ij")
        v00 = (i * cols + j).ravel()
        v01, v10, v11 = v00 + 1, v00 + cols, v00 + cols + 1
        tris = np.concatenate([np.stack([v00, v10, v11], 1), np.stack([v00, v11, v01], 1)])
        return verts, tris, uv


def _spow(x: np.ndarray, p: float) -> np.ndarray:
    return np.sign(x) * np.abs(x) ** p


def _limb_axes(d: np.ndarray) -> np.ndarray:
    """Axes with z along the limb direction d, y towards the person's back where possible."""
    z = d / np.linalg.norm(d)
    ref = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(ref, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


@dataclass(frozen=True)
class PartDef:
    name: str
    joint: str
    shape: Shape
    material: str  # texture generator: shirt, sleeve, trousers, skin, head, hand, shoe
    grid: tuple[int, int]  # (n_eta, n_omega)


def _part_defs(joints: list[Joint]) -> list[PartDef]:
    off = {j.name: j.offset for j in joints}
    eye = np.eye(3)
    parts = [
        PartDef("pelvis", "pelvis", Shape(np.array([0, 0, -0.03]), eye, 0.165, 0.11, 0.12, 0.6), "trousers",
                (36, 64)),
        PartDef("abdomen", "spine", Shape(np.array([0, 0.005, 0.09]), eye, 0.145, 0.10, 0.14, 0.7), "shirt",
                (36, 64)),
        PartDef("chest", "chest", Shape(np.array([0, 0, 0.05]), eye, 0.175, 0.11, 0.16, 0.55, 0.08), "shirt",
                (40, 72)),
        PartDef("neck", "neck", Shape(np.array([0, 0.005, 0.06]), eye, 0.052, 0.055, 0.09, 0.5), "skin",
                (20, 32)),
        PartDef("head", "head", Shape(np.array([0, -0.005, 0.09]), eye, 0.078, 0.098, 0.118, 1.0), "head",
                (48, 72)),
    ]
    for side in ("l", "r"):
        d_up = off[f"elbow_{side}"]
        d_fore = off[f"wrist_{side}"]
        hand_dir = d_fore / np.linalg.norm(d_fore)
        foot_axes = np.stack([np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), np.array([0, -1.0, 0])], axis=1)
        parts += [
            PartDef(f"upper_arm_{side}", f"shoulder_{side}",
                    Shape(d_up / 2, _limb_axes(d_up), 0.052, 0.05, np.linalg.norm(d_up) / 2 + 0.035, 0.5, -0.2),
                    "sleeve", (32, 40)),
            PartDef(f"forearm_{side}", f"elbow_{side}",
                    Shape(d_fore / 2, _limb_axes(d_fore), 0.04, 0.037, np.linalg.norm(d_fore) / 2 + 0.025, 0.5,
                          -0.25), "skin", (32, 40)),
            PartDef(f"hand_{side}", f"wrist_{side}",
                    Shape(hand_dir * 0.08, _limb_axes(hand_dir), 0.022, 0.045, 0.09, 0.7), "hand", (20, 32)),
            PartDef(f"thigh_{side}", f"hip_{side}",
                    Shape(off[f"knee_{side}"] / 2, _limb_axes(off[f"knee_{side}"]), 0.078, 0.08, 0.25, 0.5, -0.3),
                    "trousers", (36, 48)),
            PartDef(f"shin_{side}", f"knee_{side}",
                    Shape(off[f"ankle_{side}"] / 2, _limb_axes(off[f"ankle_{side}"]), 0.056, 0.058, 0.225, 0.5,
                          -0.3), "trousers", (36, 40)),
            PartDef(f"foot_{side}", f"ankle_{side}",
                    Shape(np.array([0, -0.05, -0.035]), foot_axes, 0.045, 0.045, 0.13, 0.6), "shoe", (20, 32)),
        ]
    return parts


_MATERIAL_SPEC = {  # specular strength, Blinn-Phong exponent
    "shirt": (0.05, 8.0), "sleeve": (0.05, 8.0), "trousers": (0.04, 6.0), "skin": (0.25, 30.0),
    "head": (0.22, 28.0), "hand": (0.25, 30.0), "shoe": (0.4, 60.0),
}

# (part, eta, omega) of each landmark: eta up the part's axis, omega around it (radians)
# For limbs omega = -pi/2 points to -y' (the person's front for hanging limbs).
_LANDMARKS = {
    "birthmark": ("forearm_l", 0.35, -1.2),
    "tattoo": ("forearm_r", 0.05 * math.pi, -math.pi / 2),  # the centre of the ring (see _skin)
    "nose_tip": ("head", -0.05, -math.pi / 2),
    "chin": ("head", -0.75, -math.pi / 2),
    "sternum": ("chest", 0.25, -math.pi / 2),
    "navel": ("abdomen", -0.1, -math.pi / 2),
    "shoulder_top_l": ("upper_arm_l", 1.1, math.pi),
    "shoulder_top_r": ("upper_arm_r", 1.1, 0.0),
    "elbow_l": ("forearm_l", 1.0, math.pi / 2),
    "elbow_r": ("forearm_r", 1.0, math.pi / 2),
    "wrist_l": ("forearm_l", -1.0, math.pi),
    "wrist_r": ("forearm_r", -1.0, 0.0),
    "knee_l": ("shin_l", 1.0, -math.pi / 2),
    "knee_r": ("shin_r", 1.0, -math.pi / 2),
    "ankle_l": ("shin_l", -1.1, math.pi),
    "ankle_r": ("shin_r", -1.1, 0.0),
    "toe_l": ("foot_l", 1.2, 0.0),
    "toe_r": ("foot_r", 1.2, math.pi),
}


@dataclass(frozen=True)
class PosedPerson:
    """The person in one pose: world-space mesh, joints and landmarks."""

    vertices: np.ndarray  # [V, 3] float64, world, metres
    triangles: np.ndarray  # [T, 3] int32, the same for every pose
    joints: dict[str, np.ndarray]  # joint -> [3] world position
    joint_transforms: dict[str, np.ndarray]  # joint -> [4, 4] local-to-world
    landmarks: dict[str, np.ndarray]  # landmark -> [3] world position, on the surface
    vertex_colors: np.ndarray  # [V, 3] float32 linear albedo at each vertex

    def to_open3d(self):
        """An open3d TriangleMesh with vertex normals and vertex colours (albedo, sRGB)."""
        import open3d as o3d

        m = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(self.vertices),
                                      o3d.utility.Vector3iVector(self.triangles))
        m.vertex_colors = o3d.utility.Vector3dVector(_linear_to_srgb(self.vertex_colors).astype(np.float64))
        m.compute_vertex_normals()
        return m


class Person:
    """The synthetic person: parts, mesh, texture atlas and ground-truth helpers."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.joints = skeleton()
        self.parts = _part_defs(self.joints)
        self.part_names = [p.name for p in self.parts]
        verts, tris, uvs, tpart, spec, shin = [], [], [], [], [], []
        self._ranges: list[tuple[int, int]] = []
        self._grids: list[tuple[int, int, int]] = []  # (first vertex, n_eta, n_omega+1)
        n = 0
        for k, p in enumerate(self.parts):
            v, t, uv = p.shape.surface(*p.grid)
            tile = _tile_rect(k)
            uvs.append(np.stack([tile[0] + uv[:, 0] * tile[2], tile[1] + uv[:, 1] * tile[3]], 1))
            verts.append(v)
            tris.append(t + n)
            tpart.append(np.full(len(t), k, dtype=np.int16))
            ks, sh = _MATERIAL_SPEC[p.material]
            spec.append(np.full(len(t), ks, dtype=np.float32))
            shin.append(np.full(len(t), sh, dtype=np.float32))
            self._ranges.append((n, n + len(v)))
            self._grids.append((n, p.grid[0], p.grid[1] + 1))
            n += len(v)
        self._rest_local = np.concatenate(verts)  # [V, 3] in each part's joint frame
        self.triangles = np.concatenate(tris).astype(np.int32)
        self.vertex_uv = np.concatenate(uvs).astype(np.float32)
        self.triangle_part = np.concatenate(tpart)
        self.triangle_specular = np.concatenate(spec)
        self.triangle_shininess = np.concatenate(shin)
        self.texture = _build_atlas(self.parts, seed)
        self._lut = (_srgb_to_linear(np.arange(256) / 255.0)).astype(np.float32)
        self.landmark_names = list(_LANDMARKS)
        self._landmark_vertex = {name: self._grid_vertex(part, eta, om)
                                 for name, (part, eta, om) in _LANDMARKS.items()}

    def _grid_vertex(self, part: str, eta: float, omega: float) -> int:
        k = self.part_names.index(part)
        first, n_eta, cols = self._grids[k]
        i = int(round((eta + np.pi / 2) / np.pi * (n_eta - 1)))
        j = int(round((omega + np.pi) / (2 * np.pi) * (cols - 1)))
        return first + min(max(i, 1), n_eta - 2) * cols + min(max(j, 0), cols - 2)

    @cached_property
    def vertex_albedo(self) -> np.ndarray:
        """Linear albedo at every vertex, [V, 3] float32."""
        return self.albedo(self.vertex_uv)

    def pose(self, params: PoseParams | None = None) -> PosedPerson:
        """The world-space mesh, joints and landmarks in a pose (None: rest)."""
        G = forward_kinematics(self.joints, params)
        verts = np.empty_like(self._rest_local)
        for p, (s, e) in zip(self.parts, self._ranges):
            g = G[p.joint]
            verts[s:e] = self._rest_local[s:e] @ g[:3, :3].T + g[:3, 3]
        return PosedPerson(
            vertices=verts, triangles=self.triangles,
            joints={k: g[:3, 3].copy() for k, g in G.items()}, joint_transforms=G,
            landmarks={k: verts[v].copy() for k, v in self._landmark_vertex.items()},
            vertex_colors=self.vertex_albedo)

    def albedo(self, uv: np.ndarray) -> np.ndarray:
        """Linear albedo [N, 3] float32 in 0..1 at atlas UVs [N, 2] (bilinear)."""
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise ShapeError("uv", tuple(uv.shape), "[N, 2]")
        h, w = self.texture.shape[:2]
        # bilinear in the atlas (sRGB texels, as a painted texture is), then to linear
        n = len(uv)
        cols = 1024  # cv2.remap maps must be under 32767 rows: lay the samples out in a block
        rows = max(1, -(-n // cols))
        mx = np.zeros(rows * cols, dtype=np.float32)
        my = np.zeros(rows * cols, dtype=np.float32)
        mx[:n] = uv[:, 0] * w - 0.5
        my[:n] = uv[:, 1] * h - 0.5
        srgb = cv2.remap(self.texture, mx.reshape(rows, cols), my.reshape(rows, cols), cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
        return self._lut[srgb.reshape(-1, 3)[:n]]

    def inside(self, points: np.ndarray, posed: PosedPerson, exclude: int | None = None) -> np.ndarray:
        """Whether points [N, 3] are strictly inside any body part (1 mm margin); [N] bool."""
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ShapeError("points", tuple(pts.shape), "[N, 3]")
        out = np.zeros(len(pts), dtype=bool)
        for k, p in enumerate(self.parts):
            if k == exclude:
                continue
            g = posed.joint_transforms[p.joint]
            local = (pts - g[:3, 3]) @ g[:3, :3]
            q = (local - p.shape.centre) @ p.shape.axes
            out |= p.shape.implicit(q, INSIDE_SHRINK) < 1.0
        return out

    def surface_samples(self, posed: PosedPerson, n: int, seed: int = 0) -> np.ndarray:
        """``n`` points uniformly on the outer body surface, [n, 3] (for Chamfer scoring)."""
        rng = np.random.default_rng(seed)
        v = posed.vertices
        t = self.triangles
        area = 0.5 * np.linalg.norm(np.cross(v[t[:, 1]] - v[t[:, 0]], v[t[:, 2]] - v[t[:, 0]]), axis=1)
        out: list[np.ndarray] = []
        have = 0
        while have < n:
            m = int((n - have) * 1.6) + 64
            tri = rng.choice(len(t), size=m, p=area / area.sum())
            r1, r2 = rng.random(m), rng.random(m)
            s = np.sqrt(r1)
            pts = ((1 - s)[:, None] * v[t[tri, 0]] + (s * (1 - r2))[:, None] * v[t[tri, 1]]
                   + (s * r2)[:, None] * v[t[tri, 2]])
            keep = np.ones(m, dtype=bool)
            for k in range(len(self.parts)):
                sel = self.triangle_part[tri] == k
                if sel.any():
                    keep[sel] = ~self.inside(pts[sel], posed, exclude=k)
            out.append(pts[keep])
            have += int(keep.sum())
        return np.concatenate(out)[:n]


def build_person(seed: int = 0) -> Person:
    """The synthetic person; deterministic for a seed."""
    return Person(seed)


# ----------------------------------------------------------------------------- texture


def _tile_rect(k: int) -> tuple[float, float, float, float]:
    """UV rectangle (u0, v0, du, dv) of part k's tile (whole atlas pixels), with a 4-pixel gutter."""
    tile, gutter = ATLAS_SIZE // _TILES, 4
    r, c = divmod(k, _TILES)
    return ((c * tile + gutter) / ATLAS_SIZE, (r * tile + gutter) / ATLAS_SIZE,
            (tile - 2 * gutter) / ATLAS_SIZE, (tile - 2 * gutter) / ATLAS_SIZE)


def _build_atlas(parts: list[PartDef], seed: int) -> np.ndarray:
    """The sRGB uint8 atlas [ATLAS_SIZE, ATLAS_SIZE, 3] (RGB order)."""
    rng = np.random.default_rng(seed)
    atlas = np.full((ATLAS_SIZE, ATLAS_SIZE, 3), 128, dtype=np.uint8)
    tile = ATLAS_SIZE // _TILES
    for k, p in enumerate(parts):
        img = _MATERIALS[p.material](tile, rng, p.name)
        r, c = divmod(k, _TILES)
        atlas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = img
    return atlas


_PRINT_PALETTE = np.array([
    (200, 30, 40), (240, 120, 20), (250, 200, 40), (30, 40, 120), (90, 40, 140), (20, 20, 25),
    (240, 240, 235), (40, 110, 200), (170, 60, 120), (120, 70, 40), (220, 90, 140),
], dtype=np.uint8)


def _noise(shape: tuple[int, int], rng: np.random.Generator, sigma_px: float, amp: float) -> np.ndarray:
    n = rng.standard_normal(shape).astype(np.float32)
    if sigma_px > 0:
        n = cv2.GaussianBlur(n, (0, 0), sigma_px)
        n /= max(float(n.std()), 1e-6)
    return n * amp


def _finish(img: np.ndarray, rng: np.random.Generator, fabric: float = 6.0) -> np.ndarray:
    h, w = img.shape[:2]
    n = _noise((h, w), rng, 0.7, fabric)[..., None]
    return np.clip(img.astype(np.float32) + n, 0, 255).astype(np.uint8)


def _shirt(size: int, rng: np.random.Generator, name: str, base=(235, 225, 205)) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = base
    # plaid of thin lines
    for _ in range(10):
        col = tuple(int(x) for x in _PRINT_PALETTE[rng.integers(len(_PRINT_PALETTE))])
        x = int(rng.integers(size))
        cv2.line(img, (x, 0), (x, size - 1), col, int(rng.integers(2, 5)))
        y = int(rng.integers(size))
        cv2.line(img, (0, y), (size - 1, y), col, int(rng.integers(2, 5)))
    # printed shapes at several scales
    for _ in range(int(size * size / 900)):
        col = tuple(int(x) for x in _PRINT_PALETTE[rng.integers(len(_PRINT_PALETTE))])
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        r = int(np.exp(rng.uniform(np.log(4), np.log(30))))
        kind = rng.integers(4)
        if kind == 0:
            cv2.circle(img, (cx, cy), r, col, -1, cv2.LINE_AA)
        elif kind == 1:
            box = cv2.boxPoints(((cx, cy), (2 * r, r * rng.uniform(0.5, 1.5)), rng.uniform(0, 180)))
            cv2.fillPoly(img, [box.astype(np.int32)], col, cv2.LINE_AA)
        elif kind == 2:
            pts = (np.array([cx, cy]) + rng.uniform(-r, r, (3, 2))).astype(np.int32)
            cv2.fillPoly(img, [pts], col, cv2.LINE_AA)
        else:
            cv2.ellipse(img, (cx, cy), (r, max(2, r // 3)), rng.uniform(0, 180), 0, 360, col, 2, cv2.LINE_AA)
    # a seam and buttons on the shirt's front (u = 0.25 faces the front for torso parts)
    if name in ("chest", "abdomen"):
        x = size // 4
        cv2.line(img, (x, 0), (x, size - 1), (60, 50, 45), 3, cv2.LINE_AA)
        for y in range(size // 10, size, size // 5):
            cv2.circle(img, (x + 8, y), 7, (245, 245, 240), -1, cv2.LINE_AA)
            cv2.circle(img, (x + 8, y), 7, (40, 35, 30), 1, cv2.LINE_AA)
    return _finish(img, rng)


def _sleeve(size: int, rng: np.random.Generator, name: str) -> np.ndarray:
    img = _shirt(size, rng, name)
    cv2.rectangle(img, (0, size - 24), (size - 1, size - 1), (30, 40, 120), -1)  # cuff at the elbow end
    return img


def _trousers(size: int, rng: np.random.Generator, name: str) -> np.ndarray:
    base = np.array([58, 78, 128], dtype=np.float32)
    twill = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigmaX=0.6,
                             sigmaY=3.0)
    twill = twill / max(float(twill.std()), 1e-6)
    fade = _noise((size, size), rng, 18.0, 1.0)
    img = base[None, None, :] * (1.0 + 0.10 * twill[..., None] + 0.18 * fade[..., None])
    img = np.clip(img, 0, 255).astype(np.uint8)
    # worn patches, stitching and pockets
    for _ in range(25):
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        ax = (int(rng.integers(6, 30)), int(rng.integers(4, 20)))
        cv2.ellipse(img, (cx, cy), ax, float(rng.uniform(0, 180)), 0, 360, (105, 125, 170), -1, cv2.LINE_AA)
    for x in (int(size * 0.24), int(size * 0.76)):
        for dx in (-6, 6):
            for y in range(0, size, 14):
                cv2.line(img, (x + dx, y), (x + dx, y + 7), (210, 160, 60), 2)
    if name == "pelvis":
        for x0 in (int(size * 0.08), int(size * 0.55)):
            cv2.rectangle(img, (x0, size // 3), (x0 + size // 6, size // 3 + size // 5), (200, 150, 60), 2)
        cv2.rectangle(img, (0, 0), (size - 1, size // 10), (50, 35, 25), -1)  # belt
        cv2.rectangle(img, (size // 4 - 14, 4), (size // 4 + 14, size // 10 - 4), (190, 180, 150), 3)
    return _finish(img, rng, 4.0)


def _skin_base(size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array([224, 172, 140], dtype=np.float32)
    low = _noise((size, size), rng, 24.0, 1.0)
    img = base[None, None, :] * (1.0 + 0.05 * low[..., None])
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(40):  # freckles and pores
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        cv2.circle(img, (cx, cy), int(rng.integers(1, 3)), (190, 135, 105), -1, cv2.LINE_AA)
    return img


def _skin(size: int, rng: np.random.Generator, name: str) -> np.ndarray:
    img = _skin_base(size, rng)
    if name == "forearm_l":  # the birthmark: an irregular brown spot, ~2.5 cm
        u, v = (-1.2 + np.pi) / (2 * np.pi), 1.0 - (0.35 + np.pi / 2) / np.pi
        cx, cy = int(u * size), int(v * size)
        for _ in range(7):
            off = rng.integers(-14, 15, 2)
            cv2.ellipse(img, (cx + int(off[0]), cy + int(off[1])), (int(rng.integers(10, 22)),
                        int(rng.integers(8, 18))), float(rng.uniform(0, 180)), 0, 360, (105, 62, 40), -1,
                        cv2.LINE_AA)
    if name == "forearm_r":  # a tattoo: a star in a ring with hatching
        c = (int(size * 0.25), int(size * 0.45))
        cv2.circle(img, c, 70, (30, 35, 60), 4, cv2.LINE_AA)
        star = np.array([[c[0] + 60 * math.cos(a * 4 * math.pi / 5 - math.pi / 2),
                          c[1] + 60 * math.sin(a * 4 * math.pi / 5 - math.pi / 2)] for a in range(5)])
        cv2.polylines(img, [star.astype(np.int32)], True, (30, 35, 60), 4, cv2.LINE_AA)
        for k in range(-60, 61, 12):
            cv2.line(img, (c[0] + k, c[1] + 80), (c[0] + k + 20, c[1] + 110), (30, 35, 60), 3, cv2.LINE_AA)
    return _finish(img, rng, 2.0)


def _hand(size: int, rng: np.random.Generator, name: str) -> np.ndarray:
    img = _skin_base(size, rng)
    for k in range(4):  # knuckle creases and nails
        y = int(size * (0.25 + 0.1 * k))
        cv2.line(img, (0, y), (size - 1, y), (200, 145, 115), 2, cv2.LINE_AA)
    cv2.rectangle(img, (size // 3, size - size // 8), (2 * size // 3, size - 1), (235, 200, 190), -1)
    return _finish(img, rng, 2.0)


def _head(size: int, rng: np.random.Generator, name: str) -> np.ndarray:
    img = _skin_base(size, rng)
    hair = np.array([52, 36, 26], dtype=np.float32)

    def uvpx(eta: float, omega: float) -> tuple[int, int]:
        return int((omega + np.pi) / (2 * np.pi) * size), int((1.0 - (eta + np.pi / 2) / np.pi) * size)

    # hair: the top of the head and the back, with strands
    yy, xx = np.mgrid[0:size, 0:size]
    eta = np.pi / 2 - (yy + 0.5) / size * np.pi
    omega = (xx + 0.5) / size * 2 * np.pi - np.pi
    front = np.cos(omega + np.pi / 2)  # 1 at the face (omega = -pi/2)
    hair_mask = (eta > 0.55 - 0.25 * (1 - front)) | ((front < -0.2) & (eta > -0.45))
    strands = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), sigmaX=0.8,
                               sigmaY=6)
    strands /= max(float(strands.std()), 1e-6)
    img[hair_mask] = np.clip(hair * (1 + 0.25 * strands[hair_mask][:, None]), 0, 255).astype(np.uint8)
    f = -np.pi / 2
    for s in (-1, 1):  # eyes, brows
        ex, ey = uvpx(0.18, f + s * 0.42)
        cv2.ellipse(img, (ex, ey), (16, 8), 0, 0, 360, (245, 245, 240), -1, cv2.LINE_AA)
        cv2.circle(img, (ex, ey), 6, (70, 50, 35), -1, cv2.LINE_AA)
        cv2.circle(img, (ex, ey), 3, (10, 10, 10), -1, cv2.LINE_AA)
        bx, by = uvpx(0.34, f + s * 0.42)
        cv2.ellipse(img, (bx, by), (20, 5), 0, 0, 360, (60, 40, 28), -1, cv2.LINE_AA)
    nx, ny = uvpx(-0.05, f)
    cv2.ellipse(img, (nx, ny + 4), (8, 4), 0, 0, 360, (175, 120, 95), -1, cv2.LINE_AA)
    mx, my = uvpx(-0.35, f)
    cv2.ellipse(img, (mx, my), (26, 8), 0, 0, 360, (170, 75, 80), -1, cv2.LINE_AA)
    cv2.line(img, (mx - 24, my), (mx + 24, my), (110, 45, 50), 2, cv2.LINE_AA)
    for s in (-1, 1):  # ears
        ex, ey = uvpx(0.05, f + s * np.pi / 2)
        cv2.ellipse(img, (ex, ey), (8, 22), 0, 0, 360, (205, 150, 120), 3, cv2.LINE_AA)
    return _finish(img, rng, 2.0)


def _shoe(size: int, rng: np.random.Generator, name: str) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = (38, 32, 30)
    img = _finish(img, rng, 5.0)
    cv2.rectangle(img, (0, int(size * 0.42)), (size - 1, int(size * 0.58)), (200, 195, 185), -1)  # sole band
    for k in range(6):  # laces on top (omega ~ 0 .. the foot's +x' axis is world +x; top is -y')
        y = int(size * (0.15 + 0.12 * k))
        cv2.line(img, (int(size * 0.18), y), (int(size * 0.32), y + 10), (220, 215, 200), 3, cv2.LINE_AA)
    return img


_MATERIALS = {"shirt": _shirt, "sleeve": _sleeve, "trousers": _trousers, "skin": _skin, "head": _head,
              "hand": _hand, "shoe": _shoe}


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)
