"""Build the demo dataset: labelled crops and augmentations of the photos bundled with scikit-image and
scikit-learn (nothing is downloaded).

    python datasets/build_demo.py [--out datasets/demo] [--per-class 12] [--size 256] [--seed 0]

Writes ``<out>/<label>/<label>_<n>.jpg``: for each source photo, ``per-class`` random crops (25-100% of
the area, any aspect ratio within 3:4..4:3), horizontal flips, small rotations and brightness / contrast /
colour changes, saved with the longer side ``size`` pixels. The label is the photo's subject, so a
folder-labelled dataset comes out (scans report it per image; galleries keep it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

# label -> how to get the photo (uint8 RGB or gray)
SOURCES = {
    "astronaut": ("skimage", "astronaut"), "cat": ("skimage", "chelsea"), "coffee": ("skimage", "coffee"),
    "rocket": ("skimage", "rocket"), "galaxies": ("skimage", "hubble_deep_field"),
    "tissue": ("skimage", "immunohistochemistry"), "retina": ("skimage", "retina"),
    "motorcycle": ("skimage", "stereo_left"), "cameraman": ("skimage", "camera"), "moon": ("skimage", "moon"),
    "coins": ("skimage", "coins"), "text": ("skimage", "page"), "brick": ("skimage", "brick"),
    "grass": ("skimage", "grass"), "gravel": ("skimage", "gravel"), "temple": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
}


def source_photo(kind: str, name: str) -> Image.Image:
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name))
    from skimage import data

    if name == "stereo_left":
        pixels = data.stereo_motorcycle()[0]
    else:
        pixels = getattr(data, name)()
    return Image.fromarray(pixels).convert("RGB")


def augment(photo: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    width, height = photo.size
    area = width * height * rng.uniform(0.25, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * ratio))))
    crop_h = int(min(height, round(np.sqrt(area / ratio))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    angle = rng.uniform(-12, 12)
    image = image.rotate(angle, resample=Image.BILINEAR, expand=False)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def build(out: Path, per_class: int = 12, size: int = 256, seed: int = 0, labels=None) -> int:
    """Write the dataset under ``out``; returns the number of images."""
    rng = np.random.default_rng(seed)
    count = 0
    for label, (kind, name) in SOURCES.items():
        if labels is not None and label not in labels:
            continue
        photo = source_photo(kind, name)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            augment(photo, rng, size).save(folder / f"{label}_{n:02d}.jpg", quality=90)
            count += 1
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    count = build(args.out, args.per_class, args.size, args.seed)
    print(f"demo dataset: {count} images in {len(SOURCES)} classes under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
