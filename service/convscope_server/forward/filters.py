"""Filter visualisation: the weights of any Conv layer (CS231n "Visualizing and Understanding"; the
first-layer figures of Krizhevsky et al. 2012, He et al. 2016, Huang et al. 2017).

First-layer filters on a colour image are shown as RGB tiles, each filter min-max scaled to 0-255 on its
own; deeper filters as a grid of one grayscale tile per (filter, input channel); depthwise filters as one
grayscale tile each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convscope_server import render


@dataclass
class FilterSet:
    conv_node: str
    weights: np.ndarray   # (out, in / group, kh, kw)
    group: int
    rgb: bool
    depthwise: bool


def conv_filters(node, weights: np.ndarray, sees_pixels: bool, image_channels: int) -> FilterSet:
    """Describe the weights of Conv ``node``. ``sees_pixels``: its input is the image (receptive field 1)."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
    out_channels, per_group = weights.shape[:2]
    depthwise = group > 1 and per_group == 1 and group == out_channels
    rgb = sees_pixels and group == 1 and per_group == image_channels == 3
    return FilterSet(node.name or node.output[0], weights, group, rgb, depthwise)


def _tile_scale(kernel: int) -> int:
    return max(1, 24 // max(kernel, 1))


def render_filters(filters: FilterSet, max_filters: int, max_channels: int, bgr: bool = False) -> np.ndarray:
    w = filters.weights[:max_filters]
    scale = _tile_scale(w.shape[-1])
    if filters.rgb:
        tiles = []
        for f in w:
            tile = (render.normalize(f) * 255).round().astype(np.uint8).transpose(1, 2, 0)
            tiles.append(render.upscale(tile[..., ::-1] if bgr else tile, scale))
        return render.grid(tiles, pad=2)
    if filters.depthwise:
        tiles = [render.upscale((render.normalize(f[0]) * 255).round().astype(np.uint8), scale) for f in w]
        return render.grid(tiles, pad=2)
    channels = min(w.shape[1], max_channels)
    tiles = [render.upscale((render.normalize(f[c]) * 255).round().astype(np.uint8), scale)
             for f in w for c in range(channels)]
    return render.grid(tiles, columns=channels, pad=1)
