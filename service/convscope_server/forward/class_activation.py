"""CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization") for networks whose
head is global average pooling followed by one linear layer: the class's weights over the pooled
channels, applied to the feature map before pooling. Forward-only: the weights come from the graph and
the feature map from a probe session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convscope_server.onnx.graph import logits_node

PASS_THROUGH = {"Flatten", "Reshape", "Squeeze", "Identity", "Dropout"}


@dataclass
class LinearHead:
    feature_map: str      # the tensor that is globally pooled
    weights: np.ndarray   # (classes, channels)


def find_linear_head(proto, values: dict, logits_output: str) -> LinearHead | str:
    """The GAP + linear head ending at ``logits_output``, or a sentence saying why there is none."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = logits_node(proto, logits_output)
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        return f"the logits come from {node.op_type if node else 'no node'}, not a linear layer"
    weights = values.get(node.input[1])
    if weights is None:
        return "the linear layer's weights are not stored in the graph"
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
    weights = weights if trans_b else weights.T  # -> (classes, channels)
    source = producers.get(node.input[0])
    while source is not None and source.op_type in PASS_THROUGH:
        source = producers.get(source.input[0])
    if source is None or source.op_type != "GlobalAveragePool":
        return f"the linear layer reads {source.op_type if source else 'the input'}, not a global average pool"
    return LinearHead(source.input[0], np.asarray(weights, np.float32))


def class_activation_map(feature_map: np.ndarray, head: LinearHead, target: int) -> np.ndarray:
    """(C, h, w) feature map -> ReLU(sum_k w_k^c A_k) at the feature map's resolution."""
    return np.maximum(np.tensordot(head.weights[target], feature_map, axes=1), 0)
