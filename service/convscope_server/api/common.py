"""Request helpers shared by the technique servicers: defaults, limits, the single input image, targets."""

from __future__ import annotations

import numpy as np

from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.images import to_model_input


def positive(value: int, default: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(field, f"must be positive, got {value}")
    return value or default


def optional_size(request, field: str, default: int) -> int:
    if not request.HasField(field):
        return default
    value = getattr(request, field)
    if value <= 0:
        raise InvalidArgument(field, f"must be a positive number of pixels, got {value}")
    return value


def input_axes(model) -> tuple[int, tuple[int, int]]:
    """(channel axis, (height axis, width axis)) of one model-input sample (no batch axis)."""
    return (0, (1, 2)) if model.config.layout == "NCHW" else (2, (0, 1))


def single_input(model, request, limits) -> np.ndarray:
    if not request.HasField("image"):
        raise InvalidArgument("image", "required")
    return to_model_input(request.image, model.config, "image", limits.max_image_pixels)


def resolve_target(model, backend, request, sample) -> int:
    if request.HasField("target"):
        if not 0 <= request.target < model.num_classes:
            raise InvalidArgument("target", f"{request.target} is outside the model's classes "
                                  f"0..{model.num_classes - 1}")
        return int(request.target)
    return int(np.argmax(backend.logits(sample[None])[0]))


def check_passes(passes: int, limits, what: str) -> None:
    if passes > limits.max_forward_passes:
        raise ResourceExhausted(f"{what}: {passes} forward passes is over the limit of {limits.max_forward_passes}")


def spatial_layer(model, name: str, field: str, what: str = "this technique needs a conv feature map"):
    """Resolve ``name`` and require an (N, C, H, W) / (N, H, W, C) spatial tensor."""
    layer = model.layer(name, field)
    if layer.spatial is None or len(layer.shape) != 4:
        raise InvalidArgument(field, f"{layer.name!r} is not a spatial (N, C, H, W) tensor; {what}")
    return layer


def neuron_position(request, layer) -> tuple[int, int] | None:
    """(row, col) from a request's optional row/col fields, checked against ``layer``'s spatial size."""
    if request.HasField("row") != request.HasField("col"):
        raise InvalidArgument("col" if request.HasField("row") else "row", "give both row and col, or neither")
    if not request.HasField("row"):
        return None
    if layer is None or layer.spatial is None:
        raise InvalidArgument("row", "a neuron position needs a spatial layer")
    height, width = (layer.shape[1], layer.shape[2]) if layer.layout == "NHWC" else layer.shape[2:4]
    for field, value, size in (("row", request.row, height), ("col", request.col, width)):
        if (size > 0 and not 0 <= value < size) or value < 0:
            raise InvalidArgument(field, f"{value} is outside {layer.name!r}'s 0..{size - 1}")
    return int(request.row), int(request.col)
