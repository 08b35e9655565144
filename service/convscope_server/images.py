"""Image messages -> model inputs, using the model's preprocessing configuration.

Encoded images and uint8 pixel arrays are resized (stretch or shorter-side resize + centre crop),
scaled, normalised with mean/std and laid out as the graph wants. A float32 array in the model's input
shape is passed through unchanged.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image as PILImage

from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.repository import ModelConfig
from convscope_server.tensors import read_tensor


def sample_shape(config: ModelConfig) -> tuple[int, int, int]:
    """The model input of one image, without the batch axis."""
    if config.layout == "NCHW":
        return config.channels, config.height, config.width
    return config.height, config.width, config.channels


def decode(data: bytes, field: str, max_pixels: int) -> PILImage.Image:
    if not data:
        raise InvalidArgument(field, "empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ResourceExhausted(f"{field}: image is {width}x{height} = {width * height} pixels, over "
                                        f"the limit of {max_pixels}")
            image.load()
    except ResourceExhausted:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as error:
        raise ResourceExhausted(f"{field}: {error}") from None
    except Exception as error:  # Pillow raises many types for corrupt data
        raise InvalidArgument(field, f"cannot decode image: {type(error).__name__}: {error}") from None
    return image


def pixels_to_input(image: PILImage.Image, config: ModelConfig) -> np.ndarray:
    image = image.convert("L" if config.channels == 1 else "RGB")
    if config.resize == "center_crop":
        width, height = image.size
        side = min(config.height, config.width) / config.crop_fraction
        scale = side / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), PILImage.BILINEAR)
        left = (image.width - config.width) // 2
        top = (image.height - config.height) // 2
        image = image.crop((left, top, left + config.width, top + config.height))
    else:
        image = image.resize((config.width, config.height), PILImage.BILINEAR)
    x = np.asarray(image, dtype=np.float32).reshape(config.height, config.width, -1)
    x = x * (config.scale / 255.0)
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    if config.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x, dtype=np.float32)


def _array_to_pil(array: np.ndarray, field: str) -> PILImage.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return PILImage.fromarray(array, "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return PILImage.fromarray(array, "RGB" if array.shape[2] == 3 else "RGBA")
    raise InvalidArgument(field, f"uint8 pixels must be HxW or HxWxC with C in 1, 3, 4; got shape {list(array.shape)}")


def to_model_input(message, config: ModelConfig, field: str, max_pixels: int) -> np.ndarray:
    """One Image message -> one model input sample (no batch axis), float32."""
    which = message.WhichOneof("source")
    if which == "encoded":
        return pixels_to_input(decode(message.encoded, f"{field}.encoded", max_pixels), config)
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
        return np.array(array)
    if array.dtype == np.uint8:
        if array.size == 0:
            raise InvalidArgument(f"{field}.array", "empty pixel array")
        height, width = array.shape[:2]
        if height * width > max_pixels:
            raise ResourceExhausted(f"{field}.array: image is {width}x{height} pixels, over the limit of {max_pixels}")
        return pixels_to_input(_array_to_pil(np.ascontiguousarray(array), f"{field}.array"), config)
    raise InvalidArgument(f"{field}.array", f"datatype {message.array.datatype} is not accepted: send UINT8 pixels "
                          "or an FP32 model input")
