"""Which attribution methods can be trusted on this model: deletion and insertion curves (Petsiuk et al.
2018, RISE) of each method's maps over a sample of images, against a random ordering of the pixels.

Deletion removes the pixels a map ranks first and watches the target probability fall: a faithful map
makes it fall fast (a small area under the curve). Insertion restores them into the baseline and watches
it rise: a faithful map makes it rise fast (a large area). A method is called faithful on this model when,
averaged over the sample, its insertion AUC minus its deletion AUC beats the random ordering's: on a
confident CNN the deletion curve of every ordering collapses within the first steps (AUCs of ~0.01 apart
by noise), so requiring both curves to beat random separately would call nothing faithful. The report
gives both AUCs, so a reader can judge margins too. The maps come from the existing techniques (the audit computes them); this
module only runs the curves and compares.
"""

from __future__ import annotations

import numpy as np

from convscope_server.audit.metrics import perturbation_curve
from convscope_server.scores import class_probabilities

RANDOM = "random"


def random_maps(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """The baseline ordering: a seeded uniform random map per image."""
    rng = np.random.default_rng(seed)
    return [rng.random((height, width)) for _ in range(count)]


def faithfulness(logits, samples: np.ndarray, targets: list[int], maps: dict[str, list[np.ndarray]],
                 baseline: np.ndarray, spatial_axes: tuple[int, int], steps: int = 16, batch_size: int = 16,
                 should_stop=None, softmax: bool = True) -> dict | None:
    """{method: {"deletion_auc", "insertion_auc" (means over the sample), "per_image": [...], "faithful"}}
    for each method of ``maps`` (one (H, W) map per sample) plus "random" when absent. ``logits(batch)``
    runs the model; the score is the target's probability (``scores.class_probabilities`` with the model's
    ``[output] softmax``). None when stopped."""
    height, width = samples.shape[1 + spatial_axes[0]], samples.shape[1 + spatial_axes[1]]
    maps = dict(maps)
    maps.setdefault(RANDOM, random_maps(len(samples), height, width))
    report: dict = {}
    for method, method_maps in maps.items():
        rows = []
        for sample, target, attribution_map in zip(samples, targets, method_maps):
            if should_stop is not None and should_stop():
                return None

            def score(batch, target=target):
                return class_probabilities(np.asarray(logits(batch), np.float64).reshape(len(batch), -1),
                                           softmax)[:, target]

            deletion = perturbation_curve(score, sample, baseline, attribution_map, spatial_axes, steps, False,
                                          batch_size)
            insertion = perturbation_curve(score, sample, baseline, attribution_map, spatial_axes, steps, True,
                                           batch_size)
            rows.append({"deletion_auc": deletion.auc, "insertion_auc": insertion.auc,
                         "deletion": deletion.scores.tolist(), "insertion": insertion.scores.tolist()})
        report[method] = {"deletion_auc": float(np.mean([r["deletion_auc"] for r in rows])),
                          "insertion_auc": float(np.mean([r["insertion_auc"] for r in rows])),
                          "per_image": rows}
    def margin(numbers):
        return numbers["insertion_auc"] - numbers["deletion_auc"]

    chance = margin(report[RANDOM])
    for method, numbers in report.items():
        numbers["faithful"] = None if method == RANDOM else bool(margin(numbers) > chance)
    return report
