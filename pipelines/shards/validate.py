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

__all__ = ["DEFAULT_MAX_PIXELS", "CorruptImage", "ImageInfo", "check_header", "check_pixels",
           "jpeg_hw", "sniff_format", "validate_image", "webp_size"]

VALIDATE_MODES = ("none", "header", "decode")
# 50 megapixels (an 8K x 6K photo is 48 MP): decoded as RGB that is 150 MB per image per
# decoder thread. A decompression bomb (a 190 KB PNG of 14000 x 14000 px) declares far more
# in its header, which is read before any decode; `data.max_pixels` (null: no limit) sets it.
DEFAULT_MAX_PIXELS = 50_000_000

# Start-of-frame markers (all except DHT C4, JPG C8, DAC CC) and the progressive ones.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


class CorruptImage(ValueError):
    """The bytes are not a usable image; `reason` says why (short, for counters/logs)."""

    def __init__(self, reason: str, kind: str = "bad_image") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # the counter it goes to: bad_image | too_many_pixels | undecodable


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


def jpeg_hw(data: bytes) -> tuple[int, int]:
    """(H, W) from the first frame header: a marker walk, no scan for the end (fast)."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise CorruptImage(f"jpeg: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF and i + 9 <= n:
            height, width = struct.unpack_from(">HH", data, i + 5)
            if height and width:
                return height, width
            break
        i += 2 + length
    raise CorruptImage("jpeg: no usable frame header")


def webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first chunk (VP8 / VP8L / VP8X); (0, 0) if unknown."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", data, 21)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    return 0, 0


def _check_webp(data: bytes) -> ImageInfo:
    (size,) = struct.unpack("<I", data[4:8])
    if len(data) < size + 8 or len(data) < 30:
        raise CorruptImage("webp: RIFF size larger than the data (truncated)")
    w, h = webp_size(data)
    return ImageInfo("webp", w, h)


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


def _header_wh(data: bytes) -> tuple[int, int]:
    """(W, H) where the header gives them cheaply, else (0, 0) ("none" judges nothing)."""
    try:
        fmt = sniff_format(data)
        if fmt == "jpeg":
            h, w = jpeg_hw(data)
            return w, h
        if fmt == "png" and len(data) >= 24:
            return struct.unpack_from(">II", data, 16)
        if fmt == "webp":
            return webp_size(data)
    except (CorruptImage, struct.error):
        pass
    return 0, 0


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """CorruptImage(kind="too_many_pixels") when width x height passes `max_pixels`."""
    if max_pixels and width * height > max_pixels:
        raise CorruptImage(f"too many pixels: {width}x{height} = {width * height} > "
                           f"max_pixels={max_pixels} (a decompression bomb?)", "too_many_pixels")


def validate_image(data: bytes, mode: str = "header",
                   max_pixels: int | None = None) -> ImageInfo | None:
    """Validate `data` per `mode` ("none", "header", "decode"); raise CorruptImage if bad.

    "decode" runs the header check and then a full PIL decode (catches corrupt entropy-coded
    data, at the cost of a decode per sample). `max_pixels` is checked on the header's
    dimensions before any decode, in every mode ("none" reads the size only).
    """
    if mode == "none":
        if not data:
            raise CorruptImage("empty")
        if max_pixels:
            check_pixels(*_header_wh(data), max_pixels)
        return None
    if mode not in VALIDATE_MODES:
        raise ValueError(f"validate={mode!r}: expected one of {VALIDATE_MODES}")
    info = check_header(data)
    check_pixels(info.width, info.height, max_pixels)
    if mode == "decode":
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                info = ImageInfo(info.format, im.width, im.height, info.progressive)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, bomb errors)
            raise CorruptImage(f"decode failed: {type(e).__name__}: {e}", "undecodable") from None
    return info
