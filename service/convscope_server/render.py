"""Arrays -> pictures: colormaps, tile grids, heatmap overlays, PNG bytes. numpy + Pillow only."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Anchor colours of matplotlib's "inferno" (perceptually uniform, black at 0), interpolated linearly.
_INFERNO = np.array([
    [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51], [249, 140, 10],
    [249, 201, 50], [252, 255, 164]], dtype=np.float32)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 RGB with the inferno colormap."""
    v = np.clip(np.nan_to_num(values), 0, 1) * (len(_INFERNO) - 1)
    low = np.floor(v).astype(int)
    high = np.minimum(low + 1, len(_INFERNO) - 1)
    t = (v - low)[..., None]
    return (_INFERNO[low] * (1 - t) + _INFERNO[high] * t).round().astype(np.uint8)


def normalize(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant array becomes zeros."""
    lo, hi = float(np.min(values)), float(np.max(values))
    return np.zeros_like(values, dtype=np.float32) if hi <= lo else ((values - lo) / (hi - lo)).astype(np.float32)


def normalize_robust(values: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Non-negative maps (saliency) -> [0, 1], scaled to their ``percentile`` so a few extreme pixels do not
    turn the rest black (the outlier clipping Captum's visualiser applies too)."""
    top = float(np.percentile(values, percentile))
    if top <= 0:
        return normalize(values)
    return np.clip(values / top, 0, 1).astype(np.float32)


def png(pixels: np.ndarray) -> bytes:
    """uint8 HxW or HxWx3 -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small tiles stay crisp."""
    return pixels if factor <= 1 else pixels.repeat(factor, axis=0).repeat(factor, axis=1)


def grid(tiles: list[np.ndarray], columns: int | None = None, pad: int = 1, background: int = 64) -> np.ndarray:
    """Same-sized uint8 tiles (HxW or HxWx3) in a grid with ``pad`` pixels between them."""
    if not tiles:
        return np.zeros((1, 1, 3), np.uint8)
    tiles = [t if t.ndim == 3 else np.repeat(t[..., None], 3, axis=2) for t in tiles]
    h, w = tiles[0].shape[:2]
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), background, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return out


def resize(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (half-pixel centres, edges clamped: OpenCV's INTER_LINEAR)."""
    values = np.asarray(values, np.float32)
    in_h, in_w = values.shape

    def axis(out_size, in_size):
        pos = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
        pos = np.clip(pos, 0, in_size - 1)
        low = np.floor(pos).astype(int)
        high = np.minimum(low + 1, in_size - 1)
        return low, high, (pos - low).astype(np.float32)

    y0, y1, ty = axis(height, in_h)
    x0, x1, tx = axis(width, in_w)
    top = values[y0][:, x0] * (1 - tx) + values[y0][:, x1] * tx
    bottom = values[y1][:, x0] * (1 - tx) + values[y1][:, x1] * tx
    return top * (1 - ty[:, None]) + bottom * ty[:, None]


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] heatmap (any size; resized) over a uint8 HxWx3 image."""
    if heat.shape != image.shape[:2]:
        heat = resize(heat, *image.shape[:2])
    blended = image.astype(np.float32) * (1 - alpha) + colormap(heat).astype(np.float32) * alpha
    return blended.round().clip(0, 255).astype(np.uint8)


def display_image(x: np.ndarray, config) -> np.ndarray:
    """A model input sample (one image, model layout) back to uint8 HxWx3 pixels for showing."""
    hwc = x.transpose(1, 2, 0) if config.layout == "NCHW" else x
    pixels = (hwc * np.asarray(config.std, np.float32) + np.asarray(config.mean, np.float32)) * (255.0 / config.scale)
    return shown_pixels(pixels, config.channel_order == "BGR")


def shown_pixels(pixels: np.ndarray, bgr: bool) -> np.ndarray:
    """Float HxWxC pixel values (0..255, the model's channel order) -> uint8 HxWx3 RGB: BGR reversed, RGBA's
    colours, grey repeated; any other channel count shows the channels' mean as grey."""
    channels = pixels.shape[2]
    if bgr and channels >= 3:
        pixels = pixels[..., [2, 1, 0, *range(3, channels)]]
    pixels = pixels.clip(0, 255).round().astype(np.uint8)
    if channels in (3, 4):
        return np.ascontiguousarray(pixels[..., :3])
    grey = pixels.mean(axis=2, keepdims=True).round().astype(np.uint8)
    return np.repeat(grey, 3, axis=2)


def line_plot(xs, ys, x_label: str, y_label: str, size: tuple[int, int] = (480, 320)) -> np.ndarray:
    """A small line chart (y in [0, 1]) as uint8 RGB, drawn with Pillow."""
    from PIL import ImageDraw

    width, height = size
    left, right, top, bottom = 56, 16, 16, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    x_max = max(xs) or 1.0

    def point(x, y):
        return (left + (width - left - right) * x / x_max, height - bottom - (height - top - bottom) * y)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = point(0, tick)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    for x in xs:
        px, _ = point(x, 0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 12, height - bottom + 6), f"{x * 255:.0f}", fill="black")
    draw.text((width // 2 - 60, height - 16), x_label, fill="black")
    draw.text((left + 6, top + 4), y_label, fill="black")
    points = [point(x, y) for x, y in zip(xs, ys)]
    draw.line(points, fill=(200, 40, 40), width=2)
    for px, py in points:
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(200, 40, 40))
    return np.asarray(image)
