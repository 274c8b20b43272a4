"""The codec on generated images with known properties: one test per rule of "images that
come out right" (orientation, colour, transparency, animation, never bigger, metadata,
formats) plus the quality floor against a plain Pillow save on a real photograph."""

from __future__ import annotations

import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skimage
from PIL import Image
from skimage.metrics import structural_similarity

from imgproc.codec import CodecError, Encoded, compress, strip_metadata
from imgproc.models import OutputFormat
from tests.conftest import make_image
from tests.images import (
    XMP,
    animated_gif,
    cmyk_profile_to_lab,
    deep_grey,
    exif_with_gps,
    oriented_jpeg,
    pattern,
    rgb_profile,
    save,
    srgb_icc,
    upright_marker,
)

PHOTOS = Path(skimage.__file__).parent / "data"


def encode(data: bytes, fmt: OutputFormat = OutputFormat.AUTO, **options: Any) -> Encoded:
    options.setdefault("quality", 50)
    return compress(data, output_format=fmt, max_pixels=50_000_000, **options)


def opened(encoded: Encoded) -> Image.Image:
    image = Image.open(io.BytesIO(encoded.data))
    assert image.format == encoded.format
    assert image.size == (encoded.width, encoded.height)
    return image


def close_to(pixel: Any, expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected, strict=False))


# ---- 1. orientation --------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(orientation: int) -> None:
    out = encode(oriented_jpeg(orientation))
    image = opened(out).convert("RGB")
    assert image.size == (120, 80)  # upright dimensions, whatever the stored ones were
    assert close_to(image.getpixel((10, 10)), (255, 0, 0))  # red top-left
    assert close_to(image.getpixel((110, 10)), (0, 0, 255))  # blue top-right
    assert close_to(image.getpixel((60, 70)), (255, 255, 255))
    assert image.getexif().get(0x0112, 1) == 1  # tag reset (or gone)


# ---- 2. colour -------------------------------------------------------------------------------


def test_icc_profile_is_kept() -> None:
    icc = rgb_profile("Test Wide RGB")  # a wide-gamut profile: its bytes come back unchanged
    out = encode(save(pattern(200, 100), "JPEG", quality=95, icc_profile=icc))
    assert opened(out).info["icc_profile"] == icc


def test_srgb_profile_is_dropped_as_redundant() -> None:
    """Untagged means sRGB to every browser, so an sRGB profile is 3 KB of nothing."""
    out = encode(save(pattern(200, 100), "JPEG", quality=95, icc_profile=srgb_icc()))
    assert "icc_profile" not in opened(out).info


def test_cmyk_is_converted_through_its_profile() -> None:
    cmyk = Image.new("CMYK", (64, 64), (255, 0, 0, 0))  # cyan ink
    data = save(cmyk, "JPEG", quality=95, icc_profile=cmyk_profile_to_lab((65, 45, 70)))
    image = opened(encode(data))
    assert image.mode == "RGB"
    # The profile maps every ink to orange; a plain CMYK formula would give cyan.
    red, green, blue = image.getpixel((32, 32))  # type: ignore[misc]
    assert red > 160 and 50 < green < 130 and blue < 70
    assert "icc_profile" not in image.info  # converted to sRGB, which untagged means


def test_cmyk_without_a_profile_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (64, 64), (255, 0, 0, 0))
    image = opened(encode(save(cmyk, "JPEG", quality=95)))
    assert image.mode == "RGB"
    assert close_to(image.getpixel((32, 32)), (0, 255, 255))


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    assert Image.open(io.BytesIO(deep_grey())).mode == "I;16"
    image = opened(encode(deep_grey()))
    assert image.mode == "L"
    assert image.getpixel((10, 10)) >= 250  # type: ignore[operator]
    assert 55 <= image.getpixel((50, 10)) <= 75  # type: ignore[operator]  # 16384/65535*255=64


def test_float_image_is_scaled() -> None:
    floats = Image.new("F", (64, 32), 0.0)
    floats.paste(1.0, (0, 0, 32, 32))
    floats.paste(0.5, (32, 0, 64, 32))
    image = opened(encode(save(floats, "TIFF")))
    assert image.getpixel((10, 10)) >= 250  # type: ignore[operator]
    assert 115 <= image.getpixel((50, 10)) <= 140  # type: ignore[operator]


# ---- 3. transparency and animation -----------------------------------------------------------


def half_transparent(mode: str) -> bytes:
    rgba = Image.new("RGBA", (100, 50), (0, 0, 0, 0))
    rgba.paste((200, 30, 30, 255), (0, 0, 50, 50))
    if mode == "RGBA":
        return save(rgba, "PNG")
    if mode == "LA":
        return save(rgba.convert("LA"), "PNG")
    return save(rgba.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_kept_under_auto_as_webp(mode: str) -> None:
    data = half_transparent(mode)
    if mode == "P":  # the palette index 0 must be the transparent one for this fixture
        source = Image.open(io.BytesIO(data))
        assert source.mode == "P" and "transparency" in source.info
    out = encode(data)
    assert out.format == "WEBP"
    image = opened(out).convert("RGBA")
    assert image.getpixel((25, 25))[3] == 255  # type: ignore[index]
    assert image.getpixel((75, 25))[3] == 0  # type: ignore[index]


def test_opaque_rgba_is_jpeg_under_auto() -> None:
    out = encode(save(pattern(100, 50).convert("RGBA"), "PNG"))
    assert out.format == "JPEG"


def test_jpeg_flattens_onto_white() -> None:
    image = opened(encode(half_transparent("RGBA"), OutputFormat.JPEG))
    assert image.mode == "RGB"
    assert close_to(image.getpixel((75, 25)), (255, 255, 255), 10)
    assert close_to(image.getpixel((25, 25)), (200, 30, 30))


def test_png_is_palette_quantised_and_keeps_alpha() -> None:
    source = Image.open(io.BytesIO(half_transparent("RGBA")))
    image = opened(encode(save(source, "WEBP", lossless=True), OutputFormat.PNG))
    assert image.mode == "P"
    rgba = image.convert("RGBA")
    assert rgba.getpixel((75, 25))[3] == 0 and rgba.getpixel((25, 25))[3] == 255  # type: ignore[index]


def test_webp_follows_the_quality() -> None:
    data = make_image(600, 400)
    low, high = (encode(data, OutputFormat.WEBP, quality=q) for q in (10, 90))
    assert low.format == high.format == "WEBP"
    assert len(low.data) < len(high.data)


@pytest.mark.parametrize("fmt", [OutputFormat.AUTO, OutputFormat.WEBP])
def test_animated_gif_keeps_every_frame_and_its_timing(fmt: OutputFormat) -> None:
    out = encode(animated_gif(), fmt)
    image = opened(out)
    assert out.format == "WEBP" and out.frames == 3
    assert getattr(image, "n_frames", 1) == 3
    durations, colours = [], []
    for index in range(3):
        image.seek(index)
        image.load()
        durations.append(image.info["duration"])
        colours.append(image.convert("RGB").getpixel((30, 20)))
    assert durations == [100, 250, 400]
    assert close_to(colours[0], (255, 0, 0)) and close_to(colours[2], (0, 0, 255))


def test_animated_webp_keeps_its_frames() -> None:
    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "yellow")]
    data = save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=[70, 90])
    image = opened(encode(data))
    assert getattr(image, "n_frames", 1) == 2
    image.seek(1)
    image.load()
    assert image.info["duration"] == 90


def test_animated_gif_as_jpeg_is_its_first_frame() -> None:
    image = opened(encode(animated_gif(), OutputFormat.JPEG))
    assert getattr(image, "n_frames", 1) == 1
    assert close_to(image.getpixel((30, 20)), (255, 0, 0))


# ---- 4. never bigger -------------------------------------------------------------------------


def tiny_jpeg(**options: Any) -> bytes:
    """A small, heavily compressed JPEG: re-encoding it at quality 50 makes it bigger."""
    noise = Image.effect_noise((48, 48), 60).convert("RGB")
    return save(noise, "JPEG", quality=5, optimize=True, progressive=True, **options)


def test_tiny_already_compressed_jpeg_is_kept_as_is() -> None:
    tiny = tiny_jpeg()
    out = encode(tiny)
    assert out.kept_original is True
    assert out.data == tiny
    assert (out.width, out.height, out.format) == (48, 48, "JPEG")


def test_kept_input_loses_its_metadata_losslessly() -> None:
    tiny = tiny_jpeg(exif=exif_with_gps(), xmp=XMP)
    out = encode(tiny)
    assert out.kept_original is True
    kept = Image.open(io.BytesIO(out.data))
    assert not kept.getexif() and "xmp" not in kept.info
    assert b"Secret Photographer" not in out.data and b"CameraMaker" not in out.data
    assert np.array_equal(np.asarray(kept), np.asarray(Image.open(io.BytesIO(tiny))))


def test_bigger_output_in_another_format_is_not_replaced() -> None:
    out = encode(tiny_jpeg(), OutputFormat.PNG)
    assert out.format == "PNG" and out.kept_original is False


def test_rotated_input_is_never_kept_sideways() -> None:
    out = encode(oriented_jpeg(6, optimize=True))
    assert out.kept_original is False
    assert (out.width, out.height) == (120, 80)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_strip_metadata_other_containers(fmt: str) -> None:
    data = save(pattern(40, 30), fmt, exif=exif_with_gps(), xmp=XMP)
    stripped = strip_metadata(data, fmt)
    image = Image.open(io.BytesIO(stripped))
    image.load()
    assert not image.getexif() and b"Secret Photographer" not in stripped
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


# ---- 5. metadata -----------------------------------------------------------------------------


def test_exif_xmp_and_gps_are_stripped_by_default() -> None:
    icc = rgb_profile()
    data = save(
        pattern(300, 200), "JPEG", quality=95, exif=exif_with_gps(), xmp=XMP, icc_profile=icc
    )
    out = encode(data)
    image = opened(out)
    assert not image.getexif()
    assert "xmp" not in image.info and b"Secret Photographer" not in out.data
    assert b"CameraMaker" not in out.data
    assert image.info["icc_profile"] == icc  # the profile stays


def test_keep_metadata_keeps_exif_with_orientation_reset() -> None:
    exif = exif_with_gps()
    exif[0x0112] = 6
    upright = upright_marker()
    data = save(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)
    image = opened(encode(data, keep_metadata=True))
    kept = image.getexif()
    assert kept[0x010F] == "CameraMaker"
    assert kept.get_ifd(0x8825)[1] == "N"
    assert kept[0x0112] == 1
    assert image.size == (120, 80)


# ---- 6. formats in ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF"])
def test_input_formats(fmt: str) -> None:
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    data = save(pattern(320, 200), fmt)
    out = encode(data)
    assert out.input_format == fmt
    assert (out.width, out.height) == (320, 200)


FIRST_IMAGES = """
import pathlib, sys
from imgproc import codec
from imgproc.models import OutputFormat
inputs = [path.read_bytes() for path in sorted(pathlib.Path(sys.argv[2]).iterdir())]
if sys.argv[1] == "warm":
    codec.warm_up()
before = set(sys.modules)
for data in inputs:
    for output_format in OutputFormat:
        codec.compress(data, quality=50, output_format=output_format, max_pixels=10**6)
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_a_warmed_up_process_loads_nothing_at_its_first_images(tmp_path: Path) -> None:
    """What the worker does before its first claim: the first images of a fresh process
    then import nothing (an import holds the GIL, and every thread of the process waited).
    The cold run shows the check sees the loading it is about."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    still = pattern(64, 48)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF"):
        (tmp_path / fmt).write_bytes(save(still.convert("RGB"), fmt))
    (tmp_path / "PNG-alpha").write_bytes(save(still.convert("RGBA"), "PNG"))

    def loaded(mode: str) -> set[str]:
        ran = subprocess.run(
            [sys.executable, "-c", FIRST_IMAGES, mode, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent.parent,
        )
        return set(ran.stdout.split())

    assert "pillow_heif" in loaded("cold")
    assert loaded("warm") == set()


def test_format_outside_the_whitelist() -> None:
    with pytest.raises(CodecError) as caught:
        encode(save(Image.new("RGB", (16, 16)), "ICO"))
    assert caught.value.reason == "not an image, or an unsupported image format"


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
        encode(data)
    assert caught.value.reason.startswith(reason)


def test_pixel_cap() -> None:
    with pytest.raises(CodecError) as caught:
        compress(
            save(Image.new("L", (2000, 1000)), "PNG"),
            quality=50,
            output_format=OutputFormat.AUTO,
            max_pixels=1_000_000,
        )
    assert caught.value.reason == (
        "too many pixels: 2000x1000 is over the limit of 1,000,000 pixels"
    )


# ---- 7. no larger, no worse than a plain save(quality=50) ------------------------------------


@pytest.mark.parametrize("photo", ["astronaut.png", "coffee.png", "chelsea.png"])
def test_default_is_no_larger_and_no_worse_than_plain_pillow(photo: str) -> None:
    original = Image.open(PHOTOS / photo).convert("RGB")
    source = save(original, "PNG")
    plain = save(original, "JPEG", quality=50)
    ours = encode(source)
    assert ours.format == "JPEG"
    assert len(ours.data) <= len(plain)
    reference = np.asarray(original)

    def ssim(data: bytes) -> float:
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        return float(structural_similarity(reference, decoded, channel_axis=2))

    assert ssim(ours.data) >= ssim(plain) - 1e-9


def test_an_output_has_only_its_own_bytes_after_a_bigger_one_from_the_same_thread() -> None:
    """A thread encodes into one memory file for all its images: a small output after a
    big one must not carry the big one's tail."""
    big = make_image(1600, 1200)
    small = make_image(40, 30, fmt="PNG")  # re-encoded as a JPEG, never kept as it is
    alone = encode(small).data
    with ThreadPoolExecutor(1) as thread:
        outputs = list(thread.map(encode, [big, small, big]))
    assert not outputs[1].kept_original and outputs[1].format == "JPEG"
    assert outputs[1].data == alone
    assert Image.open(io.BytesIO(outputs[1].data)).size == (40, 30)
    assert outputs[0].data == outputs[2].data


def test_jpeg_optimize_setting_is_smaller_with_the_same_pixels() -> None:
    data = save(Image.open(PHOTOS / "coffee.png").convert("RGB"), "JPEG", quality=92)
    plain, optimized = (encode(data, jpeg_optimize=flag) for flag in (False, True))
    assert len(optimized.data) < len(plain.data)
    assert np.array_equal(np.asarray(opened(plain)), np.asarray(opened(optimized)))
