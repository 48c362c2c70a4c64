"""Dense geometry at full size: the issue's figures for virtual-ring-24 (24 cameras, 1280x960).

    .venv/bin/python benchmarks/mesh.py [RENDER_DIR]

Renders the stills take once into RENDER_DIR (default /tmp/twinstudio-mesh-bench; reused when
it holds a render), meshes frame 0 with the exact cameras and keyed masks, and prints one line
per figure: seconds (target <= 60), chamfer_mm (<= 5), fscore at 5 mm (>= 0.9), vertices.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

# benchmarks/reconstruct.py would shadow the package when run as a script: the repository goes first
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reconstruct.mesh import MeshOptions, run_mesh
from rigs.virtual.render import RenderOptions, run_render


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(tempfile.gettempdir()) / "twinstudio-mesh-bench"
    if not (root / "render.json").is_file():
        t = time.perf_counter()
        run_render("virtual-ring-24", root, RenderOptions(takes=("stills",)))
        print(f"render_seconds {time.perf_counter() - t:.1f}")
    out = root / "mesh-bench"
    t = time.perf_counter()
    rep = run_mesh(root, root / "gt" / "cameras.json", out, options=MeshOptions())
    wall = time.perf_counter() - t
    g = rep.scores or {}
    print(f"seconds {rep.seconds:.1f}")
    print(f"chamfer_mm {g.get('chamfer_mm', float('nan')):.3f}")
    print(f"fscore {g.get('fscore', float('nan')):.4f}")
    print(f"precision {g.get('precision', float('nan')):.4f}")
    print(f"recall {g.get('recall', float('nan')):.4f}")
    print(f"vertices {rep.vertices}")
    print(f"triangles {rep.triangles}")
    print(f"watertight {rep.watertight}")
    print(f"wall_seconds_with_scoring {wall:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
