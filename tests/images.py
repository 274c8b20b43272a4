"""Generated test images with known properties (Pillow), shared by the codec and API tests."""

from __future__ import annotations

import io
import struct
from typing import Any

from PIL import Image, ImageCms

# Exif orientation -> the transpose that, applied to the stored pixels, shows them upright.
TO_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
FROM_UPRIGHT = {**TO_UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def upright_marker(width: int = 120, height: int = 80) -> Image.Image:
    """White with a red block in the top-left corner and a blue one top-right."""
    image = Image.new("RGB", (width, height), "white")
    image.paste((255, 0, 0), (0, 0, width // 3, height // 3))
    image.paste((0, 0, 255), (width - width // 3, 0, width, height // 3))
    return image


def oriented_jpeg(orientation: int, **options: Any) -> bytes:
    """A JPEG whose pixels are stored turned so that ``orientation`` shows them upright."""
    upright = upright_marker()
    stored = upright.transpose(FROM_UPRIGHT[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(stored, "JPEG", quality=95, exif=exif, **options)


def _desc(text: bytes) -> bytes:
    """An ICC v2 textDescriptionType tag: ASCII text, empty Unicode and ScriptCode parts."""
    return b"desc" + b"\0" * 4 + struct.pack(">I", len(text) + 1) + text + b"\0" + b"\0" * 78


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def cmyk_profile_to_lab(lab: tuple[float, float, float]) -> bytes:
    """A valid ICC v2 CMYK printer profile whose A2B0 maps every colour to one Lab colour.

    Converting through it gives a colour no plain CMYK->RGB formula would give, so a test
    can tell that the embedded profile was used.
    """
    l_value, a_value, b_value = lab
    entry = bytes([round(l_value * 255 / 100), round(a_value + 128), round(b_value + 128)])
    ramp = bytes(range(256))
    lut = (
        b"mft1"
        + b"\0" * 4
        + bytes([4, 3, 2, 0])
        + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
        + ramp * 4
        + entry * 2**4
        + ramp * 3
    )
    text = b"test CMYK"
    desc = _desc(text)
    wtpt = b"XYZ " + b"\0" * 4 + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    cprt = b"text" + b"\0" * 4 + b"none\0"
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"cprt", cprt), (b"A2B0", lut)]
    return _profile(b"prtr", b"CMYK", b"Lab ", tags)


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_with_gps() -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x0112] = 1
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (52.0, 31.0, 12.0)
    return exif


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
    b'22-rdf-syntax-ns#"><rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/'
    b'elements/1.1/"><dc:creator>Secret Photographer</dc:creator></rdf:Description>'
    b"</rdf:RDF></x:xmpmeta>"
)


def animated_gif(frames: int = 3, durations: tuple[int, ...] = (100, 250, 400)) -> bytes:
    images = [Image.new("RGB", (60, 40), colour) for colour in ("red", "green", "blue")][:frames]
    return save(
        images[0],
        "GIF",
        save_all=True,
        append_images=images[1:],
        duration=list(durations[:frames]),
        loop=0,
    )


def pattern(width: int = 320, height: int = 200) -> Image.Image:
    """An RGB image with structure (stripes, a ring), so compression has work to do."""
    return Image.open(io.BytesIO(_pattern_png(width, height))).convert("RGB")


def _pattern_png(width: int, height: int) -> bytes:
    from tests.conftest import make_image

    return make_image(width, height, "PNG")


def rgb_profile(description: str = "Test Wide RGB") -> bytes:
    """A valid ICC v2 RGB display profile (matrix/TRC, P3-like primaries) that is not sRGB."""
    text = description.encode()
    desc = _desc(text)

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)

    gamma = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, 0x0233) + b"\0\0"  # 2.2
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.5151, 0.2412, -0.0011)),
        (b"gXYZ", xyz(0.2920, 0.6922, 0.0419)),
        (b"bXYZ", xyz(0.1571, 0.0666, 0.7841)),
        (b"rTRC", gamma),
        (b"gTRC", gamma),
        (b"bTRC", gamma),
        (b"cprt", b"text" + b"\0" * 4 + b"none\0"),
    ]
    return _profile(b"mntr", b"RGB ", b"XYZ ", tags)


def _profile(device: bytes, space: bytes, pcs: bytes, tags: list[tuple[bytes, bytes]]) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for signature, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"\0" * 4
        + struct.pack(">I", 0x02100000)
        + device
        + space
        + pcs
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + struct.pack(">I", 0)
        + _s15(0.9642)
        + _s15(1.0)
        + _s15(0.8249)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def deep_grey() -> bytes:
    """A 16-bit greyscale PNG: left half 65535, right half 16384."""
    import numpy as np

    values = np.zeros((32, 64), dtype=np.uint16)
    values[:, :32] = 65535
    values[:, 32:] = 16384
    return save(Image.fromarray(values), "PNG")
