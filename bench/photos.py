"""The real photographs the benchmarks use: scikit-image's data set, shipped in its wheel."""

from __future__ import annotations

import io
import random
from pathlib import Path

import skimage
from PIL import Image, ImageEnhance

# Colour photographs; the first eight make the fidelity set of `make bench-quality`.
FIDELITY_SET = [
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "ihc.png",
]
CATALOGUE_SET = [*FIDELITY_SET, "motorcycle_right.png", "color.png"]
# Catalogue widths, largest first.
WIDTHS = [2000, 1600, 1200, 1000, 800, 600]


def photo(name: str) -> Image.Image:
    """One photograph as an RGB image."""
    return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")


def catalogue_images(count: int, seed: int = 7) -> list[bytes]:
    """``count`` distinct JPEGs (q90) from real photographs at catalogue sizes."""
    rng = random.Random(seed)
    sources = [photo(name) for name in CATALOGUE_SET[:count]]
    images = []
    for index in range(count):
        source = sources[index % len(sources)]
        width = WIDTHS[(index // len(sources)) % len(WIDTHS)]
        height = round(width * source.height / source.width)
        crop = rng.uniform(0.0, 0.08)
        box = (
            source.width * crop,
            source.height * crop,
            source.width * (1 - crop / 2),
            source.height * (1 - crop / 2),
        )
        variant = source.resize((width, height), Image.Resampling.BICUBIC, box=box)
        variant = ImageEnhance.Brightness(variant).enhance(rng.uniform(0.9, 1.1))
        out = io.BytesIO()
        variant.save(out, "JPEG", quality=90)
        images.append(out.getvalue())
    return images
