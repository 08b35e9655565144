"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
Networks"): a class activation map that needs no gradients.

Each channel of a layer's activation, upsampled to the input and min-max scaled, masks the input; the
target logits of the masked inputs, soft-maxed over channels, weight the channels; the map is the ReLU of
the weighted sum, min-max scaled and resized to the input. The steps follow pytorch-grad-cam's
``ScoreCAM`` so that the two agree on the same model and input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convscope_server import render
from convscope_server.forward.backend import softmax


def resize_align_corners(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (C, h, w) maps with corner pixels aligned (torch's UpsamplingBilinear2d)."""
    _, in_h, in_w = maps.shape

    def axis(out_size, in_size):
        pos = np.arange(out_size) * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros(1)
        low = np.minimum(np.floor(pos).astype(int), in_size - 1)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (pos - low).astype(np.float32)

    y0, y1, ty = axis(height, in_h)
    x0, x1, tx = axis(width, in_w)
    top = maps[:, y0][:, :, x0] * (1 - tx) + maps[:, y0][:, :, x1] * tx
    bottom = maps[:, y1][:, :, x0] * (1 - tx) + maps[:, y1][:, :, x1] * tx
    return top * (1 - ty[None, :, None]) + bottom * ty[None, :, None]


def _scale(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


@dataclass
class ScoreCamMap:
    cam: np.ndarray              # (H, W) in [0, 1]
    channel_weights: np.ndarray  # (C,)
    passes: int = 0              # forward passes run: one per live channel, one for all silent ones


def score_cam(backend, sample: np.ndarray, target: int, activation: np.ndarray, channel_axis: int,
              spatial_axes: tuple[int, int], batch_size: int = 16, progress=None,
              should_stop=None) -> ScoreCamMap | None:
    """``activation``: the layer's (C, h, w) values for ``sample`` (channels first). ``channel_axis`` and
    ``spatial_axes`` locate the model input's axes in ``sample``. None when stopped early."""
    height, width = sample.shape[spatial_axes[0]], sample.shape[spatial_axes[1]]
    channels = activation.shape[0]
    scores = np.empty(channels, np.float32)
    # A channel that is zero everywhere (common after a ReLU) masks the whole input to zero, whatever the
    # channel: one pass scores them all, exactly as one pass each would.
    silent = ~activation.reshape(channels, -1).any(axis=1)
    if silent.any():
        scores[silent] = backend.logits(np.zeros_like(sample[None], dtype=np.float32))[0, target]
    live = np.flatnonzero(~silent)
    for begin in range(0, len(live), batch_size):
        if should_stop is not None and should_stop():
            return None
        chosen = live[begin: begin + batch_size]
        masks = resize_align_corners(activation[chosen], height, width)
        flat = masks.reshape(len(masks), -1)
        lo, hi = flat.min(axis=1)[:, None, None], flat.max(axis=1)[:, None, None]
        masks = (masks - lo) / (hi - lo + 1e-8)
        masks = np.expand_dims(masks, 1 + channel_axis)  # broadcast over the input's channels
        scores[chosen] = backend.logits((sample[None] * masks).astype(np.float32))[:, target]
        if progress is not None:
            progress(int(silent.sum()) + begin + len(chosen), channels)
    weights = softmax(scores)
    cam = np.maximum((weights[:, None, None] * activation).sum(axis=0), 0)
    cam = render.resize(_scale(cam), height, width)
    return ScoreCamMap(_scale(np.maximum(cam, 0)).astype(np.float32), weights, len(live) + int(silent.any()))
