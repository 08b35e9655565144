"""The audit's numbers (service/convscope_server/audit/metrics.py) against independent computations:
scikit-learn for accuracy, confusions and nearest pairs, explicit loops for calibration and for the
deletion / insertion curves (on the tiny ONNX model through onnxruntime)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from scipy.spatial.distance import pdist, squareform
from sklearn.metrics import confusion_matrix, top_k_accuracy_score

from convscope_server.audit import metrics
from tiny_models import SIZE, export, tiny_net

RNG = np.random.default_rng(7)


def test_top_k_accuracy_equals_scikit_learn():
    scores = RNG.normal(size=(300, 12))
    labels = RNG.integers(0, 12, 300)
    for k in (1, 3, 5):
        assert metrics.top_k_accuracy(scores, labels, k) == pytest.approx(
            top_k_accuracy_score(labels, scores, k=k, labels=np.arange(12)))


def test_confusions_are_the_largest_off_diagonal_cells():
    labels = RNG.integers(0, 6, 500)
    predicted = np.where(RNG.random(500) < 0.6, labels, RNG.integers(0, 6, 500))
    matrix = confusion_matrix(labels, predicted, labels=np.arange(6))
    np.fill_diagonal(matrix, 0)
    cells = sorted(((-matrix[t, p], t, p) for t in range(6) for p in range(6) if matrix[t, p]))[:5]
    got = metrics.confusions(predicted, labels, top=5)
    assert [(c.true, c.predicted, c.count) for c in got] == [(t, p, -n) for n, t, p in cells]


def test_calibration_equals_a_loop_over_predictions():
    logits = RNG.normal(size=(400, 10)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.where(RNG.random(400) < 0.5, probabilities.argmax(axis=1), RNG.integers(0, 10, 400))
    bins = 10
    got = metrics.calibration(probabilities, labels, bins)
    members = [[] for _ in range(bins)]
    for p, label in zip(probabilities, labels):
        confidence = p.max()
        b = next(b for b in range(bins) if confidence <= (b + 1) / bins)  # (b/bins, (b+1)/bins]
        members[b].append((confidence, p.argmax() == label))
    ece = sum(abs(np.mean([c for _, c in m]) - np.mean([q for q, _ in m])) * len(m) for m in members if m) / 400
    assert got.ece == pytest.approx(ece, rel=1e-9)
    assert got.count.tolist() == [len(m) for m in members]
    for b, m in enumerate(members):
        if m:
            assert got.accuracy[b] == pytest.approx(np.mean([c for _, c in m]))
            assert got.confidence[b] == pytest.approx(np.mean([q for q, _ in m]))
        else:
            assert np.isnan(got.accuracy[b])


@pytest.fixture(scope="module")
def tiny_session(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "tiny.onnx"
    export(tiny_net(), path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("insertion", [False, True])
def test_perturbation_curves_equal_brute_force(tiny_session, insertion):
    """Deletion / insertion (RISE) on the tiny model: each step's input built pixel by pixel in a loop."""
    sample = RNG.normal(size=(3, SIZE, SIZE)).astype(np.float32)
    baseline = np.zeros_like(sample)
    attribution_map = RNG.random((SIZE, SIZE))
    target, steps = 4, 8

    def probability(batch):
        logits = tiny_session.run(None, {"input": batch.astype(np.float32)})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True))[:, target]

    got = metrics.perturbation_curve(probability, sample, baseline, attribution_map, (1, 2), steps, insertion,
                                     batch_size=4)
    ranked = sorted(range(SIZE * SIZE), key=lambda i: (-attribution_map.flat[i], i))
    expected = []
    for step in range(steps + 1):
        count = int(round(step * SIZE * SIZE / steps))
        x = (baseline if insertion else sample).copy()
        for index in ranked[:count]:
            row, col = divmod(index, SIZE)
            x[:, row, col] = (sample if insertion else baseline)[:, row, col]
        expected.append(probability(x[None])[0])
    np.testing.assert_allclose(got.scores, expected, rtol=1e-6, atol=1e-7)
    fractions = np.array([int(round(s * SIZE * SIZE / steps)) for s in range(steps + 1)]) / (SIZE * SIZE)
    area = sum((fractions[i + 1] - fractions[i]) * (expected[i] + expected[i + 1]) / 2 for i in range(steps))
    assert got.auc == pytest.approx(area, rel=1e-6)  # batched vs single runs differ in float32 rounding
    assert got.fractions[0] == 0 and got.fractions[-1] == 1


def test_unit_statistics_over_batches_equal_the_whole_scan():
    values = np.maximum(RNG.normal(size=(20, 5, 4, 4)), 0)
    values[:, 2] = 0                 # dead
    values[:, 3] = np.minimum(values[:, 3] + 6, 6)  # saturated at 6
    stats = metrics.UnitStatistics(5, threshold=0.0, ceiling=6.0)
    for begin in range(0, 20, 7):
        stats.add(values[begin: begin + 7])
    flat = values.transpose(1, 0, 2, 3).reshape(5, -1)
    np.testing.assert_allclose(stats.maximum, flat.max(axis=1))
    np.testing.assert_allclose(stats.mean, flat.mean(axis=1))
    assert stats.images == 20
    assert stats.dead().tolist() == [2]
    assert stats.saturating(0.5).tolist() == [3]


def test_near_duplicates_equal_all_pairs_distances():
    codes = RNG.normal(size=(500, 16))
    codes[321] = codes[17] + 1e-4   # near-duplicates
    codes[400] = codes[5] + 2e-3
    distances = squareform(pdist(codes))
    pairs = sorted((distances[i, j], i, j) for i in range(500) for j in range(i + 1, 500))[:10]
    got = metrics.near_duplicates(codes, top=10, chunk=128)
    assert [(p.first, p.second) for p in got] == [(i, j) for _, i, j in pairs]
    np.testing.assert_allclose([p.distance for p in got], [d for d, _, _ in pairs], rtol=1e-9)


def test_unit_correlation_equals_numpy_over_batches_and_skips_constant_channels():
    """The co-moments added batch by batch give numpy's corrcoef of the per-image channel means; a channel
    that is the same on every image (dead) has no correlation and no neighbours, and is no one's."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(23, 5, 4, 4))
    values[:, 3] = 0.0  # dead
    values[:, 4] = 0.7 * values[:, 0] + 0.1 * rng.normal(size=(23, 4, 4))
    stats = metrics.UnitStatistics(5)
    for begin in range(0, 23, 7):
        stats.add(values[begin: begin + 7])
    means = values.mean(axis=(2, 3))
    live = [0, 1, 2, 4]
    np.testing.assert_allclose(stats.correlation()[np.ix_(live, live)], np.corrcoef(means[:, live].T), atol=1e-10)
    assert np.isnan(stats.correlation()[3]).all()
    assert stats.neighbours(3) == []
    assert stats.neighbours(0, 2)[0][0] == 4 and all(c != 3 for c, _ in stats.neighbours(1, 5))
    assert len(stats.neighbours(1, 5)) == 3
