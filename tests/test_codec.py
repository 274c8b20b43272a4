"""The codec on generated images with known properties (Pillow, no I/O)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from imgproc.codec import CodecError, compress
from imgproc.models import OutputFormat
from tests.conftest import make_image


def run(data: bytes, fmt: OutputFormat = OutputFormat.AUTO, quality: int = 50) -> Image.Image:
    encoded = compress(data, quality=quality, output_format=fmt, max_pixels=50_000_000)
    image = Image.open(io.BytesIO(encoded.data))
    assert image.format == encoded.format
    assert image.size == (encoded.width, encoded.height)
    return image


def test_jpeg_keeps_dimensions_and_shrinks() -> None:
    data = make_image(1200, 800)
    encoded = compress(data, quality=50, output_format=OutputFormat.AUTO, max_pixels=10**8)
    assert (encoded.width, encoded.height, encoded.format) == (1200, 800, "JPEG")
    assert len(encoded.data) < len(data)
    assert encoded.content_type == "image/jpeg" and encoded.extension == "jpg"


@pytest.mark.parametrize("source", ["PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_input_formats(source: str) -> None:
    image = run(make_image(300, 200, source))
    assert image.size == (300, 200)


def test_exif_orientation_is_applied() -> None:
    original = Image.new("RGB", (400, 200), "white")
    exif = original.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = io.BytesIO()
    original.save(out, "JPEG", exif=exif)
    assert run(out.getvalue()).size == (200, 400)


def test_alpha_under_auto_becomes_webp_and_keeps_transparency() -> None:
    image = run(make_image(200, 100, "PNG", mode="RGBA"))
    assert image.format == "WEBP"
    assert image.mode == "RGBA"
    assert image.getpixel((4, 50))[3] == 255
    assert image.getpixel((12, 50))[3] == 0


def test_jpeg_output_flattens_alpha_onto_white() -> None:
    source = Image.new("RGBA", (200, 100), (0, 0, 0, 0))  # transparent black...
    source.paste((200, 0, 0, 255), (0, 0, 100, 100))  # ...with an opaque red left half
    out = io.BytesIO()
    source.save(out, "PNG")
    image = run(out.getvalue(), OutputFormat.JPEG)
    assert image.format == "JPEG" and image.mode == "RGB"
    assert all(c > 245 for c in image.getpixel((150, 50)))  # transparent: white, not black
    red, green, blue = image.getpixel((50, 50))
    assert red > 180 and green < 30 and blue < 30


def test_png_output_is_quantised() -> None:
    image = run(make_image(200, 100), OutputFormat.PNG)
    assert image.format == "PNG" and image.mode == "P"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (make_image(300, 200, "PNG")[:300], "truncated or corrupt image"),
        (b"%PDF-1.4", "not an image, or an unsupported image format"),
        (b"", "not an image, or an unsupported image format"),
    ],
)
def test_undecodable(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as caught:
        compress(data, quality=50, output_format=OutputFormat.AUTO, max_pixels=10**8)
    assert caught.value.reason.startswith(reason)


def test_format_outside_the_whitelist() -> None:
    out = io.BytesIO()
    Image.new("RGB", (10, 10)).save(out, "ICO")
    with pytest.raises(CodecError, match="unsupported image format"):
        compress(out.getvalue(), quality=50, output_format=OutputFormat.AUTO, max_pixels=10**8)
