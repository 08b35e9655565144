"""Image messages -> model inputs, using the model's preprocessing configuration.

Encoded images and uint8 pixel arrays are resized (stretch or shorter-side resize + centre crop),
scaled, normalised with mean/std and laid out as the graph wants. A float32 array in the model's input
shape is passed through unchanged.

Scaling, channel order, mean and std are one multiply-add per channel on the laid-out pixels,
``x * (scale / 255 / std) + (-mean / std)``: within 1e-6 of doing the steps one by one (7e-7 at most for
ImageNet mean/std, identical for the default model's 0.5 / 0.5).

JPEG draft mode (``encoded_to_input(..., draft=True)``): libjpeg decodes a JPEG at 1/2, 1/4 or 1/8 scale
(DCT scaling) when the reduced image still has at least ``DRAFT_MARGIN`` times the pixels per side that
the resize step needs; the resize then reads the picture's exact extent in the reduced image (Pillow's
draft box), so the geometry is the full decode's. Measured with benchmarks/dataset_scan.py --draft on 48
JPEGs (8 scikit-image / scikit-learn photos upscaled to 2000, 3000 and 4000 px, with and without grain,
quality 90), model-input units, margin 2 against the full decode:

    default model (stretch, mean/std 0.5, inputs in [-1, 1]): max 0.055 (7 of 255 levels), mean 0.0017
    (0.2 level), worst image mean 0.0030; centre crop with ImageNet mean/std: max 0.103, mean 0.0039,
    worst image mean 0.0065. Top-1 of the default model changed on 2 of 48, both the galaxies photo
    whose two best classes are within 0.004 in probability; on the other photos it never changed.
    Decode + preprocessing: 49 ms -> 20 ms CPU per image (margin 3: half the differences, 23 ms;
    margin 1: 2.5-4 times larger, 15 ms).

Who uses it: dataset scans (TopPatches, BuildGallery), where many photo-sized files are read and a
ranking over the whole set is the result. Single-image requests (Predict, activations, attributions,
synthesis, neighbour queries) never do: a user comparing with their own preprocessing gets the reference
full decode + resize there. :func:`decode` always decodes in full.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image as PILImage

from convscope.images import eight_bit
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.repository import ModelConfig
from convscope_server.tensors import read_tensor

DRAFT_MARGIN = 2  # a draft keeps at least this many times the pixels per side the resize needs
MAX_INPUT_MAGNITUDE = 1e6  # float32 model inputs: larger values overflow float32 somewhere in most CNNs


def sample_shape(config: ModelConfig) -> tuple[int, int, int]:
    """The model input of one image, without the batch axis."""
    if config.layout == "NCHW":
        return config.channels, config.height, config.width
    return config.height, config.width, config.channels


def decode(data: bytes, field: str, max_pixels: int, budget=None) -> PILImage.Image:
    """Decode image bytes in full (at most ``max_pixels``), the reference every request gets."""
    return _decode(data, field, max_pixels, budget=budget)[0]


def encoded_to_input(data: bytes, config: ModelConfig, field: str, max_pixels: int,
                     draft: bool = False, budget=None) -> np.ndarray:
    """Encoded image bytes -> one model input. ``draft``: a JPEG much larger than the model input is decoded
    at reduced scale (dataset scans only; see the module docstring). ``budget``: the request's
    ``memory.Budget``, charged with the decoded size (read from the header) before decoding."""
    image, box = _decode(data, field, max_pixels, config if draft else None, budget)
    try:
        return pixels_to_input(image, config, box)
    except (ValueError, OSError) as error:  # a decoded mode Pillow cannot convert or resize
        raise InvalidArgument(field, f"cannot use a {image.mode} image: {error}") from None


def _decode(data: bytes, field: str, max_pixels: int, draft: ModelConfig | None = None,
            budget=None) -> tuple[PILImage.Image, tuple | None]:
    """The decoded image, and where the picture lies in it when JPEG draft mode reduced it: (0, 0, W / s,
    H / s) for a 1/s decode, whose last row and column cover a partial block."""
    if not data:
        raise InvalidArgument(field, "empty image bytes")
    box = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ResourceExhausted(f"{field}: image is {width}x{height} = {width * height} pixels, over "
                                        f"the limit of {max_pixels}")
            if budget is not None:
                budget.decoded(width, height, field)
            if draft is not None and image.format in ("JPEG", "MPO"):  # MPO: JPEG with extra frames
                needed = resized_size(width, height, draft)
                reduced = image.draft(None, (DRAFT_MARGIN * needed[0], DRAFT_MARGIN * needed[1]))
                box = reduced[1] if reduced and image.size != (width, height) else None
            image.load()
    except ResourceExhausted:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as error:
        raise ResourceExhausted(f"{field}: {error}") from None
    except Exception as error:  # Pillow raises many types for corrupt data
        # Pillow names the in-memory file it could not read ("<_io.BytesIO object at 0x7f...>"): not useful
        # to the caller, and it would make the same bad file's message differ from run to run
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error))
        raise InvalidArgument(field, f"cannot decode image: {type(error).__name__}: {reason}") from None
    return image, box


def resized_size(width: float, height: float, config: ModelConfig) -> tuple[int, int]:
    """The size a ``width`` x ``height`` picture is resized to (before the centre crop, if any). Exact for a
    draft's box too: dividing both sides by a power of two leaves every rounding step unchanged."""
    if config.resize == "center_crop":
        scale = min(config.height, config.width) / config.crop_fraction / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    return config.width, config.height


PIXEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}   # model input channels -> the picture mode that fills them


def pixels_to_input(image: PILImage.Image, config: ModelConfig, box: tuple | None = None) -> np.ndarray:
    """Resize (``box``: the part of ``image`` holding the picture), crop, scale, normalise, lay out. A
    4-channel model gets RGBA (alpha 255 where the picture has none); other channel counts take float32
    model inputs only (ValueError)."""
    mode = PIXEL_MODES.get(config.channels)
    if mode is None:
        raise ValueError(f"the model takes {config.channels} channels per pixel and a picture has 1, 3 or 4: send "
                         f"a float32 model input of shape {list(sample_shape(config))} instead")
    image = eight_bit(image)
    if image.mode != mode:
        image = image.convert(mode)
    box = box or (0, 0, image.width, image.height)
    width, height = resized_size(box[2], box[3], config)
    image = image.resize((width, height), PILImage.BILINEAR, box=box)
    if config.resize == "center_crop":
        left, top = (width - config.width) // 2, (height - config.height) // 2
        image = image.crop((left, top, left + config.width, top + config.height))
    return normalize_pixels(np.asarray(image).reshape(config.height, config.width, -1), config)


def normalize_pixels(pixels: np.ndarray, config: ModelConfig) -> np.ndarray:
    """uint8 (H, W, C) pixels already at the model's input size -> a model input sample: channel order,
    scale, mean/std and layout as ``config`` says (no resize, no crop; the inverse of
    ``render.display_image``)."""
    if config.channel_order == "BGR":
        pixels = pixels[..., bgr_order(pixels.shape[-1])]
    std = np.asarray(config.std, np.float64)
    multiply = (config.scale / 255.0 / std).astype(np.float32)
    add = (-np.asarray(config.mean, np.float64) / std).astype(np.float32)
    if config.layout == "NCHW":
        pixels, multiply, add = pixels.transpose(2, 0, 1), multiply[:, None, None], add[:, None, None]
    x = pixels.astype(np.float32, order="C")
    x *= multiply
    x += add
    return x


def bgr_order(channels: int) -> list[int]:
    """RGB <-> BGR as a channel index list: the first three reversed, alpha (a fourth channel) kept last."""
    return [2, 1, 0, *range(3, channels)] if channels >= 3 else list(range(channels))


def _array_to_pil(array: np.ndarray, field: str) -> PILImage.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return PILImage.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return PILImage.fromarray(array, "RGB" if array.shape[2] == 3 else "RGBA")
    raise InvalidArgument(field, f"uint8 pixels must be HxW or HxWxC with C in 1, 3, 4; got shape {list(array.shape)}")


def to_model_input(message, config: ModelConfig, field: str, max_pixels: int, draft: bool = False,
                   budget=None) -> np.ndarray:
    """One Image message -> one model input sample (no batch axis), float32. ``draft``: large JPEGs are
    decoded at reduced scale (dataset scans only; see the module docstring). ``budget``: the request's
    ``memory.Budget``, charged with decoded pixels before decoding."""
    which = message.WhichOneof("source")
    if which == "encoded":
        return encoded_to_input(message.encoded, config, f"{field}.encoded", max_pixels, draft, budget)
    if which != "array":
        raise InvalidArgument(field, "no image given: set encoded or array")
    array = read_tensor(message.array, f"{field}.array")
    expected = sample_shape(config)
    if array.dtype == np.float32:
        if array.shape == (1, *expected):
            array = array[0]
        if array.shape != expected:
            raise InvalidArgument(f"{field}.array", f"a float32 array is used as the model input unchanged, so it "
                                  f"must have shape {list(expected)} (or [1, ...]); got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise InvalidArgument(f"{field}.array", "contains NaN or infinite values")
        if np.abs(array).max() > MAX_INPUT_MAGNITUDE:
            raise InvalidArgument(f"{field}.array", f"values must be within +-{MAX_INPUT_MAGNITUDE:g} (model-input "
                                  f"space), got {float(np.abs(array).max()):g}")
        return np.array(array)
    if array.dtype == np.uint8:
        if array.ndim not in (2, 3):
            raise InvalidArgument(f"{field}.array", f"uint8 pixels must be HxW or HxWxC with C in 1, 3, 4; got shape "
                                  f"{list(array.shape)}")
        if array.size == 0:
            raise InvalidArgument(f"{field}.array", "empty pixel array")
        height, width = array.shape[:2]
        if height * width > max_pixels:
            raise ResourceExhausted(f"{field}.array: image is {width}x{height} pixels, over the limit of {max_pixels}")
        if budget is not None:
            budget.decoded(width, height, f"{field}.array")
        try:
            return pixels_to_input(_array_to_pil(np.ascontiguousarray(array), f"{field}.array"), config)
        except ValueError as error:   # a model whose channel count no picture has
            raise InvalidArgument(f"{field}.array", str(error)) from None
    raise InvalidArgument(f"{field}.array", f"datatype {message.array.datatype} is not accepted: send UINT8 pixels "
                          "or an FP32 model input")
