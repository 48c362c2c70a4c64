"""Colour-difference figures: CIEDE2000 against Sharma et al.'s table, sRGB -> L*a*b*, masks, green rim."""

from __future__ import annotations

import numpy as np
import pytest

from rigs.errors import ShapeError
from train.colour import (
    SRGB_TO_XYZ,
    backdrop_excess,
    ciede2000,
    delta_e_srgb,
    mean_delta_e,
    srgb_to_lab,
)

# Table 1 of G. Sharma, W. Wu, E. N. Dalal (2005), "The CIEDE2000 color-difference formula:
# implementation notes, supplementary test data, and mathematical observations":
# L1, a1, b1, L2, a2, b2, ΔE00 (kL = kC = kH = 1), all 34 pairs.
SHARMA_2005 = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]
_TABLE = np.array(SHARMA_2005)
_LAB1, _LAB2, _DE = _TABLE[:, 0:3], _TABLE[:, 3:6], _TABLE[:, 6]


def test_sharma_table_is_complete():
    assert _TABLE.shape == (34, 7)


@pytest.mark.parametrize("row", range(34))
def test_ciede2000_matches_sharma_pair(row):
    got = ciede2000(_LAB1[row], _LAB2[row])
    assert np.shape(got) == ()
    assert abs(float(got) - _DE[row]) <= 1e-4, (row + 1, float(got), _DE[row])


def test_ciede2000_vectorised_over_the_table_and_extra_axes():
    got = ciede2000(_LAB1, _LAB2)
    assert got.shape == (34,) and got.dtype == np.float64
    np.testing.assert_allclose(got, _DE, rtol=0, atol=1e-4)
    got2 = ciede2000(_LAB1.reshape(2, 17, 3), _LAB2.reshape(2, 17, 3))
    assert got2.shape == (2, 17)
    np.testing.assert_array_equal(got2.ravel(), got)
    # broadcasting one colour against many
    many = ciede2000(np.broadcast_to(_LAB1[0], (4, 3)), _LAB2[:4])
    np.testing.assert_array_equal(ciede2000(_LAB1[0], _LAB2[:4]), many)


def test_ciede2000_half_turn_boundary_pairs_either_order():
    # pairs 9-15 straddle |h'1 - h'2| = 180 degrees; 10 and 14 sit exactly on it (the "<= 180" side)
    for row in range(8, 15):
        assert abs(float(ciede2000(_LAB2[row], _LAB1[row])) - _DE[row]) <= 1e-4, row + 1


def test_ciede2000_is_symmetric():
    np.testing.assert_allclose(ciede2000(_LAB2, _LAB1), ciede2000(_LAB1, _LAB2), rtol=0, atol=1e-12)
    rng = np.random.default_rng(7)
    x = np.column_stack([rng.uniform(0, 100, 2000), rng.uniform(-128, 128, (2000, 2))])
    y = np.column_stack([rng.uniform(0, 100, 2000), rng.uniform(-128, 128, (2000, 2))])
    np.testing.assert_allclose(ciede2000(x, y), ciede2000(y, x), rtol=0, atol=1e-12)
    assert np.all(np.isfinite(ciede2000(x, y))) and np.all(ciede2000(x, y) > 0)


def test_ciede2000_zero_for_identical_colours():
    rng = np.random.default_rng(3)
    x = np.column_stack([rng.uniform(0, 100, 500), rng.uniform(-128, 128, (500, 2))])
    x = np.vstack([x, [[0, 0, 0], [100, 0, 0], [50, 0, 0], [50, 0, -0.0], [50, -3, 0]]])
    np.testing.assert_array_equal(ciede2000(x, x), 0.0)
    np.testing.assert_array_equal(ciede2000(_LAB1, _LAB1), 0.0)


def test_ciede2000_parametric_weights():
    light, dark = np.array([80.0, 5.0, 5.0]), np.array([50.0, 5.0, 5.0])  # a pure lightness difference
    assert ciede2000(light, dark, kL=2) == pytest.approx(ciede2000(light, dark) / 2, rel=1e-12)
    # kC and kH do not touch a pure lightness difference
    assert ciede2000(light, dark, kC=3, kH=5) == pytest.approx(ciede2000(light, dark), rel=1e-12)


def test_ciede2000_refuses_a_wrong_last_axis():
    with pytest.raises(ShapeError):
        ciede2000(np.zeros((4, 2)), np.zeros((4, 2)))
    with pytest.raises(ShapeError):
        ciede2000(np.zeros(3), 5.0)


def test_srgb_to_lab_white_black_and_primaries():
    np.testing.assert_allclose(srgb_to_lab(np.ones(3)), [100.0, 0.0, 0.0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab(np.zeros(3)), [0.0, 0.0, 0.0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], rtol=0, atol=0.01)
    np.testing.assert_allclose(srgb_to_lab(np.array([0.0, 1.0, 0.0])), [87.73, -86.18, 83.18], rtol=0, atol=0.01)
    np.testing.assert_allclose(srgb_to_lab(np.array([0.0, 0.0, 1.0])), [32.30, 79.19, -107.86], rtol=0, atol=0.01)
    # grey is neutral: a* = b* = 0 at every level; 18% grey in sRGB (118/255) is near L* 50
    grey = srgb_to_lab(np.repeat(np.linspace(0, 1, 11)[:, None], 3, axis=1))
    np.testing.assert_allclose(grey[:, 1:], 0.0, atol=1e-9)
    assert np.all(np.diff(grey[:, 0]) > 0)
    assert srgb_to_lab(np.full(3, 119 / 255))[0] == pytest.approx(50.0, abs=0.5)


def test_srgb_matrix_is_the_iec_matrix():
    iec = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    np.testing.assert_array_equal(np.round(SRGB_TO_XYZ, 4), iec)


def test_srgb_to_lab_shapes_dtype_and_clipping():
    img = np.random.default_rng(1).uniform(0, 1, (5, 7, 3)).astype(np.float32)
    lab = srgb_to_lab(img)
    assert lab.shape == (5, 7, 3) and lab.dtype == np.float64
    np.testing.assert_allclose(lab[2, 3], srgb_to_lab(img[2, 3].astype(np.float64)), atol=1e-12)
    # out-of-range floats are clipped, as a display would show them
    np.testing.assert_array_equal(srgb_to_lab(np.array([1.2, -0.1, 0.5])), srgb_to_lab(np.array([1.0, 0.0, 0.5])))
    with pytest.raises(ShapeError):
        srgb_to_lab(np.full((2, 2, 3), 255, np.uint8))   # 8-bit must be divided by 255 first
    with pytest.raises(ShapeError):
        srgb_to_lab(np.zeros((2, 2, 4)))


def test_delta_e_srgb():
    a = np.array([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    np.testing.assert_array_equal(delta_e_srgb(a, a), 0.0)
    np.testing.assert_allclose(delta_e_srgb(a, a[::-1]), ciede2000(srgb_to_lab(a), srgb_to_lab(a[::-1])))
    # one 8-bit step on a mid grey is below a just-noticeable difference; black vs white is the maximum ~100
    assert 0 < delta_e_srgb(np.full(3, 128 / 255), np.full(3, 129 / 255)) < 1
    assert delta_e_srgb(np.zeros(3), np.ones(3)) == pytest.approx(100.0, abs=1e-3)


def test_mean_delta_e_over_a_mask():
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 1, (6, 8, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    per_pixel = delta_e_srgb(a, b)
    assert mean_delta_e(a, b) == pytest.approx(per_pixel.mean(), rel=1e-12)
    mask = np.zeros((6, 8), bool)
    mask[1:3, 2:6] = True
    got = mean_delta_e(a, b, mask)
    assert isinstance(got, float)
    assert got == pytest.approx(per_pixel[mask].mean(), rel=1e-12)
    assert mean_delta_e(a, a, mask) == 0.0


def test_mean_delta_e_empty_selection_is_none():
    a = np.full((4, 4, 3), 0.3)
    b = np.full((4, 4, 3), 0.6)
    assert mean_delta_e(a, b, np.zeros((4, 4), bool)) is None
    assert mean_delta_e(np.zeros((0, 3)), np.zeros((0, 3))) is None


def test_mean_delta_e_refuses_mismatched_shapes():
    a = np.zeros((4, 4, 3))
    with pytest.raises(ShapeError):
        mean_delta_e(a, np.zeros((4, 5, 3)))
    with pytest.raises(ShapeError):
        mean_delta_e(a, a, np.ones((4, 5), bool))
    with pytest.raises(ShapeError):
        mean_delta_e(a, a, np.ones((4, 4), np.uint8))   # a 0/1 image, not a boolean mask


def test_backdrop_excess_hand_values():
    rgb = np.array([
        [0.2, 0.9, 0.3],    # green screen: 0.9 - 0.3
        [0.5, 0.5, 0.5],    # neutral grey: nothing
        [0.8, 0.6, 0.1],    # orange: green below red
        [0.4, 0.45, 0.42],  # faint green tint: 0.45 - 0.42
        [0.0, 0.0, 0.0],
    ])
    np.testing.assert_allclose(backdrop_excess(rgb), [0.6, 0.0, 0.0, 0.03, 0.0], atol=1e-12)
    np.testing.assert_allclose(backdrop_excess(rgb, channel=0), [0.0, 0.0, 0.2, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(backdrop_excess(rgb, channel=2), [0.0, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    assert backdrop_excess(np.array([0.1, 0.2, 0.9]), channel=2) == pytest.approx(0.7)
    assert backdrop_excess(rgb).shape == (5,)
    assert backdrop_excess(rgb.reshape(5, 1, 3)).shape == (5, 1)


def test_backdrop_excess_uint8_does_not_wrap():
    rgb = np.array([[10, 200, 30], [200, 10, 30]], np.uint8)
    np.testing.assert_array_equal(backdrop_excess(rgb), [170.0, 0.0])


def test_backdrop_excess_refuses_a_bad_channel():
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError):
            backdrop_excess(np.zeros(3), channel=bad)
