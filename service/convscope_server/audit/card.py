"""The model card's numbers that come from the graph alone: parameters (initializers, counted once however
many nodes share them) and multiply-accumulates per layer for the ops that dominate a CNN's cost (Conv,
ConvTranspose, Gemm, MatMul), from the shapes the graph analysis resolved for one image. Measured numbers
(latency, throughput) come from running the model on this server, not from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    name: str       # the node's output tensor
    op_type: str
    macs: int       # multiply-accumulates for one image


def parameters(proto) -> int:
    """Values held by the graph's floating-point initializers (weights and biases; integer constants such as
    shapes and indices are not parameters)."""
    import onnx

    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return sum(math.prod(init.dims) for init in proto.graph.initializer if init.data_type in floating)


def layer_costs(proto, layers) -> list[LayerCost]:
    """Multiply-accumulates per Conv / ConvTranspose / Gemm / MatMul node for one image, from ``layers``
    (the graph analysis's LayerInfo list: output shapes, weight shapes). Layers whose shapes are not
    known are left out."""
    by_name = {layer.name: layer for layer in layers}
    costs = []
    for node in proto.graph.node:
        layer = by_name.get(node.output[0])
        if layer is None or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        weight, out = layer.weight_shape, layer.shape
        if not weight or any(d <= 0 for d in out[1:]) or any(d <= 0 for d in weight):
            continue
        if node.op_type == "Conv":
            # each output value: (C_in / groups) x kernel multiply-adds = weight.shape[1:] product
            macs = math.prod(out[1:]) * math.prod(weight[1:])
        elif node.op_type == "ConvTranspose":
            spatial_in = _input_positions(by_name, node, len(weight) - 2)
            macs = None if spatial_in is None else weight[0] * spatial_in * math.prod(weight[1:])
        else:  # Gemm / MatMul: each output value sums over the shared dimension
            shared = _shared_dimension(node, weight)
            macs = math.prod(out[1:]) * shared
        if macs:
            costs.append(LayerCost(layer.name, node.op_type, int(macs)))
    return costs


def _input_positions(by_name, node, spatial_rank: int) -> int | None:
    source = by_name.get(node.input[0])
    if source is None or len(source.shape) < spatial_rank + 2 or any(d <= 0 for d in source.shape[2:]):
        return None
    return math.prod(source.shape[2:])


def _shared_dimension(node, weight) -> int:
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return weight[1] if trans_b else weight[0]
    return weight[-2]  # MatMul: (..., K) x (K, M)


def layer_table(layers, costs: list[LayerCost]) -> list[dict]:
    """Every tensor the graph analysis knows: name, op, shape (-1: the batch or unknown), layout, receptive
    field (size and jump in input pixels, rows x columns, where it is local) and multiply-accumulates."""
    macs = {c.name: c.macs for c in costs}
    rows = []
    for layer in layers:
        field = layer.spatial
        rows.append({"name": layer.name, "op": layer.op_type, "shape": [int(d) for d in layer.shape],
                     "layout": layer.layout,
                     "receptive_field": None if field is None else {"size": [field.h.size, field.w.size],
                                                                    "jump": [field.h.jump, field.w.jump]},
                     "macs": macs.get(layer.name, 0)})
    return rows


def summary(proto, layers) -> dict:
    """Parameters, total multiply-accumulates, the ten costliest layers and the layer table, for audit.json."""
    costs = layer_costs(proto, layers)
    total = sum(c.macs for c in costs)
    top = sorted(costs, key=lambda c: -c.macs)[:10]
    return {"parameters": parameters(proto), "macs": total,
            "costliest": [{"layer": c.name, "op": c.op_type, "macs": c.macs,
                           "share": c.macs / total if total else 0.0} for c in top],
            "layers": layer_table(layers, costs)}
