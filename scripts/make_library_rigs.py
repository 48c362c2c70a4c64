"""Write the rig files of rigs/library/ (run once; the TOML files are committed).

Every camera is listed explicitly, as a studio's rig file would; this script
only saves typing the geometry of rings and domes. Run:

    python scripts/make_library_rigs.py
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

LIB = Path(__file__).resolve().parents[1] / "rigs" / "library"


def fmt(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".") if x != 0 else "0.0"


def vec(v) -> str:
    return "[" + ", ".join(fmt(float(x)) for x in v) + "]"


def lights_block(lights: list[dict]) -> str:
    out = []
    for li in lights:
        out.append("[[lights]]")
        for k, v in li.items():
            if isinstance(v, str):
                out.append(f'{k} = "{v}"')
            elif isinstance(v, (list, tuple)):
                out.append(f"{k} = {vec(v)}")
            else:
                out.append(f"{k} = {v}")
        out.append("")
    return "\n".join(out)


VIRTUAL_LIGHTS = [
    {"id": "key", "kind": "softbox", "position": (-2.2, -2.4, 2.6), "power": 1.0},
    {"id": "fill", "kind": "softbox", "position": (2.6, -2.0, 2.2), "power": 0.8},
    {"id": "rim-l", "kind": "spot", "position": (-2.4, 2.4, 2.5), "power": 0.9},
    {"id": "rim-r", "kind": "spot", "position": (2.4, 2.4, 2.5), "power": 0.9},
    {"id": "top", "kind": "panel", "position": (0.0, 0.0, 3.6), "power": 0.8},
    {"id": "front", "kind": "softbox", "position": (0.0, -3.0, 1.4), "power": 0.7},
]

PRESETS = """[presets.flat]
levels = { key = 0.55, fill = 0.55, rim-l = 0.5, rim-r = 0.5, top = 0.5, front = 0.6 }

[presets.key-fill-rim]
levels = { key = 1.0, fill = 0.4, rim-l = 0.8, rim-r = 0.8 }

[presets.olat]
sequence = ["key", "fill", "rim-l", "rim-r", "top", "front"]
level = 1.0
"""


def virtual_camera(cid: str, pos, rng, res=(1280, 960), focal=14.0, sensor=(17.3, 12.975)) -> str:
    k1 = -0.06 + 0.02 * rng.standard_normal()
    k2 = 0.015 + 0.005 * rng.standard_normal()
    p = 0.0003 * rng.standard_normal(2)
    off = rng.uniform(-6, 6, 2)
    f = focal * (1 + 0.01 * rng.standard_normal())
    return "\n".join([
        "[[cameras]]",
        f'id = "{cid}"',
        'driver = "virtual"',
        f"resolution = [{res[0]}, {res[1]}]",
        f"focal_mm = {f:.3f}",
        f"sensor_mm = [{sensor[0]}, {sensor[1]}]",
        f"principal_offset_px = [{off[0]:.2f}, {off[1]:.2f}]",
        f"distortion = [{k1:.4f}, {k2:.4f}, {p[0]:.5f}, {p[1]:.5f}, 0.0]",
        f"position = {vec(pos)}",
        "",
    ])


def ring_24() -> str:
    rng = np.random.default_rng(24)
    head = """# 24 virtual cameras in three rings of 8 around a 2 m capture volume.
[rig]
name = "virtual-ring-24"
description = "Virtual studio: 24 cameras in three rings (0.4 m, 1.1 m, 1.9 m high), 6 lights"
version = 1

[volume]
center = [0.0, 0.0]
radius = 1.0
height = 2.0

[trigger]
timeout = "5 s"
retries = 2
backoff = "100 ms"
settle = "50 ms"

[motion]
fps = 24
frames = 24
preset = "flat"

# the board is walked through the whole volume: ~39 views per camera, spread over the
# image, so that every camera's principal point and rotation separate (see issue 4)
[calibration]
poses = 96
board = { squares = [10, 7], square = "14 cm", marker = "10.5 cm", dictionary = "DICT_5X5_100" }

[virtual]
seed = 7
noise_sigma = 1.5
backdrop_rgb = [0.10, 0.55, 0.18]

"""
    cams = []
    n = 0
    for z, phase in [(0.4, 0.0), (1.1, 22.5), (1.9, 11.25)]:
        for k in range(8):
            n += 1
            a = math.radians(phase + 45 * k - 90)
            pos = (3.0 * math.cos(a), 3.0 * math.sin(a), z)
            cams.append(virtual_camera(f"cam{n:02d}", pos, rng, focal=11.0))
    return head + "\n".join(cams) + "\n" + lights_block([{**li, "driver": "virtual"} for li in VIRTUAL_LIGHTS]) + PRESETS


def split_over_hosts(text: str, name: str, description: str, hosts: dict[str, str],
                     host_of: callable) -> str:
    """A rig's text spread over capture hosts: ``[[hosts]]`` after ``[rig]`` and ``host = ...`` on each camera.

    ``hosts`` maps host name -> description; ``host_of(n)`` names the host of the n-th camera (1-based).
    Everything else (geometry, lenses, noise) stays byte for byte the same as the single-host rig."""
    head, sep, rest = text.partition("\n[volume]")
    swap = {"name = ": f'name = "{name}"', "description = ": f'description = "{description}"'}
    head = "\n".join(next((v for k, v in swap.items() if ln.startswith(k)), ln) for ln in head.split("\n"))
    host_tables = "".join(f'\n[[hosts]]\nname = "{h}"\ndescription = "{d}"\n' for h, d in hosts.items())
    out, n = [], 0
    for line in (sep + rest).split("\n"):
        out.append(line)
        if line == "[[cameras]]":
            n += 1
        elif line.startswith("driver = ") and n and out[-3] == "[[cameras]]":
            out.append(f'host = "{host_of(n)}"')
    return head + host_tables + "\n".join(out)


def ring_24_two_hosts() -> str:
    """virtual-ring-24 over two capture PCs: cam01-12 on host "a", cam13-24 on host "b"."""
    text = ring_24().replace("# 24 virtual cameras in three rings of 8 around a 2 m capture volume.",
                             "# virtual-ring-24 spread over two capture hosts: cam01-12 on \"a\", cam13-24 on \"b\".")
    return split_over_hosts(text, "virtual-ring-24-2hosts",
                            "Virtual studio: virtual-ring-24 over two capture hosts (12 cameras each)",
                            {"a": "capture PC A: cam01-cam12", "b": "capture PC B: cam13-cam24"},
                            lambda n: "a" if n <= 12 else "b")


def dome_96() -> str:
    rng = np.random.default_rng(96)
    head = """# 96 virtual cameras on a dome (6 rings of elevations) around a 2 m capture volume.
[rig]
name = "virtual-dome-96"
description = "Virtual studio: 96 cameras on a 3.2 m dome, 6 lights"
version = 1

[volume]
radius = 1.0
height = 2.0

[motion]
fps = 30
frames = 30
preset = "flat"

[virtual]
seed = 96

"""
    cams = []
    n = 0
    rings = [(-5, 20), (10, 20), (25, 18), (40, 16), (55, 12), (72, 10)]
    assert sum(c for _, c in rings) == 96
    for i, (elev, count) in enumerate(rings):
        for k in range(count):
            n += 1
            a = math.radians(360 * k / count + 7 * i)
            e = math.radians(elev)
            r = 3.2
            pos = (r * math.cos(e) * math.cos(a), r * math.cos(e) * math.sin(a), 1.0 + r * math.sin(e))
            cams.append(virtual_camera(f"cam{n:02d}", pos, rng, res=(1024, 768), focal=12.0))
    return head + "\n".join(cams) + "\n" + lights_block([{**li, "driver": "virtual"} for li in VIRTUAL_LIGHTS]) + PRESETS


def studio_48() -> str:
    rng = np.random.default_rng(48)
    head = """# A tethered DSLR studio: 48 full-frame cameras (35 mm lenses, portrait
# orientation) in 12 columns of 4, each on its own USB port and identified by
# serial number; 8 LED fixtures on sACN universe 1 (2 channels each: dimmer,
# colour temperature).
[rig]
name = "studio-gphoto2-48"
description = "Tethered studio: 48 gphoto2 DSLRs (serial-addressed), 8 sACN fixtures"
version = 1

[volume]
radius = 0.9
height = 2.1

[trigger]
timeout = "8 s"
retries = 2
backoff = "500 ms"
stagger = "0 ms"
settle = "400 ms"

[motion]
fps = 5
frames = 20
preset = "flat"

[calibration]
poses = 40
board = { squares = [9, 6], square = "10 cm", marker = "7.5 cm", dictionary = "DICT_5X5_100" }

[profiles.body]
shutter = "1/200"
aperture = "f/11"
iso = 200
white_balance = "Flash"
image_format = "JPEG Fine"

[profiles.face]
shutter = "1/200"
aperture = "f/13"
iso = 200
white_balance = "Flash"
image_format = "JPEG Fine"

"""
    cams = []
    n = 0
    for col in range(12):
        a = math.radians(30 * col - 90)
        for row, z in enumerate([0.45, 1.0, 1.55, 2.1]):
            n += 1
            r = 3.0
            pos = (r * math.cos(a), r * math.sin(a), z)
            target = (0.0, 0.0, min(max(z, 0.6), 1.6))
            serial = f"{3020000 + int(rng.integers(10000, 99999))}"
            cams.append("\n".join([
                "[[cameras]]",
                f'id = "cam{n:02d}"',
                'driver = "gphoto2"',
                f'serial = "{serial}"',
                "resolution = [6000, 4000]",
                "focal_mm = 35.0",
                "sensor_mm = [35.9, 23.9]",
                f"position = {vec(pos)}",
                f"look_at = {vec(target)}",
                "roll_deg = 90.0",
                f'profile = "{"face" if row == 2 else "body"}"',
                "",
            ]))
    lights = []
    for i in range(8):
        a = math.radians(45 * i - 67.5)
        lights.append({"id": f"led{i + 1}", "driver": "sacn", "kind": "panel",
                       "position": (3.4 * math.cos(a), 3.4 * math.sin(a), 2.6),
                       "universe": 1, "channel": 1 + 2 * i, "channels": 2})
    presets = """[presets.flat]
levels = { led1 = 0.6, led2 = 0.6, led3 = 0.6, led4 = 0.6, led5 = 0.6, led6 = 0.6, led7 = 0.6, led8 = 0.6 }

[presets.key-fill-rim]
levels = { led1 = 1.0, led3 = 0.35, led5 = 0.8, led7 = 0.8 }

[presets.olat]
sequence = ["led1", "led2", "led3", "led4", "led5", "led6", "led7", "led8"]
level = 1.0
"""
    return head + "\n".join(cams) + "\n" + lights_block(lights) + presets


def webcams_4() -> str:
    head = """# Four USB webcams (UVC, through OpenCV) on tripods, for quick tests.
[rig]
name = "webcams-4"
description = "Four 1080p USB webcams through OpenCV"
version = 1

[volume]
radius = 0.6
height = 2.0

[trigger]
timeout = "2 s"
retries = 1

[motion]
fps = 30
frames = 60

"""
    cams = []
    for i in range(4):
        a = math.radians(90 * i - 90 + 45)
        pos = (2.2 * math.cos(a), 2.2 * math.sin(a), 1.4)
        cams.append("\n".join([
            "[[cameras]]",
            f'id = "cam{i + 1:02d}"',
            'driver = "opencv"',
            f"address = {i}",
            "resolution = [1920, 1080]",
            "focal_mm = 3.0",
            "sensor_mm = [5.6, 3.15]",
            f"position = {vec(pos)}",
            "",
        ]))
    return head + "\n".join(cams)


def main() -> None:
    LIB.mkdir(parents=True, exist_ok=True)
    for name, text in [("virtual-ring-24", ring_24()), ("virtual-ring-24-2hosts", ring_24_two_hosts()),
                       ("virtual-dome-96", dome_96()),
                       ("studio-gphoto2-48", studio_48()), ("webcams-4", webcams_4())]:
        (LIB / f"{name}.toml").write_text(text)
        print(f"wrote {LIB / name}.toml")


if __name__ == "__main__":
    main()
