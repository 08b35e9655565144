"""What is in a graph: every tensor with its producing op, shape, dtype, spatial layout and receptive field.

Two things are followed from the image input through the graph, per tensor:

- **Where the image's rows and columns are** (the layout). Each is a *place*: the axis that holds it and,
  when a Reshape has merged it with other axes, its stride inside that axis. Rank-keeping ops keep places;
  Transpose moves them; Reshape / Flatten / Squeeze / Unsqueeze keep the row-major element order, so a
  place is found again in the new shape wherever an axis (or a part of one) has the same size and stride.
  That is what recognises ShuffleNet's channel shuffle, (N, C, H, W) -> (N, g, C/g, H, W) -> Transpose ->
  (N, C, H, W), and the legacy exporter's GroupNorm, (N, C, H, W) -> (N, g, C/g*H*W) -> InstanceNorm ->
  back, without trusting any Reshape that moves or splits H or W. A tensor's layout is known when both
  places are whole axes and axis 0 is still the batch: "NCHW" or "NHWC" for 4-D tensors.
- **The receptive field**, (size, jump, start) per image axis, after Araujo, Norris & Sim (2019),
  "Computing Receptive Fields of Convolutional Neural Networks": a unit ``i`` sees the input window of
  ``size`` pixels centred at ``start + i * jump``.

  - Conv / pooling: ``size += (k - 1) * dilation * jump``, ``start += ((k - 1) * dilation / 2 - pad_begin) *
    jump``, ``jump *= stride`` (explicit pads, and SAME_UPPER / SAME_LOWER / VALID auto_pad).
  - Pad (constant mode) and Slice / Split on an image axis: ``start`` moves to the first kept unit; a Slice
    step multiplies ``jump``.
  - Element-wise ops (with broadcasting), Concat and Split on other axes: the union of the inputs' windows,
    when their jumps agree.
  - Ops that work along one non-image axis keep the window (pointwise in space): MatMul with a constant
    weight on the channel axis of an (N, H, W, C) tensor (a Linear layer in a channels-last block),
    reductions (ReduceMean, ...) and normalisations (LayerNormalization, its ReduceMean-Sub-Pow-ReduceMean-
    Add-Sqrt-Div decomposition, Softmax, LpNormalization, LRN) over the channel axis only. Which axes a
    reduction covers comes from its ``axes`` attribute or (ReduceSum from opset 13, the others from 18) its
    second input, compared with the tensor's places.
  - Reductions over both image axes (GlobalAveragePool, ReduceMean over H and W) are global pooling: the
    result has no image axes and every unit sees the whole image. Gemm, and MatMul over an image axis,
    likewise.
  - **Normalisations whose statistics span the image axes** (InstanceNormalization, GroupNormalization, a
    LayerNormalization over (C, H, W), a Softmax over H or W; and any element-wise op with an input that is
    itself global, such as a squeeze-and-excitation gate) keep the layout, but each output unit depends on
    every pixel through the mean and variance. No local window is claimed for them: claiming the window of
    the convolutions alone would be contradicted by perturbing one far pixel, which moves every unit. Such
    tensors report a layout (so activations, Score-CAM, Grad-CAM and CAM use them with the right axes) and no
    receptive field (so patches are the whole image).
  - Ops whose spatial effect is not modelled (Resize, ConvTranspose, DepthToSpace, Pad in reflect mode, ...)
    keep the layout where it provably stays (rank-keeping ops on NCHW tensors) and claim no window; any
    other op stops both: nothing is claimed that cannot be computed.

Shapes come from ONNX shape inference; where it leaves dims unknown (a Reshape whose shape is computed from
Shape / Gather at run time), the caller passes shapes from one probe run (``unresolved`` names them).
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

# Ops that compute each output element from the elements at the same position of their (broadcast) inputs.
POINTWISE = {
    "Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Identity", "Dropout", "Cast", "CastLike", "BatchNormalization", "ThresholdedRelu",
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Where", "Expand", "QuantizeLinear",
    "DequantizeLinear", "QuickGelu", "FastGelu", "BiasGelu", "Shrink", "Sin", "Cos", "Tan", "Not", "And", "Or",
    "Xor", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "IsNaN", "IsInf", "Swish",
}
SLIDING = {"Conv", "MaxPool", "AveragePool", "LpPool"}
# Channels-first ops that keep the (N, C, H, W) layout but whose windows are not modelled.
GRID = {"ConvTranspose", "DepthToSpace", "SpaceToDepth", "MaxUnpool"}
RESIZE = {"Resize", "Upsample"}
VIEWS = {"Reshape", "Flatten"}
REDUCE = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}
GLOBAL_POOL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
NORMALIZE = {"LayerNormalization", "InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization",
             "LpNormalization", "Softmax", "LogSoftmax", "Hardmax", "LRN"}
SHAPE_ONLY = {"Shape", "Size"}  # their outputs describe a tensor's shape, not its pixels
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
    """A tensor whose axes ``h_axis`` and ``w_axis`` map to input rows and columns, with its receptive field."""

    h_axis: int
    w_axis: int
    h: AxisField
    w: AxisField


LAYOUTS = {(2, 3): "NCHW", (1, 2): "NHWC"}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    op_type: str
    node_name: str
    datatype: str
    shape: tuple[int, ...]  # -1 for dynamic (batch) or unknown dims
    spatial: Spatial | None  # set when the layout and a local receptive field are both known
    weight_shape: tuple[int, ...] | None
    axes: tuple[int, int] | None = None  # (height axis, width axis) whenever they are known

    @property
    def layout(self) -> str:
        """"NCHW" / "NHWC" for a 4-D tensor whose image axes are known, else ""."""
        if self.axes is None or len(self.shape) != 4:
            return ""
        return LAYOUTS.get(self.axes, "")

    @property
    def channel_axis(self) -> int | None:
        """The channel axis of a 4-D tensor with a known layout."""
        return {"NCHW": 1, "NHWC": 3}.get(self.layout)


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


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...] | None]:
    """name -> shape (-1 for unknown dims), or None where shape inference left even the rank unknown."""
    table: dict[str, tuple[int, ...] | None] = {}
    graph = model.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        ttype = value.type.tensor_type
        table[value.name] = (tuple(d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim)
                             if ttype.HasField("shape") else None)
    for init in graph.initializer:
        table.setdefault(init.name, tuple(init.dims))
    return table


def unresolved(model: onnx.ModelProto) -> list[str]:
    """Node outputs whose shape inference left the rank or a dim other than the batch axis unknown: the
    tensors a probe run must measure before the graph can be followed."""
    shapes = static_shapes(model)
    names = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for name in node.output:
            shape = shapes.get(name)
            if name and (shape is None or any(d < 0 for d in shape[1:])):
                names.append(name)
    return names


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


FOLDABLE = {"Identity", "Cast", "ConstantOfShape", "Concat", "Reshape", "Transpose", "Slice", "Squeeze",
            "Unsqueeze", "Gather", "Add", "Sub", "Mul", "Div", "Neg", "Range"}
FOLD_LIMIT = 4096  # elements: index arithmetic, not weights


def _fold(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    op = node.op_type
    if op == "Identity":
        return args[0]
    if op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    if op == "ConstantOfShape":
        value = attribute(node, "value")
        fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
        return np.full([int(d) for d in args[0]], fill.ravel()[0], fill.dtype)
    if op == "Concat":
        return np.concatenate(args, axis=int(attribute(node, "axis", 0)))
    if op == "Reshape":
        dims = [int(d) for d in args[1]]
        if not attribute(node, "allowzero", 0):
            dims = [args[0].shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return args[0].reshape(dims)
    if op == "Transpose":
        return args[0].transpose(attribute(node, "perm"))
    if op == "Slice":
        rank = args[0].ndim
        starts, ends = (int(v) for v in args[1]), [int(v) for v in args[2]]
        axes = [int(a) for a in args[3]] if len(args) > 3 and args[3] is not None else range(len(ends))
        steps = [int(v) for v in args[4]] if len(args) > 4 and args[4] is not None else [1] * len(ends)
        index = [slice(None)] * rank
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[axis % rank] = slice(start, end, step)
        return args[0][tuple(index)]
    if op in ("Squeeze", "Unsqueeze"):
        axes = [int(a) for a in (args[1] if len(args) > 1 else attribute(node, "axes") or [])]
        if op == "Squeeze":
            return np.squeeze(args[0], axis=tuple(axes) if axes else None)
        return np.expand_dims(args[0], tuple(axes))
    if op == "Gather":
        return np.take(args[0], args[1], axis=int(attribute(node, "axis", 0)))
    if op == "Neg":
        return -args[0]
    if op == "Range":
        return np.arange(args[0], args[1], args[2], dtype=args[0].dtype)
    a, b = args
    if op == "Div" and np.issubdtype(a.dtype, np.integer):
        return np.fix(np.true_divide(a, b)).astype(a.dtype)  # ONNX integer division truncates
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](a, b).astype(a.dtype)


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers, Constant-node outputs, and what small index arithmetic on them computes (Identity
    copies of tied parameters, the TorchScript exporter's pads built by ConstantOfShape / Concat / Reshape
    / Slice / Transpose / Cast), as arrays."""
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif (node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and len(node.output) == 1
              and all(name in values for name in node.input if name)):
            args = [values[name] if name else None for name in node.input]
            if any(arg is not None and arg.size > FOLD_LIMIT for arg in args):
                continue
            try:
                with np.errstate(all="ignore"):
                    result = np.asarray(_fold(node, args))
            except (ValueError, TypeError, IndexError, KeyError):
                continue
            if result.size <= FOLD_LIMIT:
                values[node.output[0]] = result
    return values


def shape_only(model: onnx.ModelProto, name: str, image_input: str) -> bool:
    """True when ``name`` depends on the image only through its shape (Shape / Size of it): index arithmetic
    a graph computes at run time, such as the dynamo exporter's as_strided indices (a Range over the batch
    size). Such a tensor has one value per input shape, which one run at that shape gives."""
    producers = {out: node for node in model.graph.node for out in node.output}
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        if tensor == image_input:
            return False
        node = producers.get(tensor)
        if tensor in seen or node is None or node.op_type in ("Shape", "Size"):
            continue
        seen.add(tensor)
        stack.extend(i for i in node.input if i)
    return True


def subgraphs(node: onnx.NodeProto):
    """The graphs a node holds as attributes (If branches, Loop / Scan bodies)."""
    for value in node.attribute:
        if value.type == onnx.AttributeProto.GRAPH:
            yield value.g
        elif value.type == onnx.AttributeProto.GRAPHS:
            yield from value.graphs


def read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` reads, its subgraphs' reads (which may be the outer graph's)
    included."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for inner in subgraphs(node):
            read |= read_names(inner)
    return read


def opset_version(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


# -- propagation state -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Place:
    """Where an image axis lives in a tensor: index ``(i // inner) % size`` along ``axis``. ``inner`` is 1
    and ``size`` the axis' length when the image axis is a whole tensor axis."""

    axis: int
    inner: int = 1
    size: int = -1


@dataclass(frozen=True)
class Flow:
    """What is known of a tensor computed from the image (tensors that are not have no Flow): where its
    rows and columns are, the receptive field (None: no local window, the whole image or not modelled),
    and whether axis 0 is still the batch."""

    places: tuple[Place, Place] | None = None
    field: tuple[AxisField, AxisField] | None = None
    batched: bool = False

    def __post_init__(self):
        if self.places is None and self.field is not None:
            object.__setattr__(self, "field", None)  # a window means nothing without its axes


UNKNOWN = Flow()


def _exact(places, shape) -> bool:
    """Both image axes are whole axes of ``shape``."""
    if places is None or shape is None or places[0].axis == places[1].axis:
        return False
    return all(p.inner == 1 and 0 <= p.axis < len(shape) and (p.size < 0 or shape[p.axis] < 0 or
                                                              shape[p.axis] == p.size) for p in places)


def _resized(places, shape):
    """Whole-axis places with their sizes taken from ``shape`` (after a rank-keeping op)."""
    if places is None or shape is None or any(p.inner != 1 or p.axis >= len(shape) for p in places):
        return None
    return tuple(Place(p.axis, 1, shape[p.axis]) for p in places)


def _strides(shape) -> list[int]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return strides


def _known(shape) -> bool:
    """Every dim known except perhaps the batch axis (strides never need it)."""
    return shape is not None and all(d >= 0 for d in shape[1:])


def _view(flow: Flow, src, dst) -> Flow:
    """Reshape / Flatten: the row-major order is kept, so an image axis is found again wherever an axis of
    ``dst`` (or a part of one) has the same stride and size as it had in ``src``."""
    if not (_known(src) and _known(dst)):
        return UNKNOWN
    batched = flow.batched and math.prod(src[1:]) == math.prod(dst[1:])
    if tuple(src[1:]) == tuple(dst[1:]) and len(src) == len(dst):
        return replace(flow, batched=batched)
    if flow.places is None:
        return Flow(None, None, batched)
    s_in, s_out = _strides(src), _strides(dst)
    places = []
    for p in flow.places:
        flat = s_in[p.axis] * p.inner
        if p.size == 1:  # carries no index: only an unambiguous length-1 axis of the same stride will do
            found = [Place(b, 1, 1) for b in range(len(dst)) if dst[b] == 1 and s_out[b] == flat]
            if len(found) != 1:
                return Flow(None, None, batched)
            places.append(found[0])
            continue
        if p.size < 1:
            return Flow(None, None, batched)
        for b in range(len(dst)):
            top = math.inf if b == 0 and dst[0] < 0 else s_out[b] * dst[b]
            if s_out[b] <= flat < top:
                break
        else:
            return Flow(None, None, batched)
        if flat % s_out[b] or (top != math.inf and top % (flat * p.size)):
            return Flow(None, None, batched)  # the image axis straddles two axes of the new shape
        places.append(Place(b, flat // s_out[b], p.size))
    return Flow(tuple(places), flow.field, batched)


def _union(fields: list) -> tuple[AxisField, AxisField] | None:
    first = fields[0]
    if any(f[0].jump != first[0].jump or f[1].jump != first[1].jump for f in fields):
        return None
    out = []
    for axis in (0, 1):
        lows, highs = zip(*(f[axis].window() for f in fields))
        lo, hi = min(lows), max(highs)
        out.append(AxisField(int(round(hi - lo)) + 1, first[axis].jump, (lo + hi) / 2))
    return tuple(out)


def _elementwise(inputs: list[tuple[Flow, tuple | None]], out_shape) -> Flow:
    """Output position = input position, inputs aligned from the right (numpy broadcasting). An input
    without image axes, or broadcast along one, adds whole-image dependence: the window is dropped."""
    ranks = [len(s) for _, s in inputs if s is not None]
    if out_shape is None and len(ranks) != len(inputs):
        return UNKNOWN
    rank = len(out_shape) if out_shape is not None else max(ranks)
    candidates, fields, local, batched = set(), [], True, True
    for flow, shape in inputs:
        if shape is None:
            return UNKNOWN
        shift = rank - len(shape)
        batched = batched and flow.batched and shift == 0
        if flow.places is None or flow.field is None:
            local = False
        if flow.places is None:
            continue
        if out_shape is None or any(shape[p.axis] == 1 and out_shape[p.axis + shift] != 1 for p in flow.places):
            local = False  # broadcast over the image: the same value at every position
            continue
        candidates.add(tuple(replace(p, axis=p.axis + shift) for p in flow.places))
        fields.append(flow.field)
    if len(candidates) != 1:
        return Flow(None, None, batched)
    places = candidates.pop()
    return Flow(places, _union(fields) if local else None, batched)


def _axes_list(node, g, index: int | None, name: str = "axes"):
    """An op's axes from its ``index``-th input (newer opsets) or its attribute; None if not constant,
    () if absent."""
    if index is not None and len(node.input) > index and node.input[index]:
        value = g.values.get(node.input[index])
        return None if value is None else [int(a) for a in np.asarray(value).ravel()]
    axes = attribute(node, name)
    return () if axes is None else [int(a) for a in (axes if isinstance(axes, (list, tuple)) else [axes])]


def _reduce(flow: Flow, axes: set[int], keepdims: bool) -> Flow:
    """A reduction over ``axes``: global pooling when it covers an image axis, pointwise in space when not."""
    if 0 in axes:
        return UNKNOWN  # mixes the samples of a batch
    if flow.places is None:
        return Flow(None, None, flow.batched)
    if axes & {p.axis for p in flow.places}:
        return Flow(None, None, flow.batched)
    if keepdims:
        return flow
    places = tuple(replace(p, axis=p.axis - sum(a < p.axis for a in axes)) for p in flow.places)
    return Flow(places, flow.field, flow.batched)


def _normalize(flow: Flow, axes: set[int]) -> Flow:
    """Shape-keeping normalisation with statistics over ``axes``: pointwise in space unless the statistics
    span an image axis, in which case the layout stays and every unit sees the whole image."""
    if 0 in axes:
        return Flow(flow.places, None, False)
    if flow.places is not None and axes & {p.axis for p in flow.places}:
        return Flow(flow.places, None, flow.batched)
    return flow


def _slide(node, fields, places, in_shape, weights_shape):
    """Conv / pooling windows on channels-first image axes (2 and 3)."""
    kernel = attribute(node, "kernel_shape") or (list(weights_shape[2:]) if weights_shape else None)
    if not kernel or len(kernel) != 2:
        return None
    strides = attribute(node, "strides") or [1, 1]
    dilations = attribute(node, "dilations") or [1, 1]
    pads = attribute(node, "pads") or [0, 0, 0, 0]
    auto_pad = attribute(node, "auto_pad") or b"NOTSET"
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    out = []
    for place, axis_field in zip(places, fields):
        i = place.axis - 2
        k, s, d = int(kernel[i]), int(strides[i]), int(dilations[i])
        extent = (k - 1) * d + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = in_shape[place.axis]
            if size < 0:
                return None
            total = max((math.ceil(size / s) - 1) * s + extent - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad == "VALID":
            begin = 0
        else:
            begin = int(pads[i])
        out.append(AxisField(axis_field.size + (extent - 1) * axis_field.jump, axis_field.jump * s,
                             axis_field.start + ((extent - 1) / 2 - begin) * axis_field.jump))
    return tuple(out)


def _shift(fields, places, offsets: dict[int, int], steps: dict[int, int] | None = None):
    """Windows after dropping ``offsets[axis]`` leading units of image axes (and keeping every
    ``steps[axis]``-th)."""
    out = []
    for place, f in zip(places, fields):
        begin, step = offsets.get(place.axis, 0), (steps or {}).get(place.axis, 1)
        out.append(AxisField(f.size, f.jump * step, f.start + begin * f.jump))
    return tuple(out)


class _Graph:
    def __init__(self, model: onnx.ModelProto, shapes: dict | None):
        self.static = static_shapes(model)
        self.resolved = shapes or {}
        self.values = constants(model)
        self.opset = opset_version(model)

    def shape(self, name: str) -> tuple[int, ...] | None:
        static = self.static.get(name)
        if name in self.resolved and not _known(static):
            return tuple(self.resolved[name])
        return static


def _pad(node, g, flow, in_shape, out_shape) -> Flow:
    mode = attribute(node, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    places = _resized(flow.places, out_shape)
    if not _exact(flow.places, in_shape):
        return Flow(None, None, flow.batched)
    pads = g.values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else attribute(node, "pads")
    axes = _axes_list(node, g, 3)
    if pads is None or axes is None or mode != "constant" or flow.field is None:
        return Flow(places, None, flow.batched)
    pads = [int(p) for p in np.asarray(pads).ravel()]
    rank = len(in_shape)
    axes = [a % rank for a in axes] if axes else list(range(rank))
    begin, end = dict(zip(axes, pads[: len(axes)])), dict(zip(axes, pads[len(axes):]))
    if begin.get(0, 0) or end.get(0, 0):
        return UNKNOWN  # pads the batch
    return Flow(places, _shift(flow.field, flow.places, {a: -b for a, b in begin.items()}), flow.batched)


def _slice(node, g, flow, in_shape, out_shape) -> Flow:
    if g.opset < 10:
        starts, axes, steps = attribute(node, "starts"), list(attribute(node, "axes") or ()), None
    else:
        starts, axes = g.values.get(node.input[1]), _axes_list(node, g, 3)
        steps = g.values.get(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if axes is None or in_shape is None:
        return UNKNOWN
    rank = len(in_shape)
    if not axes:  # every axis from 0, as many as there are starts
        if starts is None:
            return UNKNOWN
        axes = list(range(np.asarray(starts).size))
    axes = [int(a) % rank for a in axes]
    if 0 in axes:
        return UNKNOWN
    image_axes = {p.axis for p in flow.places} if flow.places else set()
    if not image_axes & set(axes):
        return flow  # a slice of channels: pointwise in space
    places = _resized(flow.places, out_shape)
    if not _exact(flow.places, in_shape) or starts is None or flow.field is None:
        return Flow(places, None, flow.batched)
    starts = [int(s) for s in np.asarray(starts).ravel()]
    steps = [int(s) for s in np.asarray(steps).ravel()] if steps is not None else [1] * len(axes)
    offsets, strides = {}, {}
    for axis, start, step in zip(axes, starts, steps):
        size = in_shape[axis]
        if axis not in image_axes:
            continue
        if step <= 0 or size < 0:
            return Flow(places, None, flow.batched)
        start = start + size if start < 0 else start
        offsets[axis], strides[axis] = min(max(start, 0), size), step
    return Flow(places, _shift(flow.field, flow.places, offsets, strides), flow.batched)


def _split(node, g, flow, in_shape) -> list[Flow]:
    rank = len(in_shape) if in_shape is not None else None
    outs = [name for name in node.output]
    if rank is None:
        return [UNKNOWN] * len(outs)
    axis = int(attribute(node, "axis", 0)) % rank
    if axis == 0:
        return [UNKNOWN] * len(outs)
    image_axes = {p.axis for p in flow.places} if flow.places else set()
    if axis not in image_axes:
        return [flow] * len(outs)
    result, offset = [], 0
    for name in outs:
        shape = g.shape(name)
        places = _resized(flow.places, shape)
        if shape is None or shape[axis] < 0 or flow.field is None or not _exact(flow.places, in_shape):
            result.append(Flow(places, None, flow.batched))
            continue
        result.append(Flow(places, _shift(flow.field, flow.places, {axis: offset}), flow.batched))
        offset += shape[axis]
    return result


def _matmul(a: Flow | None, b: Flow | None, a_shape, b_shape, out_shape) -> Flow:
    """A constant weight applied along one axis (a Linear layer): pointwise in space unless that axis holds
    an image axis. Two image-dependent operands (attention) mix positions."""
    if a is not None and b is not None or a_shape is None or b_shape is None or out_shape is None:
        return UNKNOWN
    flow, shape = (a, a_shape) if a is not None else (b, b_shape)
    if len(shape) < 2 or len(a_shape if b is not None else b_shape) < 2:
        return UNKNOWN  # a vector operand removes an axis; not seen in CNNs
    mixed = len(shape) - 1 if a is not None else len(shape) - 2
    if flow.places is None or any(p.axis == mixed for p in flow.places):
        return Flow(None, None, False)
    shift = len(out_shape) - len(shape)
    places = tuple(replace(p, axis=p.axis + shift) for p in flow.places)
    return Flow(places, flow.field, flow.batched and shift == 0)


def _propagate(node, g: _Graph, states: dict) -> list[Flow | None]:
    """The Flow of each of ``node``'s outputs from its inputs' Flows."""
    count = len(node.output)
    flows = [states.get(name) if name else None for name in node.input]
    op = node.op_type
    if op in SHAPE_ONLY or not any(f is not None for f in flows):
        return [None] * count  # does not depend on the image's values (shape arithmetic, constants)
    first = flows[0]
    in_shape = g.shape(node.input[0])
    out_shape = g.shape(node.output[0]) if node.output[0] else None
    rest = [UNKNOWN] * (count - 1)  # second outputs (indices, masks, statistics): nothing claimed
    only_first = first is not None and all(f is None for f in flows[1:])

    if op in POINTWISE or op == "Concat":
        inputs = [(f, g.shape(name)) for f, name in zip(flows, node.input) if f is not None]
        out = _elementwise(inputs, out_shape)
        if op == "Concat" and out.places is not None and out_shape is not None:
            axis = int(attribute(node, "axis", 0)) % len(out_shape)
            if axis == 0:
                out = UNKNOWN
            elif axis in {p.axis for p in out.places}:
                out = Flow(_resized(out.places, out_shape), None, out.batched)
        return [out] + rest
    if not only_first and op not in ("MatMul",):
        return [UNKNOWN] * count  # image-dependent weights, pads, scales: not modelled
    if op == "Transpose":
        perm = list(attribute(node, "perm") or range(len(in_shape or ()))[::-1])
        if not perm or first.places is None:
            return [Flow(None, None, first.batched and perm[:1] == [0])] + rest
        places = tuple(replace(p, axis=perm.index(p.axis)) for p in first.places)
        return [Flow(places, first.field, first.batched and perm[0] == 0)] + rest
    if op in VIEWS:
        return [_view(first, in_shape, out_shape)] + rest
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes_list(node, g, 1)
        if axes is None or not axes or in_shape is None or out_shape is None:
            return [_view(first, in_shape, out_shape)] + rest
        if op == "Unsqueeze":
            inserted = sorted(a % len(out_shape) for a in axes)
            kept = [i for i in range(len(out_shape)) if i not in inserted]
            move = dict(enumerate(kept))
        else:
            removed = {a % len(in_shape) for a in axes}
            move = {i: i - sum(r < i for r in removed) for i in range(len(in_shape)) if i not in removed}
        if first.places is None or any(p.axis not in move for p in first.places):
            return [Flow(None, None, first.batched and move.get(0) == 0)] + rest
        places = tuple(replace(p, axis=move[p.axis]) for p in first.places)
        return [Flow(places, first.field, first.batched and move.get(0) == 0)] + rest
    if op in SLIDING:
        if not _exact(first.places, in_shape) or {p.axis for p in first.places} != {2, 3} or len(in_shape) != 4:
            return [Flow(None, None, first.batched)] + rest
        weights = g.shape(node.input[1]) if op == "Conv" else None
        fields = _slide(node, first.field, first.places, in_shape, weights) if first.field else None
        return [Flow(_resized(first.places, out_shape), fields, first.batched)] + rest
    if op in GRID or op in RESIZE:
        grid = {p.axis for p in first.places} == {2, 3} if first.places else False
        if not _exact(first.places, in_shape) or (op in GRID and not grid):
            return [Flow(None, None, first.batched)] + rest
        return [Flow(_resized(first.places, out_shape), None, first.batched)] + rest
    if op == "Pad":
        return [_pad(node, g, first, in_shape, out_shape)] + rest
    if op == "Slice":
        return [_slice(node, g, first, in_shape, out_shape)] + rest
    if op == "Split":
        return _split(node, g, first, in_shape)
    if op == "MatMul":
        return [_matmul(flows[0], flows[1], in_shape, g.shape(node.input[1]), out_shape)] + rest
    if op == "Gemm":
        return [Flow(None, None, first.batched and not attribute(node, "transA", 0))] + rest
    if in_shape is None:
        return [UNKNOWN] * count
    rank = len(in_shape)
    if op in GLOBAL_POOL:
        return [_reduce(first, set(range(2, rank)), True)] + rest
    if op in REDUCE:
        if op in ("ArgMax", "ArgMin"):
            axes = [int(attribute(node, "axis", 0))]
        else:
            axes = _axes_list(node, g, 1 if (op == "ReduceSum" and g.opset >= 13) or g.opset >= 18 else None)
            if axes is None:
                return [UNKNOWN] * count
            if not axes:
                if attribute(node, "noop_with_empty_axes", 0):
                    return [first] + rest
                axes = list(range(rank))
        return [_reduce(first, {a % rank for a in axes}, bool(attribute(node, "keepdims", 1)))] + rest
    if op in NORMALIZE:
        if op == "LayerNormalization":
            axes = set(range(int(attribute(node, "axis", -1)) % rank, rank))
            stats = _reduce(first, axes, True)
            return [_normalize(first, axes)] + [stats] * (count - 1)
        if op in ("InstanceNormalization", "GroupNormalization"):
            axes = set(range(2 if op == "InstanceNormalization" else 1, rank))
        elif op == "MeanVarianceNormalization":
            axes = {a % rank for a in attribute(node, "axes", [0, 2, 3])}
        elif op == "LRN":
            axes = {1}
        elif op == "LpNormalization":
            axes = {int(attribute(node, "axis", -1)) % rank}
        else:  # Softmax family: one axis from opset 13, the coerced 2-D tail before
            axis = int(attribute(node, "axis", -1 if g.opset >= 13 else 1)) % rank
            axes = {axis} if g.opset >= 13 else set(range(axis, rank))
        return [_normalize(first, axes)] + rest
    return [UNKNOWN] * count


def _reported_shape(static, resolved, dynamic_batch: bool, batched: bool) -> tuple[int, ...]:
    """The shape Describe lists: shape inference's, with dims it left open filled in from the probe run
    (the batch axis of a dynamic-batch graph stays -1)."""
    if resolved is None or _known(static):
        return tuple(static) if static is not None else ()
    out = list(resolved)
    if static is not None and len(static) == len(resolved):
        out = [s if s >= 0 else r for s, r in zip(static, resolved)]
        if static[0] < 0:
            out[0] = -1
    elif dynamic_batch and batched and out:
        out[0] = -1
    return tuple(out)


def describe_graph(model: onnx.ModelProto, image_input: str, image_layout: str,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> list[LayerInfo]:
    """Every tensor of the (shape-inferred) graph, in topological order, Constant nodes left out.
    ``shapes``: shapes measured by a probe run for the tensors shape inference left open (see
    :func:`unresolved`)."""
    g = _Graph(model, shapes)
    types = tensor_types(model)
    initializers = {init.name for init in model.graph.initializer}
    unit = AxisField(1, 1, 0.0)
    h_axis, w_axis = (1, 2) if image_layout == "NHWC" else (2, 3)
    input_shape = g.shape(image_input) or ()
    dynamic_batch = not input_shape or input_shape[0] < 0
    sizes = [input_shape[a] if len(input_shape) == 4 else -1 for a in (h_axis, w_axis)]
    states: dict[str, Flow | None] = {
        image_input: Flow((Place(h_axis, 1, sizes[0]), Place(w_axis, 1, sizes[1])), (unit, unit), True)}

    def info(name, op_type, node_name, weight_shape):
        flow = states.get(name)
        shape = g.shape(name)
        axes = spatial = None
        if flow is not None and flow.batched and _exact(flow.places, shape) and len(shape) >= 3 \
                and min(p.axis for p in flow.places) >= 1:
            axes = (flow.places[0].axis, flow.places[1].axis)
            if flow.field is not None:
                spatial = Spatial(axes[0], axes[1], *flow.field)
        reported = _reported_shape(g.static.get(name), g.resolved.get(name), dynamic_batch,
                                   flow is not None and flow.batched)
        return LayerInfo(name, op_type, node_name, types.get(name, ("",))[0], reported, spatial, weight_shape, axes)

    layers = [info(value.name, "Input", "", None) for value in model.graph.input if value.name not in initializers]
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for name, flow in zip(node.output, _propagate(node, g, states)):
            if name:
                states[name] = flow
        weight_shape = None
        if node.op_type in WEIGHTED and len(node.input) > 1 and node.input[1] in initializers:
            weight_shape = tuple(g.static[node.input[1]])
        layers.extend(info(name, node.op_type, node.name, weight_shape) for name in node.output if name)
    return layers
