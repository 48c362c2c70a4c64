"""The whole reconstruction of a capture, stage by stage, and its report.

``run_reconstruct(root)`` runs, in order:

1. **cameras** — calibration from the calibration take, or SfM on the stills
   take when there is none (or when asked), into ``recon/cameras.json``;
2. **masks** — the subject mask of every still, ``recon/masks/<take>/``;
3. **mesh** — the subject's mesh from the masks, ``recon/mesh/<take>/``;
4. **motion** — 3D tracks of the motion take, ``recon/motion/<take>/``;

then writes ``recon/report.json`` (schema ``twinstudio.recon-report``): per
stage its status, time and figures, and an *accuracy* list of the figures
that matter with their targets. On virtual captures every figure is scored
against ground truth. Nothing here prints: progress goes to ``on_event``.

Each stage picks its take by kind (:func:`reconstruct.inputs.find_take`): a
``plates`` take (clean plates of the empty studio) is never read as stills
or motion, and a plates take named as ``stills_take`` is refused.

A stage's status is one of:

* ``done`` — it wrote its outputs;
* ``failed`` — it was asked for and produced nothing (too few cameras saw
  the board, SfM's result was refused, zero tracks, ...), with the reason,
  and with the frames it left out when verification refused some; a stage
  that needs a failed one fails too ("needs cameras, which failed");
* ``skipped`` — it does not apply to this capture (no stills or motion take)
  and the user did not name it (``ReconstructOptions.named``). The cameras
  stage always applies: every other stage needs it.

Before anything is written, every stage that will run checks that the
session's consent covers it: ``capture`` for calibration from the board
take, ``train`` for SfM, masks, mesh and motion (they model the person).
Each stage reads only frames that pass :func:`reconstruct.inputs.verified_images`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from reconstruct.inputs import (
    GroundTruth,
    ReconstructError,
    find_take,
    left_out_summary,
    list_takes,
    verified_images,
)
from rigs.errors import EXIT_STAGE_FAILED, TwinstudioError
from rigs.fileio import atomic_write_json

REPORT_SCHEMA = "twinstudio.recon-report"
REPORT_VERSION = 1
STAGES = ("cameras", "masks", "mesh", "motion")

#: the issue's targets on the virtual studio: figure key -> (label, unit, comparison, limit)
TARGETS: dict[str, tuple[str, str, str, float]] = {
    "calibration.rms_px": ("calibration RMS reprojection", "px", "<=", 0.3),
    "calibration.max_focal_pct": ("calibration focal error (max)", "%", "<=", 0.2),
    "calibration.max_position_mm": ("calibration position error (max)", "mm", "<=", 1.0),
    "calibration.max_rotation_deg": ("calibration rotation error (max)", "deg", "<=", 0.02),
    "sfm.registered_fraction": ("SfM cameras registered", "", ">=", 1.0),
    "sfm.max_position_mm": ("SfM position error (max)", "mm", "<=", 2.0),
    "sfm.max_rotation_deg": ("SfM rotation error (max)", "deg", "<=", 0.1),
    "masks.mean_iou": ("mask IoU (mean)", "", ">=", 0.97),
    "mesh.chamfer_mm": ("mesh Chamfer distance", "mm", "<=", 5.0),
    "mesh.fscore": ("mesh F-score at 5 mm", "", ">=", 0.9),
    "mesh.seconds": ("mesh build time", "s", "<=", 60.0),
    "motion.median_mm": ("motion 3D error (median)", "mm", "<=", 5.0),
}


class StageFailed(ReconstructError):
    """Stages that were asked for produced nothing (exit code 7); the report says why."""

    exit_code = EXIT_STAGE_FAILED

    def __init__(self, failed: dict[str, str], report: Path) -> None:
        super().__init__(f"{len(failed)} stage(s) failed: "
                         + "; ".join(f"{name}: {why}" for name, why in failed.items()) + f" (report: {report})",
                         stages=sorted(failed), report=str(report))
        self.failed = dict(failed)
        self.report = report


@dataclass(frozen=True)
class StageEvent:
    """Event: a stage started, finished, failed or was skipped."""

    stage: str
    status: str  # "start" | "done" | "failed" | "skipped"
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class ReconstructOptions:
    stages: tuple[str, ...] = STAGES
    cameras_from: str = "auto"
    """'auto' (calibration take if there is one, else SfM), 'calibration', 'sfm' or 'existing'."""
    calibration_take: str | None = None
    stills_take: str | None = None
    motion_take: str | None = None
    mesh_frame: int = 0
    workers: int | None = None
    named: tuple[str, ...] = ()
    """Stages the user asked for by name: where one does not apply to the capture it fails, not skips."""


@dataclass
class ReconstructReport:
    root: Path
    out_dir: Path
    stages: dict[str, dict] = field(default_factory=dict)
    accuracy: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)  # stages of this run that failed -> why

    @property
    def path(self) -> Path:
        return self.out_dir / "report.json"


def run_reconstruct(root: Path | str, options: ReconstructOptions = ReconstructOptions(), *,
                    out_dir: Path | str | None = None,
                    on_event: Callable[[object], None] | None = None) -> ReconstructReport:
    """Reconstruct a session or render folder; writes ``out_dir`` (default ``root/recon``) and its report.

    Raises ConsentError (nothing written) when the session's consent does not
    cover a stage that would run; stages that fail are in ``report.failed``
    (the CLI turns them into :class:`StageFailed`).
    """
    from capture.consent import require_session_consent

    root = Path(root)
    if not (root / "takes").is_dir():
        raise ReconstructError(f"{root}: no takes/ folder (not a session or render folder)", path=str(root))
    unknown = sorted((set(options.stages) | set(options.named)) - set(STAGES))
    if unknown:
        raise ReconstructError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}",
                               stages=unknown)
    wanted = [n for n in STAGES if n in options.stages or (n == "cameras" and options.cameras_from == "existing")]
    for name in wanted:  # every door checks consent, before anything is written
        scope = _scope(root, name, options)
        if scope is not None:
            require_session_consent(root, scope)
    out = Path(out_dir) if out_dir else root / "recon"
    out.mkdir(parents=True, exist_ok=True)
    emit = on_event or (lambda ev: None)
    report = ReconstructReport(root, out)
    gt = GroundTruth.find(root)
    t0 = time.perf_counter()
    # with cameras from an existing cameras.json that was not asked for, the check is a prerequisite only:
    # the report keeps the stage's earlier record (the calibration's figures) unless the file is unusable
    cameras_check_only = options.cameras_from == "existing" and "cameras" not in options.stages
    status: dict[str, str] = {}  # this run's stages

    def fail(name: str, why: str, seconds: float = 0.0, **figures) -> None:
        figures.pop("reason", None)  # the stage's own note on its empty result is in ``why``
        report.stages[name] = {"status": "failed", **figures, "reason": why,
                               **({"seconds": round(seconds, 2)} if seconds else {})}
        status[name] = "failed"
        report.failed[name] = why
        emit(StageEvent(name, "failed", why, seconds))

    def stage(name: str, fn: Callable[[], dict], needs: tuple[str, ...] = ()) -> None:
        if name not in wanted:
            return
        why = _not_applicable(root, name, options)
        if why is not None:
            if name in options.named or name == "cameras":
                fail(name, why)
            else:
                report.stages[name] = {"status": "skipped", "reason": why}
                status[name] = "skipped"
                emit(StageEvent(name, "skipped", why))
            return
        failed = [n for n in needs if status.get(n) == "failed"]
        if failed:
            fail(name, f"needs {', '.join(failed)}, which failed")
            return
        not_run = [n for n in needs if n not in status]
        if not_run:
            fail(name, f"needs {', '.join(not_run)}, which did not run (add it to the stages, or take the "
                       "cameras of an earlier run with cameras_from='existing')")
            return
        emit(StageEvent(name, "start"))
        s0 = time.perf_counter()
        try:
            figures = fn()
        except TwinstudioError as e:
            from capture.consent import ConsentError

            if isinstance(e, ConsentError):  # not a stage's failure: the whole command is refused
                raise
            facts = _plain(e.facts)
            left = facts.pop("left_out", None)
            fail(name, str(e), time.perf_counter() - s0, **({"left_out": left} if left else {}),
                 **({"facts": facts} if facts else {}))
            return
        secs = time.perf_counter() - s0
        failure = figures.pop("failure", None)
        if failure is not None:  # it ran, and produced nothing: its figures say how far it got
            figures.pop("seconds", None)
            fail(name, failure, secs, **figures)
            return
        status[name] = "done"
        if not (name == "cameras" and cameras_check_only):
            report.stages[name] = {"status": "done", **figures, "seconds": round(secs, 2)}
        emit(StageEvent(name, "done", figures.get("summary", ""), secs))

    stage("cameras", lambda: _cameras(root, out, options, emit))
    stage("masks", lambda: _masks(root, out, options, gt, emit))
    stage("mesh", lambda: _mesh(root, out, options, emit), needs=("cameras",))
    stage("motion", lambda: _motion(root, out, options, emit), needs=("cameras",))
    report.seconds = time.perf_counter() - t0
    this_run = dict(report.stages)
    earlier = {}
    if report.path.is_file():
        try:
            earlier = _read_json(report.path).get("stages", {})
        except (ReconstructError, AttributeError):  # an unreadable earlier report is replaced
            earlier = {}
    report.stages = {**{k: v for k, v in earlier.items() if k in STAGES}, **this_run}  # a re-run of one stage
    report.stages = {k: report.stages[k] for k in STAGES if k in report.stages}
    report.accuracy = accuracy_rows(report.stages)
    atomic_write_json(report.path, {
        "schema": REPORT_SCHEMA, "version": REPORT_VERSION, "root": str(root), "virtual": gt is not None,
        "seconds": round(report.seconds, 2), "stages": _plain(report.stages), "accuracy": report.accuracy})
    return report


def _scope(root: Path, name: str, options: ReconstructOptions) -> str | None:
    """The consent scope a stage needs: ``capture`` for calibration from the board take, ``train`` for the
    stages that model the person (SfM on the stills, masks, mesh, motion); None for reading cameras.json."""
    if name != "cameras":
        return "train"
    how = options.cameras_from
    if how == "existing":
        return None
    if how == "auto":
        how = "calibration" if (options.calibration_take or list_takes(root, "calibration")) else "sfm"
    return "capture" if how == "calibration" else "train"


def _not_applicable(root: Path, name: str, options: ReconstructOptions) -> str | None:
    """Why a stage does not apply to this capture (it holds no take of the kind it reads), or None."""
    if name == "cameras":
        if options.cameras_from in ("auto",) and not options.calibration_take and not options.stills_take \
                and not list_takes(root, "calibration") and not list_takes(root, "stills"):
            return f"{root}: no calibration or stills take to compute cameras from"
        return None
    kind, take = {"masks": ("stills", options.stills_take), "mesh": ("stills", options.stills_take),
                  "motion": ("motion", options.motion_take)}[name]
    if take is None and not list_takes(root, kind):
        return f"{root}: no {kind} take"
    return None


# ----------------------------------------------------------------------------- stages


def _cameras(root: Path, out: Path, options: ReconstructOptions, emit) -> dict:
    from reconstruct.calibrate import CalibrationOptions, run_calibrate

    how = options.cameras_from
    if how == "existing":
        from reconstruct.inputs import read_cameras

        cams = read_cameras(out / "cameras.json")
        return {"method": "existing", "cameras": len(cams), "summary": f"{len(cams)} cameras from cameras.json"}
    if how == "auto":
        how = "calibration" if list_takes(root, "calibration") else "sfm"
    if how == "calibration":
        res = run_calibrate(root, CalibrationOptions(take=options.calibration_take, workers=options.workers),
                            out_dir=out, on_event=emit)
        g = res.ground_truth or {}
        return {"method": "calibration", "take": res.take, "cameras": len(res.cameras), "unreached": res.unreached,
                "left_out": res.skipped_images, "verify_seconds": round(res.verify_seconds, 3),
                "image_sizes": {c: list(wh) for c, wh in res.image_sizes.items()},
                "rms_px": res.rms_px, "board_views": res.views,
                "observations": res.observations, "rejected": res.rejected,
                "ground_truth": {k: v for k, v in g.items() if k != "cameras"} or None,
                "summary": f"{len(res.cameras)} cameras, RMS {res.rms_px:.3f} px"
                           + (f", {len(res.skipped_images)} frame(s) left out" if res.skipped_images else "")}
    if how == "sfm":
        from reconstruct.sfm import SfmOptions, run_sfm

        import shutil

        res = run_sfm(root, out / "sfm", SfmOptions(take=options.stills_take),
                      rig_path=root / "rig.toml" if (root / "rig.toml").is_file() else None, on_event=emit)
        # the later stages read recon/cameras.json: it holds SfM's cameras only once SfM accepted them
        shutil.copyfile(res.cameras_path, out / "cameras.json")
        shutil.copytree(res.colmap_dir, out / "colmap", dirs_exist_ok=True)
        g = res.ground_truth or {}
        return {"method": "sfm", "take": res.take, "cameras": len(res.cameras), "registered": sorted(res.registered),
                "unregistered": res.unregistered, "points": res.points, "frame": res.frame,
                "left_out": res.skipped_images, "verify_seconds": round(res.verify_seconds, 3),
                "reprojection_px": res.mean_reprojection_error_px,
                "registered_fraction": len(res.registered) / max(1, len(res.registered) + len(res.unregistered)),
                "ground_truth": {k: v for k, v in g.items() if k != "cameras"} or None,
                "summary": f"{len(res.registered)} cameras registered by SfM, {res.points} points"}
    raise ReconstructError(f"unknown camera source {options.cameras_from!r}", key="cameras_from")


def _masks(root: Path, out: Path, options: ReconstructOptions, gt: GroundTruth | None, emit) -> dict:
    from reconstruct.masks import MaskOptions, mask_iou, run_masks
    from rigs.rigfile import load_rig

    take = find_take(root, "stills", options.stills_take)
    checked = verified_images(root, take, workers=options.workers)
    images = [p for frames in checked.images.values() for p in frames.values()]
    if not images:
        raise ReconstructError(f"take {take} holds no usable images"
                               + (f" ({left_out_summary(checked.left_out)})" if checked.left_out else ""),
                               take=take, left_out=checked.left_out or None)
    mopts = MaskOptions.for_rig(load_rig(root / "rig.toml")) if (root / "rig.toml").is_file() else MaskOptions()
    rep = run_masks(images, out / "masks" / take, mopts, root=root / "takes" / take, on_event=emit)
    figures: dict = {"take": take, "images": len(rep.records), "dir": str((out / "masks" / take).relative_to(out)),
                     "left_out": checked.left_out, "verify_seconds": round(checked.seconds, 3)}
    if gt is not None:
        import cv2

        ious = []
        for r in rep.records:
            cam, frame = r.image.parent.name, int(r.image.stem)
            truth = gt.mask(take, cam, frame)
            if truth is not None:
                ious.append(mask_iou(cv2.imread(str(r.mask), cv2.IMREAD_GRAYSCALE) > 127, truth))
        if ious:
            figures["ground_truth"] = {"mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious)),
                                       "images": len(ious)}
    figures["summary"] = f"{len(rep.records)} masks" + (
        f", IoU {figures['ground_truth']['mean_iou']:.3f}" if "ground_truth" in figures else "") + (
        f", {len(checked.left_out)} frame(s) left out" if checked.left_out else "")
    return figures


def _mesh(root: Path, out: Path, options: ReconstructOptions, emit) -> dict:
    from reconstruct.mesh import MeshOptions, run_mesh

    take = find_take(root, "stills", options.stills_take)
    masks = out / "masks" / take
    run_mesh(root, out / "cameras.json", out / "mesh" / take, take=take, frame=options.mesh_frame,
             masks_dir=masks if (masks / "masks.json").is_file() else None, options=MeshOptions(), on_event=emit)
    doc = _stage_doc(out, out / "mesh" / take / "mesh.json")
    doc["build_seconds"] = doc.pop("seconds", None)  # the mesh itself, without reading and scoring
    g = doc.get("ground_truth") or {}
    return {**doc, "summary": f"{doc.get('vertices', '?')} vertices"
                              + (f", Chamfer {g['chamfer_mm']:.2f} mm" if "chamfer_mm" in g else "")
                              + (f", {len(doc['left_out'])} frame(s) left out" if doc.get("left_out") else "")}


def _motion(root: Path, out: Path, options: ReconstructOptions, emit) -> dict:
    from reconstruct.motion import MotionOptions, run_motion

    take = find_take(root, "motion", options.motion_take)
    run_motion(root, out / "cameras.json", out / "motion" / take, MotionOptions(take=take), on_event=emit)
    doc = _stage_doc(out, out / "motion" / take / "motion.json")
    g = doc.get("ground_truth") or {}
    summary = (f"{doc.get('tracks', '?')} tracks over {doc.get('frames', '?')} frames"
               + (f", median error {g['median_mm']:.2f} mm" if g.get("median_mm") is not None else "")
               + (f", {len(doc['left_out'])} frame(s) left out" if doc.get("left_out") else ""))
    if not doc.get("tracks"):
        return {**doc, "summary": summary, "failure": f"take {take}: no surface point was tracked in 3D "
                                                      f"({doc.get('reason') or 'zero tracks'})"}
    return {**doc, "summary": summary}


# ----------------------------------------------------------------------------- report


def accuracy_rows(stages: dict[str, dict]) -> list[dict]:
    """The figures that have targets, with their values and whether they meet them."""
    values: dict[str, float] = {}
    cams = stages.get("cameras", {})
    if cams.get("status") == "done":
        prefix = "calibration" if cams.get("method") == "calibration" else "sfm"
        if prefix == "calibration":
            values["calibration.rms_px"] = cams.get("rms_px")
        else:
            values["sfm.registered_fraction"] = cams.get("registered_fraction")
        for k, v in (cams.get("ground_truth") or {}).items():
            values[f"{prefix}.{k}"] = v
    masks = stages.get("masks", {})
    if (masks.get("ground_truth") or {}).get("mean_iou") is not None:
        values["masks.mean_iou"] = masks["ground_truth"]["mean_iou"]
    mesh = stages.get("mesh", {})
    for k in ("chamfer_mm", "fscore"):
        if (mesh.get("ground_truth") or {}).get(k) is not None:
            values[f"mesh.{k}"] = mesh["ground_truth"][k]
    if mesh.get("build_seconds") is not None:
        values["mesh.seconds"] = mesh["build_seconds"]
    motion = stages.get("motion", {})
    if (motion.get("ground_truth") or {}).get("median_mm") is not None:
        values["motion.median_mm"] = motion["ground_truth"]["median_mm"]
    rows = []
    for key, (label, unit, op, limit) in TARGETS.items():
        v = values.get(key)
        if v is None or not np.isfinite(v):
            continue
        ok = v <= limit if op == "<=" else v >= limit
        rows.append({"key": key, "figure": label, "value": float(v), "unit": unit, "target": f"{op} {limit:g}",
                     "ok": bool(ok)})
    return rows


def _stage_doc(out: Path, manifest: Path) -> dict:
    """A stage's own manifest as report figures: without its schema, with its folder (relative to ``out``)."""
    doc = _read_json(manifest)
    doc.pop("schema", None)
    doc.pop("version", None)
    return {**doc, "dir": str(manifest.parent.relative_to(out))}


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReconstructError(f"{path}: cannot read ({e})", path=str(path)) from e


def _plain(x):
    """JSON-ready copy (numpy scalars, paths, dataclasses)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "__dataclass_fields__"):
        return _plain(asdict(x))
    return x


__all__ = ["REPORT_SCHEMA", "STAGES", "TARGETS", "ReconstructOptions", "ReconstructReport", "StageEvent",
           "StageFailed", "accuracy_rows", "run_reconstruct"]
