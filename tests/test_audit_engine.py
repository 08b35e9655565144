"""The audit end to end inside the server process (audit/engine.py) on the tiny model over a labelled
folder: every section present and JSON-ready, its numbers against onnxruntime run by the test and Captum
on the native module, and a model without a gradient path still audited."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from convscope_server.audit.engine import AuditBudget, run_audit
from convscope_server.audit.faithfulness import faithfulness
from convscope_server.datasets import folder_items
from convscope_server.forward.backend import OrtBackend
from convscope_server.gradient.bridge import TorchBridges
from convscope_server.repository import load_folder
from tiny_models import NUM_CLASSES, SIZE, TINY_CONFIG, export, tiny_net

BUDGET = AuditBudget(unit_layers=2, attribution_images=3, curve_steps=4, robustness_images=8,
                     epsilons=(0.0, 4 / 255))


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    base = tmp_path_factory.mktemp("engine")
    native = tiny_net()
    folder = base / "models" / "tiny"
    export(native, folder / "model.onnx")
    (folder / "config.toml").write_text(TINY_CONFIG)
    (folder / "labels.txt").write_text("".join(f"thing {i}\n" for i in range(NUM_CLASSES)))
    model = load_folder("tiny", folder)
    data = base / "data"
    rng = np.random.default_rng(9)
    for label in ("thing 1", "thing 2", "5"):
        (data / label).mkdir(parents=True)
        for n in range(4):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(data / label / f"{n}.png")
    torch_model = TorchBridges("cpu").get(model)
    report = run_audit(model, folder_items(data, base, model.config, 10**7), torch_model, BUDGET)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return model, native, data, base, report, session


def test_every_section_is_there_and_json_ready(audited):
    *_, report, _ = audited
    assert set(report) == {"model", "dataset", "classes", "units", "faithfulness", "randomisation", "robustness",
                           "stage_seconds"}
    assert list(report["stage_seconds"]) == ["model card", "scanning", "sections", "map", "faithfulness",
                                             "randomisation", "robustness"]
    points = report["dataset"]["map"]["points"]
    assert sorted(p["id"] for p in points) == sorted(f"{label}/{n}.png" for label in ("5", "thing 1", "thing 2")
                                                     for n in range(4))
    truth = {"thing 1": 1, "thing 2": 2, "5": 5}
    assert all(p["correct"] == (p["predicted"] == truth[p["label"]]) for p in points)
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN or infinity anywhere
    assert report["model"]["parameters"] > 0 and report["model"]["timing"]["latency_ms"] > 0
    assert report["dataset"]["images"] == 12 and len(report["units"]) == 2
    assert set(report["faithfulness"]["methods"]) == {"vanilla", "integrated_gradients", "gradcam", "occlusion",
                                                      "random"}


def test_accuracy_and_robustness_against_onnxruntime(audited):
    model, native, data, base, report, session = audited
    truth = {"thing 1": 1, "thing 2": 2, "5": 5}
    right = []
    for path in sorted(data.rglob("*.png")):
        x = ((np.asarray(Image.open(path), np.float32) / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None]
        right.append(int(session.run(None, {"input": x})[0].argmax()) == truth[path.parent.name])
    assert report["classes"]["accuracy"] == pytest.approx(np.mean(right))
    robust = report["robustness"]
    assert robust["against"] == "labels" and robust["images"] == 8
    assert robust["corruptions"]["clean"] == pytest.approx(np.mean(right[:8]))
    assert robust["fgsm"]["accuracy"][0] == pytest.approx(np.mean(right[:8]))  # epsilon 0: the clean inputs
    assert robust["fgsm"]["iterative_accuracy"][0] == pytest.approx(np.mean(right[:8]))
    # the iterative attack is at least as strong as one FGSM step at the same epsilon
    assert robust["fgsm"]["iterative_accuracy"][1] <= robust["fgsm"]["accuracy"][1]


def test_vanilla_faithfulness_equals_the_curves_of_captum_maps(audited):
    from captum.attr import Saliency

    model, native, data, base, report, _ = audited
    items = list(folder_items(data, base, model.config, 10**7))[:3]
    samples = np.stack([item.load() for item in items])
    logits = OrtBackend(model).logits
    targets = logits(samples).argmax(axis=1).tolist()
    maps = [np.abs(Saliency(native).attribute(torch.from_numpy(x[None]), target=t)[0].numpy()).max(axis=0)
            for x, t in zip(samples, targets)]
    expected = faithfulness(logits, samples, targets, {"vanilla": maps}, np.zeros_like(samples[0]), (1, 2), 4)
    got = report["faithfulness"]["methods"]["vanilla"]
    assert got["deletion_auc"] == pytest.approx(expected["vanilla"]["deletion_auc"], rel=1e-4)
    assert got["insertion_auc"] == pytest.approx(expected["vanilla"]["insertion_auc"], rel=1e-4)


def test_the_iterative_attack_stays_in_its_ball_and_lowers_the_loss(audited):
    """The basic iterative method: within epsilon of the input (pixel units) and on valid pixels, and the
    loss of the true labels no lower than one FGSM step's at the same epsilon."""
    import torch.nn.functional as F

    from convscope_server.gradient import adversarial
    from convscope_server.gradient.synthesis.common import InputSpace

    model, native, data, base, *_ = audited
    torch_model = TorchBridges("cpu").get(model)
    space = InputSpace.of(model.config)
    samples = np.stack([item.load() for item in list(folder_items(data, base, model.config, 10**7))[:4]])
    x = torch.cat([space.from_sample(s) for s in samples])
    y = torch_model.logits(space.model_input(x)).argmax(1).detach()
    epsilon = 4 / 255
    attacked = adversarial.iterative(torch_model, space, x, y, epsilon)
    unit = space.per_pixel_unit()
    low, high = space.bounds()
    assert bool(((attacked - x).abs() <= epsilon * unit + 1e-6).all())
    assert bool((attacked >= low - 1e-6).all() and (attacked <= high + 1e-6).all())
    one_step = adversarial.fgsm(torch_model, space, x, y, epsilon)
    with torch.no_grad():
        loss_iterative = F.cross_entropy(torch_model.logits(space.model_input(attacked)), y).item()
        loss_fgsm = F.cross_entropy(torch_model.logits(space.model_input(one_step)), y).item()
    assert loss_iterative >= loss_fgsm


def test_the_randomisation_check_equals_the_sanity_rpc_on_the_same_image(audited):
    """Adebayo et al.'s check in the report against the server's SanityCheck technique run here directly on
    the first sampled image (the same maps, the same seed and layers)."""
    from convscope_server.audit.engine import _maps
    from convscope_server.gradient import sanity

    model, native, data, base, report, _ = audited
    section = report["randomisation"]
    assert len(section["layers"]) == 3 and set(section["correlations"]) == {"vanilla", "integrated_gradients",
                                                                          "gradcam"}
    item = next(iter(folder_items(data, base, model.config, 10**7)))
    sample = item.load()[None]
    target = OrtBackend(model).logits(sample).argmax(axis=1).tolist()
    cam_layer = model.layer(report["faithfulness"]["gradcam_layer"])
    torch_model = TorchBridges("cpu").get(model)
    expected = sanity.cascading_randomization(
        torch_model, model.proto, {"vanilla": lambda tm: _maps("vanilla", model, tm, sample, target, cam_layer)[0]},
        3, seed=0)
    np.testing.assert_allclose(section["correlations"]["vanilla"], expected.correlations["vanilla"], rtol=1e-6)
    for method, values in section["correlations"].items():
        assert section["insensitive"][method] == (abs(values[-1]) >= 0.5)


def test_a_model_without_a_gradient_path_gets_every_forward_section(audited):
    model, native, data, base, *_ = audited
    report = run_audit(model, folder_items(data, base, model.config, 10**7), "onnx2pytorch cannot convert X", BUDGET)
    assert report["faithfulness"]["unavailable"] == {m: "onnx2pytorch cannot convert X"
                                                     for m in ("vanilla", "integrated_gradients", "gradcam")}
    assert set(report["faithfulness"]["methods"]) == {"occlusion", "random"}
    assert report["robustness"]["fgsm"] == {"unavailable": "onnx2pytorch cannot convert X"}
    assert report["randomisation"] == {"unavailable": "onnx2pytorch cannot convert X"}
    assert "accuracy" in report["classes"]


def test_unit_pages_equal_the_native_modules_activations(audited):
    """Each tracked channel's top hits are the largest per-image maxima of that channel over the dataset, and
    its mean per label the mean over that label's images, computed by the native torch module's hooks."""
    model, native, data, base, report, _ = audited
    modules = {"/relu1/Relu_output_0": native.relu1, "/relu2/Relu_output_0": native.relu2,
               "/relu6/Clip_output_0": native.relu6}
    items = list(folder_items(data, base, model.config, 10**7))
    batch = torch.from_numpy(np.stack([item.load() for item in items]))
    paged = {name: numbers["pages"] for name, numbers in report["units"].items() if numbers.get("pages")}
    assert paged
    for name, cards in paged.items():
        store = {}
        handle = modules[name].register_forward_hook(lambda m, i, o: store.__setitem__("out", o.detach()))
        with torch.no_grad():
            native(batch)
        handle.remove()
        values = store["out"].numpy()
        assert len(cards) == min(values.shape[1], BUDGET.unit_channels)
        for card in cards:
            maxima = values[:, card["channel"]].reshape(len(items), -1).max(axis=1)
            best = np.sort(maxima)[::-1][: len(card["hits"])]
            np.testing.assert_allclose([hit["value"] for hit in card["hits"]], best, rtol=1e-4, atol=1e-5)
            assert all(len(hit["png"]) > 100 for hit in card["hits"])
            for label in ("thing 1", "thing 2", "5"):
                rows = [i for i, item in enumerate(items) if item.label == label]
                expected = values[rows, card["channel"]].reshape(len(rows), -1).mean(axis=1).mean()
                assert card["class_means"][label] == pytest.approx(expected, rel=1e-4, abs=1e-6)
