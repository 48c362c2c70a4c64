"""The fast PNG writer produces ordinary PNGs that OpenCV reads back exactly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rigs.errors import ShapeError
from rigs.pngio import encode_png


@pytest.mark.parametrize("dtype,shape", [(np.uint8, (37, 53)), (np.uint16, (41, 29)), (np.uint8, (17, 23, 3)),
                                         (np.uint8, (19, 21, 4))])
def test_round_trip(dtype, shape):
    rng = np.random.default_rng(3)
    img = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    img[5:9] = 0  # runs of zeros and extremes
    img[10] = np.iinfo(dtype).max
    back = cv2.imdecode(np.frombuffer(encode_png(img), np.uint8), cv2.IMREAD_UNCHANGED)
    if img.ndim == 3:
        back = cv2.cvtColor(back, cv2.COLOR_BGR2RGB if img.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    assert back.dtype == img.dtype and np.array_equal(back, img)


def test_smooth_depth_compresses():
    yy, xx = np.mgrid[0:480, 0:640]
    depth = (20000 + 3 * yy + xx).astype(np.uint16)
    assert len(encode_png(depth)) < depth.nbytes / 4


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros(5, np.uint8)])
def test_rejects_unsupported_images(bad):
    with pytest.raises(ShapeError):
        encode_png(bad)
