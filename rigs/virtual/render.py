"""Render a rig's virtual studio to disk: takes of images plus ground truth.

``run_render(rig_path, out_dir, options)`` is a stage function: it validates
the rig before writing anything, renders in worker processes (one camera's
caches at a time per worker), reports progress through ``on_event`` and
writes ``render.json`` last. Layout of ``out_dir``::

    render.json                                  manifest (schema twinstudio.render/1)
    rig.toml                                     the rig file rendered
    gt/cameras.json                              exact cameras (OpenCV convention)
    takes/<take>/<camera>/<frame:06d>.jpg        images (jpg or png, per the rig)
    takes/<take>/gt/<camera>/<frame:06d>.depth.png   z-depth of the subject and board (uint16,
                                                     metres * DEPTH_SCALE; 0 elsewhere)
    takes/<take>/gt/<camera>/backdrop.depth.png      z-depth of the empty studio (same units)
    takes/<take>/gt/<camera>/<frame:06d>.mask.png    subject mask, 0/255
    takes/<take>/gt/meshes/<frame:06d>.ply       subject mesh per frame (world, metres)
    takes/<take>/gt/frames.json                  per frame: time, lighting step, joints, landmarks, board pose

Takes: ``calib-nnn`` (the ChArUco board at the rig's calibration poses, no
subject), ``plates-nnn`` (clean plates: the empty studio, no subject and no
board, one frame per lighting step of the stills, in the same order; its
masks are all 0, its depth PNGs 0 everywhere and its frames.json has no
joints, landmarks or meshes), ``stills-nnn`` (subject at rest, one frame per
lighting step of every preset) and ``motion-nnn`` (the motion clip at the
rig's fps under the motion preset).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
import traceback
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict

from rigs.errors import TwinstudioError
from rigs.fileio import atomic_write_bytes, atomic_write_json
from rigs.geometry import Camera
from rigs.pngio import encode_png
from rigs.rigfile import PresetStep, Rig, load_rig, resolve_rig_path

#: depth PNGs hold metres * DEPTH_SCALE as uint16: 0.2 mm steps up to 13.1 m
DEPTH_SCALE = 5000.0
RENDER_SCHEMA = "twinstudio.render"
RENDER_SCHEMA_VERSION = 1

TakeKind = Literal["calibration", "plates", "stills", "motion"]
_TAKE_PREFIX = {"calibration": "calib", "plates": "plates", "stills": "stills", "motion": "motion"}


class RenderError(TwinstudioError):
    """Rendering failed (a worker crashed, or the output folder is unusable)."""


@dataclass(frozen=True)
class RenderOptions:
    """What to render."""

    takes: tuple[TakeKind, ...] = ("stills", "motion")
    """Takes to render, in this order."""
    frames: int | None = None
    """Frames of the motion take (default: the rig's motion.frames)."""
    scale: float = 1.0
    """Resolution scale of every camera (0.5 renders 1280x960 cameras at 640x480)."""
    workers: int | None = None
    """Worker processes (default: one per CPU core)."""
    cameras: tuple[str, ...] | None = None
    """Only these camera ids (default: all)."""
    ground_truth: bool = True
    """Write depth, masks, meshes and joints next to the images."""
    noise: bool = True
    """Add the rig's sensor noise."""
    noise_seed: int | None = None
    """Seed of the sensor noise (default: the rig's ``virtual.seed``); the scene stays the same."""


@dataclass(frozen=True)
class RenderProgress:
    """Event: one more image is on disk."""

    done: int
    total: int
    camera: str
    take: str


@dataclass(frozen=True)
class FrameSpec:
    """One instant of a take: what stands in the volume and how it is lit."""

    index: int
    time: float
    step: PresetStep
    clip_frame: int | None  # frame of the motion clip posing the person; None = no person
    board_index: int | None  # index into the rig's calibration board poses


@dataclass(frozen=True)
class TakeSpec:
    id: str
    kind: TakeKind
    frames: tuple[FrameSpec, ...]


@dataclass
class RenderResult:
    out_dir: Path
    manifest_path: Path
    images: int
    seconds: float
    takes: list[str] = field(default_factory=list)


class RenderedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str


class RenderManifest(BaseModel):
    """render.json, validated on read."""

    model_config = ConfigDict(extra="forbid")
    schema_: str = RENDER_SCHEMA
    version: int = RENDER_SCHEMA_VERSION
    rig: str
    scale: float
    depth_scale: float = DEPTH_SCALE
    cameras: list[str]
    takes: list[dict]
    images: list[RenderedFile]
    seconds: float

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def model_dump_json_ready(self) -> dict:
        d = self.model_dump(by_alias=True)
        d["schema"] = d.pop("schema_")
        return d


def plan_takes(rig: Rig, options: RenderOptions) -> list[TakeSpec]:
    """The takes, frames and lighting steps ``options`` asks for, numbered as a session would."""
    takes: list[TakeSpec] = []
    motion_preset = rig.motion_preset
    flat = rig.preset_steps(motion_preset)[0] if motion_preset else PresetStep(preset="off", name="off",
                                                                                levels={})
    for n, kind in enumerate(options.takes, start=1):
        tid = f"{_TAKE_PREFIX[kind]}-{n:03d}"
        if kind == "calibration":
            frames = [FrameSpec(i, 0.0, flat, None, i) for i in range(rig.calibration.poses)]
        elif kind in ("plates", "stills"):
            # a clean plate per lighting step of the stills: the same steps in the same order, nobody on stage
            steps = rig.preset_steps() or [flat]
            subject = 0 if kind == "stills" else None
            frames = [FrameSpec(i, 0.0, s, subject, None) for i, s in enumerate(steps)]
        else:
            count = options.frames or rig.motion.frames
            frames = [FrameSpec(i, i / rig.motion.fps, flat, i, None) for i in range(count)]
        takes.append(TakeSpec(tid, kind, tuple(frames)))
    return takes


def rendered_cameras(rig: Rig, options: RenderOptions) -> list[Camera]:
    """The rig's cameras at the render scale (exact for virtual rigs)."""
    cams = rig.cameras
    if options.cameras:
        unknown = sorted(set(options.cameras) - {c.id for c in cams})
        if unknown:
            raise RenderError(f"unknown camera(s) {', '.join(unknown)} in rig {rig.name}", cameras=unknown)
        cams = [c for c in cams if c.id in options.cameras]
    if options.scale != 1.0:
        cams = [Camera(c.id, c.intrinsics.scaled(options.scale), c.pose) for c in cams]
    return cams


def run_render(rig_path: Path | str, out_dir: Path | str, options: RenderOptions = RenderOptions(), *,
               on_event: Callable[[RenderProgress], None] | None = None) -> RenderResult:
    """Render the takes of ``options`` for every camera of the rig into ``out_dir``.

    Validates the rig and the options before anything is written. Returns
    the number of images and the wall time; ``render.json`` lists every image
    with its sha256.
    """
    rig_path = resolve_rig_path(rig_path)
    rig = load_rig(rig_path)
    if not 0.05 <= options.scale <= 4:
        raise RenderError(f"scale {options.scale} is outside 0.05..4", scale=options.scale)
    if options.frames is not None and options.frames < 1:
        raise RenderError("frames must be at least 1", frames=options.frames)
    cams = rendered_cameras(rig, options)
    takes = plan_takes(rig, options)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RenderError(f"{out} exists and is not a folder", path=str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gt").mkdir(exist_ok=True)
    shutil.copyfile(rig_path, out / "rig.toml")
    atomic_write_json(out / "gt" / "cameras.json",
                      {"schema": "twinstudio.cameras", "version": 1, "convention": "opencv",
                       "cameras": [c.to_dict() for c in cams]}, fsync=False)

    t0 = time.perf_counter()
    workers = max(1, min(options.workers or os.cpu_count() or 1, len(cams)))
    shares = [[c.id for c in cams[i::workers]] for i in range(workers)]
    total = len(cams) * sum(len(t.frames) for t in takes)
    files: list[dict] = []
    if workers == 1:
        files = _render_share(rig_path, out, options, takes, shares[0], True, on_event=on_event, total=total)
    else:
        files = _render_parallel(rig_path, out, options, takes, shares, total, on_event)
    seconds = time.perf_counter() - t0
    files.sort(key=lambda f: f["path"])
    manifest = RenderManifest(rig=rig.name, scale=options.scale, cameras=[c.id for c in cams],
                              takes=[{"id": t.id, "kind": t.kind, "frames": len(t.frames),
                                      "steps": [f.step.name for f in t.frames]} for t in takes],
                              images=[RenderedFile(**f) for f in files], seconds=round(seconds, 3))
    path = out / "render.json"
    atomic_write_json(path, manifest.model_dump_json_ready())
    return RenderResult(out, path, len(files), seconds, [t.id for t in takes])


def _render_parallel(rig_path, out, options, takes, shares, total, on_event) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(rig_path), str(out), options, takes, share, i, queue,
                                               os.getpid()),
                         daemon=True) for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    files: list[dict] = []
    done = finished = 0
    try:
        while finished < len(procs):
            try:
                msg = queue.get(timeout=1.0)
            except Empty:
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RenderError(f"render worker died (exit code {dead[0].exitcode})") from None
                continue
            kind = msg[0]
            if kind == "image":
                done += 1
                if on_event:
                    on_event(RenderProgress(done, total, msg[1], msg[2]))
            elif kind == "done":
                files.extend(msg[1])
                finished += 1
            elif kind == "error":
                raise RenderError(f"render worker failed: {msg[1]}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
    return files


def _worker(rig_path: str, out: str, options: RenderOptions, takes: list[TakeSpec], share: list[str],
            index: int, queue, parent: int | None = None) -> None:
    from rigs.procs import die_with_parent

    die_with_parent(parent=parent)  # a killed parent must not leave workers writing into its folder
    try:
        def emit(ev: RenderProgress) -> None:
            queue.put(("image", ev.camera, ev.take))

        files = _render_share(Path(rig_path), Path(out), options, takes, share, index == 0, on_event=emit)
        queue.put(("done", files))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", traceback.format_exc(limit=8)))


def _render_share(rig_path: Path, out: Path, options: RenderOptions, takes: list[TakeSpec],
                  camera_ids: list[str], write_take_gt: bool, *, on_event=None, total: int = 0) -> list[dict]:
    """Render every take for some cameras, camera by camera (one camera's caches at a time).

    ``write_take_gt``: this share also writes the per-take ground truth (meshes, frames.json).
    """
    from rigs.virtual.board import board_poses
    from rigs.virtual.motion import default_clip
    from rigs.virtual.studio import FrameState, VirtualStudio

    rig = load_rig(rig_path)
    cams = {c.id: c for c in rendered_cameras(rig, options)}
    studio = VirtualStudio(rig, noise_seed=options.noise_seed)
    n_motion = max((len(t.frames) for t in takes if t.kind == "motion"), default=1)
    clip = default_clip(frames=max(n_motion, 1), fps=rig.motion.fps)
    boards = board_poses(studio.board, rig.volume, rig.calibration.poses, seed=rig.virtual.seed)

    # the moving geometry of every instant, built once and shared by the cameras
    instants: dict[tuple[int | None, int | None], object] = {}
    posed_cache: dict[int, object] = {}
    for take in takes:
        for f in take.frames:
            key = (f.clip_frame, f.board_index)
            if key in instants:
                continue
            posed = None
            if f.clip_frame is not None:
                posed = posed_cache.get(f.clip_frame) or studio.person.pose(clip.params(f.clip_frame))
                posed_cache[f.clip_frame] = posed
            bp = boards[f.board_index] if f.board_index is not None else None
            instants[key] = studio.frame(FrameState(posed, bp))

    if write_take_gt and options.ground_truth:
        _write_take_ground_truth(out, takes, posed_cache, boards, studio)

    files: list[dict] = []
    done = 0
    for cid in camera_ids:
        cam = cams[cid]
        view = studio.view(cam)
        ext = next(c.format for c in rig.camera_specs if c.id == cid)
        for take in takes:
            img_dir = out / "takes" / take.id / cid
            gt_dir = out / "takes" / take.id / "gt" / cid
            img_dir.mkdir(parents=True, exist_ok=True)
            if options.ground_truth:
                gt_dir.mkdir(parents=True, exist_ok=True)
                _write_png(gt_dir / "backdrop.depth.png", depth_to_png(studio.backdrop_depth(view)))
            for f in take.frames:
                dyn = instants[(f.clip_frame, f.board_index)]
                img = studio.render(view, dyn, f.step, noise_key=_noise_key(cid, take.id, f.index),
                                    noise=options.noise)
                name = f"{f.index:06d}"
                files.append(_write_image(img_dir / f"{name}.{ext}", img.rgb, out))
                if options.ground_truth:
                    depth = depth_to_png(img.depth, img.foreground)
                    _write_png(gt_dir / f"{name}.depth.png", depth)
                    _write_png(gt_dir / f"{name}.mask.png", img.mask.astype(np.uint8) * 255)
                done += 1
                if on_event:
                    on_event(RenderProgress(done, total, cid, take.id))
    return files


def _noise_key(camera_id: str, take_id: str, frame: int) -> int:
    """A stable integer per image (Python's hash() of strings is salted per process)."""
    return zlib.crc32(f"{camera_id}/{take_id}/{frame}".encode())


def _write_image(path: Path, rgb: np.ndarray, root: Path) -> dict:
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if path.suffix == ".jpg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RenderError(f"could not encode {path}", path=str(path))
    sha = atomic_write_bytes(path, buf.tobytes(), fsync=False)
    return {"path": path.relative_to(root).as_posix(), "sha256": sha}


def _write_png(path: Path, arr: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(arr), fsync=False)


def depth_to_png(depth: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """z-depth in metres [H, W] -> uint16 metres * DEPTH_SCALE; 0 where inf, beyond range or not ``where``."""
    out = np.zeros(depth.shape, dtype=np.uint16)
    sel = np.isfinite(depth) if where is None else where & np.isfinite(depth)
    d = np.round(depth[sel] * DEPTH_SCALE)
    out[sel] = np.where(d > 65535, 0, d)
    return out


def depth_from_png(arr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`depth_to_png`: metres, inf where 0."""
    return np.where(arr > 0, arr.astype(np.float32) / DEPTH_SCALE, np.inf).astype(np.float32)


def _write_take_ground_truth(out: Path, takes: list[TakeSpec], posed: dict, boards: list, studio) -> None:
    import open3d as o3d

    for take in takes:
        gt = out / "takes" / take.id / "gt"
        (gt / "meshes").mkdir(parents=True, exist_ok=True)
        frames = []
        written: set[int] = set()
        for f in take.frames:
            entry: dict = {"index": f.index, "time": f.time, "preset": f.step.preset, "step": f.step.name,
                           "levels": f.step.levels}
            if f.clip_frame is not None:
                p = posed[f.clip_frame]
                # one mesh per pose: a still take's frames all share the rest pose
                mesh_path = gt / "meshes" / f"{f.clip_frame:06d}.ply"
                if f.clip_frame not in written:
                    written.add(f.clip_frame)
                    o3d.io.write_triangle_mesh(str(mesh_path), p.to_open3d(), write_ascii=False)
                entry["mesh"] = mesh_path.relative_to(gt).as_posix()
                entry["joints"] = {k: [float(x) for x in v] for k, v in p.joints.items()}
                entry["landmarks"] = {k: [float(x) for x in v] for k, v in p.landmarks.items()}
            if f.board_index is not None:
                bp = boards[f.board_index]
                entry["board_to_world"] = {"R": bp.R.tolist(), "t": bp.t.tolist()}
            frames.append(entry)
        doc = {"schema": "twinstudio.groundtruth", "version": 1, "take": take.id, "kind": take.kind,
               "depth_scale": DEPTH_SCALE, "frames": frames}
        if take.kind == "calibration":
            b = studio.board.spec
            doc["board"] = {"squares": list(b.squares), "square": b.square, "marker": b.marker,
                            "dictionary": b.dictionary}
        atomic_write_json(gt / "frames.json", doc, fsync=False)


def load_render_manifest(path: Path | str) -> RenderManifest:
    """Read and validate a render.json."""
    import json

    from pydantic import ValidationError

    p = Path(path)
    try:
        data = json.loads(p.read_text())
        data["schema_"] = data.pop("schema")
        m = RenderManifest.model_validate(data)
    except (OSError, ValueError, KeyError, ValidationError) as e:
        raise RenderError(f"{p}: not a valid render manifest: {e}", path=str(p)) from e
    if m.schema_ != RENDER_SCHEMA or m.version != RENDER_SCHEMA_VERSION:
        raise RenderError(f"{p}: schema {m.schema_}/{m.version} is not {RENDER_SCHEMA}/{RENDER_SCHEMA_VERSION}")
    return m

