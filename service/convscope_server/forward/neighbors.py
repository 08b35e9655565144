"""Nearest neighbours in a network's feature space and in pixel space (Krizhevsky, Sutskever & Hinton
2012, figure 4: last-layer neighbours find the same object in other poses, pixel neighbours find the same
colours and layout).

The search is exact and brute force, in two steps: a float32 matrix product over the gallery, chunk by
chunk (memory-mapped galleries never load whole), screens a few times k candidates; their distances are
then recomputed exactly in float64 and sorted (ties by gallery position). The same answers as
scikit-learn's ``NearestNeighbors(algorithm="brute")``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from convscope_server import render

CHUNK = 8192


def thumbnail(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 -> size x size x 3 (antialiased): the stored picture and the pixel space."""
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR))


def _exact(rows: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    if metric == "l2":
        return np.sqrt(((rows - query) ** 2).sum(axis=1))
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(query)
    dots = rows @ query
    similarity = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return 1.0 - similarity


def nearest(data: np.ndarray, squared_norms: np.ndarray, query: np.ndarray, k: int,
            metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``data`` (N, D), any dtype, nearest to ``query`` (D,): (indices, distances),
    closest first. ``metric``: "l2" (Euclidean) or "cosine" (1 - cosine similarity; zero vectors are at
    distance 1). ``squared_norms`` (N,) are the rows' squared L2 norms."""
    count = len(data)
    k = min(k, count)
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    query = np.asarray(query, np.float64).ravel()
    query32 = query.astype(np.float32)
    screen = min(count, max(4 * k, k + 32))
    best_index = np.empty(0, np.int64)
    best_score = np.empty(0, np.float64)
    for begin in range(0, count, CHUNK):
        block = np.asarray(data[begin: begin + CHUNK], np.float32).reshape(-1, query.size)
        dots = (block @ query32).astype(np.float64)
        norms = squared_norms[begin: begin + len(block)]
        if metric == "l2":
            score = norms - 2 * dots          # + |q|^2, the same for every row
        else:
            lengths = np.sqrt(norms) * np.linalg.norm(query)
            score = -np.divide(dots, lengths, out=np.zeros_like(dots), where=lengths > 0)
        indices = np.concatenate([best_index, np.arange(begin, begin + len(block))])
        scores = np.concatenate([best_score, score])
        keep = np.argpartition(scores, screen - 1)[:screen] if len(scores) > screen else slice(None)
        best_index, best_score = indices[keep], scores[keep]
    candidates = np.sort(best_index)  # ascending positions: friendlier reads from a memory-mapped file
    distances = _exact(np.stack([np.asarray(data[i]).ravel() for i in candidates]), query, metric)
    order = np.lexsort((candidates, distances))[:k]
    return candidates[order], distances[order]


def neighbor_grid(query: np.ndarray, rows: list[list[np.ndarray]], tile: int = 96) -> np.ndarray:
    """The query, then its neighbours, one row per space (the lecture's elephant figure). The query tile has
    an orange frame."""
    framed = render.upscale(query, max(1, tile // query.shape[0])).copy()
    for edge in (np.s_[:3], np.s_[-3:], np.s_[:, :3], np.s_[:, -3:]):
        framed[edge] = (255, 140, 0)
    tiles = []
    columns = 1 + max(len(r) for r in rows)
    for row in rows:
        tiles.append(framed)
        tiles.extend(render.upscale(t, max(1, tile // t.shape[0])) for t in row)
        tiles.extend(np.full_like(framed, 32) for _ in range(columns - 1 - len(row)))
    return render.grid(tiles, columns=columns, pad=3)
