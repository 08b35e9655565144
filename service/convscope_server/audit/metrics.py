"""The numbers of a model audit, computed from arrays a dataset scan and the techniques produce: no proto
types, no I/O, no torch (the audit composes existing techniques; this module only counts).

- classification: top-k accuracy, the most frequent confusions;
- calibration: expected calibration error over equal-width confidence bins and the reliability diagram's
  bins (Guo et al. 2017, "On Calibration of Modern Neural Networks");
- attribution faithfulness: deletion and insertion curves (Petsiuk et al. 2018, "RISE: Randomized Input
  Sampling for Explanation of Black-box Models"): pixels removed from (or restored into) the input in
  order of attribution, the target probability after each step, and the area under the curve;
- units: per-channel statistics over a scan, dead channels (never above a threshold anywhere) and
  saturated ones (at their ceiling most of the time, as ReLU6 units can be);
- dataset: near-duplicate pairs by code distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz


# -- classification ---------------------------------------------------------------------------------------

def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of rows of ``scores`` (N, classes) whose label is among the ``k`` highest scores; ties are
    broken towards the lower class index, as a stable sort of the negated scores does."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if len(scores) == 0:
        return float("nan")
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


@dataclass(frozen=True)
class Confusion:
    true: int
    predicted: int
    count: int


def confusions(predicted: np.ndarray, labels: np.ndarray, top: int = 10) -> list[Confusion]:
    """The ``top`` most frequent (true, predicted) pairs with true != predicted, most frequent first, ties
    in (true, predicted) order."""
    pairs: dict[tuple[int, int], int] = {}
    for true, guess in zip(np.asarray(labels).tolist(), np.asarray(predicted).tolist()):
        if true != guess:
            pairs[(true, guess)] = pairs.get((true, guess), 0) + 1
    ordered = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
    return [Confusion(true, guess, count) for (true, guess), count in ordered[:top]]


# -- calibration ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    ece: float                  # expected calibration error: sum over bins of |accuracy - confidence| x share
    edges: np.ndarray           # (bins + 1,) confidence bin edges over [0, 1]
    confidence: np.ndarray      # (bins,) mean top-1 probability of the predictions in each bin (NaN if empty)
    accuracy: np.ndarray        # (bins,) fraction of those predictions that are right (NaN if empty)
    count: np.ndarray           # (bins,) predictions per bin


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> Calibration:
    """Top-1 calibration of ``probabilities`` (N, classes) against one label per row."""
    probabilities = np.asarray(probabilities, np.float64)
    return calibration_of(probabilities.max(axis=1), probabilities.argmax(axis=1) == np.asarray(labels), bins)


def calibration_of(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> Calibration:
    """Calibration of predictions with top-1 probability ``confidence`` and ``correct`` (booleans): each
    falls in the bin ``(edges[b], edges[b + 1]]`` of its confidence (the first bin also takes 0)."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, bins) / count
        accuracy = np.bincount(index, correct.astype(np.float64), bins) / count
    used = count > 0
    ece = float((np.abs(accuracy[used] - mean_confidence[used]) * count[used]).sum() / max(1, len(correct)))
    return Calibration(ece, edges, mean_confidence, accuracy, count)


# -- attribution faithfulness -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Curve:
    fractions: np.ndarray   # (steps + 1,) share of pixels removed (deletion) or restored (insertion)
    scores: np.ndarray      # (steps + 1,) target probability at each fraction
    auc: float              # trapezoidal area under scores over fractions, in [0, 1]


def pixel_order(attribution_map: np.ndarray) -> np.ndarray:
    """Flat pixel indices of an (H, W) map, most important first (ties in row-major order)."""
    return np.argsort(-np.asarray(attribution_map, np.float64).ravel(), kind="stable")


def perturbation_curve(score, sample: np.ndarray, baseline: np.ndarray, attribution_map: np.ndarray,
                       spatial_axes: tuple[int, int], steps: int = 16, insertion: bool = False,
                       batch_size: int = 16) -> Curve:
    """Deletion (``insertion=False``): starting from ``sample``, the most important pixels (all channels)
    are replaced by ``baseline`` in ``steps`` equal shares; insertion: starting from ``baseline``, they are
    restored from ``sample``. ``score(batch)`` gives the target probability of each input of a batch;
    ``attribution_map`` is (H, W) over the input's ``spatial_axes``."""
    height, width = sample.shape[spatial_axes[0]], sample.shape[spatial_axes[1]]
    order = pixel_order(attribution_map)
    counts = np.round(np.linspace(0, height * width, steps + 1)).astype(int)
    start, end = (baseline, sample) if insertion else (sample, baseline)
    inputs = []
    for count in counts:
        mask = np.zeros(height * width, bool)
        mask[order[:count]] = True
        shape = [1] * sample.ndim
        shape[spatial_axes[0]], shape[spatial_axes[1]] = height, width
        inputs.append(np.where(mask.reshape(height, width).reshape(shape), end, start).astype(sample.dtype))
    scores = np.concatenate([np.asarray(score(np.stack(inputs[i: i + batch_size])), np.float64)
                             for i in range(0, len(inputs), batch_size)])
    fractions = counts / float(height * width)
    return Curve(fractions, scores, float(_trapezoid(scores, fractions)))


# -- units ------------------------------------------------------------------------------------------------

class UnitStatistics:
    """Per-channel statistics of one layer over a scan: maximum, mean, the fraction of positions above
    ``threshold`` (active) and at or above a ``ceiling`` (saturated; ReLU6's 6), the images counted, and
    the co-moments of the per-image channel means (C x C), from which :meth:`neighbours` finds the
    channels that fire on the same images.

    Fed with channels-first values (``add``) or with their per-image reduction (``add_rows`` of
    :meth:`per_image`, what a Ray worker sends back). Sums are taken over blocks of ``BLOCK`` images in
    arrival order, so the numbers are bit-identical however the images were batched on the way; reading a
    statistic adds the last, partial block."""

    BLOCK = 16

    def __init__(self, channels: int, threshold: float = 0.0, ceiling: float | None = None):
        self.threshold, self.ceiling = threshold, ceiling
        self.images = 0
        self.positions = 0
        self.maximum = np.full(channels, -np.inf)
        self.total = np.zeros(channels)
        self.active = np.zeros(channels)
        self.saturated = np.zeros(channels)
        self.image_mean_sum = np.zeros(channels)
        self.image_mean_products = np.zeros((channels, channels))
        self._pending: list[dict] = []
        self._pending_rows = 0

    @staticmethod
    def per_image(values: np.ndarray, threshold: float = 0.0, ceiling: float | None = None) -> dict[str, np.ndarray]:
        """Channels-first values (N, C, ...) reduced per image and channel: maximum, total, active and
        saturated counts (N, C), and the positions per image (N,)."""
        flat = np.asarray(values, np.float64).reshape(values.shape[0], values.shape[1], -1)
        return {"maximum": flat.max(axis=2), "total": flat.sum(axis=2),
                "active": (flat > threshold).sum(axis=2),
                "saturated": ((flat >= ceiling).sum(axis=2) if ceiling is not None
                              else np.zeros(flat.shape[:2], np.int64)),
                "positions": np.full(len(flat), flat.shape[2], np.int64)}

    def add(self, values: np.ndarray) -> None:
        self.add_rows(self.per_image(values, self.threshold, self.ceiling))

    def add_rows(self, rows: dict[str, np.ndarray]) -> None:
        """Fold in :meth:`per_image` rows of the next images."""
        self.maximum = np.maximum(self.maximum, rows["maximum"].max(axis=0, initial=-np.inf))
        self._pending.append(rows)
        self._pending_rows += len(rows["maximum"])
        if self._pending_rows >= self.BLOCK:
            self._flush(final=False)

    def finish(self) -> None:
        """Add the last, partial block (the end of a scan)."""
        self._flush()

    def _flush(self, final: bool = True) -> None:
        if not self._pending:
            return
        pending = {key: np.concatenate([rows[key] for rows in self._pending]) for key in self._pending[0]}
        blocks = len(pending["maximum"]) if final else len(pending["maximum"]) // self.BLOCK * self.BLOCK
        for begin in range(0, blocks, self.BLOCK):
            end = min(begin + self.BLOCK, blocks)
            total = pending["total"][begin:end]
            means = total / pending["positions"][begin:end, None]
            self.images += end - begin
            self.positions += int(pending["positions"][begin:end].sum())
            self.total += total.sum(axis=0)
            self.active += pending["active"][begin:end].sum(axis=0)
            self.saturated += pending["saturated"][begin:end].sum(axis=0)
            self.image_mean_sum += means.sum(axis=0)
            self.image_mean_products += means.T @ means
        rest = {key: values[blocks:] for key, values in pending.items()}
        self._pending = [rest] if len(rest["maximum"]) else []
        self._pending_rows = len(rest["maximum"])

    @property
    def mean(self) -> np.ndarray:
        self._flush()
        return self.total / max(1, self.positions)

    def dead(self) -> np.ndarray:
        """Channels never above the threshold, at any position of any image."""
        return np.flatnonzero(self.maximum <= self.threshold)

    def correlation(self) -> np.ndarray:
        """Pearson correlation between channels of their per-image mean activation over the scanned images
        (C x C; NaN where a channel's mean is the same on every image, e.g. a dead channel)."""
        self._flush()
        n = max(1, self.images)
        mean = self.image_mean_sum / n
        covariance = self.image_mean_products / n - np.outer(mean, mean)
        spread = np.sqrt(np.maximum(np.diag(covariance), 0.0))
        scale = np.outer(spread, spread)
        with np.errstate(divide="ignore", invalid="ignore"):
            found = covariance / scale
        found[scale <= 1e-12 * max(1.0, float(np.abs(mean).max(initial=0.0))) ** 2] = np.nan
        return np.clip(found, -1.0, 1.0)

    def neighbours(self, channel: int, count: int = 5, correlation: np.ndarray | None = None) -> list[tuple[int, float]]:
        """The ``count`` other channels whose per-image mean activation correlates most with ``channel``'s
        over the dataset, as (channel, correlation), strongest first (ties: lower channel first); empty when
        ``channel`` is constant over the dataset."""
        row = (self.correlation() if correlation is None else correlation)[channel].copy()
        row[channel] = np.nan
        order = [c for c in np.argsort(-np.nan_to_num(row, nan=-np.inf), kind="stable") if np.isfinite(row[c])]
        return [(int(c), float(row[c])) for c in order[:count]]

    def saturating(self, share: float = 0.5) -> np.ndarray:
        """Channels at or above the ceiling at more than ``share`` of their positions."""
        if self.ceiling is None:
            return np.zeros(0, np.int64)
        self._flush()
        return np.flatnonzero(self.saturated / max(1, self.positions) > share)


# -- dataset ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    first: int
    second: int
    distance: float


def near_duplicates(codes: np.ndarray, top: int = 20, chunk: int = 1024) -> list[Pair]:
    """The ``top`` closest pairs (i < j) of rows of ``codes`` by Euclidean distance, closest first, ties in
    (i, j) order. Chunked: memory O(chunk x N), not O(N^2)."""
    codes = np.asarray(codes, np.float64)
    norms = (codes ** 2).sum(axis=1)
    best: list[tuple[float, int, int]] = []
    for begin in range(0, len(codes), chunk):
        block = codes[begin: begin + chunk]
        squared = norms[begin: begin + chunk, None] + norms[None, :] - 2 * block @ codes.T
        rows, cols = np.nonzero(np.triu(np.ones(squared.shape, bool), k=begin + 1))
        if not len(rows):
            continue
        values = squared[rows, cols]
        keep = np.argsort(values, kind="stable")[: 4 * top]
        best += [(float(values[i]), begin + int(rows[i]), int(cols[i])) for i in keep]
        best = sorted(best)[: 4 * top]
    # exact distances for the candidates kept (the expansion above loses precision on near-equal codes)
    exact = sorted((float(np.linalg.norm(codes[i] - codes[j])), i, j) for _, i, j in best)
    return [Pair(i, j, distance) for distance, i, j in exact[:top]]
