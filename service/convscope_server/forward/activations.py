"""Activation visualisation (Yosinski et al. 2015, "Understanding Neural Networks Through Deep
Visualization"): the values of any tensor for a batch of images, per-channel statistics, channel grids
with zero shown black, and a dead-filter report over a set of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convscope_server import render


CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose"}  # their output's axis 1 is the filters', by the op's definition


def channel_axis(shape, layout: str, op_type: str = "") -> int | None:
    """The axis of a tensor (N, ...) that holds channels: from its layout ("NCHW" 1, "NHWC" 3); axis 1 of an
    (N, C) vector and of a Conv output; the only axis longer than 1 of a pooled (N, C, 1, 1) or (N, 1, 1, C)
    vector. None when it cannot be told: a wrong axis is never guessed."""
    if layout:
        return 1 if layout == "NCHW" else 3
    if len(shape) < 2:
        return None
    if len(shape) == 2 or op_type in CHANNELS_FIRST_OPS:
        return 1
    longer = [axis for axis, size in enumerate(shape[1:], 1) if size != 1]
    return longer[0] if len(longer) == 1 else None


def channels_first(values: np.ndarray, layout: str, axis: int | None = None) -> np.ndarray:
    """(N, ...) values with channels on axis 1: NHWC tensors transposed, or ``axis`` moved to 1."""
    if axis is not None:
        return np.moveaxis(values, axis, 1) if axis != 1 else values
    return values.transpose(0, 3, 1, 2) if layout == "NHWC" and values.ndim == 4 else values


def channel_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel (axis 1 of channels-first values), over the batch and every position."""
    flat = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1) if values.ndim >= 2 else values[None]
    return {"mean": flat.mean(axis=1), "min": flat.min(axis=1), "max": flat.max(axis=1),
            "zero_fraction": (flat == 0).mean(axis=1)}


def activation_grid(sample: np.ndarray, max_channels: int, scale_max: float | None = None) -> np.ndarray:
    """One image's (C, H, W) activations as a grid of grayscale tiles: 0 (and below) black, the layer's
    largest value white, so channels can be compared with each other."""
    sample = sample[:max_channels]
    top = scale_max if scale_max is not None else float(sample.max())
    scaled = np.clip(sample / top, 0, 1) if top > 0 else np.zeros_like(sample)
    factor = max(1, 32 // max(sample.shape[-1], 1))
    tiles = [render.upscale((tile * 255).round().astype(np.uint8), factor) for tile in scaled]
    return render.grid(tiles, pad=1)


@dataclass
class DeadReport:
    channels: int
    dead: list[int]
    constant: list[int]


class DeadFilterScan:
    """Accumulates per-channel min and max over batches; memory is two vectors per layer."""

    def __init__(self, tolerance: float = 0.0):
        self.tolerance = tolerance
        self._min: dict[str, np.ndarray] = {}
        self._max: dict[str, np.ndarray] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        stats = channel_stats(values)
        if name in self._min:
            np.minimum(self._min[name], stats["min"], out=self._min[name])
            np.maximum(self._max[name], stats["max"], out=self._max[name])
        else:
            self._min[name], self._max[name] = stats["min"], stats["max"]

    def report(self, name: str) -> DeadReport:
        lo, hi = self._min[name], self._max[name]
        dead = (np.abs(lo) <= self.tolerance) & (np.abs(hi) <= self.tolerance)
        constant = ~dead & (hi - lo <= self.tolerance)
        return DeadReport(len(lo), np.flatnonzero(dead).tolist(), np.flatnonzero(constant).tolist())
