"""What is in a graph: every tensor with its producing op, shape, dtype, and receptive field.

Receptive fields follow Araujo, Norris & Sim (2019), "Computing Receptive Fields of Convolutional Neural
Networks", per spatial axis: a unit ``i`` of a tensor sees the input window of ``size`` pixels centred at
``start + i * jump``. They are propagated through the graph from the image input:

- Conv / pooling: ``size += (k - 1) * dilation * jump``, ``start += ((k - 1) * dilation / 2 - pad_begin) * jump``,
  ``jump *= stride`` (explicit pads, and SAME_UPPER / SAME_LOWER / VALID auto_pad).
- Pad on spatial axes: ``start -= pad_begin * jump``.
- Element-wise ops with several spatial inputs (residual Add, Concat on channels): the union of the inputs'
  windows, when their jumps agree.
- Transpose moves the spatial axes (NHWC graphs from tf2onnx transpose to NCHW after the input).
- Global pooling, Flatten, Reshape, Gemm, MatMul: the result sees the whole image and is not spatial.
- Anything else (Resize, Slice, ...) stops the propagation: no receptive field is claimed for what cannot
  be computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

ONNX_TO_DATATYPE = {
    onnx.TensorProto.BOOL: "BOOL", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT16: "UINT16", onnx.TensorProto.INT16: "INT16", onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
}

# Ops that keep each spatial position where it is and look at no neighbours.
POINTWISE = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "BatchNormalization", "LRN", "ThresholdedRelu",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "QuantizeLinear",
    "DequantizeLinear", "QuickGelu", "FastGelu", "BiasGelu",
}
SLIDING = {"Conv", "MaxPool", "AveragePool", "LpPool"}
GLOBAL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Flatten", "Reshape", "Gemm", "MatMul",
          "ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2", "Squeeze", "Unsqueeze", "Softmax",
          "LogSoftmax", "InstanceNormalization", "ArgMax"}
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class AxisField:
    size: int
    jump: int
    start: float

    def window(self) -> tuple[float, float]:
        half = (self.size - 1) / 2
        return self.start - half, self.start + half


@dataclass(frozen=True)
class Spatial:
    """A tensor whose axes ``h_axis`` and ``w_axis`` map to input rows and columns."""

    h_axis: int
    w_axis: int
    h: AxisField
    w: AxisField


WHOLE_IMAGE = "whole-image"  # marker: derived from the image, not spatial (after global pooling etc.)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op_type: str
    node_name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for dynamic or unknown dims
    spatial: Spatial | None
    weight_shape: tuple[int, ...] | None

    @property
    def layout(self) -> str:
        if self.spatial is None or len(self.shape) != 4:
            return ""
        return {(2, 3): "NCHW", (1, 2): "NHWC"}.get((self.spatial.h_axis, self.spatial.w_axis), "")


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """name -> (datatype, shape with -1 for unknown, dim names) for every typed value in the graph."""
    table = {}
    graph = model.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        ttype = value.type.tensor_type
        dims, names = [], []
        for dim in ttype.shape.dim:
            dims.append(dim.dim_value if dim.HasField("dim_value") else -1)
            names.append(dim.dim_param)
        table[value.name] = (ONNX_TO_DATATYPE.get(ttype.elem_type, str(ttype.elem_type)), tuple(dims),
                             tuple(names))
    for init in graph.initializer:
        table.setdefault(init.name, (ONNX_TO_DATATYPE.get(init.data_type, str(init.data_type)),
                                     tuple(init.dims), ()))
    return table


def logits_node(model: onnx.ModelProto, logits_output: str) -> onnx.NodeProto | None:
    """The node that computes ``logits_output``, looking through Identity nodes."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(logits_output)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    return node


def classifier_input(model: onnx.ModelProto, logits_output: str) -> str | None:
    """The tensor the logits are computed from (the penultimate layer): the logits node's first input."""
    node = logits_node(model, logits_output)
    return node.input[0] if node is not None and node.input else None


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs, as arrays."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _slide(node, spatial: Spatial, in_shape, weights_shape) -> Spatial | None:
    if (spatial.h_axis, spatial.w_axis) != (2, 3):
        return None  # ONNX convs and pools are channels-first
    kernel = _attr(node, "kernel_shape") or (list(weights_shape[2:]) if weights_shape else None)
    if not kernel or len(kernel) != 2:
        return None
    strides = _attr(node, "strides") or [1, 1]
    dilations = _attr(node, "dilations") or [1, 1]
    pads = _attr(node, "pads") or [0, 0, 0, 0]
    auto_pad = (_attr(node, "auto_pad") or b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    fields = []
    for axis, field in ((0, spatial.h), (1, spatial.w)):
        k, s, d = int(kernel[axis]), int(strides[axis]), int(dilations[axis])
        extent = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = in_shape[2 + axis] if in_shape and len(in_shape) == 4 else -1
            if size < 0:
                return None
            total = max((math.ceil(size / s) - 1) * s + extent - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad == "VALID":
            begin = 0
        else:
            begin = int(pads[axis])
        fields.append(AxisField(field.size + (extent - 1) * field.jump, field.jump * s,
                                field.start + ((extent - 1) / 2 - begin) * field.jump))
    return replace(spatial, h=fields[0], w=fields[1])


def _pad(node, spatial: Spatial, values, rank: int) -> Spatial | None:
    pads = values.get(node.input[1]) if len(node.input) > 1 else _attr(node, "pads")
    if pads is None:
        return None
    pads = [int(p) for p in np.asarray(pads).ravel()]
    axes = list(range(rank))
    if len(node.input) > 3 and node.input[3]:
        if node.input[3] not in values:
            return None
        axes = [int(a) % rank for a in np.asarray(values[node.input[3]]).ravel()]
    begin = dict(zip(axes, pads[: len(axes)]))
    return replace(spatial, h=replace(spatial.h, start=spatial.h.start - begin.get(spatial.h_axis, 0) * spatial.h.jump),
                   w=replace(spatial.w, start=spatial.w.start - begin.get(spatial.w_axis, 0) * spatial.w.jump))


def _union(parts: list[Spatial]) -> Spatial | None:
    first = parts[0]
    if any((p.h_axis, p.w_axis, p.h.jump, p.w.jump) != (first.h_axis, first.w_axis, first.h.jump, first.w.jump)
           for p in parts):
        return None
    fields = []
    for axis in ("h", "w"):
        lows, highs = zip(*(getattr(p, axis).window() for p in parts))
        lo, hi = min(lows), max(highs)
        fields.append(AxisField(int(round(hi - lo)) + 1, getattr(first, axis).jump, (lo + hi) / 2))
    return replace(first, h=fields[0], w=fields[1])


def propagate(node, states: dict, types: dict, values: dict):
    """The receptive-field state of ``node``'s first output from its inputs' states."""
    inputs = [states.get(name) for name in node.input if name]
    image_inputs = [s for s in inputs if s is not None]
    if not image_inputs:
        return None  # does not depend on the image (shape arithmetic, constants)
    if any(s == WHOLE_IMAGE for s in image_inputs):
        return WHOLE_IMAGE if node.op_type in POINTWISE | GLOBAL | {"Concat"} else None
    op = node.op_type
    first = states.get(node.input[0])
    if op in GLOBAL:
        return WHOLE_IMAGE
    if op in SLIDING:
        if not isinstance(first, Spatial) or len(image_inputs) != 1:
            return None
        weights = types.get(node.input[1], (None, None))[1] if op == "Conv" else None
        return _slide(node, first, types.get(node.input[0], (None, None, None))[1], weights)
    if op == "Pad":
        if not isinstance(first, Spatial) or len(image_inputs) != 1:
            return None
        return _pad(node, first, values, len(types.get(node.input[0], ("", (), ()))[1]))
    if op == "Transpose":
        perm = list(_attr(node, "perm") or [])
        if not isinstance(first, Spatial) or not perm:
            return None
        return replace(first, h_axis=perm.index(first.h_axis), w_axis=perm.index(first.w_axis))
    if op == "Concat":
        axis = int(_attr(node, "axis", 0))
        rank = len(types.get(node.output[0], ("", (), ()))[1]) or 4
        if axis % rank in {s.h_axis for s in image_inputs} | {s.w_axis for s in image_inputs}:
            return None
        return _union(image_inputs)
    if op in POINTWISE:
        return _union(image_inputs)
    return None


def describe_graph(model: onnx.ModelProto, image_input: str, image_layout: str) -> list[LayerInfo]:
    """Every tensor of the (shape-inferred) graph, in topological order, Constant nodes left out."""
    types = tensor_types(model)
    values = constants(model)
    initializers = {init.name for init in model.graph.initializer}
    unit = AxisField(1, 1, 0.0)
    h_axis, w_axis = (1, 2) if image_layout == "NHWC" else (2, 3)
    states: dict[str, object] = {image_input: Spatial(h_axis, w_axis, unit, unit)}
    layers = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dtype, shape, _ = types.get(value.name, ("", (), ()))
        state = states.get(value.name)
        layers.append(LayerInfo(value.name, "Input", "", dtype, shape,
                                state if isinstance(state, Spatial) else None, None))
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        state = propagate(node, states, types, values)
        weight_shape = None
        if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in initializers:
            weight_shape = types[node.input[1]][1]
        for index, name in enumerate(node.output):
            if not name:
                continue
            dtype, shape, _ = types.get(name, ("", (), ()))
            out_state = state if index == 0 else None
            if isinstance(out_state, Spatial) and (len(shape) <= max(out_state.h_axis, out_state.w_axis)):
                out_state = None
            states[name] = out_state
            layers.append(LayerInfo(name, node.op_type, node.name, dtype, shape,
                                    out_state if isinstance(out_state, Spatial) else None, weight_shape))
    return layers
