"""Turn what a user has in hand into a ``convscope.v1.Image`` message.

Accepted: a path (str or pathlib.Path), encoded bytes (PNG/JPEG), a PIL image, a uint8 HxWxC / HxW
array (pixels, preprocessed by the server), or a float32 array in the model's input shape (used as the
model input unchanged).
"""

from __future__ import annotations

import io
import os

import numpy as np

from convscope.tensors import to_tensor
from convscope.v1 import tensor_pb2

# The files a dataset folder's scan reads (server) and a folder streamed by the CLI sends, by extension.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def to_image_message(image) -> tensor_pb2.Image:
    if isinstance(image, tensor_pb2.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return tensor_pb2.Image(encoded=f.read())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return tensor_pb2.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.float64:
            image = image.astype(np.float32)
        if image.dtype not in (np.uint8, np.float32):
            raise TypeError(f"image arrays must be uint8 pixels or float32 model inputs, not {image.dtype}")
        return tensor_pb2.Image(array=to_tensor(image))
    try:
        from PIL import Image as PILImage
    except ImportError:  # pragma: no cover - pillow is a dependency
        PILImage = None
    if PILImage is not None and isinstance(image, PILImage.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return tensor_pb2.Image(encoded=buffer.getvalue())
    raise TypeError(f"cannot send {type(image).__name__} as an image: give a path, bytes, a PIL image, "
                    "a uint8 HxWxC array or a float32 model-input array")


def eight_bit(image):
    """A PIL image in 16-bit or 32-bit grey (PNG / TIFF modes I;16*, I, F) as 8-bit grey: the top 8 of 16
    bits, as OpenCV's imread does (Pillow's own convert clips every value above 255 to white); a float image
    in [0, 1] is scaled by 255, other floats are clipped to [0, 255]. Other modes are returned unchanged."""
    from PIL import Image as PILImage

    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values >> 8
        return PILImage.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float64))
        if values.size and 0 <= values.min() and values.max() <= 1:
            values = values * 255
        return PILImage.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    return image


def readable_text(name: str) -> str:
    """A file name as valid UTF-8 text (protobuf strings must be): bytes that are not UTF-8 (Python keeps
    them as surrogates) shown as \\xNN. The server names dataset files the same way."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
