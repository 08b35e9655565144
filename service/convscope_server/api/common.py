"""Request helpers shared by the technique servicers: defaults, limits, the single input image, targets."""

from __future__ import annotations

import numpy as np

from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.forward import activations as acts
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


def _layout_reason(layer) -> str:
    if len(layer.shape) != 4:
        return f"it has shape {list(layer.shape)}"
    if layer.axes is not None:
        return f"its height and width are axes {layer.axes}, neither NCHW nor NHWC"
    return (f"it has shape {list(layer.shape)}, but which of its axes are channels, height and width could not "
            f"be followed from the input to this {layer.op_type} output")


def spatial_layer(model, name: str, field: str, what: str = "this technique needs a conv feature map"):
    """Resolve ``name`` and require a 4-D tensor whose layout is known: (N, C, H, W) or (N, H, W, C). Its
    receptive field need not be local (a tensor after InstanceNorm or GroupNorm sees the whole image)."""
    layer = model.layer(name, field)
    if not layer.layout:
        raise InvalidArgument(field, f"{layer.name!r} is not a spatial (N, C, H, W) tensor: {_layout_reason(layer)}; "
                              f"{what}")
    return layer


def neuron_position(request, layer) -> tuple[int, int] | None:
    """(row, col) from a request's optional row/col fields, checked against ``layer``'s spatial size."""
    if request.HasField("row") != request.HasField("col"):
        raise InvalidArgument("col" if request.HasField("row") else "row", "give both row and col, or neither")
    if not request.HasField("row"):
        return None
    if layer is None or not layer.layout:
        reason = f": {_layout_reason(layer)}" if layer is not None else ""
        raise InvalidArgument("row", f"a neuron position needs a spatial layer{reason}")
    height, width = (layer.shape[axis] for axis in layer.axes)
    for field, value, size in (("row", request.row, height), ("col", request.col, width)):
        if (size > 0 and not 0 <= value < size) or value < 0:
            raise InvalidArgument(field, f"{value} is outside {layer.name!r}'s 0..{size - 1}")
    return int(request.row), int(request.col)


def channel_axis(layer, field: str) -> int:
    """The axis holding ``layer``'s channels (see ``activations.channel_axis``), or INVALID_ARGUMENT."""
    axis = acts.channel_axis(layer.shape, layer.layout, layer.op_type)
    if axis is None:
        raise InvalidArgument(field, f"{layer.name!r}: which axis holds the channels is not known; "
                              f"{_layout_reason(layer)}")
    return axis
