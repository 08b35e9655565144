"""2-D embeddings of a gallery's codes: PCA, and t-SNE (van der Maaten & Hinton 2008, "Visualizing Data
using t-SNE") with openTSNE, which calls back between iterations (progress, and stopping when asked).
Gradients: Barnes-Hut (van der Maaten 2014) up to 25,000 points, FFT interpolation (Linderman et al. 2019)
above; on 10,000 codes Barnes-Hut is 1.5x faster than FFT on two cores (benchmarks/tsne_speed.py).
Pictures: a scatter plot coloured by class, and Karpathy's t-SNE image grid (each point snapped to its own
cell by a linear assignment, each cell the image).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

# Ten distinct colours (Tableau 10); classes beyond the ten most frequent are drawn grey.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (188, 189, 34), (23, 190, 207), (127, 127, 127)]
OTHER = (190, 190, 190)
BARNES_HUT_UP_TO = 25_000


class Stopped(Exception):
    """The caller asked the embedding to stop (cancelled call, deadline, wall-time limit)."""


def pca(codes: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> (N, 2) coordinates on the first two principal components, and their explained variance
    ratios (scikit-learn's PCA, exact: a full SVD, or the covariance's eigenvectors when N > D, not the
    randomized solver scikit-learn picks by itself for large inputs)."""
    from sklearn.decomposition import PCA

    solver = "covariance_eigh" if len(codes) > codes.shape[1] else "full"
    model = PCA(n_components=2, svd_solver=solver, random_state=seed)
    return model.fit_transform(np.asarray(codes, np.float64)).astype(np.float32), model.explained_variance_ratio_


def tsne(codes: np.ndarray, perplexity: float, iterations: int, seed: int,
         progress: Callable[[int, int, float], None], should_stop: Callable[[], bool],
         every: int = 25) -> tuple[np.ndarray, float]:
    """(N, D) -> (N, 2) t-SNE coordinates and the final KL divergence. A quarter of the iterations (at most
    250) use early exaggeration, as in the paper; ``progress(step, total, kl)`` every ``every`` steps."""
    from openTSNE import TSNE

    early = min(250, iterations // 4)
    steps = {"done": 0}  # openTSNE counts each phase from 0; progress counts both

    def callback(iteration, error, embedding):
        steps["done"] += every
        progress(min(steps["done"], iterations), iterations, float(error))
        return should_stop()

    model = TSNE(n_components=2, perplexity=perplexity, early_exaggeration_iter=early, n_iter=iterations - early,
                 negative_gradient_method="bh" if len(codes) <= BARNES_HUT_UP_TO else "fft",
                 random_state=seed, n_jobs=max(1, os.cpu_count() or 1), callbacks=callback,
                 callbacks_every_iters=every, verbose=False)
    embedding = model.fit(np.asarray(codes, np.float32))
    if should_stop():
        raise Stopped
    return np.asarray(embedding, np.float32), float(embedding.kl_divergence)


def snap_to_grid(coordinates: np.ndarray, size: int) -> np.ndarray:
    """Give each of up to size x size points its own cell of a size x size grid, keeping neighbours together:
    the assignment minimising the total squared distance from points (scaled to the grid) to cell centres.
    Returns (N, 2) (row, col)."""
    from scipy.optimize import linear_sum_assignment

    if len(coordinates) > size * size:
        raise ValueError(f"{len(coordinates)} points do not fit a {size}x{size} grid")
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    scaled = (coordinates - low) / np.where(high > low, high - low, 1)  # (x, y) in [0, 1]
    centres = (np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1).reshape(-1, 2) + 0.5) / size
    points = np.stack([1 - scaled[:, 1], scaled[:, 0]], axis=1)  # rows run down the y axis
    cost = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    rows, cells = linear_sum_assignment(cost)
    out = np.empty((len(coordinates), 2), np.int64)
    out[rows] = np.stack(np.divmod(cells, size), axis=1)
    return out


def image_grid(thumbnails: list[np.ndarray], cells: np.ndarray, size: int) -> np.ndarray:
    """Each thumbnail in its (row, col) cell of a size x size grid; empty cells dark."""
    side = thumbnails[0].shape[0]
    out = np.full((size * side, size * side, 3), 24, np.uint8)
    for picture, (row, col) in zip(thumbnails, cells):
        out[row * side: (row + 1) * side, col * side: (col + 1) * side] = picture
    return out


def class_colours(classes: list[int]) -> dict[int, tuple[int, int, int]]:
    """The ten most frequent classes get a palette colour each (most frequent first)."""
    return {c: PALETTE[i] for i, (c, _) in enumerate(Counter(classes).most_common(len(PALETTE)))}


def scatter(coordinates: np.ndarray, classes: list[int], names: Callable[[int], str], title: str,
            size: int = 640) -> np.ndarray:
    """A scatter plot of 2-D points coloured by class, with a legend of the ten most frequent classes."""
    legend_width = 220
    image = Image.new("RGB", (size + legend_width, size), "white")
    draw = ImageDraw.Draw(image)
    margin = 24
    low, high = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(high > low, high - low, 1)
    colours = class_colours(classes)
    radius = 4 if len(coordinates) < 2000 else 2
    # Grey points first, so coloured classes are drawn on top of them.
    for (x, y), c in sorted(zip(coordinates.tolist(), classes), key=lambda p: p[1] in colours):
        px = margin + (x - low[0]) / span[0] * (size - 2 * margin)
        py = size - margin - (y - low[1]) / span[1] * (size - 2 * margin)
        draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colours.get(c, OTHER))
    draw.rectangle([margin // 2, margin // 2, size - margin // 2, size - margin // 2], outline=(160, 160, 160))
    draw.text((margin, 4), title, fill="black")
    counts = Counter(classes)
    for i, (c, colour) in enumerate(colours.items()):
        y = margin + i * 20
        draw.ellipse([size + 8, y + 2, size + 18, y + 12], fill=colour)
        draw.text((size + 24, y), f"{names(c)[:24]} ({counts[c]})", fill="black")
    if len(counts) > len(colours):
        y = margin + len(colours) * 20
        draw.ellipse([size + 8, y + 2, size + 18, y + 12], fill=OTHER)
        draw.text((size + 24, y), f"{len(counts) - len(colours)} other classes", fill="black")
    return np.asarray(image)
