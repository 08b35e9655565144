"""The audit's one pass over a dataset: every image goes through the model once, and that pass feeds
every forward section of the report — predictions and probabilities (classes, calibration), the codes
of the penultimate layer (near-duplicates, the embedding map) and per-channel statistics of the chosen
layers (dead and saturated units). Probe sessions expose the inner tensors; the logits come from the
same run.

Labels: a dataset's labels are folder names (or streamed item labels); ``class_mapping`` maps them to the
model's class indices — an explicit mapping first (label -> index or list of indices, any of which counts
as right), else the label equal to a class name (case, spaces, underscores and hyphens ignored), else a
label that is a class index written as a number. Labels that map to nothing are reported, and their
images left out of accuracy and calibration.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from convscope_server.datasets import Item, ItemFailure, batches
from convscope_server.audit.metrics import UnitStatistics
from convscope_server.forward import activations as acts
from convscope_server.forward.backend import OrtBackend, softmax


def _key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text).strip().lower()


def class_mapping(labels: list[str], class_names: list[str], explicit: dict | None = None,
                  num_classes: int = 0) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """({dataset label: accepted class indices}, [labels that map to nothing]) for the distinct
    ``labels`` (empty labels are ignored)."""
    by_name: dict[str, int] = {}
    for index, name in enumerate(class_names):
        by_name.setdefault(_key(name), index)
    classes = num_classes or len(class_names)
    mapping: dict[str, tuple[int, ...]] = {}
    unmapped: list[str] = []
    for label in dict.fromkeys(label for label in labels if label):
        if explicit and label in explicit:
            chosen = explicit[label]
            indices = tuple(int(i) for i in (chosen if isinstance(chosen, (list, tuple)) else [chosen]))
        elif _key(label) in by_name:
            indices = (by_name[_key(label)],)
        elif label.isdigit() and int(label) < classes:
            indices = (int(label),)
        else:
            unmapped.append(label)
            continue
        mapping[label] = indices
    return mapping, unmapped


@dataclass
class ScanResult:
    ids: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    logits: np.ndarray | None = None          # (N, classes)
    codes: np.ndarray | None = None           # (N, D) the code layer's values, flattened
    units: dict[str, UnitStatistics] = field(default_factory=dict)
    failures: list[ItemFailure] = field(default_factory=list)
    kept: np.ndarray | None = None            # the first ``keep`` model inputs, for the sampled sections
    top: dict = field(default_factory=dict)   # layer -> TopActivations of its tracked channels
    loaders: dict = field(default_factory=dict)  # scan index -> (id, loader) of images some table keeps
    class_sums: dict = field(default_factory=dict)  # layer -> {label: (sum of per-image channel means, images)}
    worst: list = field(default_factory=list)  # [(probability of the label, scan index)], lowest first
    indices: list[int] = field(default_factory=list)  # scan index of each row (rows skip unreadable items)

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits.astype(np.float64))


def scan(model, items: Iterator[Item], code_layer: str | None, unit_layers: list, batch_size: int,
         should_stop: Callable[[], bool], progress: Callable[[int], None] | None = None, workers: int = 0,
         ceiling: dict[str, float] | None = None, keep: int = 0, track: dict | None = None,
         k: int = 6, accepted: Callable[[str], tuple[int, ...] | None] | None = None, worst: int = 0) -> ScanResult:
    """One pass of ``items`` through ``model``: logits, the flattened values of ``code_layer`` and
    :class:`UnitStatistics` of each layer in ``unit_layers`` (``LayerInfo`` objects; channels read on
    the axis their layout names). ``ceiling`` gives a layer's saturation value (ReLU6: 6). Unreadable
    items are recorded in ``failures`` and left out. The first ``keep`` inputs are kept (``kept``) for the
    sections that run on a sample. ``track`` (layer -> channel indices) keeps, for those channels, the
    ``k`` images that excite each most (``top``, with the loaders of the images still referenced, as
    TopPatches does) and each label's mean activation per channel (``class_sums``). With ``accepted``
    (label -> the class indices that count as right, None when it maps to none), the ``worst`` images —
    the lowest probability of their label, ties to the earlier image — are kept with their loaders
    (``worst``), for pictures of what the model gets most wrong."""
    backend = OrtBackend(model)
    result = ScanResult()
    logits_name = model.config.logits_output
    names = [logits_name] + ([code_layer] if code_layer else []) + [layer.name for layer in unit_layers]
    axes = {layer.name: acts.channel_axis(layer.shape, layer.layout, layer.op_type) for layer in unit_layers}
    logits, codes, kept = [], [], []
    for batch in batches(items, batch_size, result.failures.append, should_stop, workers):
        if sum(len(k) for k in kept) < keep:
            kept.append(batch.inputs[: keep - sum(len(k) for k in kept)].copy())
        values = backend.tensors(batch.inputs, names)
        logits.append(values[logits_name].reshape(len(batch.inputs), -1))
        if code_layer:
            codes.append(values[code_layer].reshape(len(batch.inputs), -1).astype(np.float32))
        for layer in unit_layers:
            first = acts.channels_first(values[layer.name], layer.layout, axes[layer.name])
            if layer.name not in result.units:
                result.units[layer.name] = UnitStatistics(first.shape[1], 0.0, (ceiling or {}).get(layer.name))
            result.units[layer.name].add(first)
            if track and layer.name in track:
                _track(result, layer.name, first, np.asarray(track[layer.name], np.int64), k, batch)
        if accepted is not None and worst > 0:
            _keep_worst(result, values[logits_name].reshape(len(batch.inputs), -1), batch, accepted, worst)
        if track or result.worst:
            referenced = set().union(*(table.referenced() for table in result.top.values()),
                                     (index for _, index in result.worst))
            for row, index in enumerate(batch.indices):
                if index in referenced:
                    result.loaders[index] = (batch.ids[row], batch.loaders[row])
            for index in [i for i in result.loaders if i not in referenced]:
                del result.loaders[index]
        result.ids += batch.ids
        result.labels += batch.labels
        result.indices += list(batch.indices)
        if progress is not None:
            progress(batch.indices[-1] + 1)
    result.logits = np.concatenate(logits) if logits else np.zeros((0, model.num_classes), np.float32)
    if code_layer:
        result.codes = np.concatenate(codes) if codes else np.zeros((0, 0), np.float32)
    result.kept = np.concatenate(kept) if kept else np.zeros((0, *model_input_shape(model)), np.float32)
    return result


def _keep_worst(result: ScanResult, logits: np.ndarray, batch, accepted, count: int) -> None:
    """Merge this batch's labelled images into the ``count`` with the lowest probability of their label."""
    probabilities = softmax(logits.astype(np.float64))
    found = list(result.worst)
    for row, label in enumerate(batch.labels):
        classes = accepted(label) if label else None
        if classes:
            found.append((float(probabilities[row, list(classes)].sum()), int(batch.indices[row])))
    result.worst = sorted(found)[:count]


def _track(result: ScanResult, name: str, values: np.ndarray, channels: np.ndarray, k: int, batch) -> None:
    from convscope_server.forward.patches import TopActivations

    table = result.top.setdefault(name, TopActivations(channels, k))
    table.add(values, batch.indices)
    means = values[:, channels].reshape(len(values), len(channels), -1).mean(axis=2)
    sums = result.class_sums.setdefault(name, {})
    for row, label in enumerate(batch.labels):
        total, count = sums.get(label, (np.zeros(len(channels)), 0))
        sums[label] = (total + means[row], count + 1)


def model_input_shape(model) -> tuple[int, int, int]:
    config = model.config
    return ((config.channels, config.height, config.width) if config.layout == "NCHW"
            else (config.height, config.width, config.channels))
