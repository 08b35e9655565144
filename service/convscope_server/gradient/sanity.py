"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Weighted layers the logits depend on are re-initialised one after another from the top (logits) down,
cumulatively, on a copy of the converted module; after each step every method's map is recomputed and
compared with its map on the trained model by Spearman rank correlation of the absolute values. A method
whose maps barely change while the weights that define the class are destroyed is not explaining the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from convscope_server.onnx.graph import read_names, subgraphs


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, tied values sharing the mean of their ranks (CAMs have many zeros after the ReLU)."""
    flat = values.ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], flat.size]
    group = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(flat.size)
    ranks[order] = ((starts + ends - 1) / 2)[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps: Pearson correlation of their average ranks."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator else 0.0


# Ops whose output depends on their input's shape only, never on its values: a weight behind them cannot
# change the logits, so the walk back from the logits stops there.
SHAPE_ONLY = ("Shape", "Size")


def ancestors(proto, output: str) -> set[str]:
    """Names of the tensors whose values ``output`` depends on, ``output`` included: the graph walked back
    from it through every node's inputs (and what its subgraphs read), except the inputs of ops that read
    only a shape (:data:`SHAPE_ONLY`)."""
    producer = {out: node for node in proto.graph.node for out in node.output if out}
    found, pending = set(), [output]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        node = producer.get(name)
        if node is None or node.op_type in SHAPE_ONLY:
            continue
        inner = set().union(*(read_names(graph) for graph in subgraphs(node)))   # If / Loop bodies
        pending.extend(n for n in (*node.input, *inner) if n and n not in found)
    return found


def logits_name(torch_model, proto) -> str:
    """The graph output holding the logits (``model.config.logits_output``: the converted module keeps
    its index among the graph's outputs)."""
    outputs = [value.name for value in proto.graph.output]
    index = torch_model.logits_index
    return outputs[index if index is not None else 0]


def weighted_layers(torch_model, proto) -> list[tuple[str, object]]:
    """(tensor name, module holding weights) for every Conv/Gemm/MatMul node the logits depend on, from the
    top down. Layers of other outputs (an embedding head beside the classifier, an auxiliary head) are
    left out: randomising them cannot change a map of a class score, and the cascade would report every
    method as insensitive. The audit's randomisation section runs through here too."""
    path = ancestors(proto, logits_name(torch_model, proto))
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.output[0] not in torch_model.module.mapping:
            continue
        if node.output[0] not in path:
            continue
        module, _ = torch_model.producer(node.output[0])
        holders = [m for m in module.modules() if getattr(m, "weight", None) is not None]
        if holders:
            found.append((node.output[0], holders[-1]))
    return found[::-1]


def randomize(module, generator) -> None:
    """Re-initialise weight and bias with Gaussians of the same standard deviation as the trained ones,
    drawn on the CPU with ``generator`` (the same weights on every device) and moved to the module's."""
    import torch

    for name in ("weight", "bias"):
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        std = float(tensor.detach().std()) if tensor.numel() > 1 else 1.0
        with torch.no_grad():
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.device) * (std or 1.0))


@dataclass
class SanityReport:
    layers: list[str]                    # randomised, cumulatively, in this order
    correlations: dict[str, list[float]]  # method -> one value per layer
    original: dict[str, np.ndarray] = field(default_factory=dict)
    randomized: dict[str, list[np.ndarray]] = field(default_factory=dict)


def cascading_randomization(torch_model, proto, maps: dict, layers: int, seed: int, progress=None,
                            should_stop=None, keep_maps: bool = False) -> SanityReport | None:
    """``maps``: method name -> function(torch_model) -> (H, W) map. ``layers``: how many weighted layers
    to randomise from the top (0: all)."""
    import torch

    copy_model = copy.copy(torch_model)  # same device, precision and gate; its own weights
    copy_model.module = copy.deepcopy(torch_model.module)
    order = weighted_layers(copy_model, proto)
    order = order[:layers] if layers else order
    total = (len(order) + 1) * len(maps)
    original = {name: np.abs(fn(torch_model)) for name, fn in maps.items()}
    report = SanityReport([name for name, _ in order], {name: [] for name in maps},
                          original if keep_maps else {}, {name: [] for name in maps} if keep_maps else {})
    done = len(maps)
    if progress is not None:
        progress(done, total)
    generator = torch.Generator().manual_seed(seed)
    for _, module in order:
        randomize(module, generator)
        for name, fn in maps.items():
            if should_stop is not None and should_stop():
                return None
            current = np.abs(fn(copy_model))
            report.correlations[name].append(spearman(original[name], current))
            if keep_maps:
                report.randomized[name].append(current)
            done += 1
            if progress is not None:
                progress(done, total)
    return report
