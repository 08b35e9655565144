"""Occlusion sensitivity (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks").

A window of ``baseline`` values slides over the model input (all channels at once); at each position the
target class's probability (``scores.class_probabilities``: softmax, a sigmoid for a single output, or the
output as it is when it holds probabilities) and logit are recorded. The per-pixel attribution is the mean,
over the windows covering a pixel, of the drop in the chosen score, which is what Captum's ``Occlusion`` computes
for the same window, stride and baseline (positions ``0, s, 2s, ...`` up to ``ceil((L - w) / s) * s``, the
last window clipped at the border). Perturbed inputs go to onnxruntime in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convscope_server.scores import class_probabilities


def window_starts(size: int, window: int, stride: int) -> list[int]:
    return [i * stride for i in range(math.ceil((size - window) / stride) + 1)]


def forward_passes(height: int, width: int, window: tuple[int, int], stride: tuple[int, int]) -> int:
    return len(window_starts(height, window[0], stride[0])) * len(window_starts(width, window[1], stride[1]))


def gaussian_blur(sample: np.ndarray, sigma: float, axes: tuple[int, int]) -> np.ndarray:
    """Separable Gaussian blur over the two spatial ``axes`` (edges reflected)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    kernel /= kernel.sum()
    out = sample.astype(np.float32)
    for axis in axes:
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return out.astype(np.float32)


@dataclass
class OcclusionMaps:
    probability: np.ndarray   # (rows, cols)
    logit: np.ndarray         # (rows, cols)
    rows: list[int]
    cols: list[int]
    attribution: np.ndarray   # (H, W)
    base_probability: float
    base_logit: float


def occlusion(backend, sample: np.ndarray, target: int, window: tuple[int, int], stride: tuple[int, int],
              baseline: np.ndarray, spatial_axes: tuple[int, int], score: str = "probability",
              chunk: int = 16, progress=None, should_stop=None, softmax: bool | None = None) -> OcclusionMaps | None:
    """Occlusion maps for one model-input ``sample`` (no batch axis). ``baseline`` has the sample's shape.
    ``softmax`` is the model's ``[output] softmax`` (None: the backend's model's). Returns None when
    ``should_stop()`` turned true between batches."""
    if softmax is None:
        config = getattr(getattr(backend, "model", None), "config", None)
        softmax = True if config is None else bool(config.softmax)
    h_axis, w_axis = spatial_axes
    height, width = sample.shape[h_axis], sample.shape[w_axis]
    rows = window_starts(height, window[0], stride[0])
    cols = window_starts(width, window[1], stride[1])
    positions = [(r, c) for r in rows for c in cols]

    # The clean input rides in the first batch: one input shape for the whole job (a GPU session searches
    # convolution algorithms per shape) and no separate pass.
    runs: list[tuple[int, int] | None] = [None, *positions]
    logits = np.empty(len(runs), np.float32)
    probabilities = np.empty(len(runs), np.float32)
    for begin in range(0, len(runs), chunk):
        if should_stop is not None and should_stop():
            return None
        batch = np.repeat(sample[None], min(chunk, len(runs) - begin), axis=0)
        for k, position in enumerate(runs[begin: begin + chunk]):
            if position is None:
                continue
            index = [k, slice(None), slice(None), slice(None)]
            index[1 + h_axis] = slice(position[0], position[0] + window[0])
            index[1 + w_axis] = slice(position[1], position[1] + window[1])
            batch[tuple(index)] = baseline[tuple(index[1:])]
        scores = backend.logits(batch)
        logits[begin: begin + len(batch)] = scores[:, target]
        probabilities[begin: begin + len(batch)] = class_probabilities(scores, softmax)[:, target]
        if progress is not None:
            progress(begin + len(batch) - 1, len(positions))
    base_logit, base_probability = float(logits[0]), float(probabilities[0])
    logits, probabilities = logits[1:], probabilities[1:]

    drops = (base_probability - probabilities) if score == "probability" else (base_logit - logits)
    total = np.zeros((height, width), np.float64)
    counts = np.zeros((height, width), np.float64)
    for (r, c), drop in zip(positions, drops):
        total[r: r + window[0], c: c + window[1]] += drop
        counts[r: r + window[0], c: c + window[1]] += 1
    attribution = (total / np.maximum(counts, 1)).astype(np.float32)
    return OcclusionMaps(probabilities.reshape(len(rows), len(cols)), logits.reshape(len(rows), len(cols)),
                         rows, cols, attribution, base_probability, base_logit)
