"""Maximally-activating patches: for every channel of a layer, the dataset images that excite it most and
the input patch under the winning unit's receptive field (Zeiler & Fergus 2014, "Visualizing and
Understanding Convolutional Networks"; Girshick et al. 2014, "Rich feature hierarchies", the pool5 figure).

An image counts once per channel, at its strongest position, so a channel's k hits are k different images.
All channels are tracked in one pass with a (k, channels) table merged with every batch: memory is
O(k x channels) whatever the number of images. Ties keep the earlier image (scan order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from convscope_server import render
from convscope_server.onnx.graph import Spatial


class TopActivations:
    """The running top-k table. ``add`` takes channels-first activations, (B, C, H, W) or (B, C)."""

    def __init__(self, channels: np.ndarray, k: int):
        self.channels = np.asarray(channels, np.int64)
        self.k = k
        width = len(self.channels)
        self.values = np.empty((0, width), np.float32)
        self.images = np.empty((0, width), np.int64)     # scan index of the image
        self.positions = np.empty((0, width), np.int64)  # flat index into the layer's (H, W) grid

    def add(self, activations: np.ndarray, indices: list[int]) -> None:
        values, positions = channel_maxima(activations, self.channels)
        images = np.broadcast_to(np.asarray(indices, np.int64)[:, None], values.shape)
        # The table is sorted best first, and ties sit in scan order; the new rows all come later in the
        # scan, so a stable sort on the value alone keeps "earlier image first" among equal values.
        all_values = np.concatenate([self.values, values])
        order = np.argsort(-all_values, axis=0, kind="stable")[: self.k]
        self.values = np.take_along_axis(all_values, order, axis=0)
        self.images = np.take_along_axis(np.concatenate([self.images, images]), order, axis=0)
        self.positions = np.take_along_axis(np.concatenate([self.positions, positions]), order, axis=0)

    def merge(self, values: np.ndarray, positions: np.ndarray, indices) -> None:
        """Fold in per-image maxima (from :func:`channel_maxima`) of images scanned elsewhere, arriving in any
        order: rows are ordered by value, then scan index, so the table is the one ``add`` builds in scan
        order (a distributed scan's merge; every index must come once)."""
        images = np.broadcast_to(np.asarray(indices, np.int64)[:, None], values.shape)
        all_values = np.concatenate([self.values, np.asarray(values, np.float32)])
        all_images = np.concatenate([self.images, images])
        order = np.lexsort((all_images, -all_values), axis=0)[: self.k]
        self.values = np.take_along_axis(all_values, order, axis=0)
        self.images = np.take_along_axis(all_images, order, axis=0)
        self.positions = np.take_along_axis(np.concatenate([self.positions, positions]), order, axis=0)

    def referenced(self) -> set[int]:
        """Scan indices of the images some channel still keeps."""
        return set(np.unique(self.images).tolist())


def channel_maxima(activations: np.ndarray, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and channel of channels-first ``activations``: the largest value (float32) and its flat
    position (the first maximum in row-major order)."""
    picked = activations[:, channels]
    flat = picked.reshape(len(picked), len(channels), -1)
    positions = flat.argmax(axis=2)
    values = np.take_along_axis(flat, positions[..., None], axis=2)[..., 0].astype(np.float32)
    return values, positions


@dataclass(frozen=True)
class Box:
    """Rows [top, bottom) and columns [left, right) in model-input pixels."""

    top: int
    left: int
    bottom: int
    right: int


def _axis_window(start: float, jump: int, size: int, unit: int, limit: int) -> tuple[int, int]:
    centre = start + unit * jump
    half = (size - 1) / 2
    low = max(0, math.floor(centre - half + 0.5))
    high = min(limit, math.floor(centre + half + 0.5) + 1)
    return low, max(high, low + 1)


def receptive_box(spatial: Spatial | None, position: int, grid_width: int, height: int, width: int) -> Box:
    """The input window seen by the unit at flat ``position`` of a (rows, grid_width) grid, clipped to the
    image; the whole image for non-spatial layers."""
    if spatial is None:
        return Box(0, 0, height, width)
    row, col = divmod(int(position), grid_width)
    top, bottom = _axis_window(spatial.h.start, spatial.h.jump, spatial.h.size, row, height)
    left, right = _axis_window(spatial.w.start, spatial.w.jump, spatial.w.size, col, width)
    return Box(top, left, bottom, right)


def crop(pixels: np.ndarray, box: Box) -> np.ndarray:
    return np.ascontiguousarray(pixels[box.top: box.bottom, box.left: box.right])


def fit_tile(patch: np.ndarray, size: int, background: int = 64) -> np.ndarray:
    """A patch scaled to fit a size x size tile, keeping its aspect ratio (border patches are clipped)."""
    height, width = patch.shape[:2]
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(patch).resize((new_w, new_h), Image.BILINEAR))
    tile = np.full((size, size, 3), background, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    tile[top: top + new_h, left: left + new_w] = resized
    return tile


def patch_grid(rows: list[list[np.ndarray]], tile: int) -> np.ndarray:
    """One row per channel, its patches best first (the lecture's pool5 figure)."""
    columns = max((len(r) for r in rows), default=1) or 1
    tiles = []
    for patches in rows:
        tiles.extend(fit_tile(p, tile) for p in patches)
        tiles.extend(np.full((tile, tile, 3), 32, np.uint8) for _ in range(columns - len(patches)))
    return render.grid(tiles, columns=columns, pad=2)
