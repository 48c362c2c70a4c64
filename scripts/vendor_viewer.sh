#!/usr/bin/env bash
# Re-create train/handoff/viewer/vendor/ (the bundle viewer's JavaScript) from pinned npm versions.
#
#   scripts/vendor_viewer.sh            # rewrite vendor/ from the registry (needs npm and node)
#   scripts/vendor_viewer.sh --check    # rebuild into a temporary folder and compare with the committed one
#
# The committed vendor/ is what ships in every bundle; this script is how it is made and updated:
# bump a version and its integrity below (`npm view PKG@VER dist.integrity`), run it, run the viewer
# tests (tests/handoff/test_viewer.py), commit. Every tarball is fetched with `npm pack`, its sha512
# checked against the pin before anything is extracted, and only the files the viewer imports are
# copied, byte for byte (no source maps, no types). vendor/VERSIONS.json records package, version,
# integrity and each file's sha256; vendor/LICENSES.md and the LICENSE files travel with them.
#
# three 0.187.0 publishes no minified builds (build/three.module.js and three.core.js only), so
# those are shipped as published; Spark ships its own minified ES module (its worker and WebAssembly
# are inlined in it). fflate is compiled into Spark's module: only its licence is copied.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/train/handoff/viewer/vendor"

# package  version  integrity (sha512, as the registry publishes it)
PINS=(
  "three 0.187.0 sha512-Qiu7R+Cmh8CstZsY1uJOSWnVlfo7ZtNLV7mF8Jltk3LB3AtDu9cRZlcnRKkAk8Y4z6KKw35z7Y7Urd7jWY8etA=="
  "@sparkjsdev/spark 2.2.0 sha512-wf5F2YAmPXnjm20/MgXYer9FQTXz2JOCo05HwxFkaD7Guk9rHVPIwdJ6fq0oF9ME0heMvYj+TxS6DTrucvy6KA=="
  "fflate 0.8.2 sha512-cPJU47OaAoCbg0pBvzsgpTPhmhqI5eJjh/JIu8tPj5q+T7iLvW/JAYUqmE7KOB4R1ZyEhzBaIQpQpardBF5z8A=="
)

# package  path in its tarball  ->  path under vendor/
FILES=(
  "three package/LICENSE three/LICENSE"
  "three package/build/three.module.js three/three.module.js"
  "three package/build/three.core.js three/three.core.js"
  "three package/examples/jsm/controls/OrbitControls.js three/addons/controls/OrbitControls.js"
  "three package/examples/jsm/loaders/GLTFLoader.js three/addons/loaders/GLTFLoader.js"
  "three package/examples/jsm/utils/BufferGeometryUtils.js three/addons/utils/BufferGeometryUtils.js"
  "three package/examples/jsm/utils/SkeletonUtils.js three/addons/utils/SkeletonUtils.js"
  "three package/examples/jsm/postprocessing/Pass.js three/addons/postprocessing/Pass.js"
  "@sparkjsdev/spark package/LICENSE spark/LICENSE"
  "@sparkjsdev/spark package/dist/spark.module.min.js spark/spark.module.min.js"
  "fflate package/LICENSE fflate/LICENSE"
)

check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac
for tool in npm node; do
  command -v "$tool" >/dev/null || { echo "error: $tool is needed (Debian: apt-get install nodejs npm)" >&2; exit 1; }
done

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
OUT="$WORK/vendor"
mkdir -p "$OUT" "$WORK/tgz"

for pin in "${PINS[@]}"; do
  read -r pkg ver want <<<"$pin"
  dir="$WORK/pkg/$pkg"
  mkdir -p "$dir"
  tgz="$(cd "$WORK/tgz" && npm pack --silent "$pkg@$ver" | tail -n 1)"
  got="sha512-$(node -e 'const c=require("crypto"),f=require("fs");process.stdout.write(c.createHash("sha512").update(f.readFileSync(process.argv[1])).digest("base64"))' "$WORK/tgz/$tgz")"
  if [ "$got" != "$want" ]; then
    echo "error: $pkg@$ver: the tarball's integrity is $got, the pin says $want" >&2
    exit 1
  fi
  tar -xzf "$WORK/tgz/$tgz" -C "$dir"
  echo "$pkg@$ver: integrity ok"
done

for f in "${FILES[@]}"; do
  read -r pkg src dst <<<"$f"
  [ -f "$WORK/pkg/$pkg/$src" ] || { echo "error: $pkg has no $src" >&2; exit 1; }
  mkdir -p "$(dirname "$OUT/$dst")"
  cp "$WORK/pkg/$pkg/$src" "$OUT/$dst"
  chmod 0644 "$OUT/$dst"
done

# VERSIONS.json and LICENSES.md: written by node so that the bytes do not depend on the shell's locale
PINS_TEXT="$(printf '%s\n' "${PINS[@]}")" FILES_TEXT="$(printf '%s\n' "${FILES[@]}")" node - "$OUT" <<'EOF'
const fs = require("fs"), path = require("path"), crypto = require("crypto");
const out = process.argv[2];
const lines = (s) => s.split("\n").filter(Boolean).map((l) => l.split(" "));
const files = lines(process.env.FILES_TEXT);
const packages = lines(process.env.PINS_TEXT).map(([name, version, integrity]) => ({
  package: name, version, license: "MIT", integrity,
  tarball: `https://registry.npmjs.org/${name}/-/${name.split("/").pop()}-${version}.tgz`,
  files: files.filter(([p]) => p === name).map(([, from, to]) => ({
    from, path: to,
    sha256: crypto.createHash("sha256").update(fs.readFileSync(path.join(out, to))).digest("hex"),
  })),
}));
const doc = {
  schema: "twinstudio.viewer.vendor", version: 1,
  made_by: "scripts/vendor_viewer.sh",
  note: "files copied byte for byte from the npm tarballs; fflate is compiled into Spark's module (licence only)",
  packages,
};
fs.writeFileSync(path.join(out, "VERSIONS.json"), JSON.stringify(doc, null, 2) + "\n");
const md = [
  "# Third-party code in the bundle viewer",
  "",
  "All of it is MIT-licensed; the licence texts are in the files named below.",
  "Exact versions, npm integrity hashes and per-file sha256: VERSIONS.json.",
  "Re-create or update it with scripts/vendor_viewer.sh (never edit these files by hand).",
  "",
  "| package | version | licence | licence file | files |",
  "| --- | --- | --- | --- | --- |",
  ...packages.map((p) => {
    const lic = p.files.find((f) => f.path.endsWith("/LICENSE")).path;
    const code = p.files.filter((f) => !f.path.endsWith("/LICENSE")).map((f) => "`" + f.path + "`");
    return `| ${p.package} | ${p.version} | ${p.license} | \`${lic}\` | ${code.join(", ") || "compiled into Spark's module"} |`;
  }),
  "",
  "- three.js: https://github.com/mrdoob/three.js (Copyright © 2010-2026 three.js authors)",
  "- Spark: https://github.com/sparkjsdev/spark (Copyright © 2025 World Labs Technologies, Inc.)",
  "- fflate: https://github.com/101arrowz/fflate (Copyright (c) 2023 Arjun Barrett)",
  "",
];
fs.writeFileSync(path.join(out, "LICENSES.md"), md.join("\n"));
EOF

if [ "$check" = 1 ]; then
  if diff -r "$OUT" "$DEST" >/dev/null; then
    echo "vendor/ matches the pinned packages"
  else
    diff -rq "$OUT" "$DEST" >&2 || true
    echo "error: vendor/ differs from what the pins give; run $0 and commit" >&2
    exit 1
  fi
else
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  cp -r "$OUT" "$DEST"
  echo "wrote $DEST ($(find "$DEST" -type f | wc -l) files, $(du -sh "$DEST" | cut -f1))"
fi
