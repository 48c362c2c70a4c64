"""Build the handoff bundle of a session: everything a render or generative team needs, signed.

::

    MANIFEST.json     schema, subject (pseudonymous id), consent terms, provenance, AI disclosure,
                      and every other file with its size and sha256
    SIGNATURE.json    the studio's Ed25519 signature over MANIFEST.json's exact bytes
    USAGE.md          the terms in plain words, the AI-disclosure and watermark requirement
    cameras/          transforms.json (nerfstudio, with the stills and masks it names),
                      cameras.json (OpenCV), colmap/ (COLMAP text model)
    geometry/         mesh.glb, mesh.ply, points.ply (point cloud sampled on the mesh)
    splat/            splat.ply (3D Gaussian splat, standard layout, studio metres), lighting.npz (every
                      lighting preset's f_dc, to swap in for the one baked into splat.ply)
    motion/           trajectories.npz / .csv, motion.json
    previews/         turntable.mp4 (H.264), turntable/*.png, side-by-side evaluation images
    viewer/           index.html: the twin in a browser, offline (splat, mesh, rig cameras, AI label);
                      vendor/ three.js 0.187 + Spark 2.2.0 (MIT)
    usd/              twin.usdz: splat, mesh, cameras and motion as one OpenUSD scene (train/usd.py)
    generation/       the generation kit: 1024x1024 crops, masks, metadata.jsonl (captions)
    metrics.json      the training run's figures and the reconstruction report

Bundling refuses unless the session's consent covers ``share`` today; the
generation kit (crops of the subject for generative teams) is included only
when that consent also covers ``generate``, else the manifest's ``omitted``
says why. The manifest names the signing key as the issuer of the
revocation list that applies and, when the studio says so, where it
publishes that list (``revocations``: ``issuer``, ``url``). The
bundle is assembled in a staging folder beside the output, hashed (streaming,
in parallel), signed, then renamed into place or archived into a
deterministic ``.tar``: a crash leaves no half bundle under the final name.
The manifest holds no wall-clock time, so the same inputs give the same bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rigs.fileio import atomic_write_bytes, atomic_write_json, copy_file
from train.handoff.integrity import (MANIFEST, SIGNATURE, BundleError, hash_tree, key_id, load_private_key,
                                     sign_manifest, write_tar)
from train.handoff.viewer import write_viewer

BUNDLE_SCHEMA = "twinstudio.bundle"
BUNDLE_VERSION = 1
AI_LABEL = "AI-generated digital twin"
AI_REQUIREMENT = ("Every image, video or other output generated from this twin must carry a visible "
                  f"\"{AI_LABEL}\" (or equivalent) disclosure and an invisible watermark, and must be "
                  "disclosed as AI-generated wherever it is published.")


@dataclass(frozen=True)
class BundleOptions:
    run: str = "twin"                # training run to ship (<session>/train/<run>)
    key: Path | None = None          # studio private key (default: $TWINSTUDIO_HOME/keys/studio.key)
    generation_kit: bool = True
    kit_size: int = 1024
    workers: int | None = None
    revocations_url: str | None = None  # where the studio publishes its signed revocation list (in the manifest)


@dataclass
class BundleResult:
    path: Path
    files: int
    bytes: int
    key_id: str
    manifest: dict
    omitted: dict[str, str]
    seconds: float


def default_key_path() -> Path:
    from capture.consent import studio_home

    return studio_home() / "keys" / "studio.key"


def build_bundle(session: Path | str, out: Path | str, options: BundleOptions = BundleOptions(), *,
                 on_event: Callable[[dict], None] | None = None) -> BundleResult:
    """Write the signed bundle of ``session`` to ``out`` (a folder, or a ``.tar`` archive)."""
    from capture.consent import require_consent
    from capture.session import read_manifest

    t0 = time.perf_counter()
    emit = on_event or (lambda ev: None)
    session, out = Path(session), Path(out)
    if not (session / "session.json").is_file():
        raise BundleError("not a capture session (no session.json); a bundle carries a subject's "
                          "consent, which only a session records", path=str(session))
    consent = require_consent(session, "share")
    url = _check_url(options.revocations_url)
    key_path = Path(options.key) if options.key is not None else default_key_path()
    if not key_path.exists():
        raise BundleError("no studio signing key; create one with 'twinstudio keys init'",
                          path=str(key_path))
    private_key = load_private_key(key_path)
    if out.exists():
        raise BundleError("already exists: bundles are never overwritten; choose another --out",
                          path=str(out))
    run_dir = session / "train" / options.run
    metrics_path = run_dir / "metrics.json"
    if not (run_dir / "splat.ply").is_file() or not metrics_path.is_file():
        raise BundleError("no trained twin (splat.ply, metrics.json); run 'twinstudio train run "
                          f"{session} --run {options.run}' first", path=str(run_dir))
    dataset = session / "train" / "dataset" / "transforms.json"
    if not dataset.is_file():
        raise BundleError("no training dataset", path=str(dataset))
    manifest_s = read_manifest(session)
    ds = json.loads(dataset.read_text())
    take = ds["twinstudio"]["take"]

    tar = out.suffix == ".tar"
    stage = out.with_name(f".{out.name}.staging")
    if stage.exists():
        shutil.rmtree(stage)  # our own leftover from a crash: never a finished bundle
    stage.mkdir(parents=True)
    omitted: dict[str, str] = {}
    try:
        emit({"event": "stage", "stage": "collect", "status": "running"})
        _cameras(session, ds, dataset.parent, stage / "cameras")
        _geometry(session, take, dataset.parent, stage / "geometry", omitted)
        copy_file(run_dir / "splat.ply", stage / "splat" / "splat.ply")
        if (run_dir / "lighting.npz").is_file():
            copy_file(run_dir / "lighting.npz", stage / "splat" / "lighting.npz")
        else:
            omitted["splat/lighting.npz"] = "the training run exported no lighting presets (an earlier version)"
        _motion(session, stage / "motion", omitted)
        _previews(run_dir, stage / "previews", omitted)
        write_viewer(stage / "viewer")
        emit({"event": "stage", "stage": "usd", "status": "running"})
        _usd(stage, consent, session, run_dir, emit)
        train_metrics = json.loads(metrics_path.read_text())
        recon_report = _json_or_none(session / "recon" / "report.json")
        atomic_write_json(stage / "metrics.json", {
            "training": {k: v for k, v in train_metrics.items() if k not in ("history", "dataset", "options")},
            "reconstruction": recon_report})
        no_generate = consent.problem("generate", dt.date.today()) if options.generation_kit else None
        if no_generate is not None:  # the kit is imagery for generative models: it needs 'generate' too
            omitted["generation"] = f"the consent does not allow it: {no_generate}"
        elif options.generation_kit:
            from train.handoff.genkit import KitOptions, build_generation_kit

            emit({"event": "stage", "stage": "generation kit", "status": "running"})
            kit = build_generation_kit(session, stage / "generation", consent.subject_id,
                                       KitOptions(size=options.kit_size, take=take), on_event=emit)
            omitted.update({f"generation/{what}": why for what, why in kit.skipped.items()})
        else:
            omitted["generation"] = "not requested (--no-generation-kit)"
        atomic_write_bytes(stage / "USAGE.md", usage_text(consent, manifest_s.subject_id).encode())

        emit({"event": "stage", "stage": "hash", "status": "running"})
        entries = hash_tree(stage, workers=options.workers,
                            on_progress=lambda d, n: emit({"event": "progress", "stage": "hash", "done": d,
                                                           "total": n}))
        manifest = {
            "schema": BUNDLE_SCHEMA, "version": BUNDLE_VERSION,
            "subject": {"id": consent.subject_id},
            "consent": consent_terms(consent),
            "provenance": _provenance(session, manifest_s, ds, train_metrics, recon_report, options.run),
            "ai_disclosure": {"label": AI_LABEL, "requirement": AI_REQUIREMENT},
            "revocations": {"issuer": key_id(private_key.public_key())} | ({"url": url} if url else {}),
            "omitted": omitted,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in entries],
        }
        manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
        atomic_write_bytes(stage / MANIFEST, manifest_bytes)
        atomic_write_json(stage / SIGNATURE, sign_manifest(manifest_bytes, private_key))
        if tar:
            emit({"event": "stage", "stage": "archive", "status": "running"})
            write_tar(stage, out, on_progress=lambda d, n: emit({"event": "progress", "stage": "archive",
                                                                 "done": d, "total": n}))
            shutil.rmtree(stage)
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return BundleResult(out, len(entries) + 2, sum(e.size for e in entries), key_id(private_key.public_key()),
                        manifest, omitted, round(time.perf_counter() - t0, 2))


def _check_url(url: str | None) -> str | None:
    """The revocation-list URL as given, checked: ``scheme://...``, printable, no spaces, at most 2000 characters."""
    if url is None or url == "":
        return None
    if len(url) > 2000 or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[\x21-\x7e]+", url):
        raise BundleError(f"revocations URL {url!r} is not a URL (scheme://..., printable ASCII, no spaces)")
    return url


def consent_terms(rec) -> dict:
    return {"consent_id": rec.consent_id, "agency": rec.agency, "scopes": list(rec.scopes),
            "purposes": list(rec.purposes), "markets": list(rec.markets), "valid_from": str(rec.valid_from),
            "valid_until": str(rec.valid_until), "compensation_ref": rec.compensation_ref,
            "document_sha256": rec.document_sha256}


def usage_text(rec, subject_id: str) -> str:
    """USAGE.md: the consent terms in plain words, and the AI-disclosure requirement."""
    def words(items) -> str:
        items = list(items)
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    scope_words = {"capture": "photographing the subject", "train": "training AI models of the subject",
                   "generate": "generating new images of the subject", "share": "sharing the twin with others"}
    return f"""# Using this digital twin

This bundle holds a digital twin of a real person, known here only as **{subject_id}**.
The twin belongs to that person. It exists, and may be used, only under the written consent
recorded in `MANIFEST.json` (consent `{rec.consent_id}`, agency {rec.agency}).

## What the consent allows
- **Uses**: {words(scope_words.get(s, s) for s in rec.scopes)}.
- **Purposes**: {words(rec.purposes)}. Any other purpose needs a new consent.
- **Markets**: {words(rec.markets)}. Do not publish outside these markets.
- **Period**: from {rec.valid_from} until {rec.valid_until} (inclusive). After that date, stop using the twin
  and delete this bundle and everything trained from it.
- **Compensation**: reference `{rec.compensation_ref}`; uses beyond these terms are not paid for and not allowed.
- The subject may revoke the consent at any time. The studio publishes a signed revocation list
  (`MANIFEST.json` says where, under `revocations`); import its current version with
  `twinstudio revocations import FILE` and run `twinstudio verify` before each use: a revoked or expired
  consent means stop, and a revocation status that is unknown or stale means: fetch the list first.

## AI disclosure and watermark
{AI_REQUIREMENT}

## Licensing to others
The twin may be passed on only to parties the subject has agreed to, under these same terms, with this
file and `MANIFEST.json` unchanged (the studio's signature covers them: with the studio's key pinned,
`twinstudio keys trust studio.pub --name STUDIO`, `twinstudio verify BUNDLE` detects any change).
"""


def _json_or_none(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def _cameras(session: Path, ds: dict, ds_dir: Path, dst: Path) -> None:
    """transforms.json with the stills and masks it names (by default the unmixed subject: RGBA crops of the
    undistorted stills, each frame's crop box and source size recorded), cameras.json and the COLMAP model."""
    doc = {k: v for k, v in ds.items() if k != "twinstudio"}
    meta = ds["twinstudio"]
    doc["twinstudio"] = {k: meta[k] for k in ("schema", "version", "take", "holdout", "presets", "volume",
                                              "images", "cropped") if k in meta} | {"downscales": []}
    doc["frames"] = [f for f in ds["frames"] if "time" not in f]  # the stills (motion frames carry a time)
    names = {f["file_path"] for f in doc["frames"]}
    for key in ("train_filenames", "val_filenames", "test_filenames"):
        doc[key] = [n for n in doc.get(key, []) if n in names]
    for f in doc["frames"]:
        copy_file(ds_dir / f["file_path"], dst / f["file_path"])
        copy_file(ds_dir / f["mask_path"], dst / f["mask_path"])
    if (ds_dir / "sparse_pc.ply").is_file():
        copy_file(ds_dir / "sparse_pc.ply", dst / "sparse_pc.ply")
    else:
        doc.pop("ply_file_path", None)
    atomic_write_json(dst / "transforms.json", doc)
    copy_file(session / "recon" / "cameras.json", dst / "cameras.json")
    colmap = session / "recon" / "colmap"
    for p in sorted(colmap.glob("*.txt")) if colmap.is_dir() else []:
        copy_file(p, dst / "colmap" / p.name)


def _geometry(session: Path, take: str, ds_dir: Path, dst: Path, omitted: dict) -> None:
    mesh_dir = session / "recon" / "mesh" / take
    for name in ("mesh.glb", "mesh.ply"):
        if (mesh_dir / name).is_file():
            copy_file(mesh_dir / name, dst / name)
        else:
            omitted[f"geometry/{name}"] = f"no {mesh_dir / name}"
    if (mesh_dir / "mesh.json").is_file():
        copy_file(mesh_dir / "mesh.json", dst / "mesh.json")
    if (ds_dir / "sparse_pc.ply").is_file():
        copy_file(ds_dir / "sparse_pc.ply", dst / "points.ply")
    else:
        omitted["geometry/points.ply"] = "the dataset has no point cloud"


def _motion(session: Path, dst: Path, omitted: dict) -> None:
    takes = sorted((session / "recon" / "motion").glob("*/motion.json"))
    if not takes:
        omitted["motion"] = "the session has no reconstructed motion take"
        return
    src = takes[-1].parent
    for p in sorted(src.iterdir()):
        if p.is_file():
            copy_file(p, dst / p.name)


def _previews(run_dir: Path, dst: Path, omitted: dict) -> None:
    pv = run_dir / "previews"
    if (pv / "turntable.mp4").is_file():
        copy_file(pv / "turntable.mp4", dst / "turntable.mp4")
        for p in sorted((pv / "turntable").glob("*.png")):
            copy_file(p, dst / "turntable" / p.name)
    else:
        omitted["previews/turntable"] = f"no {pv / 'turntable.mp4'}"
    for p in sorted((run_dir / "eval").glob("*.png")):
        copy_file(p, dst / "evaluation" / p.name)


def _usd(stage: Path, consent, session: Path, run_dir: Path, emit) -> None:
    """usd/twin.usdz: the splat, mesh, cameras and motion of the staged bundle as one OpenUSD scene.

    It cannot carry the sha256 of the MANIFEST.json that lists it; it carries the session
    manifest's and the splat's ('twinstudio export usd BUNDLE' embeds the bundle manifest's)."""
    from train.usd import TwinSources, sha256_file, write_usd

    def part(rel: str) -> Path | None:
        return stage / rel if (stage / rel).is_file() else None

    sources = TwinSources(
        splat=stage / "splat" / "splat.ply", cameras=part("cameras/cameras.json"), mesh=part("geometry/mesh.ply"),
        motion=part("motion/trajectories.npz"), subject_id=consent.subject_id, consent=consent_terms(consent),
        ai_disclosure={"label": AI_LABEL, "requirement": AI_REQUIREMENT},
        provenance={"session_manifest_sha256": sha256_file(session / "session.json"), "run": run_dir.name},
        origin=f"bundle of session {session.name}")
    result = write_usd(sources, stage / "usd" / "twin.usdz", on_event=emit)
    if result.problems:
        raise BundleError("the twin's USD scene fails its checks: " + "; ".join(result.problems[:5]),
                          path=str(result.path))


def _provenance(session: Path, m, ds: dict, train_metrics: dict, recon: dict | None, run: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    takes = {t.kind: t.id for t in m.takes.values() if t.status == "complete"}
    cams = _json_or_none(session / "recon" / "cameras.json") or {}
    return {
        "rig": {"name": m.rig, "sha256": m.rig_sha256},
        "session": {"name": session.name, "created_at": m.created_at, "takes": takes},
        "training": {"run": run, "method": train_metrics.get("method"), "take": ds["twinstudio"]["take"],
                     "iterations": train_metrics.get("iterations"), "device": train_metrics.get("device"),
                     "downscale": train_metrics.get("downscale"), "options": train_metrics.get("options"),
                     "held_out_cameras": ds["twinstudio"].get("holdout")},
        "reconstruction": {"cameras": cams.get("method"), "calibration_take": cams.get("take"),
                           "rms_px": cams.get("rms_px"),
                           "stages": {k: v.get("status") for k, v in (recon or {}).get("stages", {}).items()}},
        "software": {"twinstudio": ver("twinstudio"), "nerfstudio": ver("nerfstudio"), "gsplat": ver("gsplat"),
                     "torch": ver("torch"), "opencv": ver("opencv-python-headless")},
    }


__all__ = ["AI_LABEL", "AI_REQUIREMENT", "BUNDLE_SCHEMA", "BundleOptions", "BundleResult", "build_bundle",
           "consent_terms", "default_key_path", "usage_text"]
