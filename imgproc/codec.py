"""Pillow only, no I/O: image bytes in, compressed bytes and their facts out."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from imgproc.models import OutputFormat

# Formats we decode. Anything else (EPS, PSD, ICO, SVG, ...) is refused before decoding.
INPUT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

_OUTPUT = {
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
    "PNG": ("image/png", "png"),
}


class CodecError(Exception):
    """The bytes cannot be turned into an output image; ``reason`` is shown per image."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Encoded:
    """One compressed image and what the status shows about it."""

    data: bytes
    format: str
    width: int
    height: int
    input_format: str

    @property
    def content_type(self) -> str:
        """The MIME type of :attr:`data`."""
        return _OUTPUT[self.format][0]

    @property
    def extension(self) -> str:
        """The file name extension for :attr:`data`."""
        return _OUTPUT[self.format][1]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except Image.DecompressionBombError as exc:
        raise CodecError(f"too many pixels (decompression bomb refused): {exc}") from None
    except UnidentifiedImageError:
        raise CodecError("not an image, or an unsupported image format") from None
    width, height = image.size
    if width * height > max_pixels:
        raise CodecError(
            f"too many pixels: {width}x{height} is over the limit of {max_pixels:,} pixels"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise CodecError(f"truncated or corrupt image ({exc})") from None
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )


def _flatten(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def compress(data: bytes, *, quality: int, output_format: OutputFormat, max_pixels: int) -> Encoded:
    """Decode ``data`` and encode it at ``quality``, keeping its dimensions."""
    image = _open(data, max_pixels)
    input_format = image.format or "unknown"
    extra = {"icc_profile": image.info["icc_profile"]} if image.info.get("icc_profile") else {}
    image = ImageOps.exif_transpose(image)
    alpha = _has_alpha(image)
    target = output_format.value.upper()
    if output_format is OutputFormat.AUTO:
        target = "WEBP" if alpha else "JPEG"
    out = io.BytesIO()
    if target == "JPEG":
        image = (
            _flatten(image)
            if alpha
            else image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
        )
        image.save(out, "JPEG", quality=quality, optimize=True, **extra)
    elif target == "WEBP":
        image = image.convert("RGBA" if alpha else "RGB")
        image.save(out, "WEBP", quality=quality, method=4, **extra)
    else:
        image = image.convert("RGBA" if alpha else "RGB").quantize(
            256, method=Image.Quantize.FASTOCTREE if alpha else Image.Quantize.MEDIANCUT
        )
        image.save(out, "PNG", optimize=True, **extra)
    return Encoded(out.getvalue(), target, image.width, image.height, input_format)
