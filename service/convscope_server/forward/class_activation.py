"""CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization") for networks whose
head is global average pooling followed by one linear layer: the class's weights over the pooled
channels, applied to the feature map before pooling. Forward-only: the weights come from the graph and
the feature map from a probe session.

The head is found by walking back from the logits::

    feature map -> GlobalAveragePool | ReduceMean over its H and W axes
                -> [Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Gather, Identity, Dropout,
                    per-channel Mul / Div / Add / Sub by constants, BatchNormalization,
                    at most one LayerNorm over the channels (the op, or the exporter's
                    ReduceMean-Sub-Pow-ReduceMean-Add-Sqrt-Div decomposition)]
                -> Gemm | MatMul with constant weights (+ a constant bias) -> logits

Views and transposes only reorder the pooled channels (followed exactly, so ConvNeXt's LayerNorm2d, a
permute + LayerNorm + permute, is seen through); per-channel affine steps fold into the class weights.
Anything else between pool and linear layer (an activation, a second linear layer) makes the head
non-linear in the feature map, and the reason given names it.

A LayerNorm over the pooled vector ``p`` (ConvNeXt: pool -> LayerNorm2d -> Flatten -> Linear) is not
linear, but CAM stays exact: the centring ``p_k - mean(p)`` commutes with the spatial mean, and the
division is by one number per image, ``sigma = sqrt(var_k(p) + eps)``. So, with ``v_ck = w_ck gamma_k``
(times any per-channel factors after the norm),

    logit_c = const_c + mean_ij M_c(i, j),   M_c(i, j) = sum_k (v_ck - mean_k v_ck) A_k(i, j) / sigma,

which is CAM's defining decomposition of the class score over positions; the map is ReLU(M_c) as for a
plain head. Per-channel factors before the norm (``p -> a p + b``) enter the same way, with sigma taken
of ``a p + b``. The weights reported are ``v_c - mean(v_c)`` (times ``a``), before the division by sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convscope_server.onnx.graph import attribute, logits_node, static_shapes

VIEWS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Transpose", "Gather"}
AFFINE = {"Mul", "Div", "Add", "Sub"}


@dataclass
class LinearHead:
    feature_map: str      # the tensor that is globally pooled
    weights: np.ndarray   # (classes, channels): the map is ReLU(sum_k weights[c, k] A_k) (/ sigma, see norm)
    layout: str = "NCHW"  # the feature map's layout as the pooling reads it
    norm: tuple[np.ndarray, np.ndarray, float] | None = None  # (a, b, eps): a LayerNorm of a * p + b


def _const(values, node, index):
    return values.get(node.input[index]) if len(node.input) > index and node.input[index] else None


def _image_operand(node, values) -> tuple[int, np.ndarray] | None:
    """(index of the non-constant operand, the constant) for a binary op with exactly one constant."""
    consts = [values.get(name) for name in node.input[:2]]
    if len(node.input) != 2 or sum(c is not None for c in consts) != 1:
        return None
    index = 0 if consts[1] is not None else 1
    return index, np.asarray(consts[1 - index], np.float64)


def _decomposed_norm(node, producers, values):
    """(x, axes, eps) when ``node`` is the Div of ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``."""
    if node.op_type != "Div" or len(node.input) != 2:
        return None
    sub, sqrt = producers.get(node.input[0]), producers.get(node.input[1])
    if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
        return None
    mean = producers.get(sub.input[1])
    if mean is None or mean.op_type != "ReduceMean" or mean.input[0] != sub.input[0]:
        return None
    add = producers.get(sqrt.input[0])
    if add is None or add.op_type != "Add":
        return None
    operand = _image_operand(add, values)
    if operand is None:
        return None
    variance = producers.get(add.input[operand[0]])
    if variance is None or variance.op_type != "ReduceMean":
        return None
    square = producers.get(variance.input[0])
    if square is None or square.input[0] != node.input[0]:
        return None
    exponent = _const(values, square, 1)
    if not (square.op_type == "Pow" and exponent is not None and float(np.asarray(exponent).ravel()[0]) == 2.0
            or square.op_type == "Mul" and square.input[1] == node.input[0]):
        return None
    axes = [_axes(n, values) for n in (mean, variance)]
    if axes[0] is None or axes[0] != axes[1]:
        return None
    return sub.input[0], axes[0], float(operand[1].ravel()[0])


def _axes(node, values) -> list[int] | None:
    axes = _const(values, node, 1) if len(node.input) > 1 else attribute(node, "axes")
    return None if axes is None else [int(a) for a in np.asarray(axes).ravel()]


class _Channels:
    """The pooled channels on their way to the linear layer: the current shape (batch 1), which channel
    each element holds, and the per-channel affine map applied so far (``a p + b`` before a norm, the
    factor ``c`` after it)."""

    def __init__(self, shape, channels: int):
        self.shape = tuple(shape)
        self.order = np.arange(channels)
        self.a, self.b = np.ones(channels), np.zeros(channels)
        self.c = np.ones(channels)
        self.norm: tuple | None = None

    def per_channel(self, constant: np.ndarray) -> np.ndarray | None:
        """A constant broadcast over the current tensor, as one value per channel (None if it would
        change the tensor's shape)."""
        try:
            flat = np.broadcast_to(constant, self.shape).ravel()
        except ValueError:
            return None
        out = np.empty(len(self.order))
        out[self.order] = flat
        return out

    def scale(self, factor: np.ndarray) -> None:
        if self.norm is None:
            self.a, self.b = self.a * factor, self.b * factor
        else:
            self.c = self.c * factor

    def shift(self, term: np.ndarray) -> None:
        if self.norm is None:
            self.b = self.b + term  # after a norm, a shift only moves the bias

    def normalize(self, axes, gamma, eps) -> str | None:
        rank = len(self.shape)
        if self.norm is not None:
            return "two normalisations stand between the pool and the linear layer"
        if math.prod(self.shape[a % rank] for a in axes) != len(self.order):
            return "a normalisation over other axes than the pooled channels stands before the linear layer"
        self.norm = (self.a.copy(), self.b.copy(), eps)
        if gamma is not None:  # broadcast from the right over the normalised axes, as the op does
            factor = self.per_channel(np.asarray(gamma, np.float64))
            if factor is None:
                return "the normalisation's scale is not one value per channel"
            self.c = factor
        return None


def _new_shape(node, values, shape, shapes) -> tuple[int, ...] | None:
    op = node.op_type
    if op in ("Identity", "Dropout"):
        return shape
    if op == "Flatten":
        axis = int(attribute(node, "axis", 1))
        axis = axis + len(shape) if axis < 0 else axis
        return math.prod(shape[:axis]), math.prod(shape[axis:])
    if op == "Transpose":
        perm = attribute(node, "perm") or list(range(len(shape)))[::-1]
        return tuple(shape[p] for p in perm)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _axes(node, values)
        if op == "Squeeze":
            drop = {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
            return tuple(d for i, d in enumerate(shape) if i not in drop)
        out = list(shape)
        for a in sorted(a % (len(shape) + len(axes)) for a in axes):
            out.insert(a, 1)
        return tuple(out)
    if op == "Reshape":
        target = _const(values, node, 1)
        if target is None:
            known = shapes.get(node.output[0])
            return None if known is None or any(d < 0 for d in known[1:]) else (1, *known[1:])
        dims = [int(d) for d in np.asarray(target).ravel()]
        dims = [shape[i] if d == 0 and not attribute(node, "allowzero", 0) else d for i, d in enumerate(dims)]
        if dims.count(-1) == 1:
            dims[dims.index(-1)] = math.prod(shape) // max(1, -math.prod(dims))
        return tuple(dims) if math.prod(dims) == math.prod(shape) else None
    return None


def _follow(chain, values, state: _Channels, shapes) -> str | None:
    """Apply the ops from the pool to the linear layer to ``state``; a reason when one cannot be followed."""
    for step in chain:
        if isinstance(step, tuple):  # a decomposed LayerNorm: (axes, eps)
            reason = state.normalize(step[0], None, step[1])
            if reason:
                return reason
            continue
        node, op = step, step.op_type
        if op == "Gather":
            indices = _const(values, node, 1)
            if indices is None:
                return f"Gather {node.name!r} picks channels computed at run time"
            picked = np.take(state.order.reshape(state.shape), np.asarray(indices, np.int64),
                             axis=int(attribute(node, "axis", 0)))
            state.order, state.shape = picked.ravel(), picked.shape
            if sorted(state.order.tolist()) != list(range(len(state.order))) or len(state.order) != len(state.a):
                return f"Gather {node.name!r} repeats or drops pooled channels"
        elif op in VIEWS:
            shape = _new_shape(node, values, state.shape, shapes)
            if shape is None:
                return f"{op} {node.name!r} cannot be followed"
            if op == "Transpose":
                perm = attribute(node, "perm") or list(range(len(state.shape)))[::-1]
                state.order = state.order.reshape(state.shape).transpose(perm).ravel()
            state.shape = shape
        elif op == "BatchNormalization":
            if any(n not in values for n in node.input[1:5]):
                return f"BatchNormalization {node.name!r} has statistics computed at run time"
            scale, bias, mean, var = (np.asarray(values[n], np.float64) for n in node.input[1:5])
            factor = scale / np.sqrt(var + float(attribute(node, "epsilon", 1e-5)))
            lead = (1, -1) + (1,) * (len(state.shape) - 2)
            per = [state.per_channel(v.reshape(lead)) for v in (factor, bias - mean * factor)]
            if per[0] is None or per[1] is None:
                return f"BatchNormalization {node.name!r} does not normalise the pooled channels"
            state.scale(per[0])
            state.shift(per[1])
        elif op == "LayerNormalization":
            axis = int(attribute(node, "axis", -1)) % len(state.shape)
            gamma = _const(values, node, 1)
            if gamma is None or len(node.input) > 2 and node.input[2] and node.input[2] not in values:
                return f"LayerNormalization {node.name!r} has a scale or bias computed at run time"
            reason = state.normalize(list(range(axis, len(state.shape))), gamma,
                                     float(attribute(node, "epsilon", 1e-5)))
            if reason:
                return reason
        else:  # Mul / Div / Add / Sub by a constant
            index, constant = _image_operand(node, values)
            per = state.per_channel(constant)
            if per is None:
                return f"{op} {node.name!r} by a constant of shape {list(constant.shape)} is not per channel"
            if op == "Mul":
                state.scale(per)
            elif op == "Div" and index == 0:
                state.scale(1 / per)
            elif op == "Add":
                state.shift(per)
            elif op == "Sub":
                if index == 1:  # constant - x
                    state.scale(-np.ones_like(per))
                state.shift(-per if index == 0 else per)
            else:
                return f"{op} {node.name!r} divides by the pooled channels"
    return None


def find_linear_head(proto, values: dict, logits_output: str, layout_of=None, shape_value=None) -> LinearHead | str:
    """The GAP + linear head ending at ``logits_output``, or a sentence saying why there is none.
    ``layout_of(name)``, when given, is the layout the graph analysis found for a tensor ("" if unknown);
    ``shape_value(name)`` the value for one image of a tensor computed from the input's shape alone (or
    None), for index arithmetic done at run time (the dynamo exporter's as_strided Gather)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = logits_node(proto, logits_output)
    while node is not None and (node.op_type in ("Reshape", "Flatten", "Squeeze", "Identity")
                                or node.op_type == "Add" and _image_operand(node, values) is not None):
        index = _image_operand(node, values)[0] if node.op_type == "Add" else 0
        node = producers.get(node.input[index])  # a bias, or a view of the logits
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return f"the logits come from {node.op_type if node else 'no node'}, not a linear layer"
    weights = values.get(node.input[1])
    if weights is None or np.ndim(weights) != 2:
        return "the linear layer's weights are not stored in the graph"
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0):
            return "the linear layer transposes its input (Gemm transA)"
        weights = (weights if attribute(node, "transB", 0) else weights.T) * float(attribute(node, "alpha", 1.0))
    else:
        weights = weights.T  # -> (classes, channels)
    weights = np.asarray(weights, np.float64)
    chain, name = [], node.input[0]
    while True:
        source = producers.get(name)
        if source is None:
            return "the linear layer reads the input, not a global average pool"
        op = source.op_type
        if op in ("GlobalAveragePool", "ReduceMean"):
            break
        norm = _decomposed_norm(source, producers, values)
        if norm is not None:
            chain.append(norm[1:])
            name = norm[0]
        elif op in VIEWS | {"BatchNormalization", "LayerNormalization"} or (
                op in AFFINE and _image_operand(source, values) is not None):
            chain.append(source)
            name = source.input[_image_operand(source, values)[0] if op in AFFINE else 0]
        else:
            return f"the linear layer reads {op} {source.name!r}, not a global average pool"
    feature_map = source.input[0]
    shapes = static_shapes(proto)
    channels = weights.shape[1]
    if op == "GlobalAveragePool":
        layout, pooled = "NCHW", (1, channels, 1, 1)
    else:
        axes = _axes(source, values)
        if axes is None:
            return f"ReduceMean {source.name!r} reduces axes computed at run time"
        rank = len(shapes.get(feature_map) or (0,) * 4)
        axes = {a % rank for a in axes} if rank == 4 else set()
        layout = {frozenset({2, 3}): "NCHW", frozenset({1, 2}): "NHWC"}.get(frozenset(axes))
        if layout is None:
            return f"ReduceMean {source.name!r} reduces axes {sorted(axes)}, not the height and width of a feature map"
        full = (1, channels, 1, 1) if layout == "NCHW" else (1, 1, 1, channels)
        keep = attribute(source, "keepdims", 1)
        pooled = full if keep else (1, channels)
    known = layout_of(feature_map) if layout_of is not None else layout
    if known != layout:
        return (f"the pooled tensor {feature_map!r} has layout {known or 'unknown'}, but the pooling reads it "
                f"as {layout}")
    state = _Channels(pooled, channels)
    if shape_value is not None:  # indices computed from the input's shape: their value for one image
        computed = {node.input[1]: shape_value(node.input[1]) for node in chain
                    if not isinstance(node, tuple) and node.op_type == "Gather" and node.input[1] not in values}
        values = {**values, **{name: value for name, value in computed.items() if value is not None}}
    reason = _follow(reversed(chain), values, state, shapes)
    if reason:
        return reason
    if math.prod(state.shape) != channels:
        return "the linear layer does not read the pooled channels one by one"
    ordered = np.empty_like(weights)
    ordered[:, state.order] = weights
    if state.norm is None:
        return LinearHead(feature_map, (ordered * state.a).astype(np.float32), layout)
    v = ordered * state.c
    v -= v.mean(axis=1, keepdims=True)
    a, b, eps = state.norm
    return LinearHead(feature_map, (v * a).astype(np.float32), layout, (a, b, eps))


def class_map(feature_map: np.ndarray, head: LinearHead, target: int) -> np.ndarray:
    """(C, h, w) channels-first feature map -> M_c before the ReLU; its mean over positions is the logit
    less a constant of the head."""
    features = np.asarray(feature_map, np.float64)
    cam = np.tensordot(head.weights[target].astype(np.float64), features, axes=1)
    if head.norm is not None:
        a, b, eps = head.norm
        pooled = a * features.mean(axis=(1, 2)) + b
        cam = cam / np.sqrt(pooled.var() + eps)
    return cam


def class_activation_map(feature_map: np.ndarray, head: LinearHead, target: int) -> np.ndarray:
    """(C, h, w) channels-first feature map -> ReLU(M_c) at the feature map's resolution."""
    return np.maximum(class_map(feature_map, head, target), 0).astype(np.float32)
