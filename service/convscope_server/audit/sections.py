"""Report sections computed from the audit's scan (:mod:`convscope_server.audit.scan`): plain dicts, lists
and numbers, ready for audit.json and the pages. Each function reads what the scan collected; none runs
the model again.
"""

from __future__ import annotations

import numpy as np

from convscope_server.audit import metrics
from convscope_server.scores import decided_from_probabilities


def classes(result, mapping: dict[str, tuple[int, ...]], unmapped: list[str], class_name, top_k: int = 5,
            bins: int = 15, confusions: int = 10, worst: int = 12) -> dict:
    """Accuracy, top-k accuracy, the most frequent confusions, calibration (ECE and the reliability
    diagram's bins) and the worst-classified images, over the images whose label maps to classes
    (``mapping``: label -> accepted class indices; any of them counts as right). Without mapped labels:
    the distribution of predicted classes only. Predictions and confidences follow ``scores``: a model
    with a single output predicts class 0 when p > 0.5 (else no class) with confidence max(p, 1 - p)."""
    probabilities = result.probabilities
    single = probabilities.ndim == 2 and probabilities.shape[1] == 1
    predicted, confidence = (decided_from_probabilities(probabilities) if len(probabilities)
                             else (np.zeros(0, np.int64), np.zeros(0)))
    counts = np.bincount(predicted[predicted >= 0],  # a single output's "no class" is not counted
                         minlength=probabilities.shape[1] if probabilities.ndim == 2 else 0)
    distribution = [{"class": int(c), "name": class_name(int(c)), "images": int(counts[c])}
                    for c in np.argsort(-counts, kind="stable") if counts[c]]
    section = {"images": len(result.ids), "predicted": distribution, "unmapped_labels": sorted(unmapped)}
    rows = [i for i, label in enumerate(result.labels) if label in mapping]
    if not rows:
        section["labelled"] = 0
        return section
    accepted = [mapping[result.labels[i]] for i in rows]
    p = probabilities[rows]
    ranked = np.argsort(-p, axis=1, kind="stable")
    correct = np.array([predicted[rows[r]] in accepted[r] for r in range(len(rows))])
    in_top = correct.copy() if single else np.array([bool(set(ranked[r, :top_k].tolist()) & set(accepted[r]))
                                                      for r in range(len(rows))])
    truth = np.array([a[0] for a in accepted])
    wrong = [r for r in range(len(rows)) if not correct[r]]
    confused = metrics.confusions(ranked[wrong, 0], truth[wrong], confusions) if wrong and not single else []
    calibration = metrics.calibration_of(confidence[rows], correct, bins)
    true_probability = np.array([p[r, list(accepted[r])].sum() for r in range(len(rows))])
    worst_rows = np.argsort(true_probability, kind="stable")[:worst]
    section.update({
        "labelled": len(rows),
        "accuracy": float(correct.mean()),
        f"top{top_k}_accuracy": float(in_top.mean()),
        "confusions": [{"true": c.true, "true_name": class_name(c.true), "predicted": c.predicted,
                        "predicted_name": class_name(c.predicted), "images": c.count} for c in confused],
        "calibration": {"ece": calibration.ece, "bins": [
            {"low": float(calibration.edges[b]), "high": float(calibration.edges[b + 1]),
             "images": int(calibration.count[b]),
             "confidence": None if not calibration.count[b] else float(calibration.confidence[b]),
             "accuracy": None if not calibration.count[b] else float(calibration.accuracy[b])}
            for b in range(bins)]},
        "worst": [{"id": result.ids[rows[r]], "label": result.labels[rows[r]],
                   "index": int(result.indices[rows[r]]) if result.indices else rows[r],
                   "true_probability": float(true_probability[r]), "predicted": int(ranked[r, 0]),
                   "predicted_name": class_name(int(ranked[r, 0]))} for r in worst_rows.tolist()],
        "per_label": _per_label(result, rows, correct, true_probability),
    })
    return section


def _per_label(result, rows: list[int], correct: np.ndarray, true_probability: np.ndarray) -> dict:
    """Per dataset label: its images, accuracy and mean probability of the label."""
    found: dict = {}
    for r, row in enumerate(rows):
        found.setdefault(result.labels[row], []).append(r)
    return {label: {"images": len(members), "accuracy": float(correct[members].mean()),
                    "mean_probability": float(true_probability[members].mean())}
            for label, members in sorted(found.items())}


def units(result, saturation_share: float = 0.5) -> dict:
    """Per layer: channels, dead ones (never above zero on any image), saturating ones (at their ceiling
    at more than ``saturation_share`` of positions) and the mean activation per channel."""
    section = {}
    for name, stats in result.units.items():
        section[name] = {"channels": len(stats.maximum), "images": stats.images,
                         "dead": stats.dead().tolist(), "saturating": stats.saturating(saturation_share).tolist(),
                         "ceiling": stats.ceiling, "mean": [float(v) for v in stats.mean],
                         "max": [float(v) for v in stats.maximum]}
    return section


def dataset(result, duplicates: int = 20, outliers: int = 12, neighbours: int = 5) -> dict:
    """Near-duplicate pairs (closest codes) and outliers (largest mean distance to their ``neighbours``
    nearest codes), by id."""
    codes = result.codes
    if codes is None or len(codes) < 2:
        return {"near_duplicates": [], "outliers": []}
    pairs = metrics.near_duplicates(codes, duplicates)
    squared = (codes.astype(np.float64) ** 2).sum(axis=1)
    k = min(neighbours, len(codes) - 1)
    isolation = np.empty(len(codes))
    for begin in range(0, len(codes), 1024):
        block = codes[begin: begin + 1024].astype(np.float64)
        distance = np.sqrt(np.maximum(squared[begin: begin + 1024, None] + squared[None] - 2 * block @ codes.T, 0))
        distance[np.arange(len(block)), np.arange(begin, begin + len(block))] = np.inf
        isolation[begin: begin + len(block)] = np.sort(distance, axis=1)[:, :k].mean(axis=1)
    far = np.argsort(-isolation, kind="stable")[:outliers]

    def index(row: int) -> int:
        return int(result.indices[row]) if result.indices else row

    return {"near_duplicates": [{"first": result.ids[p.first], "second": result.ids[p.second],
                                 "first_index": index(p.first), "second_index": index(p.second),
                                 "distance": p.distance} for p in pairs],
            "outliers": [{"id": result.ids[i], "index": index(i), "mean_distance": float(isolation[i])}
                         for i in far.tolist()]}


def unit_channels(result, model, tile: int = 48) -> dict:
    """Per tracked layer, per tracked channel (Microscope-style): the images that excite it most with the
    receptive-field crop of the strongest unit as a PNG tile (base64) and its value, and each dataset
    label's mean activation of the channel."""
    import base64

    from convscope_server import render
    from convscope_server.forward import patches

    height, width = model.config.height, model.config.width
    decoded: dict[int, np.ndarray] = {}

    def pixels(index: int) -> np.ndarray:
        if index not in decoded:
            decoded[index] = render.display_image(result.loaders[index][1](), model.config)
        return decoded[index]

    section = {}
    for name, table in result.top.items():
        layer = model.layer(name)
        spatial = layer.spatial if layer.layout else None
        grid_width = layer.shape[layer.axes[1]] if spatial else 1
        sums = result.class_sums.get(name, {})
        cards = []
        for column, channel in enumerate(table.channels.tolist()):
            hits = []
            for slot in range(len(table.values)):
                index = int(table.images[slot, column])
                if index not in result.loaders:
                    continue
                box = patches.receptive_box(spatial, table.positions[slot, column], grid_width, height, width)
                tile_png = render.png(patches.fit_tile(patches.crop(pixels(index), box), tile))
                hits.append({"id": result.loaders[index][0], "value": float(table.values[slot, column]),
                             "box": [box.top, box.left, box.bottom, box.right],
                             "png": base64.b64encode(tile_png).decode()})
            cards.append({"channel": channel, "hits": hits,
                          "class_means": {label or "(no label)": float(total[column] / count)
                                          for label, (total, count) in sorted(sums.items())}})
        section[name] = cards
    return section
