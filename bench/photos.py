"""The real photographs the benchmarks use: scikit-image's data set, shipped in its wheel."""

from __future__ import annotations

from pathlib import Path

import skimage
from PIL import Image

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


def photo(name: str) -> Image.Image:
    """One photograph as an RGB image."""
    return Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")
