"""Every image file ends cleanly: hand-made hostile files for each failure the issue lists
(broken APNGs, GIF frames lying about their extents, gigapixel headers, TIFFs without
dimensions), hypothesis mutations of real images in every accepted format (truncated,
bytes flipped, chunks reordered and duplicated, headers lying), and the same files through
the running service: `done` or `failed` with a short, specific reason, never a traceback."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from collections.abc import Callable

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pytest_httpserver import HTTPServer

from imgproc.codec import MAX_FRAMES, CodecError, Encoded, compress
from imgproc.models import OutputFormat
from tests.conftest import csv_bytes, serve, upload, wait_terminal
from tests.images import exif_with_gps, pattern, save

MAX_PIXELS = 2_000_000


def encode(data: bytes, fmt: OutputFormat = OutputFormat.AUTO) -> Encoded:
    return compress(data, quality=50, output_format=fmt, max_pixels=MAX_PIXELS)


def reason_of(data: bytes, fmt: OutputFormat = OutputFormat.AUTO) -> str:
    with pytest.raises(CodecError) as caught:
        encode(data, fmt)
    return caught.value.reason


def frames_of(encoded: Encoded) -> list[Image.Image]:
    image = Image.open(io.BytesIO(encoded.data))
    out = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        out.append(image.convert("RGBA"))
    return out


# ---- PNG/APNG and RIFF chunks, GIFs by hand ---------------------------------------------------


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def png_of(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, every CRC right (so a decoder looks past them)."""
    body = b"".join(
        struct.pack(">I", len(d)) + k + d + struct.pack(">I", zlib.crc32(k + d)) for k, d in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 12
    while pos + 8 <= len(data):
        kind, (length,) = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 8 + length + (length & 1)
    return out


def webp_of(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(k + struct.pack("<I", len(d)) + d + b"\0" * (len(d) & 1) for k, d in chunks)
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def u24(value: int) -> bytes:
    return struct.pack("<I", value)[:3]


def lzw_stream(pixels: bytes) -> bytes:
    """Valid GIF image data for 2-bit pixels: a clear code before every pixel (no table)."""
    bits = count = 0
    out = bytearray()
    for code in [c for p in pixels for c in (4, p)] + [5]:
        bits |= code << count
        count += 3
        while count >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            count -= 8
    if count:
        out.append(bits)
    blocks = b"".join(
        bytes([len(out[i : i + 255])]) + out[i : i + 255] for i in range(0, len(out), 255)
    )
    return b"\x02" + blocks + b"\x00"


def gif(
    screen: tuple[int, int], frames: list[tuple[int, int, int, int, int]], disposal: int = 1
) -> bytes:
    """An animated GIF: a 4-colour palette, frames (x, y, width, height, colour) drawn as
    written (a lying width or height keeps a one-pixel body: the header is what is tested)."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x81, 0, 0)
    out += bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255])
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    for x, y, w, h, colour in frames:
        out += b"\x21\xf9\x04" + bytes([disposal << 2]) + struct.pack("<H", 10) + b"\x00\x00"
        out += b"\x2c" + struct.pack("<HHHHB", x, y, w, h, 0)
        out += lzw_stream(bytes([colour]) * (w * h if w * h <= 100_000 else 1))
    return out + b"\x3b"


def apng(frames: int = 3, size: tuple[int, int] = (24, 16)) -> bytes:
    colours = ["red", "green", "blue", "yellow"]
    images = [Image.new("RGBA", size, colours[i % 4]) for i in range(frames)]
    return save(images[0], "PNG", save_all=True, append_images=images[1:], duration=50, loop=0)


def animated_webp(frames: int = 3, size: tuple[int, int] = (24, 16)) -> bytes:
    images = [Image.new("RGB", size, c) for c in ["red", "green", "blue"][:frames]]
    return save(
        images[0], "WEBP", save_all=True, append_images=images[1:], duration=50, lossless=True
    )


def tiff_pages() -> bytes:
    pages = [pattern(40, 30), pattern(30, 40).convert("L")]
    return save(pages[0], "TIFF", save_all=True, append_images=pages[1:], compression="tiff_lzw")


# ---- the failures the issue measured, one by one -----------------------------------------------


def without(chunks: list[tuple[bytes, bytes]], kind: bytes, nth: int) -> list[tuple[bytes, bytes]]:
    seen = [i for i, (k, _) in enumerate(chunks) if k == kind]
    return [c for i, c in enumerate(chunks) if i != seen[nth]]


def renumbered(
    chunks: list[tuple[bytes, bytes]], kind: bytes, nth: int, seq: int
) -> list[tuple[bytes, bytes]]:
    seen = [i for i, (k, _) in enumerate(chunks) if k == kind]
    out = list(chunks)
    k, d = out[seen[nth]]
    out[seen[nth]] = (k, struct.pack(">I", seq) + d[4:])
    return out


def fctl_moved(chunks: list[tuple[bytes, bytes]], nth: int, x: int) -> list[tuple[bytes, bytes]]:
    seen = [i for i, (k, _) in enumerate(chunks) if k == b"fcTL"]
    out = list(chunks)
    k, d = out[seen[nth]]
    out[seen[nth]] = (k, d[:12] + struct.pack(">I", x) + d[16:])
    return out


def actl_claiming(chunks: list[tuple[bytes, bytes]], frames: int) -> list[tuple[bytes, bytes]]:
    return [(k, struct.pack(">I", frames) + d[4:]) if k == b"acTL" else (k, d) for k, d in chunks]


def anmf_moved(data: bytes, x: int) -> bytes:
    chunks = riff_chunks(data)
    index = next(i for i, (k, _) in enumerate(chunks) if k == b"ANMF")
    kind, body = chunks[index]
    chunks[index] = (kind, u24(x // 2) + body[3:])
    return webp_of(chunks)


def vp8x_canvas(data: bytes, width: int, height: int) -> bytes:
    chunks = [
        (k, d[:4] + u24(width - 1) + u24(height - 1) + d[10:]) if k == b"VP8X" else (k, d)
        for k, d in riff_chunks(data)
    ]
    return webp_of(chunks)


def tiff_without_width() -> bytes:
    data = save(pattern(40, 30), "TIFF")
    tag = struct.pack("<HH", 256, 4)  # ImageWidth, LONG
    assert tag in data
    return data.replace(tag, struct.pack("<HH", 0x9999, 4), 1)


def huge_tiff() -> bytes:
    data = bytearray(save(Image.new("L", (16, 16)), "TIFF"))
    for tag in (256, 257):  # ImageWidth, ImageLength
        at = data.index(struct.pack("<HH", tag, 4))  # LONG
        data[at + 8 : at + 12] = struct.pack("<I", 60000)
    return bytes(data)


CASES: list[tuple[str, Callable[[], bytes], str]] = [
    (
        "apng-missing-frame-data",
        lambda: png_of(without(png_chunks(apng()), b"fdAT", 0)),
        "truncated or corrupt image (",
    ),
    (
        "apng-sequence-errors",
        lambda: png_of(renumbered(png_chunks(apng()), b"fdAT", 0, 7)),
        "truncated or corrupt image (",
    ),
    (
        "apng-duplicated-fctl",
        lambda: png_of([*png_chunks(apng())[:4], *png_chunks(apng())[2:]]),
        "truncated or corrupt image (",
    ),
    (
        "apng-frame-outside",
        lambda: png_of(fctl_moved(png_chunks(apng()), 1, 20)),
        "animation frame outside the image: frame 2 is 24x16 at (20,0) on a 24x16 canvas",
    ),
    (
        "apng-claims-a-million-frames",
        lambda: png_of(actl_claiming(png_chunks(apng()), 1_000_000)),
        "too many frames: 1000000 frames of 24x16",
    ),
    (
        "gif-frame-extents-gigapixels",
        lambda: gif((10, 10), [(0, 0, 10, 10, 1), (0, 0, 65535, 65535, 2)]),
        "animation frame outside the image: frame 2 is 65535x65535 at (0,0) on a 10x10 canvas",
    ),
    (
        "gif-screen-gigapixels",
        lambda: gif((65535, 65535), [(0, 0, 4, 4, 1)]),
        f"too many pixels: 65535x65535 is over the limit of {MAX_PIXELS:,} pixels",
    ),
    (
        "gif-too-many-frames",
        lambda: gif((2, 2), [(0, 0, 1, 1, i % 4) for i in range(MAX_FRAMES + 1)]),
        f"too many frames: {MAX_FRAMES + 1} frames of 2x2",
    ),
    (
        "gif-frames-fill-the-cap",
        lambda: gif((1000, 1000), [(0, 0, 1, 1, 1)] * 9),
        "too many frames: 9 frames of 1000x1000",
    ),
    (
        "webp-frame-outside",
        lambda: anmf_moved(animated_webp(), 40),
        "animation frame outside the image: frame 1 is 24x16 at (40,0) on a 24x16 canvas",
    ),
    (
        "webp-canvas-gigapixels",
        lambda: vp8x_canvas(animated_webp(), 16384, 16384),
        f"too many pixels: 16384x16384 is over the limit of {MAX_PIXELS:,} pixels",
    ),
    ("tiff-missing-dimensions", tiff_without_width, "truncated or corrupt image ("),
    ("tiff-truncated", lambda: tiff_pages()[:300], "truncated or corrupt image ("),
    (
        "tiff-bomb",
        huge_tiff,
        f"too many pixels: 60000x60000 is over the limit of {MAX_PIXELS:,} pixels",
    ),
    (
        "png-lying-ihdr",
        lambda: png_of(
            [
                (b"IHDR", struct.pack(">II", 40000, 40000) + b"\x08\x02\0\0\0"),
                *png_chunks(save(pattern(8, 8), "PNG"))[1:],
            ]
        ),
        f"too many pixels: 40000x40000 is over the limit of {MAX_PIXELS:,} pixels",
    ),
    (
        "not-an-image",
        lambda: b"<html>Not found</html>",
        "not an image, or an unsupported image format",
    ),
]


@pytest.mark.parametrize(
    ("make", "reason"), [(m, r) for _, m, r in CASES], ids=[c[0] for c in CASES]
)
def test_each_hostile_file_fails_with_its_reason(make: Callable[[], bytes], reason: str) -> None:
    got = reason_of(make())
    assert got.startswith(reason) if reason.endswith("(") else got == reason
    assert len(got) <= 160


@pytest.mark.parametrize("fmt", [OutputFormat.AUTO, OutputFormat.WEBP])
def test_gif_frames_that_grow_the_canvas_encode_at_the_first_frames_size(fmt: OutputFormat) -> None:
    # Frame 2 reaches past the 20x20 screen: Pillow grows the canvas for it, and WebP
    # refused frames of different sizes ("Invalid frame dimensions").
    out = encode(
        gif((20, 20), [(0, 0, 20, 20, 0), (10, 10, 30, 30, 1), (0, 0, 20, 20, 2)], disposal=2), fmt
    )
    assert (out.format, out.width, out.height, out.frames) == ("WEBP", 20, 20, 3)
    frames = frames_of(out)
    assert [f.size for f in frames] == [(20, 20)] * 3
    assert frames[1].getpixel((15, 15))[:3] == pytest.approx((0, 255, 0), abs=40)  # type: ignore[index]


def test_odd_but_valid_images_come_out() -> None:
    palette_one = Image.new("P", (20, 10), 0)
    palette_one.putpalette([10, 200, 30])  # one colour, indexes beyond it unused
    valid = [
        save(Image.new("I;16", (32, 16), 40000), "PNG"),
        save(Image.new("LA", (32, 16), (90, 128)), "PNG"),
        save(palette_one, "PNG"),
        save(Image.new("1", (33, 17), 1), "BMP"),
        save(Image.new("CMYK", (32, 16), (0, 255, 0, 0)), "TIFF"),
        save(Image.new("F", (32, 16), 0.5), "TIFF"),
        save(
            Image.new("RGB", (32, 16), "red"),
            "JPEG",
            exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff",
        ),
        gif((0, 0), [(0, 0, 12, 8, 1), (0, 0, 12, 8, 2)]),  # a 0x0 screen, as some encoders write
        apng(),
        animated_webp(),
        tiff_pages(),
    ]
    for data in valid:
        out = encode(data)
        assert out.width * out.height > 0
        Image.open(io.BytesIO(out.data)).load()


@pytest.mark.parametrize("fmt", ["WEBP", "PNG", "JPEG"])
def test_bytes_after_the_image_are_not_kept_with_it(fmt: str) -> None:
    """Junk after the end of an image (after the RIFF size, IEND or EOI) is ignored by
    decoders; an input kept as the output (never bigger) must not carry it into a broken
    container. Found by the fuzzing below: a RIFF size short of the file, a chunk header in
    the junk, and the metadata stripper rebuilt the RIFF around it."""
    image = pattern(6, 4)
    seed = (
        animated_webp()
        if fmt == "WEBP"
        else save(image, fmt, **({"quality": 10} if fmt == "JPEG" else {}))
    )
    data = seed + b"\x07P\xc0\x88\xfe\xff\x22\xa2" + bytes(51)
    out = compress(data, quality=95, output_format=OutputFormat(fmt.lower()), max_pixels=MAX_PIXELS)
    decoded = Image.open(io.BytesIO(out.data))
    decoded.load()
    assert decoded.format == fmt


# ---- mutations of real images in every accepted format ----------------------------------------


def seeds() -> dict[str, bytes]:
    from pillow_heif import register_heif_opener

    register_heif_opener()
    still = pattern(48, 32)
    return {
        "JPEG": save(still, "JPEG", quality=90, exif=exif_with_gps()),
        "PNG": save(still.convert("RGBA"), "PNG"),
        "APNG": apng(),
        "GIF": gif((16, 12), [(0, 0, 16, 12, 0), (4, 4, 8, 6, 1), (0, 0, 8, 8, 2)], disposal=2),
        "WEBP": save(still, "WEBP", quality=80),
        "WEBP-animated": animated_webp(),
        "BMP": save(still, "BMP"),
        "TIFF": tiff_pages(),
        "AVIF": save(still, "AVIF", quality=60),
        "HEIF": save(still, "HEIF", quality=60),
    }


SEEDS = seeds()


def fixed_crcs(data: bytes) -> bytes:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    return png_of(png_chunks(data))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """The seed after one to four edits a damaged or hostile file shows."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        size = len(data)
        if size < 16:
            break
        edit = draw(st.sampled_from(["truncate", "flip", "copy", "drop", "lie", "chunks"]))
        at = draw(st.integers(0, size - 1))
        if edit == "truncate":
            del data[at:]
        elif edit == "flip":
            for offset in draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=8)):
                data[offset] ^= draw(st.integers(1, 255))
        elif edit == "copy":  # a run of bytes duplicated or moved elsewhere
            run = bytes(data[at : at + draw(st.integers(1, 64))])
            where = draw(st.integers(0, size))
            data[where:where] = run
        elif edit == "drop":
            del data[at : at + draw(st.integers(1, 64))]
        elif edit == "lie":  # a 16- or 32-bit number in the first 64 bytes made big
            field = draw(st.integers(4, min(size, 64) - 4))
            width = draw(st.sampled_from([2, 4]))
            order = draw(st.sampled_from(["<", ">"]))
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[field : field + width] = struct.pack(
                order + ("H" if width == 2 else "I"), value & (0xFFFF if width == 2 else 0xFFFFFFFF)
            )
        else:  # chunks reordered and duplicated (PNG/APNG and RIFF), CRCs made right again
            data = bytearray(_shuffled_chunks(bytes(data), draw))
    if draw(st.booleans()):
        data = bytearray(fixed_crcs(bytes(data)))
    return bytes(data)


def _shuffled_chunks(data: bytes, draw: st.DrawFn) -> bytes:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        chunks, build = png_chunks(data), png_of
    elif data[:4] == b"RIFF":
        chunks, build = riff_chunks(data), webp_of
    else:
        return data
    if not chunks:
        return data
    order = draw(st.lists(st.integers(0, len(chunks) - 1), min_size=1, max_size=len(chunks) + 3))
    return build([chunks[i] for i in order])


def assert_ends_cleanly(data: bytes, fmt: OutputFormat) -> None:
    """An Encoded whose bytes are a real image, or a CodecError with a short reason."""
    try:
        out = compress(data, quality=50, output_format=fmt, max_pixels=MAX_PIXELS)
    except CodecError as exc:
        assert exc.reason and len(exc.reason) <= 160
        assert "internal" not in exc.reason
        return
    assert 0 < out.width * out.height <= MAX_PIXELS
    Image.open(io.BytesIO(out.data)).load()


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_mutated_images_end_as_an_image_or_a_reason(name: str) -> None:
    seed = SEEDS[name]
    assert_ends_cleanly(seed, OutputFormat.AUTO)  # the seed itself is fine

    @settings(
        max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(data=mutated(seed), fmt=st.sampled_from(list(OutputFormat)))
    def run(data: bytes, fmt: OutputFormat) -> None:
        assert_ends_cleanly(data, fmt)

    run()


# ---- the same files through the running service ------------------------------------------------


@pytest.mark.slow
def test_hostile_files_through_the_service_end_with_reasons_and_no_traceback(
    make_app: Callable[..., Flask], image_host: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_app(max_pixels=MAX_PIXELS).test_client()
    files = {name: make() for name, make, _ in CASES}
    files["gif-growing-canvas"] = gif((20, 20), [(0, 0, 20, 20, 0), (10, 10, 30, 30, 1)])
    files["apng"] = apng()
    urls = {
        name: serve(image_host, f"/hostile/{name}", data, "image/png")
        for name, data in files.items()
    }
    caplog.set_level(logging.INFO)
    response = upload(client, csv_bytes([(1, "Hostile", list(urls.values()))]))
    assert response.status_code == 202, response.get_json()
    body = wait_terminal(client, response.get_json()["request_id"], timeout=60)
    assert body["status"] == "completed_with_errors"
    outcomes = {image["input_url"]: image for image in body["products"][0]["images"]}
    expected = {name: reason for name, _, reason in CASES}
    for name, url in urls.items():
        image = outcomes[url]
        if name in ("gif-growing-canvas", "apng"):
            assert (image["status"], image["format"]) == ("done", "WEBP"), image
            continue
        assert image["status"] == "failed", (name, image)
        reason = expected[name]
        assert (
            image["error"].startswith(reason) if reason.endswith("(") else image["error"] == reason
        )
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    assert all(r.levelno < logging.ERROR for r in caplog.records)
