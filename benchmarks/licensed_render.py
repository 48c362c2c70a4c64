"""Licensed renders of the demo twin (``twinstudio render``): speed of each step. Prints one figure per line:

* drawing: images/s at 1024x1024 from the splat on the CPU (the project's
  rasteriser, 2 threads here) and, where CUDA is present, on the GPU (gsplat);
* marking (visible label + watermark + JPEG + C2PA signature): ms per image,
  target <= 250 ms;
* metering: ms per ledger entry (locked append, signed, fsynced);
* end to end: ``render_licensed`` for ``--images`` orbit views, images/s.

Needs the demo's bundle (``make demo``: out/demo/bundle-demo-subject-001.tar,
its keys and revocation list). Licences, ledger and images go to a temporary
folder deleted at the end; nothing is sent anywhere.

Usage: python benchmarks/licensed_render.py [--images 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEMO = Path("out/demo")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    bundle, keys, published = DEMO / "bundle-demo-subject-001.tar", DEMO / "keys", DEMO / "revocations.json"
    if not bundle.is_file():
        print(f"no {bundle}: run 'make demo' first")
        return 1
    import torch

    from train.handoff.bundle import AI_REQUIREMENT
    from train.handoff.ledger import Ledger
    from train.handoff.licence import issue_licence
    from train.marking import mark_image
    from train.marking.credentials import CA_CERT, init_c2pa_chain, load_c2pa_chain
    from train.preview import label_image
    from train.render import load_bundle_twin, orbit_views, render_licensed, render_views

    if not (keys / CA_CERT).exists():
        init_c2pa_chain(keys)
    twin = load_bundle_twin(bundle)
    views = orbit_views(twin.params, args.images, 1024)
    print(f"demo twin: {twin.params.n:,} Gaussians; {args.images} orbit views at 1024x1024; torch threads "
          f"{torch.get_num_threads()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    images = []
    for device in devices:
        next(render_views(twin.params, views[:1], device=device))  # warm-up (compiles, allocates)
        t0 = time.perf_counter()
        images = [rgb for _, rgb in render_views(twin.params, views, device=device)]
        dt_s = time.perf_counter() - t0
        print(f"drawing on {device}: {len(images) / dt_s:.2f} images/s ({dt_s / len(images) * 1000:.0f} ms each)")
    if not torch.cuda.is_available():
        print("drawing on cuda: not measured (no GPU on this machine)")

    chain = load_c2pa_chain(keys)
    ms = []
    for i, rgb in enumerate(images):
        t0 = time.perf_counter()
        mark_image(label_image(rgb), "jpeg", bundle_sha256=twin.manifest_sha256, licence_id="lic-0123456789abcdef",
                   image_serial=i + 1, disclosure=AI_REQUIREMENT, chain=chain)
        ms.append((time.perf_counter() - t0) * 1000)
    print(f"marking (label + watermark + JPEG + C2PA) per 1024x1024 image: median {statistics.median(ms):.1f} ms, "
          f"max {max(ms):.1f} ms; target <= 250 ms")

    tmp = Path(tempfile.mkdtemp(prefix="licensed-render-"))
    try:
        today = dt.date.today()
        lic_path, lic = issue_licence(bundle, licensee="Bench Brand", purposes=["e-commerce"], markets=["EU"],
                                      valid_from=today, valid_until=today + dt.timedelta(days=30), max_images=100_000,
                                      rate="2.50 EUR/image", key=keys / "studio.key", pubkey=keys / "studio.pub",
                                      revocations=published, store=tmp / "licences")
        book = Ledger(tmp / "bench-ledger.jsonl", key=keys / "studio.key")
        t0 = time.perf_counter()
        for i in range(200):
            book.record(lic, image=str(i + 1), image_sha256=f"{i:064x}", purpose="e-commerce", market="EU")
        print(f"metering: {(time.perf_counter() - t0) / 200 * 1000:.2f} ms per ledger entry (locked, signed, fsynced)")
        t0 = time.perf_counter()
        r = render_licensed(bundle, lic_path, tmp / "renders", views, purpose="e-commerce", market="EU",
                            ledger=tmp / "usage.jsonl", key=keys / "studio.key", pubkey=keys / "studio.pub",
                            revocations=published, chain_dir=keys)
        total = time.perf_counter() - t0
        print(f"end to end (licence check, draw, mark, meter, write): {len(r.files)} images in {total:.1f} s, "
              f"{len(r.files) / total:.2f} images/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
