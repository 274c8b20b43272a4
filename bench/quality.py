"""Fidelity benchmark of encoder settings over real photographs (scikit-image's data set).

Each photograph is first saved as a quality-92 JPEG, which is what a catalogue holds; every
setting then re-encodes those bytes. Per setting it reports output bytes relative to the
input, SSIM against the decoded input, and encode time per megapixel. The row marked
``default`` is what imgproc's codec does (``imgproc.codec``).

Usage: python bench/quality.py [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import FIDELITY_SET, photo  # noqa: E402

from imgproc.codec import compress  # noqa: E402
from imgproc.models import OutputFormat  # noqa: E402

JPEG = [
    ("plain save(quality=50)", {"quality": 50}),
    ("q50 optimize", {"quality": 50, "optimize": True}),
    ("q50 progressive", {"quality": 50, "progressive": True}),
    ("q50 optimize+progressive", {"quality": 50, "optimize": True, "progressive": True}),
    (
        "q50 opt+prog 4:4:4",
        {"quality": 50, "optimize": True, "progressive": True, "subsampling": 0},
    ),
    (
        "q50 opt+prog 4:2:2",
        {"quality": 50, "optimize": True, "progressive": True, "subsampling": 1},
    ),
    ("q40 optimize+progressive", {"quality": 40, "optimize": True, "progressive": True}),
    ("q60 optimize+progressive", {"quality": 60, "optimize": True, "progressive": True}),
    ("q75 optimize+progressive", {"quality": 75, "optimize": True, "progressive": True}),
]
WEBP = [(f"webp q50 method {m}", {"quality": 50, "method": m}) for m in (0, 4, 6)]


def load_inputs() -> list[tuple[str, bytes, np.ndarray]]:
    inputs = []
    for name in FIDELITY_SET:
        image = photo(name)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=92)
        data = out.getvalue()
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        inputs.append((name, data, reference))
    return inputs


def measure(
    inputs: list[tuple[str, bytes, np.ndarray]], encode: Any, repeat: int
) -> dict[str, float]:
    ratios, ssims, ms_per_mpx = [], [], []
    for _name, data, reference in inputs:
        timings = []
        for _ in range(repeat):
            started = time.perf_counter()
            output = encode(data)
            timings.append(time.perf_counter() - started)
        decoded = np.asarray(Image.open(io.BytesIO(output)).convert("RGB"))
        ratios.append(len(output) / len(data))
        ssims.append(structural_similarity(reference, decoded, channel_axis=2))
        megapixels = reference.shape[0] * reference.shape[1] / 1e6
        ms_per_mpx.append(1000 * min(timings) / megapixels)
    return {
        "bytes_vs_input": statistics.mean(ratios),
        "ssim": statistics.mean(ssims),
        "ms_per_mpx": statistics.mean(ms_per_mpx),
    }


def pillow(fmt: str, options: dict[str, Any]) -> Any:
    def encode(data: bytes) -> bytes:
        out = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(out, fmt, **options)
        return out.getvalue()

    return encode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    inputs = load_inputs()
    rows: list[tuple[str, dict[str, float]]] = []
    for label, options in JPEG:
        rows.append((label, measure(inputs, pillow("JPEG", options), args.repeat)))
    for label, options in WEBP:
        rows.append((label, measure(inputs, pillow("WEBP", options), args.repeat)))
    for label, optimize in (
        ("default (imgproc codec, q50)", False),
        ("imgproc codec, q50, IMGPROC_JPEG_OPTIMIZE", True),
    ):
        rows.append(
            (
                label,
                measure(
                    inputs,
                    lambda d, o=optimize: (
                        compress(
                            d,
                            quality=50,
                            output_format=OutputFormat.AUTO,
                            max_pixels=10**8,
                            jpeg_optimize=o,
                        ).data
                    ),
                    args.repeat,
                ),
            )
        )
    print(f"{len(inputs)} photographs ({', '.join(FIDELITY_SET)}), inputs saved at JPEG q92\n")
    print("| setting | bytes vs input | SSIM | decode+encode ms/Mpx |")
    print("|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['bytes_vs_input']:.3f} | {r['ssim']:.4f} | {r['ms_per_mpx']:.1f} |")
    print(json.dumps({label: {k: round(v, 4) for k, v in r.items()} for label, r in rows}))
    plain, default = rows[0][1], rows[-2][1]
    ok = (
        default["bytes_vs_input"] <= plain["bytes_vs_input"]
        and default["ssim"] >= plain["ssim"] - 1e-9
    )
    print(
        f"\ndefault vs plain save(quality=50): "
        f"{'no larger and no worse' if ok else 'WORSE: check the codec settings'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
