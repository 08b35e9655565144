"""The probability rule (service/convscope_server/scores.py) on models whose logits output is not plain
multi-class logits, through the real server and client: a Softmax head and a multi-label Sigmoid head
(config `softmax = false`: the output already holds probabilities), a single logit (K = 1, a binary
classifier scored by a sigmoid) and a plain logits head as the control. Every number is checked against a
reference the test computes itself on the same ONNX file (onnxruntime + numpy) or on the native torch
module (autograd), and the audit's classes section and faithfulness curves against numbers by hand."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from conftest import start
from convscope import Client
from tiny_models import SIZE, TINY_CONFIG

CONFIG = TINY_CONFIG + "softmax = {softmax}\n"   # the tiny models' [input] and labels
UNIT = 1.0 / 0.25            # one [0, 1] pixel unit in model-input units (scale / std)
LOW, HIGH = -2.0, 2.0        # the model input of pixels 0 and 1
HEADS = {  # name: (classes, head, [output] softmax)
    "softmax_head": (10, "softmax", False),
    "sigmoid_head": (6, "sigmoid", False),
    "single_logit": (1, None, True),
    "plain": (10, None, True),
}
IMAGES = 8


class HeadNet(nn.Module):
    def __init__(self, classes: int, head: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, classes)
        self.head = head

    def forward(self, x):
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))
        x = self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
        if self.head == "softmax":
            return torch.softmax(x, 1)
        return torch.sigmoid(x) if self.head == "sigmoid" else x


def pixels_of(seed: int, count: int) -> np.ndarray:
    """uint8 (count, H, W, 3) noise pictures of different brightness and contrast."""
    rng = np.random.default_rng(seed)
    level, spread = rng.uniform(-1.0, 1.0, (count, 1, 1, 1)), rng.uniform(0.2, 0.8, (count, 1, 1, 1))
    x = np.clip(level + spread * rng.normal(size=(count, SIZE, SIZE, 3)), -1.8, 1.8)
    return np.round((x * 0.25 + 0.5) * 255).astype(np.uint8)


def model_input(pixels: np.ndarray) -> np.ndarray:
    """The config's preprocessing written out: [0, 1], (x - 0.5) / 0.25, CHW."""
    return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).copy()


XS = model_input(pixels_of(1, IMAGES))


def head_net(name: str) -> HeadNet:
    classes, head, _ = HEADS[name]
    generator = torch.Generator().manual_seed(11)
    net = HeadNet(classes, head)
    with torch.no_grad():
        for module in (net.conv1, net.conv2, net.conv3, net.fc):
            bound = module.weight[0].numel() ** -0.5 * (8.0 if module is net.fc else 2.0)
            for parameter in (module.weight, module.bias):
                parameter.copy_((torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound)
        if classes == 1:  # centre the logit on the test images: some are called class 0, some not
            net.fc.bias -= net(torch.from_numpy(XS)).median()
    return net.eval()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """{name: (native torch module, onnxruntime session, softmax flag)}, the repository and a client."""
    root = tmp_path_factory.mktemp("heads") / "models"
    found = {}
    for name, (classes, _, softmax) in HEADS.items():
        folder = root / name
        folder.mkdir(parents=True)
        net = head_net(name)
        torch.onnx.export(net, (torch.zeros(1, 3, SIZE, SIZE),), str(folder / "model.onnx"), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        (folder / "config.toml").write_text(CONFIG.format(softmax=str(softmax).lower()))
        (folder / "labels.txt").write_text("".join(f"{name} {i}\n" for i in range(classes)))
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        found[name] = (net, session, softmax)
    running = start(root)
    try:
        with Client(running.address, timeout=120) as client:
            yield found, root, client
    finally:
        running.stop(0)


def probabilities(output: np.ndarray, softmax: bool) -> np.ndarray:
    """The rule, written out here: the output as it is, a sigmoid of a single logit, or a softmax."""
    output = np.asarray(output, np.float64)
    if not softmax:
        return output
    if output.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-output))
    e = np.exp(output - output.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def run(session, xs: np.ndarray) -> np.ndarray:
    return session.run(None, {"input": np.ascontiguousarray(xs, np.float32)})[0]


def predicted(output: np.ndarray, softmax: bool) -> np.ndarray:
    """Argmax; a single output: class 0 when p > 0.5, else none (-1)."""
    if output.shape[1] == 1:
        return np.where(probabilities(output, softmax)[:, 0] > 0.5, 0, -1)
    return output.argmax(axis=1)


@pytest.mark.parametrize("name", list(HEADS))
def test_predict_probabilities(heads, name):
    found, _, client = heads
    _, session, softmax = found[name]
    classes = HEADS[name][0]
    got = client.predict(name, list(XS), top=min(5, classes))
    output = run(session, XS)
    expected = probabilities(output, softmax)
    for row, scores in enumerate(got):
        order = np.argsort(-expected[row], kind="stable")[: len(scores)]
        assert [s.index for s in scores] == order.tolist()
        np.testing.assert_allclose([s.probability for s in scores], expected[row, order], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([s.logit for s in scores], output[row, order], rtol=1e-5, atol=1e-6)
    if name == "single_logit":  # not a constant 1.0: the sigmoid of the logit, on both sides of 0.5
        p = [scores[0].probability for scores in got]
        assert min(p) < 0.5 < max(p)


def brute_force_occlusion(session, x, target, window, stride, baseline, softmax):
    """Every window position by hand: (base probability, (rows, cols) probabilities, (H, W) mean drop)."""
    rows = [i * stride[0] for i in range(-(-(SIZE - window[0]) // stride[0]) + 1)]  # the last window clipped
    cols = [i * stride[1] for i in range(-(-(SIZE - window[1]) // stride[1]) + 1)]
    occluded = []
    for r in rows:
        for c in cols:
            copy = x.copy()
            copy[:, r: r + window[0], c: c + window[1]] = baseline
            occluded.append(copy)
    p = probabilities(run(session, np.stack([x] + occluded)), softmax)[:, target]
    base, grid = p[0], p[1:].reshape(len(rows), len(cols))
    total, count = np.zeros((SIZE, SIZE)), np.zeros((SIZE, SIZE))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            total[r: r + window[0], c: c + window[1]] += base - grid[i, j]
            count[r: r + window[0], c: c + window[1]] += 1
    return base, grid, total / count


@pytest.mark.parametrize("name", list(HEADS))
def test_occlusion_equals_brute_force(heads, name):
    found, _, client = heads
    _, session, softmax = found[name]
    x = XS[0]
    target = int(predicted(run(session, x[None]), softmax)[0]) if HEADS[name][0] > 1 else 0
    window, stride = (7, 6), (5, 4)
    got = client.occlusion(name, x, target=target, window=window, stride=stride, baseline=1.5)
    base, grid, attribution = brute_force_occlusion(session, x, target, window, stride, 1.5, softmax)
    assert got.probability.shape == grid.shape == (6, 8)
    assert got.base_probability == pytest.approx(base, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(got.probability, grid, rtol=1e-5, atol=1e-6)
    scale = np.abs(attribution).max()
    assert scale > 1e-3  # the map is not flat (it was all zeros for a single logit)
    np.testing.assert_allclose(got.attribution, attribution, rtol=1e-4, atol=1e-4 * scale)


def _loss(net, name, x, label):
    """-log p(label) on the native module, by the rule."""
    out = net(x)
    if name == "plain":
        return F.cross_entropy(out, torch.tensor([label]))
    if name == "single_logit":
        return -F.logsigmoid(out[:, label]).sum()
    return -torch.log(out[:, label]).sum()  # the head's output already is p


@pytest.mark.parametrize("name", list(HEADS))
def test_fgsm_steps_along_the_gradient_of_minus_log_p(heads, name):
    found, _, client = heads
    net, session, softmax = found[name]
    x0 = XS[1]
    output = run(session, x0[None])
    label = int(np.argmax(output[0]))
    epsilon = 2 / 255
    r = client.adversarial(name, x0, label=label, epsilon=epsilon)
    expected_before = probabilities(output, softmax)[0]
    assert r.before[0].probability == pytest.approx(expected_before.max(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose([s.probability for s in r.before], expected_before[[s.index for s in r.before]],
                               rtol=1e-5, atol=1e-6)

    x = torch.from_numpy(x0[None].copy()).requires_grad_(True)
    _loss(net, name, x, label).backward()
    assert (x.grad != 0).float().mean() > 0.99
    expected = (x + epsilon * UNIT * x.grad.sign()).clamp(LOW, HIGH).detach().numpy()[0]
    assert np.isclose(r.image, expected, atol=1e-5).mean() > 0.999
    assert np.isclose(r.perturbation, expected - x0, atol=1e-5).mean() > 0.999
    assert abs(r.linf_pixels - epsilon) < 1e-5
    expected_after = probabilities(run(session, r.image[None]), softmax)[0]
    assert r.after[0].probability == pytest.approx(expected_after.max(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(HEADS))
def test_targeted_history_starts_at_p_target(heads, name):
    found, _, client = heads
    _, session, softmax = found[name]
    expected = probabilities(run(session, XS[2][None]), softmax)[0]
    target = int(np.argmin(expected))
    r = client.adversarial(name, XS[2], "targeted", target=target, steps=2, stop_probability=0.999)
    assert r.history[0] == pytest.approx(expected[target], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", list(HEADS))
def test_robustness_at_zero_is_the_clean_accuracy(heads, name):
    found, _, client = heads
    net, session, softmax = found[name]
    classes = HEADS[name][0]
    output = run(session, XS)
    labels = [0] * IMAGES if classes == 1 else [int(i) for i in np.argmax(output, axis=1)]
    if classes > 1:  # three wrong labels
        labels[:3] = [(label + 1) % classes for label in labels[:3]]
    clean = float(np.mean(predicted(output, softmax) == labels))
    assert 0.0 < clean < 1.0
    epsilon = 4 / 255
    curve = client.robustness(name, list(XS), labels=labels, epsilons=[0.0, epsilon])
    assert curve.accuracy[0] == pytest.approx(clean)
    # FGSM by hand on the native module, classified by onnxruntime
    hits = []
    for x0, label in zip(XS, labels):
        x = torch.from_numpy(x0[None].copy()).requires_grad_(True)
        _loss(net, name, x, label).backward()
        attacked = (x + epsilon * UNIT * x.grad.sign()).clamp(LOW, HIGH).detach().numpy()
        hits.append(predicted(run(session, attacked), softmax)[0] == label)
    assert curve.accuracy[1] == pytest.approx(np.mean(hits))
    if classes == 1:
        assert curve.accuracy[1] < curve.accuracy[0]  # the attack pushes p(class 0) below 0.5


@pytest.mark.parametrize("name", ["single_logit", "softmax_head"])
def test_audit_classes_and_faithfulness_by_hand(heads, name, tmp_path):
    """The audit's scan and classes section (accuracy, ECE, worst images) and its faithfulness curves,
    in process, against numbers by hand from onnxruntime."""
    from convscope_server.audit import sections
    from convscope_server.audit.faithfulness import faithfulness
    from convscope_server.audit.metrics import perturbation_curve
    from convscope_server.audit.scan import class_mapping, scan
    from convscope_server.datasets import folder_items
    from convscope_server.forward.backend import OrtBackend
    from convscope_server.repository import load_folder

    found, root, _ = heads
    _, session, softmax = found[name]
    model = load_folder(name, root / name)
    pictures = pixels_of(5, 12)
    guess = predicted(run(session, model_input(pictures)), softmax)
    labels = ["0"] * 12 if name == "single_logit" else [str(g if i % 3 else (g + 1) % 10) for i, g in enumerate(guess)]
    for n, (picture, label) in enumerate(zip(pictures, labels)):
        (tmp_path / label).mkdir(exist_ok=True)
        Image.fromarray(picture).save(tmp_path / label / f"{n:02d}.png")
    result = scan(model, folder_items(tmp_path, tmp_path, model.config, 10**7), None, [], batch_size=4,
                  should_stop=lambda: False, accepted=lambda label: (int(label),), worst=4)
    mapping, unmapped = class_mapping(result.labels, model.labels, None, model.num_classes)
    report = sections.classes(result, mapping, unmapped, model.label, bins=10)

    by_id = {f"{label}/{n:02d}.png": picture for n, (picture, label) in enumerate(zip(pictures, labels))}
    output = run(session, model_input(np.stack([by_id[i] for i in result.ids])))
    p = probabilities(output, softmax)
    truth = np.array([int(label) for label in result.labels])
    guess = predicted(output, softmax)
    correct = guess == truth
    confidence = np.maximum(p[:, 0], 1 - p[:, 0]) if p.shape[1] == 1 else p.max(axis=1)
    ece = 0.0
    for b in range(10):
        inside = (confidence > b / 10) & (confidence <= (b + 1) / 10)
        if inside.any():
            ece += abs(correct[inside].mean() - confidence[inside].mean()) * inside.sum() / len(truth)
    assert 0 < correct.mean() < 1
    assert report["accuracy"] == pytest.approx(correct.mean())
    assert report["calibration"]["ece"] == pytest.approx(ece, rel=1e-6)
    label_p = p[np.arange(len(truth)), truth]
    assert sorted(w["true_probability"] for w in report["worst"]) == pytest.approx(np.sort(label_p), rel=1e-5)
    assert [w for w, _ in result.worst] == pytest.approx(np.sort(label_p)[:4], rel=1e-5)

    samples = model_input(pictures[:2])
    maps = {"ramp": [np.arange(SIZE * SIZE, dtype=np.float64).reshape(SIZE, SIZE)] * 2}
    targets = [0, 0] if name == "single_logit" else [int(g) for g in guess[:2]]
    got = faithfulness(OrtBackend(model).logits, samples, targets, maps, np.zeros_like(samples[0]), (1, 2),
                       steps=4, softmax=model.config.softmax)
    for sample, target, row in zip(samples, targets, got["ramp"]["per_image"]):
        curve = perturbation_curve(lambda batch: probabilities(run(session, batch), softmax)[:, target], sample,
                                   np.zeros_like(sample), maps["ramp"][0], (1, 2), 4)
        np.testing.assert_allclose(row["deletion"], curve.scores, rtol=1e-5, atol=1e-6)
        assert np.ptp(row["deletion"]) > 1e-3  # not flat
