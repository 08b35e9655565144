"""Model-input space <-> the original image's geometry.

Every map the server returns (saliency, CAMs, occlusion, activations) lies in model-input space: the
picture after the server resized it (``"stretch"``: the whole image squeezed to the input size;
``"center_crop"``: shorter side resized to ``input / crop_fraction``, then the centre cropped). These
helpers invert that step, exactly as ``convscope_server.images`` performs it, so a map can be laid over
the photo at its own size and aspect.

``preprocessing`` is the dict ``Client.describe(model).preprocessing`` returns; ``image_size`` is the
original image's ``(height, width)`` in pixels (numpy order: ``array.shape[:2]``; for a PIL image pass
``image.size[::-1]``).
"""

from __future__ import annotations

import numpy as np


def _resized_size(width: int, height: int, preprocessing: dict) -> tuple[int, int]:
    """(width, height) the server resizes the image to before cropping (as ``images.resized_size``)."""
    if preprocessing["resize"] == "center_crop":
        side = min(preprocessing["height"], preprocessing["width"])
        scale = side / preprocessing["crop_fraction"] / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    return preprocessing["width"], preprocessing["height"]


def input_box(preprocessing: dict, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of the region the model input shows, in the original image's pixel
    coordinates (edges, not centres: the whole image is ``(0, 0, H, W)``). ``image_size``: (H, W)."""
    height, width = image_size
    if preprocessing["resize"] != "center_crop":
        return 0.0, 0.0, float(height), float(width)
    resized_w, resized_h = _resized_size(width, height, preprocessing)
    left = (resized_w - preprocessing["width"]) // 2
    top = (resized_h - preprocessing["height"]) // 2
    sx, sy = width / resized_w, height / resized_h  # original pixels per resized pixel
    return (top * sy, left * sx, (top + preprocessing["height"]) * sy, (left + preprocessing["width"]) * sx)


def _sample(values: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` at fractional pixel-centre ``positions``
    (clamped at the edges, like Pillow's bilinear resize when enlarging)."""
    size = values.shape[axis]
    positions = np.clip(positions, 0, size - 1)
    low = np.floor(positions).astype(int)
    high = np.minimum(low + 1, size - 1)
    weight = (positions - low).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    return np.take(values, low, axis) * (1 - weight) + np.take(values, high, axis) * weight


def to_image(values: np.ndarray, preprocessing: dict, image_size: tuple[int, int],
             fill: float = np.nan) -> np.ndarray:
    """A (h, w) or (h, w, c) array covering the model input (any resolution: a 224x224 saliency map, a 7x7
    CAM, an occlusion grid) -> the original image's (H, W[, c]) geometry, bilinear, float64; pixels the
    model never saw (outside :func:`input_box`, centre crops only) are ``fill``. ``image_size``: (H, W)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim not in (2, 3):
        raise ValueError(f"values must be (h, w) or (h, w, c), got shape {values.shape}")
    height, width = (int(s) for s in image_size)
    top, left, bottom, right = input_box(preprocessing, (height, width))
    rows = np.arange(height) + 0.5  # pixel centres in the original image
    cols = np.arange(width) + 0.5
    h, w = values.shape[:2]
    out = _sample(values, (rows - top) * h / (bottom - top) - 0.5, 0)
    out = _sample(out, (cols - left) * w / (right - left) - 0.5, 1)
    outside_rows = (rows < top) | (rows > bottom)
    outside_cols = (cols < left) | (cols > right)
    out[outside_rows] = fill
    out[:, outside_cols] = fill
    return out
