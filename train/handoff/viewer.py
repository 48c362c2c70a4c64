"""The bundle's browser viewer: ``viewer/index.html`` shows the twin offline, from the bundle folder.

The viewer is package data (``train/handoff/viewer/``): ``index.html``,
``viewer.js`` and ``vendor/`` (three.js 0.187.0 and Spark 2.2.0, MIT, copied
byte for byte from npm by ``scripts/vendor_viewer.sh``; versions, npm
integrity and sha256 in ``vendor/VERSIONS.json``). It reads the bundle's
``splat/splat.ply``, ``cameras/cameras.json``, ``cameras/transforms.json``,
``MANIFEST.json`` and ``geometry/mesh.glb`` by relative paths, so the same
folder works behind any static file server and, in Chromium started with
``--allow-file-access-from-files``, from ``file://``. What it shows and its URL
parameters: see the head of ``viewer.js``.

- :func:`write_viewer` copies it into a bundle (same bytes every time: bundles
  are hashed and byte-reproducible), after checking every vendored file
  against ``VERSIONS.json``;
- :func:`serve_bundle` serves a bundle (folder or ``.tar``) on 127.0.0.1 only,
  for ``twinstudio view``; a bundle made before the viewer existed is served
  with this package's copy at ``/viewer/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import posixpath
import tarfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rigs.fileio import copy_file
from train.handoff.integrity import BundleError

#: the viewer's files, as shipped in the package
VIEWER_DIR = Path(__file__).with_name("viewer")
#: where the viewer lives in a bundle, and its page
BUNDLE_FOLDER = "viewer"
INDEX = "viewer/index.html"

#: content types of what a bundle holds (module scripts need a JavaScript type)
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".json": "application/json", ".md": "text/markdown; charset=utf-8",
                 ".txt": "text/plain; charset=utf-8", ".ply": "application/octet-stream",
                 ".glb": "model/gltf-binary", ".mp4": "video/mp4", ".png": "image/png", ".jpg": "image/jpeg",
                 ".jpeg": "image/jpeg", ".npz": "application/octet-stream", ".csv": "text/csv; charset=utf-8",
                 ".usda": "text/plain; charset=utf-8", ".wasm": "application/wasm"}


def viewer_files() -> list[str]:
    """The viewer's files, relative to its folder (POSIX paths, sorted); checked against VERSIONS.json.

    Raises :class:`BundleError` when a vendored file is missing or differs from what
    ``scripts/vendor_viewer.sh`` recorded (someone edited it by hand, or the install is broken).
    """
    versions = VIEWER_DIR / "vendor" / "VERSIONS.json"
    if not (VIEWER_DIR / "index.html").is_file() or not versions.is_file():
        raise BundleError("the viewer is missing from this installation (reinstall twinstudio)", path=VIEWER_DIR)
    doc = json.loads(versions.read_text())
    for pkg in doc["packages"]:
        for f in pkg["files"]:
            p = VIEWER_DIR / "vendor" / f["path"]
            if not p.is_file():
                raise BundleError(f"{pkg['package']} {pkg['version']}: file missing; run "
                                  "scripts/vendor_viewer.sh", path=p)
            if hashlib.sha256(p.read_bytes()).hexdigest() != f["sha256"]:
                raise BundleError(f"{pkg['package']} {pkg['version']}: not the file VERSIONS.json records "
                                  "(edited by hand?); run scripts/vendor_viewer.sh", path=p)
    files = sorted(p.relative_to(VIEWER_DIR).as_posix() for p in VIEWER_DIR.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    listed = {"vendor/VERSIONS.json"} | {f"vendor/{f['path']}" for pkg in doc["packages"] for f in pkg["files"]}
    stray = [f for f in files if f.startswith("vendor/") and f not in listed | {"vendor/LICENSES.md"}]
    if stray:
        raise BundleError(f"files in vendor/ that VERSIONS.json does not list: {stray[:5]}", path=VIEWER_DIR)
    return files


def write_viewer(dst: Path | str) -> list[Path]:
    """Copy the viewer into ``dst`` (a bundle's ``viewer/`` folder); returns the files written, sorted.

    The bytes are the package's, unchanged, so two bundles of the same twin are identical.
    """
    dst = Path(dst)
    out = []
    for rel in viewer_files():
        copy_file(VIEWER_DIR / rel, dst / rel)
        out.append(dst / rel)
    return out


# ----------------------------------------------------------------------------- serving a bundle


@dataclass(frozen=True)
class Served:
    """One request the server answered: client address, method, path (with the query), status."""

    client: str
    method: str
    path: str
    status: int


class _Files:
    """A bundle's files by relative path: a folder, or the members of an (uncompressed) ``.tar``."""

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self.members: dict[str, tuple[int, int]] | None = None  # tar: name -> (data offset, size)
        if bundle.is_file():
            try:
                with tarfile.open(bundle, "r:") as tf:
                    self.members = {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError) as e:
                raise BundleError(f"not a bundle archive (an uncompressed .tar): {e}", path=bundle) from e
        elif not bundle.is_dir():
            raise BundleError("no such bundle (a folder or a .tar)", path=bundle)
        if not self.has("MANIFEST.json") and not self.has("splat/splat.ply"):
            raise BundleError("not a twin bundle (no MANIFEST.json, no splat/splat.ply)", path=bundle)
        self.own_viewer = self.has(INDEX)

    def has(self, rel: str) -> bool:
        if self.members is not None:
            return rel in self.members
        p = self.bundle / rel
        # regular files of the bundle only: no link, and nothing a linked folder leads to outside it
        return p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(self.bundle.resolve())

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None when the bundle has no such file (the package's viewer stands in)."""
        if rel.startswith(f"{BUNDLE_FOLDER}/") and not self.own_viewer:
            p = VIEWER_DIR / rel.removeprefix(f"{BUNDLE_FOLDER}/")
            return p.read_bytes() if p.is_file() else None
        if not self.has(rel):
            return None
        if self.members is not None:
            offset, size = self.members[rel]
            with open(self.bundle, "rb") as f:
                return os.pread(f.fileno(), size, offset)
        return (self.bundle / rel).read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: BundleServer

    def version_string(self) -> str:
        return "twinstudio-view"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._send(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(body=False)

    def _send(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        rel = posixpath.normpath(path).lstrip("/")
        if rel in ("", "."):
            self.send_response(302)
            self.send_header("Location", f"/{INDEX}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = None if rel.startswith("..") or "\0" in rel else self.server.files.read(rel)
        if data is None:
            self.send_error(404, "not in this bundle")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPES.get(posixpath.splitext(rel)[1].lower(),
                                                          "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_request(self, code="-", size="-") -> None:  # noqa: ARG002 - http.server's signature
        entry = Served(self.client_address[0], self.command, self.path, int(code) if str(code).isdigit() else 0)
        if self.server.on_request is not None:
            self.server.on_request(entry)

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        pass


class BundleServer(http.server.ThreadingHTTPServer):
    """A read-only HTTP server of one bundle on 127.0.0.1 (GET and HEAD; no listing, nothing outside it)."""

    daemon_threads = True

    def __init__(self, files: _Files, port: int, on_request: Callable[[Served], None] | None) -> None:
        self.files = files
        self.on_request = on_request
        try:
            super().__init__(("127.0.0.1", port), _Handler)
        except OSError as e:
            raise BundleError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}; choose another --port",
                              path=files.bundle) from e

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a browser that stops a download is no error
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        """The viewer's address."""
        return f"http://127.0.0.1:{self.server_address[1]}/{INDEX}"

    @property
    def own_viewer(self) -> bool:
        """Whether the bundle carries its own viewer (else this package's copy is served at /viewer/)."""
        return self.files.own_viewer


@contextlib.contextmanager
def serve_bundle(bundle: Path | str, *, port: int = 0,
                 on_request: Callable[[Served], None] | None = None) -> Iterator[BundleServer]:
    """Serve ``bundle`` (a folder or a ``.tar``) on 127.0.0.1:``port`` (0: a free one) in a thread.

    Yields the server (``.url`` is the viewer's page); stops it on leaving. ``on_request``
    is called with each answered request (:class:`Served`). Raises :class:`BundleError`
    for a path that is no bundle, or a port that cannot be had.
    """
    server = BundleServer(_Files(Path(bundle)), port, on_request)
    thread = threading.Thread(target=server.serve_forever, name="twinstudio-view", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


__all__ = ["BUNDLE_FOLDER", "INDEX", "BundleServer", "Served", "VIEWER_DIR", "serve_bundle", "viewer_files",
           "write_viewer"]
