"""Every released image marked twice: C2PA content credentials and an invisible watermark.

:func:`mark_image` takes an RGB render and its licence facts and returns the
file's bytes (JPEG or PNG): the watermark goes into the pixels first
(:mod:`train.marking.watermark`), then the encoded file is signed with the
studio's C2PA chain (:mod:`train.marking.credentials`), whose hard binding
covers those exact bytes. :mod:`train.marking.inspect` reads both back.

Nothing heavy is imported here: c2pa and OpenCV load inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from train.marking.credentials import C2paChain
    from train.marking.watermark import WatermarkOptions

#: JPEG quality of released images
JPEG_QUALITY = 92


def encode_image(rgb: np.ndarray, fmt: str, *, jpeg_quality: int = JPEG_QUALITY) -> bytes:
    """``rgb`` ``[H, W, 3]`` uint8 as JPEG (OpenCV, 4:2:0) or PNG (rigs.pngio) bytes."""
    fmt = fmt.lower().lstrip(".")
    if fmt in ("jpeg", "jpg"):
        import cv2

        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        if not ok:
            raise ValueError("OpenCV could not encode the image as JPEG")
        return buf.tobytes()
    if fmt == "png":
        from rigs.pngio import encode_png

        return encode_png(rgb)
    raise ValueError(f"format {fmt!r} is not jpeg or png")


def mark_image(rgb: np.ndarray, fmt: str, *, bundle_sha256: str, licence_id: str, image_serial: int,
               disclosure: str, chain: C2paChain, subject_id: str | None = None,
               watermark: WatermarkOptions | None = None, jpeg_quality: int = JPEG_QUALITY) -> bytes:
    """The released file (``fmt``: jpeg or png) of ``rgb`` ``[H, W, 3]`` uint8: watermarked, then signed.

    The watermark carries the licence's 24-bit tag and ``image_serial``
    (0 .. 2**24 - 1); the credentials carry all the facts given here.
    """
    from train.marking.credentials import sign_image
    from train.marking.watermark import WatermarkOptions, WatermarkPayload, embed_watermark

    payload = WatermarkPayload.for_licence(licence_id, image_serial)
    marked = embed_watermark(rgb, payload, watermark or WatermarkOptions())
    data = encode_image(marked, fmt, jpeg_quality=jpeg_quality)
    return sign_image(data, fmt, bundle_sha256=bundle_sha256, licence_id=licence_id, image_serial=image_serial,
                      disclosure=disclosure, chain=chain, subject_id=subject_id)
