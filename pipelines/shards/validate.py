"""Cheap checks that a byte string is an image a decoder will accept.

Why: DALI aborts the whole pipeline on one undecodable JPEG, and a full decode
per sample on the reading side would cost as much as the augmentation itself. Parsing the
container structure (JPEG markers, PNG chunks, RIFF header) catches what breaks pipelines
in practice -- empty members, text or HTML saved as .jpg, truncated files -- in
microseconds. `mode="decode"` adds a full PIL decode for data that is known to be dirty.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

__all__ = ["CorruptImage", "ImageInfo", "check_header", "sniff_format", "validate_image"]

VALIDATE_MODES = ("none", "header", "decode")

# Start-of-frame markers (all except DHT C4, JPG C8, DAC CC) and the progressive ones.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class CorruptImage(ValueError):
    """The bytes are not a usable image; `reason` says why (short, for counters/logs)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "jpeg" | "png" | "webp"
    width: int
    height: int
    progressive: bool = False  # JPEG only: the GPU hardware decoder wants baseline


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIG:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _check_jpeg(data: bytes) -> ImageInfo:
    n = len(data)
    i = 2
    info: ImageInfo | None = None
    while i < n:
        if data[i] != 0xFF:
            raise CorruptImage(f"jpeg: expected a marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            continue
        if marker == 0xD9:
            raise CorruptImage("jpeg: end of image before any scan")
        if i + 2 > n:
            break
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2 or i + length > n:
            raise CorruptImage(f"jpeg: segment 0x{marker:02X} runs past the end (truncated)")
        if marker in _SOF:
            if length < 8:
                raise CorruptImage("jpeg: short frame header")
            height, width, ncomp = struct.unpack(">HHB", data[i + 3 : i + 8])
            if width == 0 or ncomp not in (1, 3, 4):
                raise CorruptImage(f"jpeg: bad frame header ({width}x{height}, {ncomp} comps)")
            info = ImageInfo("jpeg", width, height, marker in _PROGRESSIVE)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if info is None:
                raise CorruptImage("jpeg: scan before any frame header (no SOF)")
            # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed as 0xFF00),
            # so its presence after the first scan means the image was not cut short.
            if data.rfind(b"\xff\xd9", i + length) == -1:  # from the end: EOI is last
                raise CorruptImage("jpeg: no end-of-image marker (truncated)")
            return info
        i += length
    raise CorruptImage("jpeg: truncated before the first scan")


def _check_png(data: bytes) -> ImageInfo:
    if len(data) < 8 + 25 + 12 or data[12:16] != b"IHDR":
        raise CorruptImage("png: missing IHDR chunk")
    width, height, depth, ctype = struct.unpack(">IIBB", data[16:26])
    if width == 0 or height == 0 or depth not in (1, 2, 4, 8, 16) or ctype not in (0, 2, 3, 4, 6):
        raise CorruptImage(f"png: bad header ({width}x{height}, depth {depth}, type {ctype})")
    if data.rfind(b"\x00\x00\x00\x00IEND") == -1:
        raise CorruptImage("png: no IEND chunk (truncated)")
    return ImageInfo("png", width, height)


def _check_webp(data: bytes) -> ImageInfo:
    (size,) = struct.unpack("<I", data[4:8])
    if len(data) < size + 8 or len(data) < 30:
        raise CorruptImage("webp: RIFF size larger than the data (truncated)")
    return ImageInfo("webp", 0, 0)  # dimensions live in a codec-specific chunk; not needed


def check_header(data: bytes) -> ImageInfo:
    """Parse the container structure; raise CorruptImage with a reason if it is not sound."""
    if not data:
        raise CorruptImage("empty")
    fmt = sniff_format(data)
    if fmt == "jpeg":
        return _check_jpeg(data)
    if fmt == "png":
        return _check_png(data)
    if fmt == "webp":
        return _check_webp(data)
    raise CorruptImage("not a JPEG, PNG or WebP (bad magic bytes)")


def validate_image(data: bytes, mode: str = "header") -> ImageInfo | None:
    """Validate `data` per `mode` ("none", "header", "decode"); raise CorruptImage if bad.

    "decode" runs the header check and then a full PIL decode (catches corrupt entropy-coded
    data and decompression bombs, at the cost of a decode per sample).
    """
    if mode == "none":
        if not data:
            raise CorruptImage("empty")
        return None
    if mode not in VALIDATE_MODES:
        raise ValueError(f"validate={mode!r}: expected one of {VALIDATE_MODES}")
    info = check_header(data)
    if mode == "decode":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                info = ImageInfo(info.format, im.width, im.height, info.progressive)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, bomb errors)
            raise CorruptImage(f"decode failed: {type(e).__name__}: {e}") from None
    return info
