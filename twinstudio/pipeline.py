"""The end-to-end pipeline on the virtual studio (what ``twinstudio demo`` runs)."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_SUBJECT = "demo-subject-001"


def run_demo(out: Path, rig: str, *, scale: float = 1.0, frames: int | None = None, plain: bool = False,
             console: Console | None = None, reconstruct: bool = True, train: bool = True) -> Path:
    """Capture a whole virtual session into ``out/session``, reconstruct it and train a preview twin.

    Returns the session folder. Training uses the GPU when one is present (a
    short run), else a CPU preview (the subject's crops at half size, 2000 iterations, under 3 minutes).

    An earlier demo session in the same place is moved aside, never deleted.
    """
    from capture.consent import ConsentRecord, add_consent
    from capture.orchestrator import CaptureOptions, prepare_virtual_studio, run_take
    from capture.session import Session
    from rigs.fileio import atomic_write_bytes
    from twinstudio.cli_capture import _events

    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "session"
    if path.exists():
        aside = out / f"session.{time.strftime('%Y%m%d-%H%M%S')}"
        path.rename(aside)
        console.print(f"an earlier demo session was moved to {aside}", markup=False)
    session = Session.create(path, rig, DEMO_SUBJECT)
    letter = (f"Consent to capture and train a digital twin of {DEMO_SUBJECT} (demo, synthetic person).\\n"
              "Scopes: capture, train, generate, share. Markets: EU, US. Until: one year from today.\\n").encode()
    atomic_write_bytes(path / "consent-letter.txt", letter)
    import hashlib

    add_consent(path, ConsentRecord(subject_id=DEMO_SUBJECT, agency="Virtual Models Ltd",
                                    scopes=["capture", "train", "generate", "share"],
                                    purposes=["e-commerce", "campaign"], markets=["EU", "US"],
                                    valid_from=dt.date.today(), valid_until=dt.date.today() + dt.timedelta(days=365),
                                    compensation_ref="DEMO-2026-001",
                                    document_sha256=hashlib.sha256(letter).hexdigest()))
    opts = CaptureOptions(render_scale=scale, frames=frames)
    t0 = time.perf_counter()
    takes = []
    kinds = ("calibration", "plates", "stills", "motion")
    with session.writing(command="twinstudio demo"), _events(plain, path) as on_event:
        prepare_virtual_studio(session, kinds, opts, on_event)
        for kind in kinds:
            takes.append(run_take(session, kind, opts, on_event=on_event))
    seconds = time.perf_counter() - t0
    table = Table(title=f"Session {path} — subject {DEMO_SUBJECT}, rig {session.manifest.rig}")
    for col in ("take", "kind", "status", "frames", "missing", "skew ms", "QA flags", "files"):
        table.add_column(col)
    for t in takes:
        flagged = sum(1 for fr in t.captured.values() for r in fr.values() if r.qa and r.qa["flags"])
        table.add_row(t.id, t.kind, t.status, str(sum(len(v) for v in t.captured.values())), str(len(t.missing())),
                      f"{t.skew_s * 1000:.1f}" if t.skew_s is not None else "-",
                      "; ".join(t.qa_flags) or (f"{flagged} frame(s)" if flagged else "none"),
                      str(path / "takes" / t.id))
    console.print(table)
    console.print(f"captured in {seconds:.0f} s; manifest {path / 'session.json'}, journal {path / 'journal.jsonl'}",
                  markup=False)
    console.print(f"virtual studio renders and ground truth (depth, masks, meshes, joints): {path / '.virtual'}",
                  markup=False)
    if reconstruct:
        rep = _reconstruct(path, plain, console)
        if train and _train(path, plain, console):
            _bundle(path, out, plain, console)
        if rep.failed:  # the demo asked for every stage: one that produced nothing is a failure (exit 7)
            from reconstruct.pipeline import StageFailed

            raise StageFailed(rep.failed, rep.path)
    return path


def _reconstruct(session: Path, plain: bool, console: Console):
    """Reconstruct the demo session and print the accuracy table against the ground truth; -> the report."""
    import json

    from reconstruct.pipeline import ReconstructOptions, run_reconstruct
    from twinstudio.cli_reconstruct import print_accuracy, progress_events

    console.rule("reconstruction")
    with progress_events(plain) as on_event:
        rep = run_reconstruct(session, ReconstructOptions(), on_event=on_event)
    print_accuracy(json.loads(rep.path.read_text()))
    console.print(f"reconstructed in {rep.seconds:.0f} s; report {rep.path}", markup=False)
    return rep


#: the demo's GPU run: long enough to pass 30 dB on held-out cameras, short enough for a demo
DEMO_GPU_TRAIN = {"iterations": 7000, "downscale": 2}


def _train(session: Path, plain: bool, console: Console) -> bool:
    """Train the demo's twin (CPU preview, or a short GPU run) and print its held-out evaluation."""
    from train.runner import TrainOptions, resolve_device, run_training
    from twinstudio.cli_train import TrainDashboard, print_train_summary

    console.rule("training the twin")
    missing = [p for p in (session / "recon" / "cameras.json", session / "recon" / "masks") if not p.exists()]
    if missing:
        console.print(f"[yellow]training skipped[/]: the reconstruction wrote no {missing[0].name} "
                      f"(see {session / 'recon' / 'report.json'})", highlight=False)
        return False
    gpu = resolve_device("auto") == "cuda"
    opts = TrainOptions(**DEMO_GPU_TRAIN) if gpu else TrainOptions(device="cpu")
    with TrainDashboard(plain, "training the twin" + (" on the GPU" if gpu else " (CPU preview)")) as on_event:
        result = run_training(session, opts, on_event=on_event)
    print_train_summary(result.metrics, result.run_dir)
    return True


def _bundle(session: Path, out: Path, plain: bool, console: Console) -> None:
    """Sign the demo's handoff bundle with a demo studio key, verify it, print its summary.

    The demo studio publishes its signed revocation list beside the bundle
    (``out/revocations.json``, issued now, its own serials kept in
    ``out/revocations/``); the verification trusts the demo key (``--pubkey``)
    and checks that list, so "valid" means what it means for a render team.
    """
    from rigs.fileio import atomic_write_bytes
    from train.handoff.bundle import BundleOptions, build_bundle
    from train.handoff.integrity import init_keys, load_private_key
    from train.handoff.revocations import issue
    from train.handoff.verify import verify_bundle
    from twinstudio.cli_handoff import print_verify_result
    from twinstudio.cli_train import TrainDashboard

    console.rule("handoff bundle")
    keys = out / "keys"  # the demo's own studio key, not the studio's real one in ~/.twinstudio
    if not (keys / "studio.key").exists():
        init_keys(keys)
    target = out / f"bundle-{DEMO_SUBJECT}.tar"
    published = out / "revocations.json"
    if target.exists():
        aside = target.with_name(f"{target.stem}.{time.strftime('%Y%m%d-%H%M%S')}.tar")
        target.rename(aside)
        console.print(f"an earlier demo bundle was moved to {aside}")
    with TrainDashboard(plain, "bundling") as on_event:
        r = build_bundle(session, target, BundleOptions(key=keys / "studio.key",
                                                        revocations_url=published.resolve().as_uri()),
                         on_event=on_event)
    signed = issue(load_private_key(keys / "studio.key"), store=out / "revocations")
    atomic_write_bytes(published, signed.data)
    console.print(f"bundled {r.files} files ({r.bytes / 2**20:.1f} MiB) in {r.seconds:.1f} s; revocation list "
                  f"{published} (serial {signed.serial}); twinstudio verify:", highlight=False)
    print_verify_result(verify_bundle(target, pubkey=keys / "studio.pub", revocations=published), target)
    console.print(f"  public key for render teams: {keys / 'studio.pub'}; check with "
                  f"'twinstudio verify {target} --pubkey {keys / 'studio.pub'} --revocations {published}'",
                  highlight=False)
    console.print(f"  open it: 'twinstudio view {target}' (the browser viewer, served on 127.0.0.1 only); "
                  f"usd/twin.usdz inside is the OpenUSD scene ('twinstudio export usd {target} --out twin.usdz')",
                  highlight=False)
    _licensed(target, out, keys, published, console)


def _licensed(bundle: Path, out: Path, keys: Path, published: Path, console: Console) -> None:
    """A brand's licence for the demo twin, three licensed renders (labelled, watermarked, C2PA-signed,
    metered), one inspected as released and once more with its credentials stripped, and the model's
    royalty statement. Everything stays under ``out`` (keys, licences, ledger, statements)."""
    import cv2

    from train.handoff.integrity import load_public_key
    from train.handoff.licence import issue_licence
    from train.handoff.royalties import royalties
    from train.marking.credentials import CA_CERT, init_c2pa_chain
    from train.marking.inspect import inspect_image
    from train.render import load_bundle_twin, orbit_views, render_licensed

    console.rule("licensed renders")
    if not (keys / CA_CERT).exists():
        init_c2pa_chain(keys)
    today = dt.date.today()
    lic_path, lic = issue_licence(bundle, licensee="Demo Brand", purposes=["e-commerce"], markets=["EU"],
                                  valid_from=today, valid_until=today + dt.timedelta(days=30), max_images=100,
                                  rate="2.50 EUR/image", key=keys / "studio.key", pubkey=keys / "studio.pub",
                                  revocations=published, store=out / "licences")
    console.print(f"licence {lic.id} for {lic.licensee}: {', '.join(lic.purposes)} in {', '.join(lic.markets)} until "
                  f"{lic.valid_until}, up to {lic.max_images} images at {lic.rate}; {lic_path}", highlight=False)
    ledger = out / "ledger" / "usage.jsonl"
    views = orbit_views(load_bundle_twin(bundle).params, 3, 1024)
    r = render_licensed(bundle, lic_path, out / "renders", views, purpose="e-commerce", market="EU",
                        ledger=ledger, key=keys / "studio.key", pubkey=keys / "studio.pub", revocations=published,
                        chain_dir=keys, on_image=lambda d, n, p: console.print(f"  [{d}/{n}] {p}", markup=False))
    console.print(f"rendered {len(r.files)} images in {r.seconds:.1f} s; {r.images_left} left on the licence; "
                  f"usage ledger {ledger}", highlight=False)
    found = inspect_image(r.files[0], keys / CA_CERT, licences=[lic.id])
    console.print("twinstudio inspect (as released):\n" + found.summary(), markup=False, highlight=False)
    img = cv2.imread(str(r.files[-1]))
    stripped = out / "renders" / "stripped-and-shrunk.jpg"  # what a website does to it: no metadata, half size, q75
    cv2.imwrite(str(stripped), cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA),
                [cv2.IMWRITE_JPEG_QUALITY, 75])
    found = inspect_image(stripped, keys / CA_CERT, licences=[lic.id])
    console.print("twinstudio inspect (credentials stripped, half size, JPEG q75):\n" + found.summary(), markup=False,
                  highlight=False)
    rep = royalties(ledger, today.strftime("%Y-%m"), keys=load_public_key(keys / "studio.pub"),
                    store=out / "licences", out=out / "royalties")
    console.print(f"royalties {rep.period}: {rep.images} image(s), "
                  f"{', '.join(f'{v} {k}' for k, v in rep.totals.items())}; written: {', '.join(str(f) for f in rep.files)}",
                  highlight=False)
