"""Deletion / insertion faithfulness (audit/faithfulness.py) on the tiny model, with saliency maps from
Captum on the native torch module (independent of the server's gradient path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope_server.audit.faithfulness import faithfulness
from convscope_server.audit.metrics import perturbation_curve
from convscope_server.forward.backend import OrtBackend, softmax
from convscope_server.repository import load_folder
from tiny_models import SIZE, TINY_CONFIG, export, tiny_net


def test_methods_are_compared_with_a_random_ordering(tmp_path):
    from captum.attr import Saliency

    native = tiny_net()
    export(native, tmp_path / "tiny" / "model.onnx")
    (tmp_path / "tiny" / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    model = load_folder("tiny", tmp_path / "tiny")
    logits = OrtBackend(model).logits
    samples = np.random.default_rng(2).normal(size=(4, 3, SIZE, SIZE)).astype(np.float32)
    targets = logits(samples).argmax(axis=1).tolist()
    saliency = [np.abs(Saliency(native).attribute(torch.from_numpy(x[None]), target=t)[0].numpy()).max(axis=0)
                for x, t in zip(samples, targets)]
    maps = {"saliency": saliency, "inverted": [-m for m in saliency]}
    baseline = np.zeros_like(samples[0])
    report = faithfulness(logits, samples, targets, maps, baseline, (1, 2), steps=8)

    assert set(report) == {"saliency", "inverted", "random"}
    for method, numbers in report.items():
        assert numbers["deletion_auc"] == pytest.approx(np.mean([r["deletion_auc"] for r in numbers["per_image"]]))
        if method != "random":
            chance = report["random"]["insertion_auc"] - report["random"]["deletion_auc"]
            assert numbers["faithful"] == (numbers["insertion_auc"] - numbers["deletion_auc"] > chance)
    # the first image's deletion curve is the metrics function's on the same map and score
    first = perturbation_curve(lambda b: softmax(logits(b).astype(np.float64))[:, targets[0]], samples[0], baseline,
                               saliency[0], (1, 2), 8)
    np.testing.assert_allclose(report["saliency"]["per_image"][0]["deletion"], first.scores, rtol=1e-9)
    # ranking by saliency removes the evidence faster than ranking against it
    assert report["saliency"]["deletion_auc"] < report["inverted"]["deletion_auc"]
    assert report["saliency"]["insertion_auc"] > report["inverted"]["insertion_auc"]
