"""Request helpers shared by the technique servicers: defaults, limits, the single input image, targets."""

from __future__ import annotations

import math
import time

import numpy as np

from convscope_server.api.streaming import stream_job
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.forward import activations as acts
from convscope_server.images import to_model_input


def positive(value: int, default: int, field: str, high: int | None = None) -> int:
    """A count: 0 means ``default``; negative or above ``high`` is refused."""
    if value < 0:
        raise InvalidArgument(field, f"must be positive, got {value}")
    if high is not None and value > high:
        raise InvalidArgument(field, f"{value} is more than {high}")
    return value or default


def finite(value: float, field: str, low: float = -math.inf, high: float = math.inf, *, default: float | None = None,
           open_low: bool = False) -> float:
    """A float field: 0 means ``default`` (when given); it must be a finite number in [low, high] (``open_low``:
    above ``low``); NaN and infinities are refused with the field named."""
    value = float(value)
    if default is not None and value == 0:
        value = float(default)
    if not math.isfinite(value):
        raise InvalidArgument(field, f"must be a finite number, got {value}")
    if value < low or (open_low and value == low) or value > high:
        left = "(" if open_low else "["
        raise InvalidArgument(field, f"must be in {left}{low:g}, {high:g}], got {value:g}")
    return value


def non_negative(value: int, field: str) -> int:
    if value < 0:
        raise InvalidArgument(field, f"must be >= 0, got {value}")
    return int(value)


def unique_layers(model, names, field: str = "layers") -> list:
    """Each named layer once, in first-mention order (a name repeated, or a node and its output, count once)."""
    layers = {}
    for i, name in enumerate(names):
        layer = model.layer(name, f"{field}[{i}]")
        layers.setdefault(layer.name, layer)
    return list(layers.values())


def check_finite(values, field: str, reason: str) -> None:
    """NaN never comes back with OK: a non-finite result is refused, naming the field most likely to blame."""
    for value in values if isinstance(values, (list, tuple)) else (values,):
        if not np.isfinite(np.asarray(value)).all():
            raise InvalidArgument(field, f"the result is not finite (NaN or infinity): {reason}")


def seconds_left(started: float, limits, what: str = "preparing the job") -> float:
    """The wall time a streamed job has left after its preparation (decoding, first passes), which counts
    against --max-job-seconds too; RESOURCE_EXHAUSTED when none is left."""
    left = limits.max_job_seconds - (time.monotonic() - started)
    if left <= 0:
        raise ResourceExhausted(f"the job ran past the server's limit of {limits.max_job_seconds:g} s while "
                                f"{what} and was stopped")
    return left


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


def single_input(model, request, limits, budget=None) -> np.ndarray:
    if not request.HasField("image"):
        raise InvalidArgument("image", "required")
    return to_model_input(request.image, model.config, "image", limits.max_image_pixels, budget=budget)


def sample_bytes(model) -> int:
    """Bytes of one float32 model-input sample."""
    return 4 * model.config.channels * model.config.height * model.config.width


def tensor_bytes(layer, images: int = 1) -> int:
    """Bytes of ``layer``'s float32 values for ``images`` images (unknown dimensions count as 1)."""
    count = images
    for size in layer.shape[1:]:
        count *= max(int(size), 1)
    return 4 * count


def resolve_target(model, backend, request, sample) -> int:
    model.require_classes("target")
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


def stream_within(context, work, started: float, limits, emits: bool = False):
    """``streaming.stream_job`` with the wall-time limit counted from ``started`` (the request's start, after
    any model conversion), so preparation counts against --max-job-seconds too."""
    left = seconds_left(started, limits)
    try:
        yield from stream_job(context, work, left, emits=emits)
    except ResourceExhausted as error:
        if not str(error).startswith("the job ran past the server's limit"):
            raise
        raise ResourceExhausted(f"the job ran past the server's limit of {limits.max_job_seconds:g} s and was "
                                "stopped") from None
