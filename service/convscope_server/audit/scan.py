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
from convscope_server.forward.backend import OrtBackend
from convscope_server.scores import class_probabilities


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
    logits: np.ndarray | list = field(default_factory=list)  # (N, classes); batches during the scan
    codes: np.ndarray | list | None = field(default_factory=list)  # (N, D) the code layer's values, flattened
    units: dict[str, UnitStatistics] = field(default_factory=dict)
    failures: list[ItemFailure] = field(default_factory=list)
    kept: np.ndarray | None = None            # the first ``keep`` model inputs, for the sampled sections
    top: dict = field(default_factory=dict)   # layer -> TopActivations of its tracked channels
    loaders: dict = field(default_factory=dict)  # scan index -> (id, loader) of images some table keeps
    class_sums: dict = field(default_factory=dict)  # layer -> {label: (sum of per-image channel means, images)}
    worst: list = field(default_factory=list)  # [(probability of the label, scan index)], lowest first
    indices: list[int] = field(default_factory=list)  # scan index of each row (rows skip unreadable items)
    sources: dict = field(default_factory=dict)  # scan index -> loader of a dataset folder's file (a path, not
                                                 # pixels), so any image can be shown after the pass
    softmax: bool = True                         # the model's [output] softmax (see convscope_server.scores)

    @property
    def probabilities(self) -> np.ndarray:
        return class_probabilities(self.logits.astype(np.float64), self.softmax)

    def absorb(self, plan: ScanPlan, indices: list[int], ids: list[str], labels: list[str], rows: dict,
               loaders: list, k: int = 6, accepted=None, worst: int = 0) -> None:
        """Fold in the :func:`reduce_batch` rows of the next readable images (scan order), with their ids,
        labels and loaders (kept only for images a table still references)."""
        from convscope_server.forward.patches import TopActivations

        self.logits.append(rows["logits"])
        if plan.code:
            self.codes.append(rows["code"])
        ceilings, track = dict(plan.ceilings), dict(plan.track)
        for name, _, _ in plan.layers:
            unit = {key: rows[f"{name}|{key}"] for key in ("maximum", "total", "active", "saturated", "positions")}
            if name not in self.units:
                self.units[name] = UnitStatistics(unit["maximum"].shape[1], 0.0, ceilings.get(name))
            self.units[name].add_rows(unit)
            if name in track:
                table = self.top.setdefault(name, TopActivations(np.asarray(track[name], np.int64), k))
                table.merge(rows[f"{name}|top_value"], rows[f"{name}|top_position"], indices)
                sums = self.class_sums.setdefault(name, {})
                for row, label in enumerate(labels):
                    total, count = sums.get(label, (np.zeros(len(track[name])), 0))
                    sums[label] = (total + rows[f"{name}|channel_mean"][row], count + 1)
        if accepted is not None and worst > 0:
            probabilities = class_probabilities(rows["logits"].astype(np.float64), plan.softmax)
            found = list(self.worst)
            for row, label in enumerate(labels):
                classes = accepted(label) if label else None
                if classes:
                    found.append((float(probabilities[row, list(classes)].sum()), int(indices[row])))
            self.worst = sorted(found)[:worst]
        if self.top or self.worst:
            referenced = set().union(*(table.referenced() for table in self.top.values()),
                                     (index for _, index in self.worst))
            for row, index in enumerate(indices):
                if index in referenced:
                    self.loaders[index] = (ids[row], loaders[row])
            for index in [i for i in self.loaders if i not in referenced]:
                del self.loaders[index]
        self.ids += ids
        self.labels += labels
        self.indices += list(indices)


@dataclass(frozen=True)
class ScanPlan:
    """What one audit pass computes per image (picklable: a Ray worker runs :func:`reduce_batch` with it)."""

    logits: str
    code: str | None
    layers: tuple[tuple[str, str, int], ...]     # (tensor, layout, channel axis) of each unit layer
    ceilings: tuple[tuple[str, float], ...] = ()  # (tensor, saturation value)
    track: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (tensor, channels with top images and label means)
    softmax: bool = True                          # the model's [output] softmax (see convscope_server.scores)

    @property
    def outputs(self) -> list[str]:
        return list(dict.fromkeys([self.logits] + ([self.code] if self.code else [])
                                  + [name for name, _, _ in self.layers]))


def reduce_batch(plan: ScanPlan, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-image numbers of one batch the audit keeps, from the model's ``values`` of ``plan.outputs``:
    logits, codes, per layer the :meth:`UnitStatistics.per_image` rows and, for tracked channels, each
    image's maximum, its position and the channel's mean. Runs where the images were (this server or a
    Ray worker); :meth:`ScanResult.absorb` folds the rows in."""
    from convscope_server.forward.patches import channel_maxima

    count = len(values[plan.logits])
    rows = {"logits": values[plan.logits].reshape(count, -1)}
    if plan.code:
        rows["code"] = values[plan.code].reshape(count, -1).astype(np.float32)
    ceilings, track = dict(plan.ceilings), dict(plan.track)
    for name, layout, axis in plan.layers:
        first = acts.channels_first(values[name], layout, axis)
        for key, value in UnitStatistics.per_image(first, 0.0, ceilings.get(name)).items():
            rows[f"{name}|{key}"] = value
        if name in track:
            channels = np.asarray(track[name], np.int64)
            rows[f"{name}|top_value"], rows[f"{name}|top_position"] = channel_maxima(first, channels)
            rows[f"{name}|channel_mean"] = first[:, channels].reshape(count, len(channels), -1).mean(axis=2)
    return rows


def plan_for(model, code_layer: str | None, unit_layers: list, ceiling: dict | None, track: dict | None) -> ScanPlan:
    return ScanPlan(model.config.logits_output, code_layer,
                    tuple((layer.name, layer.layout, acts.channel_axis(layer.shape, layer.layout, layer.op_type))
                          for layer in unit_layers),
                    tuple((ceiling or {}).items()),
                    tuple((name, tuple(int(c) for c in channels)) for name, channels in (track or {}).items()),
                    bool(model.config.softmax))


def scan(model, items: Iterator[Item], code_layer: str | None, unit_layers: list, batch_size: int,
         should_stop: Callable[[], bool], progress: Callable[[int], None] | None = None, workers: int = 0,
         ceiling: dict[str, float] | None = None, keep: int = 0, track: dict | None = None,
         k: int = 6, accepted: Callable[[str], tuple[int, ...] | None] | None = None, worst: int = 0,
         remote: Callable | None = None) -> ScanResult:
    """One pass of ``items`` through ``model``: logits, the flattened values of ``code_layer`` and
    :class:`UnitStatistics` of each layer in ``unit_layers`` (``LayerInfo`` objects; channels read on
    the axis their layout names). ``ceiling`` gives a layer's saturation value (ReLU6: 6). Unreadable
    items are recorded in ``failures`` and left out. The first ``keep`` inputs are kept (``kept``) for the
    sections that run on a sample. ``track`` (layer -> channel indices) keeps, for those channels, the
    ``k`` images that excite each most (``top``, with the loaders of the images still referenced, as
    TopPatches does) and each label's mean activation per channel (``class_sums``). With ``accepted``
    (label -> the class indices that count as right, None when it maps to none), the ``worst`` images —
    the lowest probability of their label, ties to the earlier image — are kept with their loaders
    (``worst``), for pictures of what the model gets most wrong.

    ``remote(plan, items, deliver, on_failure, should_stop)``, when given, runs :func:`reduce_batch` over
    a dataset folder's items elsewhere (a Ray cluster) and calls ``deliver(indices, rows)`` in scan-index
    order; the result is the one this server's pass gives."""
    plan = plan_for(model, code_layer, unit_layers, ceiling, track)
    result = ScanResult(softmax=plan.softmax)
    options = {"k": k, "accepted": accepted, "worst": worst}
    if remote is not None:
        listed = list(items)
        by_index = {item.index: item for item in listed}
        result.sources = {item.index: item.load for item in listed if item.path is not None}

        def deliver(indices, rows):
            chosen = [by_index[i] for i in indices]
            result.absorb(plan, indices, [i.id for i in chosen], [i.label for i in chosen], rows,
                          [i.load for i in chosen], **options)
            if progress is not None:
                progress(indices[-1] + 1)

        remote(plan, listed, deliver, result.failures.append, should_stop)
        failed = {failure.index for failure in result.failures}
        kept = []
        for item in listed:  # the sampled sections' inputs: the first readable images, decoded here
            if len(kept) >= keep or should_stop():
                break
            if item.index not in failed:
                kept.append(item.load())
        result.kept = np.stack(kept) if kept else None
    else:
        backend = OrtBackend(model)
        kept_batches = []

        def noting(items):
            for item in items:
                if item.path is not None:  # a file: its loader holds the path only
                    result.sources[item.index] = item.load
                yield item

        for batch in batches(noting(items), batch_size, result.failures.append, should_stop, workers):
            if sum(len(b) for b in kept_batches) < keep:
                kept_batches.append(batch.inputs[: keep - sum(len(b) for b in kept_batches)].copy())
            rows = reduce_batch(plan, backend.tensors(batch.inputs, plan.outputs))
            result.absorb(plan, batch.indices, batch.ids, batch.labels, rows, batch.loaders, **options)
            if progress is not None:
                progress(batch.indices[-1] + 1)
        result.kept = np.concatenate(kept_batches) if kept_batches else None
    for statistics in result.units.values():
        statistics.finish()
    result.logits = (np.concatenate(result.logits) if result.logits
                     else np.zeros((0, model.num_classes), np.float32))
    result.codes = (np.concatenate(result.codes) if result.codes else np.zeros((0, 0), np.float32)) if code_layer \
        else None
    if result.kept is None:
        result.kept = np.zeros((0, *model_input_shape(model)), np.float32)
    return result


def model_input_shape(model) -> tuple[int, int, int]:
    config = model.config
    return ((config.channels, config.height, config.width) if config.layout == "NCHW"
            else (config.height, config.width, config.channels))
