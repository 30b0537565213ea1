"""Hand-made tar headers, for archives no honest writer produces.

Headers are assembled byte by byte from the POSIX ustar layout (name 0:100, size 124:136,
checksum 148:156, type flag 156, magic 257:263, prefix 345:500), not with the code under
test nor with tarfile (which refuses to write most of what is here): negative pax record
lengths, base-256 sizes of any value, GNU long names of any length, wrong checksums.
"""

from __future__ import annotations

import gzip
import io

BLOCK = 512


def octal(n: int, width: int) -> bytes:
    """A NUL-terminated octal field of `width` bytes."""
    return f"{n:0{width - 1}o}".encode()[: width - 1] + b"\x00"


def base256(n: int, width: int = 12) -> bytes:
    """GNU base-256: first byte 0x80 (positive) or 0xff (negative, two's complement)."""
    if n >= 0:
        return b"\x80" + n.to_bytes(width - 1, "big")
    return (n % (1 << (8 * width))).to_bytes(width, "big")  # starts 0xff for small |n|


def header(name: bytes | str, size: int = 0, kind: bytes = b"0", *,
           size_field: bytes | None = None, checksum: int | None = None) -> bytes:
    """One 512-byte ustar header; `size_field` replaces the octal size, `checksum` the
    computed one (to make it wrong)."""
    name = name.encode() if isinstance(name, str) else name
    h = bytearray(BLOCK)
    h[0 : min(100, len(name))] = name[:100]
    h[100:108] = octal(0o644, 8)
    h[108:116] = octal(0, 8)
    h[116:124] = octal(0, 8)
    h[124:136] = size_field if size_field is not None else octal(size, 12)
    h[136:148] = octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = kind
    h[257:263] = b"ustar\x00"
    h[263:265] = b"00"
    chk = sum(h) if checksum is None else checksum
    h[148:156] = f"{chk:06o}".encode() + b"\x00 "
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: str, data: bytes, kind: bytes = b"0") -> bytes:
    return header(name, len(data), kind) + pad(data)


def end() -> bytes:
    return bytes(2 * BLOCK)


def pax_record(key: str, value: str) -> bytes:
    """A well-formed pax record "<len> key=value\\n" (the length counts itself)."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def sample(key: str, image: bytes, label: int = 0) -> bytes:
    return member(f"{key}.jpg", image) + member(f"{key}.cls", str(label).encode())


def gzip_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as g:
        g.write(data)
    return out.getvalue()


def gzip_member_of_zeros(name: str, size: int) -> bytes:
    """A .tar.gz holding one member of `size` zero bytes (a multiple of 1 MiB), built as a
    multi-member gzip (which gzip readers inflate as one stream): the 1 MiB block of zeros
    is compressed once and repeated, so ~1 MB of gzip per GiB costs no time here."""
    mib = 1 << 20
    assert size % mib == 0
    zeros = gzip.compress(bytes(mib), compresslevel=9, mtime=0)
    return (gzip.compress(header(name, size), mtime=0) + zeros * (size // mib)
            + gzip.compress(end(), mtime=0))


def with_checksum(hdr: bytes | bytearray) -> bytes:
    """`hdr` with its checksum recomputed (a mutated header that still passes the check)."""
    h = bytearray(hdr[:BLOCK])
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}".encode() + b"\x00 "
    return bytes(h)
