"""The CLI's figures: one matplotlib style for every picture, maps shown in the photo's own geometry.

matplotlib is an optional dependency (``pip install convscope[cli]``), imported here only, when a figure is
drawn, so ``import convscope`` stays light. Every figure function returns a :class:`Picture`: the PNG and
the numbers it drew (colour-bar range, sizes), which the page records in its ``page.json``.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from convscope import geometry

INSTALL_HINT = "pictures need matplotlib: pip install convscope[cli]"
STYLE = {"font.size": 11, "axes.titlesize": 12, "figure.titlesize": 15, "axes.labelsize": 11,
         "figure.facecolor": "white", "savefig.facecolor": "white", "image.interpolation": "bilinear"}
DPI = 100
PANEL_INCHES = 5.0   # one panel's width: 500 px


@dataclass
class Picture:
    png: bytes
    info: dict = field(default_factory=dict)


def require() -> None:
    """Raise ImportError with the install hint when matplotlib is missing (checked before any call)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def _styled(draw):
    """Run a figure function inside the house style (matplotlib's rc_context; no global state changed)."""

    @functools.wraps(draw)
    def styled(*args, **kwargs):
        require()
        import matplotlib

        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return styled


def _new(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig, info: dict | None = None) -> Picture:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    info = dict(info or {})
    info["size"] = list(Image.open(io.BytesIO(buffer.getvalue())).size)
    return Picture(buffer.getvalue(), info)


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def decode(png: bytes) -> np.ndarray:
    """PNG bytes -> uint8 RGB pixels."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# -- pixels ------------------------------------------------------------------------------------------------
def _hwc(x: np.ndarray, layout: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    while x.ndim > 3:
        x = x[0]
    if x.ndim == 2:
        return x[..., None]
    return x.transpose(1, 2, 0) if layout == "NCHW" else x


def _rgb(hwc: np.ndarray, preprocessing: dict) -> np.ndarray:
    if hwc.shape[-1] == 1:
        return np.repeat(hwc, 3, axis=-1)
    return hwc[..., ::-1] if preprocessing.get("channel_order") == "BGR" else hwc


def input_pixels(x: np.ndarray, preprocessing: dict) -> np.ndarray:
    """A model-input array (either layout, with or without batch axis) -> uint8 RGB pixels."""
    hwc = _hwc(x, preprocessing["layout"])
    std, mean = np.asarray(preprocessing["std"]), np.asarray(preprocessing["mean"])
    unit = (hwc * std + mean) / (preprocessing["scale"] or 255.0)   # [0, 1] pixel units
    return (_rgb(unit, preprocessing).clip(0, 1) * 255 + 0.5).astype(np.uint8)


def pixel_change(delta: np.ndarray, preprocessing: dict) -> np.ndarray:
    """A model-input difference -> the same change in [0, 1] pixel units (H, W, 3)."""
    hwc = _hwc(delta, preprocessing["layout"])
    return _rgb(hwc * np.asarray(preprocessing["std"]) / (preprocessing["scale"] or 255.0), preprocessing)


def for_display(photo: np.ndarray, longest: int = 1200) -> np.ndarray:
    """The photo at most ``longest`` pixels on its long side, same aspect (figures need no more)."""
    height, width = photo.shape[:2]
    if max(height, width) <= longest:
        return photo
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(photo).resize(size, Image.BILINEAR))


def model_view(photo: np.ndarray, preprocessing: dict) -> np.ndarray:
    """The photo as the model sees it (cropped and resized to the input size), uint8 RGB."""
    top, left, bottom, right = geometry.input_box(preprocessing, photo.shape[:2])
    image = Image.fromarray(photo).resize((preprocessing["width"], preprocessing["height"]), Image.BILINEAR,
                                          box=(left, top, right, bottom))
    return np.asarray(image)


def display_aspect(preprocessing: dict, photo_shape) -> float:
    """imshow's aspect that shows a model-input image in the photo's proportions (stretch resizing)."""
    if preprocessing.get("resize") == "center_crop" or photo_shape is None:
        return 1.0
    height, width = photo_shape[:2]
    return (height / width) * (preprocessing["width"] / preprocessing["height"])


def _panel_height(shape, aspect: float = 1.0) -> float:
    return float(np.clip(PANEL_INCHES * shape[0] * aspect / shape[1], 2.5, 7.5))


# -- maps over the photo -----------------------------------------------------------------------------------
def _norm(vmin: float, vmax: float):
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if vmin < 0 < vmax:
        return TwoSlopeNorm(0.0, vmin, vmax), "RdBu_r"
    if vmin == vmax:
        vmax = vmin + 1e-12
    return Normalize(vmin, vmax), "inferno"


@_styled
def heatmap(photo: np.ndarray, values: np.ndarray, preprocessing: dict, title: str, unit: str) -> Picture:
    """photo | map | map over the photo, the map brought back to the photo's geometry, with a colour bar in
    ``unit`` spanning exactly the map's minimum and maximum (signed maps: blue < 0 < red)."""
    values = np.asarray(values, np.float64)
    mapped = geometry.to_image(values, preprocessing, photo.shape[:2])
    vmin, vmax = float(np.nanmin(values)), float(np.nanmax(values))
    norm, cmap = _norm(vmin, vmax)
    fig = _new(3 * PANEL_INCHES + 1, _panel_height(photo.shape) + 0.9)
    axes = fig.subplots(1, 3)
    axes[0].imshow(photo)
    axes[0].set_title("input")
    shown = axes[1].imshow(mapped, cmap=cmap, norm=norm)
    axes[1].set_title("map")
    axes[2].imshow(photo.mean(axis=2), cmap="gray")
    axes[2].imshow(mapped, cmap=cmap, norm=norm, alpha=0.55)
    axes[2].set_title("map over the input")
    for ax in axes:
        _blank(ax)
    bar = fig.colorbar(shown, ax=axes, shrink=0.9, pad=0.01)
    bar.set_label(unit)
    fig.suptitle(title)
    return _save(fig, {"colorbar": [vmin, vmax], "unit": unit, "map_shape": list(values.shape),
                       "shown_shape": list(mapped.shape), "photo_shape": list(photo.shape[:2])})


def signed_gradient(attribution: np.ndarray, layout: str, percentile: float = 99.5) -> tuple[np.ndarray, list]:
    """An input-shaped gradient as RGB around grey: each colour channel divided by its own ``percentile`` of
    |gradient| (robust to a few huge values), clipped to [-1, 1], 0 -> grey. Returns pixels and the scales."""
    hwc = _hwc(attribution, layout)
    scales = [float(np.percentile(np.abs(hwc[..., c]), percentile)) or 1.0 for c in range(hwc.shape[-1])]
    unit = np.clip(hwc / np.asarray(scales), -1, 1)
    rgb = unit if unit.shape[-1] == 3 else np.repeat(unit[..., :1], 3, axis=-1)
    return ((rgb * 0.5 + 0.5) * 255 + 0.5).astype(np.uint8), scales


@_styled
def gradient(photo: np.ndarray, attribution: np.ndarray, preprocessing: dict, title: str) -> Picture:
    """photo | the signed gradient as an image (grey = 0), in the photo's geometry."""
    pixels, scales = signed_gradient(attribution, preprocessing["layout"])
    if preprocessing.get("channel_order") == "BGR":
        pixels = pixels[..., ::-1]
    mapped = geometry.to_image(pixels.astype(np.float64), preprocessing, photo.shape[:2], fill=128)
    fig = _new(2 * PANEL_INCHES, _panel_height(photo.shape) + 0.8)
    axes = fig.subplots(1, 2)
    axes[0].imshow(photo)
    axes[0].set_title("input")
    axes[1].imshow(mapped.clip(0, 255).astype(np.uint8))
    axes[1].set_title("gradient: grey = 0, per channel to its 99.5th percentile")
    for ax in axes:
        _blank(ax)
    fig.suptitle(title)
    return _save(fig, {"percentile": 99.5, "channel_scales": scales, "photo_shape": list(photo.shape[:2])})


# -- weights and activations -------------------------------------------------------------------------------
def _mosaic(tiles: list[np.ndarray], columns: int, pad: int = 1) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Same-sized 2-D or RGB tiles in a grid with NaN gaps; also each tile's centre (x, y)."""
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    shape = (rows * (h + pad) - pad, columns * (w + pad) - pad) + tiles[0].shape[2:]
    out = np.full(shape, np.nan)
    centres = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = tile
        centres.append((c * (w + pad) + (w - 1) / 2, r * (h + pad) + (h - 1) / 2))
    return out, centres


@_styled
def filters(weights: np.ndarray, layer: str, kind: str, rgb: bool, max_filters: int = 64,
            max_channels: int = 16) -> Picture:
    """RGB first-layer filters as colour tiles labelled with their ids; deeper filters as a (filter x input
    channel) grid of kernels on a diverging scale with a colour bar."""
    weights = np.asarray(weights, np.float64)[:max_filters]
    limit = float(np.abs(weights).max()) or 1.0
    if rgb:
        tiles = [(w.transpose(1, 2, 0) / limit * 0.5 + 0.5).clip(0, 1) for w in weights]
        columns = min(8, len(tiles))
        mosaic, centres = _mosaic(tiles, columns)
        mosaic = np.where(np.isnan(mosaic), 1.0, mosaic)
        fig = _new(min(12, 1.3 * columns + 1), 1.3 * (-(-len(tiles) // columns)) + 1)
        ax = fig.subplots()
        ax.imshow(mosaic, interpolation="nearest")
        h = weights.shape[2]
        for i, (x, y) in enumerate(centres):
            ax.text(x, y - h / 2 - 0.15, str(i), ha="center", va="bottom", fontsize=8)
        _blank(ax)
        fig.suptitle(f"{layer}: {len(tiles)} RGB filters (grey = 0, scaled by the largest |weight| {limit:.3g})")
        return _save(fig, {"filters": len(tiles), "weight_range": [-limit, limit]})
    channels = weights[:, :max_channels]
    tiles = [kernel for f in channels for kernel in f]
    columns = channels.shape[1]
    mosaic, _ = _mosaic(tiles, columns)
    kh, kw = weights.shape[2:]
    cell = 0.35 if kh * kw == 1 else 0.45
    fig = _new(min(14, max(6, cell * columns + 3)), min(20, max(3, cell * len(channels) + 1.5)))
    ax = fig.subplots()
    shown = ax.imshow(mosaic, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_xticks([c * (kw + 1) + (kw - 1) / 2 for c in range(columns)], [str(c) for c in range(columns)],
                  fontsize=8)
    step = max(1, len(channels) // 32)
    ax.set_yticks([r * (kh + 1) + (kh - 1) / 2 for r in range(0, len(channels), step)],
                  [str(r) for r in range(0, len(channels), step)], fontsize=8)
    ax.set_xlabel("input channel")
    ax.set_ylabel("filter (output channel)")
    fig.colorbar(shown, ax=ax, shrink=0.8).set_label("weight")
    fig.suptitle(f"{layer}: {kind}, kernels {kh}x{kw}")
    return _save(fig, {"filters": len(channels), "channels": columns, "weight_range": [-limit, limit]})


@_styled
def activations(values: np.ndarray, layout: str, layer: str, image_name: str, max_channels: int = 64) -> Picture:
    """One image's channels of a spatial tensor, labelled with channel ids, on one scale with a colour bar."""
    chw = np.asarray(values, np.float64)
    chw = chw[0] if chw.ndim == 4 else chw
    if layout == "NHWC":
        chw = chw.transpose(2, 0, 1)
    shown_channels = chw[:max_channels]
    columns = int(np.ceil(np.sqrt(len(shown_channels) * 1.5)))
    mosaic, centres = _mosaic(list(shown_channels), columns, pad=max(1, chw.shape[1] // 12))
    vmin, vmax = float(shown_channels.min()), float(shown_channels.max())
    norm, cmap = _norm(vmin, vmax)
    rows = -(-len(shown_channels) // columns)
    fig = _new(11, min(20, 9.5 * rows / columns * chw.shape[1] / chw.shape[2] + 1.0))
    ax = fig.subplots()
    image = ax.imshow(mosaic, cmap=cmap, norm=norm, interpolation="nearest")
    h = chw.shape[1]
    for i, (x, y) in enumerate(centres):
        ax.text(x - chw.shape[2] / 2 + 0.5, y - h / 2 + 0.5, str(i), color="white", fontsize=7, va="top",
                bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
    _blank(ax)
    fig.colorbar(image, ax=ax, shrink=0.8).set_label("activation")
    fig.suptitle(f"{layer} on {image_name}: channels 0-{len(shown_channels) - 1} of {len(chw)}")
    return _save(fig, {"colorbar": [vmin, vmax], "channels": len(shown_channels)})


@_styled
def sanity(photo: np.ndarray, preprocessing: dict, original: dict, randomized: dict, layers: list[str],
           spearman: dict, title: str, columns: int = 6) -> Picture:
    """Adebayo et al.'s cascading randomisation: one row per method (labelled), the trained model's map then
    the maps after re-initialising more and more layers from the top (columns labelled with the last layer
    re-initialised), each with its Spearman correlation to the first; every map scaled to its own maximum."""
    methods = list(original)
    picked = sorted(set(np.linspace(0, len(layers) - 1, min(columns, len(layers))).round().astype(int)))
    fig = _new(min(20, 2.4 * (len(picked) + 1) + 1), 2.3 * len(methods) + 1.2)
    axes = fig.subplots(len(methods), len(picked) + 1, squeeze=False)
    for r, method in enumerate(methods):
        maps = [original[method]] + [randomized[method][i] for i in picked]
        for c, values in enumerate(maps):
            values = np.abs(np.asarray(values, np.float64))
            mapped = geometry.to_image(values / (values.max() or 1.0), preprocessing, photo.shape[:2])
            ax = axes[r, c]
            ax.imshow(mapped, cmap="inferno", vmin=0, vmax=1)
            _blank(ax)
            if r == 0:
                ax.set_title("trained model" if c == 0 else f"up to {layers[picked[c - 1]][-22:]}", fontsize=8)
            if c:
                ax.text(0.02, 0.02, f"rho {spearman[method][picked[c - 1]]:.2f}", transform=ax.transAxes,
                        color="white", fontsize=8, bbox={"facecolor": "black", "alpha": 0.5, "linewidth": 0})
        axes[r, 0].set_ylabel(method)
    fig.suptitle(title)
    return _save(fig, {"methods": methods, "columns": [layers[i] for i in picked]})


# -- inputs beside outputs ---------------------------------------------------------------------------------
@_styled
def side_by_side(panels: list[tuple], title: str, aspect: float = 1.0,
                 losses: list[float] | None = None, loss_label: str = "objective") -> Picture:
    """Images (uint8 RGB) in a row with their titles, optionally the objective per step at the end. A panel
    is (pixels, title) or (pixels, title, its own aspect)."""
    count = len(panels) + (1 if losses else 0)
    height = _panel_height(panels[0][0].shape, aspect) * 0.8
    fig = _new(min(20, count * PANEL_INCHES * 0.8), height + (1.4 if losses else 1.0))
    axes = np.atleast_1d(fig.subplots(1, count))
    for ax, (pixels, caption, *own) in zip(axes, panels):
        ax.imshow(pixels, aspect=own[0] if own else aspect)
        ax.set_title(caption)
        _blank(ax)
    if losses:
        ax = axes[-1]
        ax.plot(np.arange(1, len(losses) + 1), losses)
        ax.set_xlabel("step")
        ax.set_ylabel(loss_label)
        ax.grid(True, alpha=0.3)
        ax.set_box_aspect(aspect * panels[0][0].shape[0] / panels[0][0].shape[1])
    fig.suptitle(title)
    return _save(fig, {"panels": [panel[1] for panel in panels]})


def amplified(change: np.ndarray) -> tuple[np.ndarray, float]:
    """A pixel change shown around grey, multiplied by a round factor so the largest change is visible."""
    wanted = 0.5 / (float(np.abs(change).max()) or 0.5)
    base = 10.0 ** np.floor(np.log10(wanted))
    factor = max(1.0, next(m * base for m in (5, 2, 1) if m * base <= wanted))
    return ((0.5 + change * factor).clip(0, 1) * 255 + 0.5).astype(np.uint8), factor


# -- dataset figures ---------------------------------------------------------------------------------------
def _tile(pixels: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(np.asarray(pixels, np.uint8).squeeze())
    return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR))


@_styled
def patches(rows: list[tuple[int, list[tuple[np.ndarray, float]]]], layer: str, tile: int = 64) -> Picture:
    """One row per channel (labelled with its id), its best patches left to right, each with its value."""
    k = max(len(hits) for _, hits in rows)
    fig = _new(min(20, 1.1 * k + 1.2), 1.15 * len(rows) + 0.8)
    axes = fig.subplots(len(rows), k, squeeze=False)
    for r, (channel, hits) in enumerate(rows):
        for c in range(k):
            ax = axes[r, c]
            _blank(ax)
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(hits):
                ax.imshow(_tile(hits[c][0], tile))
                ax.set_title(f"{hits[c][1]:.3g}", fontsize=8, pad=2)
        axes[r, 0].set_ylabel(f"ch {channel}", rotation=0, ha="right", va="center")
    fig.suptitle(f"{layer}\ntop patches per channel (number: the channel's activation)")
    return _save(fig, {"channels": [c for c, _ in rows], "values": [[v for _, v in hits] for _, hits in rows]})


def grid_tiles(png: bytes, rows: int, columns: int, pad: int) -> list[list[np.ndarray]]:
    """Cut a server grid (same-sized tiles, ``pad`` pixels around each) back into its tiles."""
    pixels = decode(png)
    h = (pixels.shape[0] - pad) // rows - pad
    w = (pixels.shape[1] - pad) // columns - pad
    return [[pixels[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w]
             for c in range(columns)] for r in range(rows)]


@_styled
def neighbors(query: np.ndarray, feature: list[tuple[np.ndarray, object]], pixel: list[tuple[np.ndarray, object]],
              metric: str, title: str) -> Picture:
    """The query, then its nearest gallery images by codes (top row) and by pixels (bottom row), each with its
    label and distance."""
    k = max(len(feature), len(pixel))
    fig = _new(min(20, 1.7 * (k + 1) + 1), 4.8)
    axes = fig.subplots(2, k + 1, squeeze=False)
    for r, (row, name) in enumerate(((feature, "by the network's codes"), (pixel, "by raw pixels"))):
        axes[r, 0].imshow(query)
        axes[r, 0].set_title("query", color="darkorange")
        axes[r, 0].set_ylabel(name)
        for c in range(k):
            ax = axes[r, c + 1]
            if c < len(row):
                pixels, hit = row[c]
                ax.imshow(pixels)
                label = (hit.label or hit.id)[-16:]
                ax.set_title(f"{label}\n{metric} {hit.distance:.3g}", fontsize=8)
        for ax in axes[r]:
            _blank(ax)
    fig.suptitle(title)
    return _save(fig, {"feature_distances": [h.distance for _, h in feature],
                       "pixel_distances": [h.distance for _, h in pixel]})


@_styled
def scatter(coordinates: np.ndarray, groups: list[str], method: str, title: str, axis_labels: tuple[str, str],
            legend_title: str, top: int = 20) -> Picture:
    """Each image a point coloured by its group (the ``top`` most frequent groups; the rest grey)."""
    from matplotlib import colormaps

    names, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_counts=True)
    order = [names[i] for i in np.argsort(-counts, kind="stable")][:top]
    fig = _new(10, 7.5)
    ax = fig.subplots()
    groups = np.asarray(groups, dtype=object).astype(str)
    other = ~np.isin(groups, order)
    if other.any():
        ax.scatter(coordinates[other, 0], coordinates[other, 1], s=14, c="lightgrey", label="other")
    colours = [colormaps["tab10" if len(order) <= 10 else "tab20"](i % 20) for i in range(len(order))]
    for name, colour in zip(order, colours):
        chosen = groups == name
        ax.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=18, c=colour, label=f"{name} ({chosen.sum()})")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.grid(True, alpha=0.3)
    ax.legend(title=legend_title, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.suptitle(title)
    return _save(fig, {"points": len(coordinates), "groups": order, "axis_labels": list(axis_labels)})


@_styled
def framed(png: bytes, title: str, width: float = 10.0) -> Picture:
    """A ready picture (e.g. the server's t-SNE image grid) under a readable title."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    fig = _new(width, width * pixels.shape[0] / pixels.shape[1] + 0.7)
    ax = fig.subplots()
    ax.imshow(pixels, interpolation="nearest")
    _blank(ax)
    fig.suptitle(title)
    return _save(fig)


# -- animations --------------------------------------------------------------------------------------------
def gif(frames: list[bytes], duration: int = 120) -> bytes:
    """PNG frames -> an animated GIF on one canvas: every frame scaled to the largest frame's size (DeepDream's
    octaves grow), the last frame held longer."""
    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
    size = max((image.size for image in images), key=lambda s: s[0] * s[1])
    images = [image if image.size == size else image.resize(size, Image.BILINEAR) for image in images]
    durations = [duration] * (len(images) - 1) + [1000]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return buffer.getvalue()
