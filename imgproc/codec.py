"""Pillow only, no I/O: image bytes in, compressed bytes and their facts out.

What a catalogue needs from a compressed image is that it looks like the original, only
smaller: orientation applied, colours managed, transparency and animation kept, privacy
metadata dropped, and never a bigger file than the one it replaces.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from PIL import Image, ImageCms, ImageOps, ImageSequence, UnidentifiedImageError

from imgproc import image_headers
from imgproc.models import OutputFormat

# Formats we decode; anything else (EPS, PSD, ICO, SVG, ...) is refused before decoding.
INPUT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "HEIF")
ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")
MAX_FRAMES = 1000
ORIENTATION = 0x0112

# Encoder settings, chosen with `make bench-quality` (table in the README). Baseline JPEG
# with 4:2:0 chroma: optimized Huffman tables save ~6% of bytes for identical pixels but
# cost ~60% more CPU per image, so they are opt-in (IMGPROC_JPEG_OPTIMIZE); progressive
# scans cost more still and save nothing over optimize; 4:4:4 is ~15% bigger. WebP
# method 4 (libwebp's default) is ~23% smaller than method 0 and keeps SSIM.
WEBP_SETTINGS: dict[str, Any] = {"method": 4}

SCRATCH_KEPT_BYTES = 4 << 20  # a bigger output is freed at once, not at the next image

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
    """One output image and what the status shows about it."""

    data: bytes
    format: str
    width: int
    height: int
    input_format: str
    kept_original: bool = False
    frames: int = 1

    @property
    def content_type(self) -> str:
        """The MIME type of :attr:`data`."""
        return _OUTPUT[self.format][0]

    @property
    def extension(self) -> str:
        """The file name extension for :attr:`data`."""
        return _OUTPUT[self.format][1]


@functools.cache
def _register_plugins() -> None:
    """HEIC/HEIF decoding through pillow-heif (AVIF is built into Pillow), once, at first use.

    Pillow's own decompression-bomb limit is turned off: it would refuse (or only warn)
    at its fixed 89 megapixels with a message of its own, while the caps the user set are
    checked here, from the headers, before anything is allocated."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    Image.MAX_IMAGE_PIXELS = None


@functools.cache
def warm_up() -> None:
    """Load now what a process's first image would: the HEIF plugin, Pillow's format
    plugins, each output format's encoder. The worker calls it before it claims anything.
    Loading is mostly imports, done holding the GIL: at a first image it held up every
    thread of the process (the downloads and the job's reads too) for 0.07-0.47 s in traced
    `make bench` batches; from a cold page cache the loading alone takes 0.5 s. An image
    through :func:`compress` to each output format loads all of it: the plugins at its
    open (``formats`` names plugins Pillow loads only in full), the encoders at its save."""
    sample = io.BytesIO()
    Image.new("RGBA", (8, 8), (200, 40, 40, 128)).save(sample, "PNG")
    for output_format in OutputFormat:
        compress(sample.getvalue(), quality=50, output_format=output_format, max_pixels=64)


# Where an exception comes from decides what it means: raised inside the image libraries it
# is about the file (or a library flaw no image should crash us with); raised in our own
# code it is a bug and stays one.
_LIBRARIES = ("PIL", "pillow_heif")
_OURS = ("imgproc",)


def _raised_in_library(exc: BaseException) -> bool:
    """True when the innermost frame of ours or a library's that raised ``exc`` is a
    library's (standard-library frames in between, such as struct or fractions, are skipped)."""
    innermost = None
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", "")).split(".", 1)[0]
        if module in _LIBRARIES or module in _OURS:
            innermost = module
        tb = tb.tb_next
    return innermost in _LIBRARIES


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 80 else text[:79] + "…"


@contextmanager
def _image_errors(reason: str) -> Iterator[None]:
    """Turn what the image libraries raise about a file into CodecError(reason (detail))."""
    try:
        yield
    except CodecError:
        raise
    except MemoryError:
        raise CodecError("not enough memory to process the image") from None
    except Image.DecompressionBombError:
        raise CodecError("too many pixels (decompression bomb refused)") from None
    except UnidentifiedImageError:
        raise CodecError("not an image, or an unsupported image format") from None
    except Exception as exc:
        if not _raised_in_library(exc):
            raise
        raise CodecError(f"{reason} ({_detail(exc)})") from None


def _quiet_image_warnings() -> None:
    """Pillow's warnings about a file (odd EXIF, palette transparency, ...) are not ours to
    raise; set per call because a test's warning filters are reset between tests."""
    for category in (UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(PIL|pillow_heif)(\.|$)")


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    """``image.save`` into bytes, with the encoder running outside the GIL.

    Pillow releases the GIL while encoding only when it writes to a real file descriptor
    (``encode_to_file``); into a BytesIO it encodes holding the GIL, so a thread pool
    encodes one image at a time whatever the cores. An anonymous memory file gives it a
    descriptor without touching a disk; the bytes are the same.

    Each thread keeps one such file, unbuffered, for all the images it encodes. Every
    system call gives the GIL away, and with downloads waiting for it the thread then
    waits to get it back: a file made, wrapped, read and closed per image took 17 calls
    around the encoder of a JPEG; reused, it takes 6 (a PNG adds its chunks' small writes).
    """
    with _image_errors("cannot encode the image"):
        scratch = _scratch_file()
        if scratch is None:  # not Linux
            out = io.BytesIO()
            image.save(out, fmt, **options)
            return out.getvalue()
        scratch.seek(0)
        scratch.truncate(0)  # the last image's bytes
        image.save(scratch, fmt, **options)
        size = scratch.tell()
        encoded = _read_all(scratch.fileno(), size)
        if size > SCRATCH_KEPT_BYTES:  # not held until the thread's next image
            scratch.truncate(0)
        return encoded


class _WholeWrites(io.FileIO):
    """A file whose ``write`` writes everything (Pillow ignores what a write returns; a raw
    file may take less than it is given)."""

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            view = view[super().write(view) or 0 :]
        return total


class _ScratchFile:
    """An anonymous memory file, closed when its thread ends (with the thread's locals)."""

    def __init__(self) -> None:
        self.file = _WholeWrites(os.memfd_create("imgproc-encode", os.MFD_CLOEXEC), "w+b")

    def __del__(self) -> None:
        found = getattr(self, "file", None)  # none when the memory file could not be made
        if found is not None:
            found.close()


_scratch = threading.local()


def _scratch_file() -> io.FileIO | None:
    """This thread's anonymous memory file for encoding into (None where there is none)."""
    if not hasattr(os, "memfd_create"):
        return None
    found: _ScratchFile | None = getattr(_scratch, "file", None)
    if found is None:
        found = _scratch.file = _ScratchFile()
    return found.file


def _read_all(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the file ``fd``, in one call where the system allows."""
    data = os.pread(fd, size, 0)
    while len(data) < size:  # a short read (only for outputs beyond what one call moves)
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            raise OSError(f"encoded output shrank to {len(data)} of {size} bytes")
        data += more
    return data


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


# ---- decoding ------------------------------------------------------------------------------


def _too_many_pixels(width: int, height: int, max_pixels: int) -> CodecError:
    return CodecError(
        f"too many pixels: {width}x{height} is over the limit of {max_pixels:,} pixels"
    )


def _check_headers(data: bytes, max_pixels: int) -> None:
    """The caps on what the container headers say, before Pillow sees the bytes."""
    geometry = image_headers.scan(data)
    if geometry is None:
        return
    width, height = geometry.width, geometry.height
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)
    count = max(len(geometry.frames), geometry.declared_frames)
    if count > MAX_FRAMES:
        raise CodecError(f"too many frames: {count} frames of {width}x{height}")
    right, bottom = width, height
    for number, frame in enumerate(geometry.frames, 1):
        if frame.right <= width and frame.bottom <= height:
            continue
        # Pillow grows a GIF's canvas to fit such a frame (as browsers do); APNG and WebP
        # forbid it. Either way a frame may not take the canvas past the pixel cap.
        right, bottom = max(right, frame.right), max(bottom, frame.bottom)
        if geometry.format != "GIF" or right * bottom > max_pixels:
            raise CodecError(
                f"animation frame outside the image: frame {number} is {frame.width}x"
                f"{frame.height} at ({frame.x},{frame.y}) on a {width}x{height} canvas"
            )
    if right * bottom * max(count, 1) > 4 * max_pixels:
        raise CodecError(f"too many frames: {count} frames of {right}x{bottom}")


# Signatures of the accepted formats: a file that starts like one but that no plugin can
# open is a damaged image of that format, not "not an image".
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (image_headers.PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


def _damaged_format(data: bytes) -> str | None:
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF"
    return None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    _check_headers(data, max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=INPUT_FORMATS)
    except UnidentifiedImageError:
        damaged = _damaged_format(data)
        if damaged is None:
            raise
        raise CodecError(f"truncated or corrupt image (unreadable {damaged} header)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)
    frames = getattr(image, "n_frames", 1)
    if frames > MAX_FRAMES or width * height * frames > 4 * max_pixels:
        raise CodecError(f"too many frames: {frames} frames of {width}x{height}")
    # The whole file to the decoder in one call: Pillow feeds it 64 KB at a time, and the
    # decoder gives the GIL back between blocks, so a 300 KB JPEG made its thread wait for
    # the GIL five times (behind hundreds of download threads, a wait is not short).
    image.decodermaxblock = max(image.decodermaxblock, len(data))
    image.load()
    return image


def _exif(image: Image.Image) -> Image.Exif:
    """The image's EXIF, or none when it is too damaged to read (the pixels may be fine)."""
    try:
        return image.getexif()
    except Exception as exc:
        if not _raised_in_library(exc):
            raise
        return Image.Exif()


@functools.lru_cache(maxsize=64)
def _is_srgb(icc: bytes) -> bool:
    """True for an sRGB profile: browsers assume sRGB, so it costs ~3 KB for nothing."""
    try:
        description = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except (ImageCms.PyCMSError, OSError):
        return False
    return "srgb" in description.lower()


def _has_alpha(image: Image.Image) -> bool:
    """True when some pixel is not fully opaque."""
    if image.mode == "P":
        return "transparency" in image.info
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La"):
        return False
    low, _high = _extrema(image.getchannel("A"))
    return low < 255


def _extrema(image: Image.Image) -> tuple[float, float]:
    """Lowest and highest value of a single-band image."""
    return cast(tuple[float, float], image.getextrema())


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled into 0-255 (not clipped)."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
        scale = 255 / 65535
    else:
        low, high = _extrema(image)
        if image.mode == "F" and low >= 0 and high <= 1:
            scale = 255.0
        elif low >= 0 and high <= 255:
            scale = 1.0
        elif low >= 0 and high <= 65535:
            scale = 255 / 65535
        else:
            span = float(high - low) or 1.0
            image = image.point(lambda v: (v - low) * (255 / span))
            return image.convert("L")
    return image.point(lambda v: v * scale).convert("L")


def _display_ready(image: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """Pixels a browser shows right: 8-bit L/RGB(A), CMYK converted through its profile."""
    mode = image.mode
    if mode == "CMYK":
        if icc:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                converted = ImageCms.profileToProfile(
                    image,
                    source,
                    _srgb_profile(),
                    outputMode="RGB",
                    renderingIntent=ImageCms.Intent.PERCEPTUAL,
                )
                assert converted is not None
                return converted, None  # now sRGB, which is what untagged means
            except (ImageCms.PyCMSError, OSError):
                pass  # a broken profile: fall back to the plain conversion
        return image.convert("RGB"), None
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit(image), None
    if mode == "LAB":
        lab = ImageCms.createProfile("LAB")
        converted = ImageCms.profileToProfile(image, lab, _srgb_profile(), outputMode="RGB")
        assert converted is not None
        return converted, None
    if mode in ("L", "RGB", "RGBA", "LA", "P"):
        return image, icc
    if mode == "1":
        return image.convert("L"), icc
    if mode in ("PA", "RGBa", "La"):
        return image.convert("RGBA"), icc
    return image.convert("RGB"), icc


# ---- encoding ------------------------------------------------------------------------------


def _flatten(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _encode_still(
    image: Image.Image,
    target: str,
    quality: int,
    alpha: bool,
    extra: dict[str, Any],
    optimize: bool,
) -> bytes:
    if target == "JPEG":
        if alpha:
            image = _flatten(image)
        elif image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode == "LA" else "RGB")
        return _save(image, "JPEG", quality=quality, optimize=optimize, **extra)
    if target == "WEBP":
        image = image.convert("RGBA" if alpha else "RGB")
        return _save(image, "WEBP", quality=quality, **WEBP_SETTINGS, **extra)
    # PNG: palette-quantised and optimised
    if alpha:
        palette = image.convert("RGBA").quantize(256, method=Image.Quantize.FASTOCTREE)
    else:
        palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    return _save(palette, "PNG", optimize=True, **extra)


def _encode_animation(image: Image.Image, quality: int, extra: dict[str, Any]) -> bytes:
    frames, durations = [], []
    size = image.size
    for frame in ImageSequence.Iterator(image):
        rgba = frame.convert("RGBA")
        if rgba.size != size:  # a GIF frame that grew the canvas: cut to the first frame's
            rgba = rgba.crop((0, 0, *size))
        frames.append(rgba)
        durations.append(_duration(frame.info.get("duration", image.info.get("duration"))))
    return _save(
        frames[0],
        "WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=durations,
        loop=_loop(image.info.get("loop")),
        quality=quality,
        **WEBP_SETTINGS,
        **extra,
    )


def _loop(value: Any) -> int:
    """How many times an animation plays (0: for ever); 0 for a nonsensical value."""
    try:
        loop = int(value)
    except (TypeError, ValueError, OverflowError):
        return 0
    return loop if 0 <= loop <= 65535 else 0


def _duration(value: Any) -> int:
    """A frame's display time in ms; 100 for a missing, zero or nonsensical one."""
    try:
        duration = int(value)
    except (TypeError, ValueError, OverflowError):
        return 100
    return duration if 0 < duration <= 65535 else 100


def _target(output_format: OutputFormat, alpha: bool, animated: bool) -> str:
    if output_format is OutputFormat.AUTO:
        return "WEBP" if (alpha or animated) else "JPEG"
    return output_format.value.upper()


def compress(
    data: bytes,
    *,
    quality: int,
    output_format: OutputFormat,
    max_pixels: int,
    keep_metadata: bool = False,
    jpeg_optimize: bool = False,
) -> Encoded:
    """Decode ``data`` and re-encode it at ``quality``, keeping dimensions and appearance;
    CodecError with a short reason when the file cannot be, whatever is wrong with it."""
    _register_plugins()
    _quiet_image_warnings()
    with _image_errors("truncated or corrupt image"):
        return _compress(data, quality, output_format, max_pixels, keep_metadata, jpeg_optimize)


def _compress(
    data: bytes,
    quality: int,
    output_format: OutputFormat,
    max_pixels: int,
    keep_metadata: bool,
    jpeg_optimize: bool,
) -> Encoded:
    image = _open(data, max_pixels)
    input_format = image.format or "unknown"
    frames = getattr(image, "n_frames", 1) if input_format in ANIMATED_FORMATS else 1
    exif = _exif(image)
    orientation = exif.get(ORIENTATION, 1)
    icc = image.info.get("icc_profile") or None
    alpha = _has_alpha(image)
    target = _target(output_format, alpha, frames > 1)

    extra: dict[str, Any] = {}
    if keep_metadata and len(exif):
        kept_exif = Image.Exif()  # a copy: exif_transpose below still reads the original tag
        kept_exif.load(exif.tobytes())
        kept_exif[ORIENTATION] = 1  # the pixels are turned upright below
        extra["exif"] = kept_exif.tobytes()

    if frames > 1 and target == "WEBP":
        if icc and not _is_srgb(icc):
            extra["icc_profile"] = icc
        width, height = image.size  # before the frames are read: a GIF's canvas may grow
        encoded = _encode_animation(image, quality, extra)
    else:
        # exif_transpose copies the whole image even when there is nothing to turn.
        still = ImageOps.exif_transpose(image) if orientation not in (1, None) else image
        still, icc = _display_ready(still, icc)
        if icc and not _is_srgb(icc):
            extra["icc_profile"] = icc
        alpha = _has_alpha(still)
        encoded = _encode_still(still, target, quality, alpha, extra, jpeg_optimize)
        width, height = still.size
        frames = 1

    # Never bigger: the input, metadata stripped losslessly, when it is no larger than our
    # output in the same format and already shows right (upright, 8-bit, not CMYK).
    display_ready = image.mode in ("L", "RGB", "RGBA", "LA", "P") and orientation in (1, None)
    same_frames = frames == getattr(image, "n_frames", 1)
    if target == input_format and display_ready and same_frames:
        kept = data if keep_metadata else strip_metadata(data, input_format)
        if len(kept) <= len(encoded):
            return Encoded(
                kept, target, width, height, input_format, kept_original=True, frames=frames
            )
    return Encoded(encoded, target, width, height, input_format, frames=frames)


# ---- lossless metadata stripping (for inputs kept as they are) ------------------------------

_JPEG_DROP = {0xE1, 0xED, 0xFE}  # APP1 (EXIF, XMP), APP13 (IPTC), COM
_PNG_DROP = {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"}
_WEBP_DROP = {b"EXIF", b"XMP "}


def strip_metadata(data: bytes, fmt: str) -> bytes:
    """The same image without EXIF/XMP/IPTC/comments; pixels and ICC profile untouched."""
    try:
        if fmt == "JPEG":
            return _strip_jpeg(data)
        if fmt == "PNG":
            return _strip_png(data)
        if fmt == "WEBP":
            return _strip_webp(data)
    except (IndexError, struct.error, ValueError):
        pass  # malformed container: keep as decoded by Pillow, which accepted it
    return data


def _strip_jpeg(data: bytes) -> bytes:
    out = bytearray(data[:2])  # SOI
    pos = 2
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError("not at a marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data
            out += data[pos:]
            return bytes(out)
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:
            out += data[pos : pos + 2]
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if pos + 2 + length > len(data):
            raise ValueError("segment runs past the end of the file")
        if marker not in _JPEG_DROP:
            out += data[pos : pos + 2 + length]
        pos += 2 + length
    return bytes(out)


def _strip_png(data: bytes) -> bytes:
    out = bytearray(data[:8])
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ValueError("chunk runs past the end of the file")
        if kind not in _PNG_DROP:
            out += data[pos:end]
        pos = end
        if kind == b"IEND":
            break  # what follows is not part of the image (decoders ignore it too)
    return bytes(out)


def _strip_webp(data: bytes) -> bytes:
    # Only what the RIFF header claims is the image; decoders ignore anything after it.
    (riff_size,) = struct.unpack("<I", data[4:8])
    stop = 8 + riff_size
    if stop > len(data):
        raise ValueError("RIFF size runs past the end of the file")
    body = bytearray()
    pos = 12
    while pos < stop:
        kind = data[pos : pos + 4]
        (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        end = pos + 8 + length + (length & 1)
        if end > stop:
            raise ValueError("chunk runs past the end of the RIFF")
        if kind == b"VP8X":
            chunk = bytearray(data[pos:end])
            chunk[8] &= ~(0x08 | 0x04) & 0xFF  # clear the EXIF and XMP flags
            body += chunk
        elif kind not in _WEBP_DROP:
            body += data[pos:end]
        pos = end
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + bytes(body)
