"""A small real session with a stand-in trained twin: what ``twinstudio bundle`` needs, in a few seconds.

The session is captured for real (the virtual studio's stills of
``virtual-ring-24`` at 1/10 scale, through the orchestrator, journal and
hashes), its cameras and masks are the virtual studio's ground truth (as in
test_bundle.py) and its nerfstudio dataset is exported for real. Only the
training run is a stand-in: a 64-Gaussian splat written by the real PLY
writer and a metrics.json, because bundling copies a run, it does not train
one (test_bundle.py bundles a really trained twin).

Call it from a test or fixture (the renderer starts worker processes, which
needs an importable ``__main__``, as pytest's is).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np

from tests.faults.cli import file_ids, run as twinstudio  # noqa: F401 - the CLI helpers these tests use

SUBJECT = "subj-007"
ALL_SCOPES = ("capture", "train", "generate", "share")


def consent(scopes=ALL_SCOPES, *, days: int = 30, subject: str = SUBJECT):
    from capture.consent import ConsentRecord

    today = dt.date.today()
    return ConsentRecord(subject_id=subject, agency="Nova Models", scopes=list(scopes), purposes=["e-commerce"],
                         markets=["EU"], valid_from=today, valid_until=today + dt.timedelta(days=days),
                         compensation_ref="INV-7", document_sha256="a" * 64)


def captured_session(root: Path, scopes=("capture", "train"), *, render_scale: float = 0.1) -> str:
    """A session at ``root`` with consent for ``scopes``, a captured stills take, the virtual studio's
    cameras (cameras.json, COLMAP model) and masks as its reconstruction; returns the take id."""
    from capture.consent import add_consent
    from capture.orchestrator import CaptureOptions, prepare_virtual_studio, run_take
    from capture.session import Session
    from reconstruct.colmap_io import write_colmap_text
    from reconstruct.inputs import GroundTruth, write_cameras

    s = Session.create(root, "virtual-ring-24", SUBJECT)
    add_consent(root, consent(scopes))
    opts = CaptureOptions(render_scale=render_scale)
    prepare_virtual_studio(s, ("stills",), opts)
    take = run_take(s, "stills", opts).id
    gt = GroundTruth.find(root)
    cams = gt.cameras()
    write_cameras(root / "recon" / "cameras.json", cams.values(), method="ground-truth")
    write_colmap_text(root / "recon" / "colmap", list(cams.values()))
    for src in gt.take_dir(take).glob("cam*/*.mask.png"):
        dst = root / "recon" / "masks" / take / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return take


def small_trained_session(root: Path, *, score_points: int = 10_000) -> Path:
    """A session at ``root`` (all scopes) at 320x240 with ground-truth cameras and masks, a reconstructed
    mesh and a really trained twin (20 CPU steps): what bundles, the viewer and USD export are tested on."""
    from reconstruct.mesh import MeshOptions, run_mesh
    from train.runner import TrainOptions, run_training

    take = captured_session(root, ALL_SCOPES, render_scale=0.25)
    run_mesh(root, root / "recon" / "cameras.json", root / "recon" / "mesh" / take, take=take,
             options=MeshOptions(voxel_mm=16.0, levels=3, refine=False), score_points=score_points)
    run_training(root, TrainOptions(device="cpu", iterations=20, downscale=4, turntable_frames=3))
    return root


def make_session(root: Path, scopes=ALL_SCOPES, *, render_scale: float = 0.1) -> Path:
    """A session at ``root``: consent for ``scopes``, a stills take, cameras, masks, dataset, run ``twin``."""
    from train.dataset import export_dataset
    from train.splat_ply import SplatParams, write_splat_ply

    # capture and export need these scopes; the bundle's record follows
    captured_session(root, ("capture", "train"), render_scale=render_scale)
    export_dataset(root)
    run = root / "train" / "twin"
    run.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 64
    write_splat_ply(run / "splat.ply", SplatParams(
        means=rng.normal(0, 0.2, (n, 3)) + [0, 0, 1], log_scales=np.full((n, 3), -4.0),
        quats=np.tile([1.0, 0, 0, 0], (n, 1)), opacity_logits=np.zeros(n), sh_dc=rng.normal(0, 0.5, (n, 3)),
        sh_rest=np.zeros((n, 0, 3))))
    (run / "metrics.json").write_text(json.dumps({"method": "twin-splat", "iterations": 0, "device": "cpu",
                                                  "downscale": 8, "note": "stand-in run for bundle tests"}))
    # the record the bundle carries replaces the set-up one
    doc = json.loads((root / "consent.json").read_text())
    doc["records"][0]["scopes"] = list(scopes)
    (root / "consent.json").write_text(json.dumps(doc))
    return root
