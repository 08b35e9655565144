"""Accuracy under common corruptions (in the spirit of Hendrycks & Dietterich 2019, "Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations"), forward-only: each model input is turned
back into the pixels it shows, corrupted at a few strengths, normalised again and classified.

- gaussian_noise: additive noise with standard deviation ``strength`` x 255, seeded per image;
- gaussian_blur: Pillow's Gaussian blur of radius ``strength`` pixels;
- jpeg: re-encoded at quality ``strength``;
- occlusion: a square of side ``strength`` x the shorter side, at a seeded random place, set to the
  normalisation mean (a zero model input).

Accuracy under FGSM (the gradient side) is ``gradient.adversarial.robustness_curve``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from convscope_server.images import bgr_order, normalize_pixels
from convscope_server.render import display_image
from convscope_server.scores import predicted_classes

CORRUPTIONS = {
    "gaussian_noise": (0.04, 0.08, 0.16),
    "gaussian_blur": (1.0, 2.0, 4.0),
    "jpeg": (50, 20, 8),
    "occlusion": (0.25, 0.5, 0.75),
}


def corrupt(pixels: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) or grey (H, W) pixels corrupted by ``kind`` at ``strength`` (see the module docstring)."""
    if kind == "gaussian_noise":
        noisy = pixels.astype(np.float64) + rng.normal(0.0, strength * 255.0, pixels.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if kind == "gaussian_blur":
        return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(strength)))
    if kind == "jpeg":
        buffer, image = io.BytesIO(), Image.fromarray(pixels)
        image.save(buffer, format="JPEG", quality=int(strength))
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(image.mode))
    if kind == "occlusion":
        return pixels  # applied in model-input space (see corrupted_input)
    raise ValueError(f"unknown corruption {kind!r}; known: {sorted(CORRUPTIONS)}")


def corrupted_input(sample: np.ndarray, config, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One model input sample under ``kind`` at ``strength``."""
    if kind == "occlusion":
        h_axis, w_axis = (1, 2) if config.layout == "NCHW" else (0, 1)
        height, width = sample.shape[h_axis], sample.shape[w_axis]
        side = max(1, int(round(strength * min(height, width))))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        out = sample.copy()
        index = [slice(None)] * 3
        index[h_axis], index[w_axis] = slice(top, top + side), slice(left, left + side)
        out[tuple(index)] = 0
        return out
    if config.channels in (1, 3):
        pixels = corrupt(display_image(sample, config), kind, strength, rng)
        return normalize_pixels(pixels[..., :config.channels], config)
    # 4 channels (RGBA) or another count: the pixels of every channel (RGB order, as normalize_pixels takes
    # them); noise on all at once, blur and JPEG on each channel as a grey picture of its own
    hwc = sample.transpose(1, 2, 0) if config.layout == "NCHW" else sample
    values = (hwc * np.asarray(config.std, np.float32) + np.asarray(config.mean, np.float32)) * (255.0 / config.scale)
    if config.channel_order == "BGR":
        values = values[..., bgr_order(values.shape[2])]
    pixels = np.clip(np.round(values), 0, 255).astype(np.uint8)
    if kind == "gaussian_noise":
        pixels = corrupt(pixels, kind, strength, rng)
    else:
        pixels = np.stack([corrupt(np.ascontiguousarray(pixels[..., c]), kind, strength, rng)
                           for c in range(pixels.shape[2])], axis=2)
    return normalize_pixels(pixels, config)


def corruption_accuracy(logits, samples: np.ndarray, accepted: list[tuple[int, ...]], config,
                        corruptions: dict | None = None, seed: int = 0, should_stop=None, progress=None) -> dict | None:
    """{kind: [{"strength": s, "accuracy": a}, ...]} of the model (``logits(batch)``) on ``samples`` whose
    right answers are ``accepted`` (a tuple of class indices per sample), with "clean" the uncorrupted
    accuracy. Noise and occlusion places are seeded per (kind, strength, image); the prediction is
    ``scores.predicted_classes`` (for a single output, class 0 when p > 0.5). None when stopped."""
    corruptions = CORRUPTIONS if corruptions is None else corruptions

    def accuracy(batch: np.ndarray) -> float:
        predicted = predicted_classes(np.asarray(logits(batch)).reshape(len(batch), -1), config.softmax)
        return float(np.mean([p in a for p, a in zip(predicted.tolist(), accepted)]))

    report: dict = {"clean": accuracy(samples)}
    total, done = sum(len(strengths) for strengths in corruptions.values()), 0
    for k, (kind, strengths) in enumerate(corruptions.items()):
        rows = []
        for s, strength in enumerate(strengths):
            if should_stop is not None and should_stop():
                return None
            batch = np.stack([corrupted_input(x, config, kind, strength, np.random.default_rng([seed, k, s, i]))
                              for i, x in enumerate(samples)])
            rows.append({"strength": float(strength), "accuracy": accuracy(batch)})
            done += 1
            if progress is not None:
                progress(done, total, f"{kind} {strength:g}")
        report[kind] = rows
    return report
