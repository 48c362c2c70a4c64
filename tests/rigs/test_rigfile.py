"""Rig files: the library rigs, the errors broken rigs raise, and volume coverage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rigs.coverage import Coverage, coverage_warnings, volume_coverage
from rigs.errors import RigError
from rigs.rigfile import Rig, library_rigs, load_rig, parse_rig

LIBRARY = {p.stem: p for p in library_rigs()}


@pytest.fixture(scope="module")
def rigs() -> dict[str, Rig]:
    return {name: load_rig(path) for name, path in LIBRARY.items()}


# --------------------------------------------------------------------------- library rigs


def test_library_has_the_expected_rigs() -> None:
    assert {"virtual-ring-24", "virtual-dome-96", "studio-gphoto2-48", "webcams-4"} <= set(LIBRARY)


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_rig_loads_with_unique_ids(name: str, rigs: dict[str, Rig]) -> None:
    rig = rigs[name]
    assert rig.name == name
    ids = [c.id for c in rig.cameras]
    assert len(ids) == len(set(ids)) > 0
    light_ids = [light.id for light in rig.lights]
    assert len(light_ids) == len(set(light_ids))
    assert load_rig(name).name == name  # a library rig can be named instead of a path


@pytest.mark.parametrize("name", sorted(n for n in LIBRARY if n.startswith("virtual-")))
def test_virtual_rig_cameras_all_see_the_volume(name: str, rigs: dict[str, Rig]) -> None:
    rig = rigs[name]
    assert rig.is_virtual
    for cam in rig.cameras:
        uv, z = cam.project(rig.volume.focus[None])
        w, h = cam.intrinsics.width, cam.intrinsics.height
        assert z[0] > 0 and 0 <= uv[0, 0] < w and 0 <= uv[0, 1] < h, cam.id
        # most of the volume (its surface rings and axis, floor to top) is in the picture
        uv, z = cam.project(rig.volume.sample_points())
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < w) & (uv[:, 1] >= 0) & (uv[:, 1] < h)
        assert inside.mean() >= 0.75, (cam.id, inside.mean())


def test_ring_24(rigs: dict[str, Rig]) -> None:
    rig = rigs["virtual-ring-24"]
    assert len(rig.cameras) == 24
    heights = np.round([c.pose.center[2] for c in rig.cameras], 3)
    rings, per_ring = np.unique(heights, return_counts=True)
    assert rings.tolist() == [0.4, 1.1, 1.9] and per_ring.tolist() == [8, 8, 8]
    assert len(rig.lights) == 6
    assert list(rig.presets) == ["flat", "key-fill-rim", "olat"]
    steps = rig.preset_steps("olat")
    assert len(steps) == 6
    assert [s.name for s in steps] == [f"olat-{light.id}" for light in rig.lights]
    for step in steps:
        assert sorted(step.levels.values()) == [0.0] * 5 + [1.0]  # one light at a time
    flat = rig.preset_steps("flat")
    assert len(flat) == 1 and set(flat[0].levels) == {light.id for light in rig.lights}
    assert len(rig.preset_steps()) == 1 + 1 + 6
    assert rig.motion.fps == 24
    assert rig.motion_preset == "flat"
    assert rig.trigger.backoff == pytest.approx(0.1)  # "100 ms"
    assert rig.calibration.board.square == pytest.approx(0.14)  # "14 cm"


def test_studio_gphoto2_48(rigs: dict[str, Rig]) -> None:
    rig = rigs["studio-gphoto2-48"]
    specs = rig.camera_specs
    assert len(specs) == 48
    assert {c.driver for c in specs} == {"gphoto2"}
    serials = [c.serial for c in specs]
    assert all(serials) and len(set(serials)) == 48
    profiles = rig.model.profiles
    assert profiles and all(c.profile in profiles for c in specs)
    assert not rig.is_virtual
    assert rig.lights and {light.driver for light in rig.lights} == {"sacn"}
    used: set[tuple[int, int]] = set()
    for light in rig.lights:
        assert light.universe is not None and light.channel is not None
        footprint = {(light.universe, ch) for ch in range(light.channel, light.channel + light.channels)}
        assert not footprint & used, light.id
        used |= footprint


def test_webcams_4(rigs: dict[str, Rig]) -> None:
    rig = rigs["webcams-4"]
    assert len(rig.camera_specs) == 4
    assert {c.driver for c in rig.camera_specs} == {"opencv"}
    assert [c.address for c in rig.camera_specs] == [0, 1, 2, 3]


def test_ring_24_two_hosts_is_ring_24_split(rigs: dict[str, Rig]) -> None:
    split, whole = rigs["virtual-ring-24-2hosts"], rigs["virtual-ring-24"]
    assert split.hosts == ["a", "b"] and whole.hosts == [] and whole.cameras_by_host() == {}
    assert split.cameras_by_host() == {"a": [f"cam{n:02d}" for n in range(1, 13)],
                                       "b": [f"cam{n:02d}" for n in range(13, 25)]}
    # the same cameras, lights and presets: only the hosts differ
    assert all(c.host is None for c in whole.camera_specs)
    assert [c.model_dump(exclude={"host"}) for c in split.camera_specs] == \
        [c.model_dump(exclude={"host"}) for c in whole.camera_specs]
    assert split.lights == whole.lights and split.presets == whole.presets


def test_dome_96(rigs: dict[str, Rig]) -> None:
    rig = rigs["virtual-dome-96"]
    assert len(rig.cameras) == 96
    assert rig.is_virtual


# --------------------------------------------------------------------------- broken rigs

#: A small valid rig. Each broken case below edits it; the line marked ``# <-``
#: in the edited text is the line the RigError must name.
BASE = """\
[rig]
name = "tiny"
version = 1

[volume]
center = [0.0, 0.0]
radius = 0.8
height = 2.0

[trigger]
timeout = "5 s"
backoff = "200 ms"

[motion]
fps = 24
frames = 12
preset = "flat"

[profiles.body]
shutter = "1/200"

[[cameras]]
id = "front"
driver = "virtual"
resolution = [640, 480]
focal_mm = 8.0
sensor_mm = [7.2, 5.4]
position = [0.0, -3.0, 1.0]

[[cameras]]
id = "side"
driver = "gphoto2"
serial = "A100"
profile = "body"
resolution = [800, 600]
focal_mm = 10.0
sensor_mm = [7.2, 5.4]
position = [3.0, 0.0, 1.0]
look_at = [0.0, 0.0, 1.0]

[[lights]]
id = "key"
driver = "sacn"
position = [-2.0, -2.0, 2.5]
universe = 1
channel = 1
channels = 4

[[lights]]
id = "fill"
driver = "sacn"
position = [2.0, -2.0, 2.5]
universe = 1
channel = 5

[presets.flat]
levels = { key = 0.6, fill = 0.6 }

[presets.olat]
sequence = ["key", "fill"]
"""


#: two capture hosts, put in front of BASE (top-level arrays of tables may come first)
HOSTS = '[[hosts]]\nname = "a"\ndescription = "left PC"\n\n[[hosts]]\nname = "b"\n\n'


def edit(*pairs: tuple[str, str]) -> str:
    """BASE with each ``old`` (which must occur exactly once) replaced by ``new``."""
    text = BASE
    for old, new in pairs:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in BASE"
        text = text.replace(old, new)
    return text


def marked_line(text: str) -> int:
    """1-based number of the one line marked ``# <-``."""
    marked = [n for n, line in enumerate(text.splitlines(), start=1) if "# <-" in line]
    assert len(marked) == 1, marked
    return marked[0]


# (case id, rig text, dotted key or None, phrase of the reason)
BROKEN = [
    ("unknown-top-level-key",
     'studio = "A"  # <-\n' + BASE,
     "studio", "unknown key 'studio'"),
    ("unknown-top-level-table",
     BASE + '\n[lenses]  # <-\nwide = "14 mm"\n',
     "lenses", "unknown key 'lenses'"),
    ("unknown-camera-key",
     edit(('position = [0.0, -3.0, 1.0]', 'position = [0.0, -3.0, 1.0]\nzoom = 2  # <-')),
     "cameras[0](id=front).zoom", "unknown key 'zoom'"),
    ("unknown-light-key",
     edit(("channels = 4", 'channels = 4\ncolour = "red"  # <-')),
     "lights[0].colour", "unknown key 'colour'"),
    ("resolution-as-string",
     edit(("resolution = [800, 600]", 'resolution = "800x600"  # <-')),
     "cameras[1](id=side).resolution", "valid tuple"),
    ("wrong-unit-kg",
     BASE + '\n[calibration.board]\nsquare = "8 kg"  # <-\n',
     "calibration.board.square", "wrong unit 'kg' for a length"),
    ("wrong-unit-inline-table",
     BASE + '\n[calibration]\nboard = { square = "8 cm", marker = "6 sec" }  # <-\n',
     "calibration.board.marker", "wrong unit 'sec' for a length"),
    ("wrong-unit-duration",
     edit(('timeout = "5 s"', 'timeout = "5 m"  # <-')),
     "trigger.timeout", "wrong unit 'm' for a duration"),
    ("millimetres-for-metres",
     edit(("position = [0.0, -3.0, 1.0]", "position = [0, -2800, 600]  # <-")),
     "cameras[0](id=front).position[1]", "-2800 m is implausible"),
    ("duplicate-camera-id",
     edit(('id = "side"', 'id = "front"  # <-')),
     "cameras[1](id=front).id", "duplicate camera id 'front'"),
    ("unknown-camera-driver",
     edit(('driver = "virtual"', 'driver = "webcam"  # <-')),
     "cameras[0](id=front).driver", "unknown camera driver 'webcam'"),
    ("unknown-light-driver",
     edit(('id = "fill"\ndriver = "sacn"', 'id = "fill"\ndriver = "artnet"  # <-')),
     "lights[1].driver", "unknown light driver 'artnet'"),
    ("camera-looks-away",
     edit(("look_at = [0.0, 0.0, 1.0]", "look_at = [6.0, 0.0, 1.0]  # <-")),
     "cameras[1](id=side).look_at", "does not see the capture volume"),
    ("camera-too-far-aside",
     edit(("position = [0.0, -3.0, 1.0]", "position = [0.0, -3.0, 1.0]\nlook_at = [3.0, 0.0, 1.0]  # <-")),
     "cameras[0](id=front).look_at", "does not see the capture volume"),
    ("dmx-footprints-overlap",
     edit(("channel = 5", "channel = 3  # <-")),
     "lights[1].channel", "channel 3 is already used by light 'key'"),
    ("dmx-same-start-channel",
     edit(("channel = 5", "channel = 1  # <-")),
     "lights[1].channel", "channel 1 is already used by light 'key'"),
    ("duplicate-light-id",
     edit(('id = "fill"', 'id = "key"  # <-')),
     "lights[1].id", "duplicate light id 'key'"),
    ("sacn-light-without-universe",
     edit(("[[lights]]\nid = \"fill\"", '[[lights]]  # <-\nid = "fill"'), ("universe = 1\nchannel = 5\n", "")),
     "lights[1]", "needs 'universe' and 'channel'"),
    ("preset-levels-missing-light",
     edit(("levels = { key = 0.6, fill = 0.6 }", "levels = { key = 0.6, back = 0.6 }  # <-")),
     "presets.flat.levels.back", "names light 'back', which is not in [[lights]]"),
    ("preset-level-out-of-range",
     edit(("levels = { key = 0.6, fill = 0.6 }", "levels = { key = 0.6, fill = 1.5 }  # <-")),
     "presets.flat.levels.fill", "less than or equal to 1"),
    ("preset-sequence-missing-light",
     edit(('sequence = ["key", "fill"]', 'sequence = ["key", "back"]  # <-')),
     "presets.olat.sequence[1]", "names light 'back'"),
    ("preset-levels-and-sequence",
     edit(("[presets.olat]", "[presets.olat]  # <-\nlevels = { key = 1.0 }")),
     "presets.olat", "exactly one of 'levels' or 'sequence'"),
    ("missing-rig-name",
     edit(("[rig]\nname = \"tiny\"\n", "[rig]  # <-\n")),
     "rig.name", "missing required key 'name'"),
    ("missing-camera-position",
     edit(('[[cameras]]\nid = "front"', '[[cameras]]  # <-\nid = "front"'), ("position = [0.0, -3.0, 1.0]\n", "")),
     "cameras[0](id=front).position", "missing required key 'position'"),
    ("invalid-toml",
     edit(("frames = 12", "frames = twelve  # <-")),
     None, "not valid TOML"),
    ("unsupported-version",
     edit(("version = 1", "version = 2  # <-")),
     "rig.version", "rig schema version 2 is not supported"),
    ("gphoto2-without-serial",
     edit(('[[cameras]]\nid = "side"', '[[cameras]]  # <-\nid = "side"'), ('serial = "A100"\n', "")),
     "cameras[1](id=side)", "needs a 'serial' or a USB 'address'"),
    ("undefined-settings-profile",
     edit(('profile = "body"', 'profile = "face"  # <-')),
     "cameras[1](id=side).profile", "settings profile 'face' is not defined"),
    ("undefined-motion-preset",
     edit(('preset = "flat"', 'preset = "dance"  # <-')),
     "motion.preset", "motion preset 'dance' is not defined"),
    ("camera-names-undeclared-host",
     HOSTS + edit(('id = "side"', 'id = "side"\nhost = "c"  # <-'),
                  ('driver = "virtual"', 'driver = "virtual"\nhost = "a"')),
     "cameras[1](id=side).host", "camera 'side' names host 'c', which is not in [[hosts]] (declared: a, b)"),
    ("camera-names-host-without-hosts",
     edit(('id = "side"', 'id = "side"\nhost = "a"  # <-')),
     "cameras[1](id=side).host", "names host 'a', which is not in [[hosts]] (declared: none"),
    ("camera-without-host-where-hosts-declared",
     HOSTS + edit(('[[cameras]]\nid = "side"', '[[cameras]]  # <-\nid = "side"'),
                  ('driver = "virtual"', 'driver = "virtual"\nhost = "a"')),
     "cameras[1](id=side)", "camera 'side' names no host; a rig with [[hosts]] needs 'host' on every camera"),
    ("light-names-undeclared-host",
     HOSTS + edit(('driver = "virtual"', 'driver = "virtual"\nhost = "a"'), ('id = "side"', 'id = "side"\nhost = "b"'),
                  ('id = "fill"', 'id = "fill"\nhost = "z"  # <-')),
     "lights[1].host", "light 'fill' names host 'z', which is not in [[hosts]]"),
    ("duplicate-host-name",
     '[[hosts]]\nname = "a"\n\n[[hosts]]\nname = "a"  # <-\n' + BASE,
     "hosts[1].name", "duplicate host name 'a'"),
    ("host-name-not-an-identifier",
     '[[hosts]]\nname = "pc 1"  # <-\n' + BASE,
     "hosts[0].name", "should match pattern"),
    ("host-without-name",
     '[[hosts]]  # <-\ndescription = "the left PC"\n' + BASE,
     "hosts[0].name", "missing required key 'name'"),
    ("unknown-host-key",
     '[[hosts]]\nname = "a"\naddress = "10.0.0.5"  # <-\n' + BASE,
     "hosts[0].address", "unknown key 'address'"),
    ("marker-not-smaller-than-square",
     BASE + '\n[calibration.board]\nsquare = "5 cm"\nmarker = "6 cm"  # <-\n',
     "calibration.board.marker", "marker must be smaller than the square"),
]


def test_base_rig_is_valid() -> None:
    rig = parse_rig(BASE, "tiny.toml")
    assert [c.id for c in rig.cameras] == ["front", "side"]
    assert rig.trigger.backoff == pytest.approx(0.2)
    assert [s.name for s in rig.preset_steps()] == ["flat", "olat-key", "olat-fill"]


@pytest.mark.parametrize("text, key, phrase", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_rig(text: str, key: str | None, phrase: str) -> None:
    with pytest.raises(RigError) as ei:
        parse_rig(text, "broken.toml")
    err = ei.value
    assert err.key == key
    assert err.line == marked_line(text)
    assert phrase in err.reason
    assert err.path == Path("broken.toml")


def test_hosts_are_optional_and_each_camera_and_light_names_its_host() -> None:
    assert parse_rig(BASE).hosts == []  # no [[hosts]]: a single-host rig, as ever
    rig = parse_rig(HOSTS + edit(('driver = "virtual"', 'driver = "virtual"\nhost = "b"'),
                                 ('id = "side"', 'id = "side"\nhost = "a"'),
                                 ('id = "key"', 'id = "key"\nhost = "a"')))
    assert rig.hosts == ["a", "b"] and rig.model.hosts[0].description == "left PC"
    assert rig.cameras_by_host() == {"a": ["side"], "b": ["front"]}
    assert [(light.id, light.host) for light in rig.lights] == [("key", "a"), ("fill", None)]


def test_host_errors_name_the_camera_or_light() -> None:
    with pytest.raises(RigError) as ei:
        parse_rig(HOSTS + edit(('driver = "virtual"', 'driver = "virtual"\nhost = "a"')))
    assert ei.value.camera == "side"
    with pytest.raises(RigError) as ei:
        parse_rig(edit(('id = "key"', 'id = "key"\nhost = "a"')))
    assert ei.value.light == "key"


def test_rig_error_names_camera_and_light() -> None:
    with pytest.raises(RigError) as ei:
        parse_rig(edit(('profile = "body"', 'profile = "face"')))
    assert ei.value.camera == "side"
    with pytest.raises(RigError) as ei:
        parse_rig(edit(("channel = 5", "channel = 3")))
    assert ei.value.light == "fill"


def test_error_message_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "studio-b.toml"
    text = edit(('driver = "virtual"', 'driver = "webcam"  # <-'))
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RigError) as ei:
        load_rig(path)
    msg = str(ei.value)
    line = marked_line(text)
    assert str(path) in msg
    assert f"studio-b.toml:{line}" in msg
    assert "[cameras[0](id=front).driver]" in msg
    assert "unknown camera driver 'webcam'" in msg
    assert ei.value.exit_code == 2


def test_missing_rig_file_names_library_rigs(tmp_path: Path) -> None:
    with pytest.raises(RigError, match="virtual-ring-24"):
        load_rig(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("value, seconds", [('"200 ms"', 0.2), ('"5 s"', 5.0), ("3", 3.0), ("0.25", 0.25),
                                            ('"1 min"', 60.0), ('"1500us"', 0.0015)])
def test_duration_strings(value: str, seconds: float) -> None:
    rig = parse_rig(edit(('backoff = "200 ms"', f"backoff = {value}")))
    assert rig.trigger.backoff == pytest.approx(seconds)


@pytest.mark.parametrize("value, metres", [('"120 cm"', 1.2), ('"800 mm"', 0.8), ('"1.5 m"', 1.5),
                                           ("0.9", 0.9), ('"95cm"', 0.95)])
def test_length_strings(value: str, metres: float) -> None:
    rig = parse_rig(edit(("radius = 0.8", f"radius = {value}")))
    assert rig.volume.radius == pytest.approx(metres)


def test_length_strings_in_vectors() -> None:
    rig = parse_rig(edit(("position = [0.0, -3.0, 1.0]", 'position = [0, "-300 cm", "1000 mm"]')))
    np.testing.assert_allclose(rig.cameras[0].pose.center, [0.0, -3.0, 1.0], atol=1e-12)


# --------------------------------------------------------------------------- coverage


def test_coverage_shape_and_edges(rigs: dict[str, Rig]) -> None:
    cov = volume_coverage(rigs["virtual-ring-24"], n_height=4, n_azimuth=8)
    assert isinstance(cov, Coverage)
    assert cov.counts.shape == (4, 8) and cov.counts.dtype.kind == "i"
    np.testing.assert_allclose(cov.band_edges_m, [0.0, 0.5, 1.0, 1.5, 2.0])
    np.testing.assert_allclose(cov.sector_edges_deg, np.arange(0, 361, 45))
    assert cov.min_count == cov.counts.min()
    assert len(cov.cameras_per_cell) == 4 and all(len(band) == 8 for band in cov.cameras_per_cell)
    for i in range(4):
        for j in range(8):
            assert len(cov.cameras_per_cell[i][j]) == cov.counts[i, j]


@pytest.mark.parametrize("name", ["virtual-ring-24", "virtual-dome-96", "studio-gphoto2-48"])
def test_rigs_see_every_cell_with_three_cameras(name: str, rigs: dict[str, Rig]) -> None:
    cov = volume_coverage(rigs[name])
    assert cov.min_count >= 3, cov.counts
    assert coverage_warnings(cov) == []


ONE_SIDE = """\
[rig]
name = "one-side"

[volume]
radius = 0.5
height = 2.0

[[cameras]]
id = "camA"
driver = "virtual"
resolution = [1200, 1600]
focal_mm = 6.0
sensor_mm = [7.2, 9.6]
position = [-0.3, -3.0, 1.0]

[[cameras]]
id = "camB"
driver = "virtual"
resolution = [1200, 1600]
focal_mm = 6.0
sensor_mm = [7.2, 9.6]
position = [0.3, -3.0, 1.0]
"""


def test_two_cameras_on_one_side() -> None:
    rig = parse_rig(ONE_SIDE, "one-side.toml")
    cov = volume_coverage(rig, n_height=2, n_azimuth=8)
    # the cameras stand at azimuth 264 and 276 degrees: only the sectors 225-270 and 270-315 face
    # both of them whole; every other sector is seen by neither
    assert cov.counts.tolist() == [[0, 0, 0, 0, 0, 2, 2, 0]] * 2
    assert cov.cameras_per_cell[1][5] == ["camA", "camB"]
    assert cov.min_count == 0

    blind = coverage_warnings(cov, min_views=1)
    assert len(blind) == 12
    assert blind[:3] == [
        "z 0.0–1.0 m, azimuth 0–45°: seen by 0 cameras",
        "z 0.0–1.0 m, azimuth 45–90°: seen by 0 cameras",
        "z 0.0–1.0 m, azimuth 90–135°: seen by 0 cameras",
    ]
    assert "z 1.0–2.0 m, azimuth 315–360°: seen by 0 cameras" in blind
    assert not any("225–270" in w or "270–315" in w for w in blind)
    all_cells = coverage_warnings(cov)  # min_views=3: every cell is under-covered
    assert len(all_cells) == 16
    assert "z 0.0–1.0 m, azimuth 225–270°: seen by 2 cameras (camA, camB)" in all_cells


def test_coverage_warning_names_a_single_camera() -> None:
    rig = parse_rig(ONE_SIDE.replace("position = [0.3, -3.0, 1.0]", "position = [2.0, -2.2, 1.0]"),
                    "one-side.toml")
    cov = volume_coverage(rig, n_height=1, n_azimuth=16)
    lines = coverage_warnings(cov)
    assert any(line.endswith("seen by 1 camera (camA)") for line in lines)
    assert any(line.endswith("seen by 1 camera (camB)") for line in lines)
    assert any(line.endswith("seen by 2 cameras (camA, camB)") for line in lines)
    assert "azimuth 22.5–45°" in lines[1]  # fractional sector edges


def _reference_coverage(rig: Rig, n_height: int, n_azimuth: int, per_side: int = 4,
                        min_fraction: float = 0.9) -> np.ndarray:
    """Plain loops, one point at a time: the definition volume_coverage implements."""
    vol = rig.volume
    counts = np.zeros((n_height, n_azimuth), dtype=int)
    for i in range(n_height):
        z0, z1 = i * vol.height / n_height, (i + 1) * vol.height / n_height
        for j in range(n_azimuth):
            a0, a1 = 2 * np.pi * j / n_azimuth, 2 * np.pi * (j + 1) / n_azimuth
            for cam in rig.cameras:
                seen = 0
                for z in np.linspace(z0, z1, per_side):
                    for a in np.linspace(a0, a1, per_side):
                        n = np.array([np.cos(a), np.sin(a), 0.0])
                        p = np.array([vol.center[0], vol.center[1], z]) + vol.radius * n
                        uv, depth = cam.project(p[None])
                        w, h = cam.intrinsics.width, cam.intrinsics.height
                        inside = -0.5 <= uv[0, 0] < w - 0.5 and -0.5 <= uv[0, 1] < h - 0.5
                        facing = n @ (cam.pose.center - p) > 0
                        seen += bool(depth[0] > 0 and inside and facing)
                counts[i, j] += seen / per_side**2 >= min_fraction
    return counts


@pytest.mark.parametrize("name", ["virtual-ring-24", "webcams-4"])
def test_coverage_matches_reference(name: str, rigs: dict[str, Rig]) -> None:
    rig = rigs[name]
    cov = volume_coverage(rig, n_height=3, n_azimuth=6)
    np.testing.assert_array_equal(cov.counts, _reference_coverage(rig, 3, 6))


def test_coverage_rejects_bad_arguments(rigs: dict[str, Rig]) -> None:
    with pytest.raises(ValueError):
        volume_coverage(rigs["webcams-4"], n_height=0)
    with pytest.raises(ValueError):
        volume_coverage(rigs["webcams-4"], min_fraction=0.0)


def test_coverage_ignores_points_folded_into_the_image_by_distortion() -> None:
    """Strong barrel distortion maps points far outside the view back into the image."""
    from rigs.coverage import _visible
    from rigs.geometry import Camera, Intrinsics, look_at

    intr = Intrinsics(640, 480, 500.0, 500.0, 319.5, 239.5, (-0.3, 0.0, 0.0, 0.0, 0.0))
    cam = Camera("wide", intr, look_at(np.array([0.0, -3.0, 1.0]), np.array([0.0, 0.0, 1.0])))
    # 58 degrees off the axis (normalised radius 1.6): the polynomial sends it to radius 0.37
    far_off = np.array([[1.6 * 3.0, 0.0, 1.0]])
    uv, z = cam.project(far_off)
    assert z[0] > 0 and 0 <= uv[0, 0] < 640  # the naive test would call it visible
    facing = np.array([[0.0, -1.0, 0.0]])
    near = np.array([[0.1, 0.0, 1.0]])
    assert _visible(cam, np.vstack([far_off, near]), np.vstack([facing, facing])).tolist() == [False, True]
