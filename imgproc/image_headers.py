"""Canvas and frame geometry read from an image's container headers, before any decoding.

Pillow learns an animation's frames only while it decodes them, and some of its decoders
allocate from header numbers first: a WebP animation decoder allocates its whole canvas, a
GIF frame reaching past the canvas makes Pillow grow the canvas to fit it. Reading those
numbers here first lets the codec apply its pixel and frame caps before any of that. The
scan never raises: a header cut short just ends it (Pillow then reports the damage).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Stop counting frames well past any cap: the answer is "too many" either way.
FRAME_SCAN_LIMIT = 100_000
_GIF_BLOCK_START = re.compile(rb"[\x21\x2c\x3b]")


@dataclass(frozen=True)
class Frame:
    """Where one animation frame sits on the canvas."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        """The first column past the frame."""
        return self.x + self.width

    @property
    def bottom(self) -> int:
        """The first row past the frame."""
        return self.y + self.height


@dataclass(frozen=True)
class Geometry:
    """What the headers say: the canvas, the frames found, the frame count declared."""

    format: str
    width: int
    height: int
    frames: list[Frame] = field(default_factory=list)
    declared_frames: int = 0


def scan(data: bytes) -> Geometry | None:
    """The geometry of a GIF, PNG/APNG or WebP file; None for other formats."""
    try:
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif(data)
        if data.startswith(PNG_SIGNATURE):
            return _png(data)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp(data)
    except (struct.error, IndexError):  # a header too short to hold its own numbers
        return None
    return None


def _gif(data: bytes) -> Geometry:
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames: list[Frame] = []
    while pos < len(data) and len(frames) < FRAME_SCAN_LIMIT:
        kind = data[pos]
        if kind == 0x3B:  # trailer
            break
        if kind == 0x21:  # extension: label, then data sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif kind == 0x2C:  # image descriptor
            if pos + 10 > len(data):
                break
            x, y, w, h, local = struct.unpack_from("<HHHHB", data, pos + 1)
            frames.append(Frame(x, y, w, h))
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = _skip_sub_blocks(data, pos + 1)  # after the LZW code size
        else:  # Pillow skips stray bytes looking for the next block; so does the scan
            found = _GIF_BLOCK_START.search(data, pos + 1)
            if found is None:
                break
            pos = found.start()
    return Geometry("GIF", width, height, frames, len(frames))


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data):
        size = data[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def _png(data: bytes) -> Geometry:
    pos = 8
    width = height = declared = 0
    frames: list[Frame] = []
    while pos + 8 <= len(data) and len(frames) < FRAME_SCAN_LIMIT:
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = pos + 8
        if kind == b"IHDR" and length >= 8:
            width, height = struct.unpack_from(">II", data, body)
        elif kind == b"acTL" and length >= 8:
            (declared,) = struct.unpack_from(">I", data, body)
        elif kind == b"fcTL" and length >= 20:
            w, h, x, y = struct.unpack_from(">IIII", data, body + 4)
            frames.append(Frame(x, y, w, h))
        elif kind == b"IEND":
            break
        pos = body + length + 4  # data and CRC
    return Geometry("PNG", width, height, frames, declared)


def _webp(data: bytes) -> Geometry | None:
    pos = 12
    width = height = 0
    frames: list[Frame] = []
    while pos + 8 <= len(data) and len(frames) < FRAME_SCAN_LIMIT:
        kind = data[pos : pos + 4]
        (length,) = struct.unpack_from("<I", data, pos + 4)
        body = pos + 8
        if kind == b"VP8X" and length >= 10:
            width = _u24(data, body + 4) + 1
            height = _u24(data, body + 7) + 1
        elif kind == b"ANMF" and length >= 16:
            x, y = _u24(data, body) * 2, _u24(data, body + 3) * 2
            frames.append(Frame(x, y, _u24(data, body + 6) + 1, _u24(data, body + 9) + 1))
        elif pos == 12:
            return None  # a simple (VP8/VP8L) file: Pillow reads its size, one frame
        pos = body + length + (length & 1)
    return Geometry("WEBP", width, height, frames, len(frames))


def _u24(data: bytes, at: int) -> int:
    low, high = struct.unpack_from("<HB", data, at)
    return int(low | high << 16)
