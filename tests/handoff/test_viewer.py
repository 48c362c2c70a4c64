"""The bundle's browser viewer, in a real headless Chromium (Debian's, WebGL 2 on the CPU through SwiftShader).

A small real twin (the virtual studio's stills at 320x240, ground-truth cameras
and masks, a visual-hull mesh, 20 CPU training steps, a 3-frame H.264
turntable) is bundled; one Chromium, in a network namespace that has only
``lo`` (tests/browser.py), then:

- opens ``viewer/index.html?camera=<held-out camera>`` from a loopback HTTP
  server and compares its pixels (read back from WebGL: the canvas exactly,
  not the label over it) with the project's own rasteriser's render of that
  camera: >= 45 dB on the whole image and >= 30 dB on the subject (the pixels
  where our render's alpha is over 0.5); the label and subject id are shown;
  every request came from 127.0.0.1 and asked for a file of the bundle;
- shows the mesh where the splat is (the GLB's axes);
- shows its errors (no splat, an unknown camera) on the page and in
  ``twinViewer.error``;
- loads from ``file://`` too (Chromium's ``--allow-file-access-from-files``), and says on the
  page what is wrong where the browser may not read the files;
- plays the bundle's turntable in a ``<video>``: duration and frame count as
  :func:`train.preview.video_info` decodes them;
- ``twinstudio view`` serves a bundle folder or archive on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nerfstudio")

from tests.browser import Browser, BrowserError, data_url_png, require_browser  # noqa: E402

BACKGROUND = (0.85, 0.85, 0.85)  # train.exports.PREVIEW_BACKGROUND


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR (dB) of two uint8 images, over the pixels ``where`` is true (all by default)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    if where is not None:
        d = d[where]
    mse = float(np.mean(d ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.fixture(scope="module")
def chromium():
    return require_browser()  # skips the browser's tests here, before the twin is built


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The folder the test server serves: bundle/ (a real bundle of a small real twin) and play.html."""
    from tests.handoff.sessions import small_trained_session
    from train.handoff.bundle import BundleOptions, build_bundle
    from train.handoff.integrity import init_keys

    session = small_trained_session(tmp_path_factory.mktemp("viewer") / "session", score_points=0)
    key, _ = init_keys(tmp_path_factory.mktemp("keys"))
    root = tmp_path_factory.mktemp("served")
    build_bundle(session, root / "bundle", BundleOptions(key=key, generation_kit=False))
    (root / "play.html").write_text(PLAY_PAGE)
    return root


@pytest.fixture(scope="module")
def browser(chromium, served):
    with Browser(served, width=640, height=480, file_access=True, chromium=chromium) as b:
        yield b


@pytest.fixture(scope="module")
def holdout(served):
    """The first held-out camera of the bundle, as in its cameras.json."""
    from rigs.geometry import Camera

    b = served / "bundle"
    cam_id = json.loads((b / "cameras" / "transforms.json").read_text())["twinstudio"]["holdout"][0]
    doc = json.loads((b / "cameras" / "cameras.json").read_text())
    return Camera.from_dict(next(c for c in doc["cameras"] if c["id"] == cam_id))


@pytest.fixture(scope="module")
def ours(served, holdout):
    """Our rasteriser's render of the held-out camera (uint8 [H, W, 3]) and its alpha ([H, W])."""
    from train.exports import render_splat
    from train.splat_ply import read_splat_ply

    params = read_splat_ply(served / "bundle" / "splat" / "splat.ply")
    i = holdout.intrinsics
    K = np.array([[i.fx, 0, i.cx + 0.5], [0, i.fy, i.cy + 0.5], [0, 0, 1]])  # pixel centres at +0.5

    def render(bg):
        return render_splat(params, holdout.pose.matrix, K, i.width, i.height, background=bg)

    rgb = render(BACKGROUND)
    alpha = 1.0 - (render((1.0, 1.0, 1.0)) - render((0.0, 0.0, 0.0))).mean(axis=2)
    return np.round(rgb * 255).astype(np.uint8), alpha


def open_viewer(page, url: str) -> dict:
    page.navigate(url)
    return page.evaluate("twinViewer.ready.then(v => ({frames: v.frames, splats: v.splats, readyMs: v.readyMs}))",
                         timeout=60)


def snapshot(page) -> np.ndarray:
    return data_url_png(page.evaluate("twinViewer.snapshot()"))


@pytest.fixture(scope="module")
def viewed(browser, holdout):
    """The held-out camera in the viewer over HTTP: (page, ready info, RGB uint8 of its canvas)."""
    page = browser.page()
    url = f"{browser.server.url}/bundle/viewer/index.html?camera={holdout.id}&background=0.85,0.85,0.85"
    info = open_viewer(page, url)
    return page, info, snapshot(page)


# ----------------------------------------------------------------------------- the twin, as we render it


def test_held_out_camera_matches_our_rasteriser(viewed, ours, holdout):
    page, info, got = viewed
    ref, alpha = ours
    i = holdout.intrinsics
    assert got.shape == ref.shape == (i.height, i.width, 3)
    subject = alpha > 0.5
    assert subject.sum() > 0.01 * subject.size, "the held-out camera should see the subject"
    whole, on_subject = psnr(got, ref), psnr(got, ref, subject)
    print(f"\nviewer vs rasteriser, {holdout.id} {i.width}x{i.height}: {whole:.2f} dB whole, "
          f"{on_subject:.2f} dB on the subject ({int(subject.sum())} px); {info}")
    assert whole >= 45.0
    assert on_subject >= 30.0
    assert info["splats"] > 1000
    # the background is the rasteriser's, byte for byte, where no Gaussian reaches
    empty = alpha < 1e-4
    assert (got[empty] == round(BACKGROUND[0] * 255)).mean() > 0.999


def test_the_page_shows_the_disclosure_and_the_canvas(viewed, served, holdout):
    page, _, got = viewed
    manifest = json.loads((served / "bundle" / "MANIFEST.json").read_text())
    shown = page.evaluate("""(() => { const l = document.getElementById('label'), r = l.getBoundingClientRect(),
        s = getComputedStyle(l);
        return {text: l.innerText, visible: r.width > 0 && r.height > 0 && s.visibility === 'visible' &&
                s.display !== 'none' && +s.opacity > 0.5, title: document.title,
                canvas: [document.getElementById('view').width, document.getElementById('view').height,
                         devicePixelRatio]}; })()""")
    assert manifest["ai_disclosure"]["label"] == "AI-generated digital twin"
    assert manifest["ai_disclosure"]["label"] in shown["text"] and shown["visible"]
    assert manifest["subject"]["id"] in shown["text"]
    assert shown["canvas"] == [holdout.intrinsics.width, holdout.intrinsics.height, 1]
    # what the screen shows is the read-back image, except where the label and controls sit over it
    from tests.browser import decode_png

    w, h = holdout.intrinsics.width, holdout.intrinsics.height
    screen = decode_png(page.screenshot({"x": 0, "y": 0, "width": w, "height": h}))[:, :, :3]
    covered = np.zeros((h, w), bool)
    for rect in page.evaluate("[...document.querySelectorAll('.panel')].filter(e => !e.hidden)"
                              ".map(e => { const r = e.getBoundingClientRect(); "
                              "return [r.left, r.top, r.right, r.bottom]; })"):
        x0, y0, x1, y1 = (int(math.floor(rect[0])), int(math.floor(rect[1])), int(math.ceil(rect[2])),
                          int(math.ceil(rect[3])))
        covered[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
    assert covered.mean() < 0.5
    assert psnr(screen, got, ~covered) >= 45.0


def test_only_the_bundle_is_requested_and_only_over_loopback(viewed, browser, served):
    page, _, _ = viewed
    assert browser.interfaces == ["lo"]  # the namespace Chromium and the server run in
    base = f"{browser.server.url}/bundle/"
    tried = page.requests
    assert tried and all(u.startswith((base, "blob:" + browser.server.url + "/", "data:")) for u in tried), tried
    log = [r for r in browser.server.log if r.path.startswith("/bundle/")]
    assert log and all(r.client == "127.0.0.1" for r in browser.server.log)
    for r in log:
        rel = r.path.split("?", 1)[0].removeprefix("/bundle/")
        assert r.status == 200 and (served / "bundle" / rel).is_file(), r
    got = {r.path.split("?", 1)[0] for r in log}
    for rel in ("viewer/index.html", "viewer/viewer.js", "viewer/vendor/spark/spark.module.min.js",
                "splat/splat.ply", "cameras/cameras.json", "MANIFEST.json"):
        assert f"/bundle/{rel}" in got


def test_the_mesh_is_where_the_splat_is(browser, holdout, ours):
    page = browser.page()
    try:
        info = open_viewer(page, f"{browser.server.url}/bundle/viewer/index.html?camera={holdout.id}"
                                 "&background=0,0,0&mesh=1&splat=0")
        mesh = snapshot(page).max(axis=2) > 0
    finally:
        page.close()
    _, alpha = ours
    subject = alpha > 0.5
    iou = (mesh & subject).sum() / (mesh | subject).sum()
    print(f"\nmesh silhouette vs the splat's (alpha > 0.5): IoU {iou:.3f}; {info}")
    assert iou > 0.6  # axes wrong (y-up left in, or flipped) give ~0


def test_errors_show_on_the_page(browser, served):
    broken = served / "broken"
    shutil.copytree(served / "bundle" / "viewer", broken / "viewer")
    shutil.copytree(served / "bundle" / "cameras", broken / "cameras")
    shutil.copy(served / "bundle" / "MANIFEST.json", broken / "MANIFEST.json")
    page = browser.page()
    try:
        page.navigate(f"{browser.server.url}/broken/viewer/index.html")
        with pytest.raises(BrowserError, match=r"splat/splat\.ply: HTTP 404"):
            page.evaluate("twinViewer.ready")
        shown = page.evaluate("[twinViewer.error, document.getElementById('error').innerText, "
                              "document.getElementById('error').hidden, document.getElementById('label').innerText]")
        assert "splat/splat.ply" in shown[0] and "splat/splat.ply" in shown[1] and shown[2] is False
        assert "AI-generated digital twin" in shown[3]  # the disclosure stays
        page.navigate(f"{browser.server.url}/bundle/viewer/index.html?camera=nope")
        with pytest.raises(BrowserError, match=r"camera=nope: no such camera .*cam01"):
            page.evaluate("twinViewer.ready")
    finally:
        page.close()


def test_the_viewer_loads_from_file_urls_too(browser, served, holdout, viewed):
    _, _, over_http = viewed
    page = browser.page()
    try:
        page_url = (served / "bundle" / "viewer" / "index.html").as_uri()
        open_viewer(page, f"{page_url}?camera={holdout.id}&background=0.85,0.85,0.85")
        got = snapshot(page)
        tried = page.requests
    finally:
        page.close()
    assert psnr(got, over_http) >= 45.0
    base = (served / "bundle").as_uri() + "/"
    assert all(u.startswith((base, "blob:", "data:")) for u in tried), tried


def test_a_file_page_the_browser_may_not_read_says_so(chromium, served):
    with Browser(served, width=320, height=240, chromium=chromium) as b:  # no --allow-file-access-from-files
        page = b.page()
        page.navigate((served / "bundle" / "viewer" / "index.html").as_uri())
        with pytest.raises(BrowserError, match="--allow-file-access-from-files"):
            page.evaluate("new Promise(r => setTimeout(r, 200)).then(() => twinViewer.ready)")
        error = page.evaluate("[document.getElementById('error').innerText, document.getElementById('error').hidden]")
    assert "twinstudio view" in error[0] and error[1] is False


# ----------------------------------------------------------------------------- the turntable


PLAY_PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>play</title>
<video id="v" muted playsinline preload="auto"></video>
<script>
// Play a video slowly and count the frames presented (requestVideoFrameCallback, one per new frame).
window.play = async (src, rate) => {
  const v = document.getElementById("v"), times = [];
  const onFrame = (now, md) => { times.push(md.mediaTime); v.requestVideoFrameCallback(onFrame); };
  v.requestVideoFrameCallback(onFrame);
  v.defaultPlaybackRate = rate;  // loading resets playbackRate to this
  v.src = src;
  await new Promise((res, rej) => { v.onloadedmetadata = res;
    v.onerror = () => rej(new Error("cannot play: " + (v.error && v.error.message))); });
  v.playbackRate = rate;
  const ended = new Promise((res) => { v.onended = res; });
  await v.play();
  await ended;
  await new Promise((res) => setTimeout(res, 100));
  const q = v.getVideoPlaybackQuality();
  return {duration: v.duration, width: v.videoWidth, height: v.videoHeight, mediaTimes: times,
          decoded: q.totalVideoFrames, dropped: q.droppedVideoFrames,
          h264: v.canPlayType('video/mp4; codecs="avc1.640028"')};
};
</script>
"""


def _long_turntable(root: Path) -> Path:
    """A 24-frame turntable of an odd size (431 x 575: the MP4 is padded to even), each frame a different
    colour, through the real writer (H.264 through PyAV)."""
    from train.preview import turntable_cameras, write_turntable

    cams = turntable_cameras(np.zeros(3), 2.0, 0.5, 24, width=431, height_px=575)

    def render(viewmat, K, width, height):
        i = next(k for k, (v, _) in enumerate(cams) if np.array_equal(v, viewmat))
        img = np.zeros((height, width, 3), np.float32)
        img[..., 0], img[..., 1] = i / 23, np.linspace(0, 1, width)[None, :]
        return img

    write_turntable(root / "long", render, cams, fps=24, size=(431, 575))
    return root / "long" / "turntable.mp4"


@pytest.mark.parametrize("which", ["bundle", "long"])
def test_the_turntable_plays_in_chromium(browser, served, which):
    """The bundle's turntable (3 frames here) and a 24-frame one of an odd size play in Chromium's <video> with
    the duration and the frames PyAV reads from the file."""
    from train.preview import video_info

    mp4 = served / "bundle" / "previews" / "turntable.mp4" if which == "bundle" else _long_turntable(served)
    want = video_info(mp4)
    assert want["codec"] == "h264" and want["pix_fmt"] == "yuv420p" and want["faststart"]
    page = browser.page()
    try:
        page.navigate(f"{browser.server.url}/play.html")
        # a tenth of the speed: each frame stays on screen for several of the compositor's frames
        got = page.evaluate(f"play('{mp4.relative_to(served).as_posix()}', 0.1)", timeout=90)
    finally:
        page.close()
    frame = 1.0 / want["fps"]
    presented = sorted(set(got["mediaTimes"]))
    print(f"\nturntable: Chromium {got['duration']} s, {len(presented)} frames presented, {got['decoded']} "
          f"decoded, {got['dropped']} dropped; PyAV {want['duration']} s, {want['frames']} frames")
    assert got["h264"] == "probably"
    assert (got["width"], got["height"]) == (want["width"], want["height"])
    assert abs(got["duration"] - want["duration"]) <= frame / 2
    assert len(presented) == want["frames"] and got["decoded"] == want["frames"] and got["dropped"] == 0
    assert np.allclose(presented, np.arange(want["frames"]) * frame, atol=1e-3)


# ----------------------------------------------------------------------------- the viewer's files, twinstudio view


def test_write_viewer_is_byte_reproducible_and_checked(tmp_path, monkeypatch):
    import hashlib

    from train.handoff import viewer
    from train.handoff.integrity import BundleError

    a = viewer.write_viewer(tmp_path / "a" / "viewer")
    b = viewer.write_viewer(tmp_path / "b" / "viewer")
    rel = [p.relative_to(tmp_path / "a" / "viewer").as_posix() for p in a]
    assert rel == [p.relative_to(tmp_path / "b" / "viewer").as_posix() for p in b] == sorted(rel)
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert {"index.html", "viewer.js", "vendor/VERSIONS.json", "vendor/LICENSES.md", "vendor/three/LICENSE",
            "vendor/spark/LICENSE", "vendor/spark/spark.module.min.js", "vendor/three/three.module.js"} <= set(rel)
    assert not [r for r in rel if r.endswith(".map")]
    doc = json.loads((tmp_path / "a" / "viewer" / "vendor" / "VERSIONS.json").read_text())
    assert {(p["package"], p["version"]) for p in doc["packages"]} >= {("three", "0.187.0"),
                                                                      ("@sparkjsdev/spark", "2.2.0")}
    for p in doc["packages"]:
        assert p["integrity"].startswith("sha512-") and p["license"] == "MIT"
        for f in p["files"]:
            data = (tmp_path / "a" / "viewer" / "vendor" / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
    # the importmap names the vendored modules, and the page's CSP lets only that inline script run
    import base64

    html = (tmp_path / "a" / "viewer" / "index.html").read_text()
    importmap = html.split('<script type="importmap">', 1)[1].split("</script>", 1)[0]
    imports = json.loads(importmap)["imports"]
    assert all((tmp_path / "a" / "viewer" / u).is_file() for u in imports.values() if not u.endswith("/"))
    digest = base64.b64encode(hashlib.sha256(importmap.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in html  # an edited importmap needs its new hash in the CSP
    # a vendored file changed by hand is refused
    copy = tmp_path / "pkg"
    shutil.copytree(viewer.VIEWER_DIR, copy)
    f = copy / "vendor" / "three" / "three.core.js"
    f.write_bytes(f.read_bytes().replace(b"three", b"thr3e", 1))
    monkeypatch.setattr(viewer, "VIEWER_DIR", copy)
    with pytest.raises(BundleError, match=r"three 0\.187\.0: not the file VERSIONS.json records"):
        viewer.write_viewer(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), b""


def test_serve_bundle_folder_and_archive(served, tmp_path):
    from train.handoff.integrity import BundleError, write_tar
    from train.handoff.viewer import serve_bundle

    bundle = served / "bundle"
    tar = tmp_path / "bundle.tar"
    write_tar(bundle, tar)
    seen = []
    for src in (bundle, tar):
        with serve_bundle(src, on_request=seen.append) as server:
            assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/viewer/index.html")
            base = server.url.removesuffix("/viewer/index.html")
            status, ctype, body = _get(server.url)
            assert status == 200 and ctype.startswith("text/html") and b"importmap" in body
            status, ctype, body = _get(f"{base}/viewer/vendor/spark/spark.module.min.js")
            assert status == 200 and ctype.startswith("text/javascript")
            assert _get(f"{base}/splat/splat.ply")[2] == (bundle / "splat" / "splat.ply").read_bytes()
            assert _get(f"{base}/")[0] == 200  # redirected to the viewer
            for bad in ("/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/nothing.txt", "/viewer/"):
                assert _get(base + bad)[0] == 404, bad
    assert seen and all(r.client == "127.0.0.1" for r in seen)
    with pytest.raises(BundleError, match="not a twin bundle"):
        with serve_bundle(tmp_path):
            pass


def test_twinstudio_view_serves_on_loopback_only(served):
    bundle = served / "bundle"
    proc = subprocess.Popen([sys.executable, "-m", "twinstudio", "view", str(bundle), "--no-open"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("viewer: "):
                break
        out = "".join(lines)
        url = next(x.split(" ", 1)[1].strip() for x in lines if x.startswith("viewer: "))
        assert url.startswith("http://127.0.0.1:") and "on 127.0.0.1 only" in out
        assert _get(url)[0] == 200
        port = url.split(":")[2].split("/")[0]
        ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        listening = [x.split()[3] for x in ss.splitlines() if f"pid={proc.pid}," in x]
        assert listening == [f"127.0.0.1:{port}"]
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
