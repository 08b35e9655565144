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
                           "feature_visualisation", "stage_seconds"}
    assert list(report["stage_seconds"]) == ["model card", "scanning", "sections", "worst images",
                                             "feature visualisation", "map", "faithfulness",
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


def _decode(png_b64: str) -> np.ndarray:
    import base64
    import io

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")).astype(np.int32)


def test_worst_images_with_grad_cam_equal_pytorch_grad_cam(audited):
    """The worst-classified images (lowest probability of their label, by onnxruntime here) carry their own
    pixels and Grad-CAM overlays for the predicted and the label's class that match pytorch-grad-cam's
    maps on the native module at the same layer."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from convscope_server import render

    model, native, data, base, report, session = audited
    truth = {"thing 1": 1, "thing 2": 2, "5": 5}
    paths = sorted(data.rglob("*.png"))
    inputs = {f"{p.parent.name}/{p.name}": ((np.asarray(Image.open(p), np.float32) / 255.0 - 0.5) / 0.25
                                             ).transpose(2, 0, 1) for p in paths}
    probability = {}
    for key, x in inputs.items():
        logits = session.run(None, {"input": x[None]})[0][0].astype(np.float64)
        p = np.exp(logits - logits.max())
        probability[key] = (p / p.sum())[truth[key.split("/")[0]]]
    worst = report["classes"]["worst"]
    assert [w["id"] for w in worst] == sorted(probability, key=lambda k: probability[k])[: len(worst)]
    assert report["classes"]["worst_method"] == "gradcam"
    assert report["classes"]["worst_layer"] == "/relu6/Clip_output_0"
    with GradCAM(model=native, target_layers=[native.relu6]) as cam:
        for w in worst:
            x = inputs[w["id"]]
            pixels = np.asarray(Image.open(data / w["id"]).convert("RGB"))
            assert np.abs(_decode(w["png"]) - pixels).max() <= 1
            for role, target in (("predicted", w["predicted"]), ("label", truth[w["label"]])):
                expected = cam(input_tensor=torch.from_numpy(x[None]), targets=[ClassifierOutputTarget(target)])[0]
                reference = render.overlay(pixels, render.normalize(expected)).astype(np.int32)
                assert np.abs(_decode(w[f"cam_{role}_png"]) - reference).mean() < 2.0, (w["id"], role)


def test_unit_neighbours_are_the_most_correlated_channels(audited):
    """Each channel card's neighbours: the channels whose per-image mean activation correlates most with its
    own over the dataset (numpy's corrcoef on the native module's activations)."""
    model, native, data, base, report, _ = audited
    items = list(folder_items(data, base, model.config, 10**7))
    store = {}
    handle = native.relu1.register_forward_hook(lambda m, i, o: store.__setitem__("out", o.detach()))
    with torch.no_grad():
        native(torch.from_numpy(np.stack([item.load() for item in items])))
    handle.remove()
    means = store["out"].numpy().mean(axis=(2, 3))
    correlation = np.corrcoef(means.T)
    for card in report["units"]["/relu1/Relu_output_0"]["pages"]:
        row = correlation[card["channel"]].copy()
        row[card["channel"]] = -np.inf
        expected = np.argsort(-row, kind="stable")[: len(card["neighbours"])]
        assert [n["channel"] for n in card["neighbours"]] == expected.tolist()
        np.testing.assert_allclose([n["correlation"] for n in card["neighbours"]], row[expected], atol=1e-5)


def test_first_layer_filters_are_the_convolution_weights(audited):
    """The first unit layer (ReLU after the image's convolution, batch norm folded into it) shows each
    channel's RGB filter: the exported Conv weights min-max scaled; a deeper layer shows none."""
    import onnx
    from onnx import numpy_helper

    model, native, data, base, report, session = audited
    proto = onnx.load(str(base / "models" / "tiny" / "model.onnx"))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    weights = next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == conv.input[1])
    for card in report["units"]["/relu1/Relu_output_0"]["pages"]:
        kernel = weights[card["channel"]]
        expected = np.round((kernel - kernel.min()) / (kernel.max() - kernel.min()) * 255).transpose(1, 2, 0)
        tile = _decode(card["filter_png"])
        scale = tile.shape[0] // kernel.shape[1]
        np.testing.assert_array_equal(tile[::scale, ::scale], expected)
    assert all("filter_png" not in card for card in report["units"]["/relu6/Clip_output_0"]["pages"])


def test_feature_visualisations_excite_their_channel_and_batch_like_one_at_a_time(audited):
    """Each tracked channel's feature visualisation raises that channel's mean (onnxruntime on the PNG,
    against the random start) more than it raises the other channels on average, and the batched ascent gives the image one channel alone would."""
    import onnx

    from convscope_server.audit.engine import FEATURE_SETTINGS, optimised_tensor
    from convscope_server.gradient.synthesis import optimize
    from convscope_server.gradient.synthesis.common import InputSpace, Objective

    model, native, data, base, report, session = audited
    assert report["feature_visualisation"]["steps"] == BUDGET.feature_steps
    layer = model.layer("/relu6/Clip_output_0")
    tensor, axis = optimised_tensor(model, layer)
    assert tensor == "/conv3/Conv_output_0"  # the Clip's input: a unit at zero on the start still has a gradient
    space = InputSpace.of(model.config)
    start = space.random(model.config.height, model.config.width, FEATURE_SETTINGS["seed"])
    cards = report["units"][layer.name]["pages"]
    proto = onnx.load(str(base / "models" / "tiny" / "model.onnx"))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    probe = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    start_values = probe.run([tensor], {"input": start.numpy()})[0][0]
    for card in cards:
        pixels = _decode(card["feature_png"]).astype(np.float32)
        x = ((pixels / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None]
        values = probe.run([tensor], {"input": x})[0][0]
        gain = values.mean(axis=(1, 2)) - start_values.mean(axis=(1, 2))
        others = np.delete(gain, card["channel"])
        assert gain[card["channel"]] > 0 and gain[card["channel"]] > others.mean(), card["channel"]
    torch_model = TorchBridges("cpu").get(model)
    reg = optimize.Regularizers(decay=FEATURE_SETTINGS["decay"], blur_every=FEATURE_SETTINGS["blur_every"],
                                blur_sigma=FEATURE_SETTINGS["blur_sigma"], jitter=FEATURE_SETTINGS["jitter"])
    alone, _ = optimize.ascend(torch_model, space, Objective(layer=tensor, channel=cards[-1]["channel"],
                                                            channel_axis=axis), start, BUDGET.feature_steps,
                               FEATURE_SETTINGS["learning_rate"], reg, FEATURE_SETTINGS["seed"])
    assert np.abs(_decode(cards[-1]["feature_png"]) - space.pixels(alone).astype(np.int32)).max() <= 1
    assert {card["feature_of"] for card in cards} == {"channel"}
    # the first layer's field (3x3 pixels) is small: its centre unit, shown as the pixels of that field
    first = report["units"]["/relu1/Relu_output_0"]["pages"]
    assert {card["feature_of"] for card in first} == {"centre unit"}
    assert all(_decode(card["feature_png"]).shape == (96, 96, 3) for card in first)


def test_a_swish_stem_shows_its_filters(tmp_path):
    """SiLU exported as x * Sigmoid(x) after a Conv + BatchNorm on the image: its channels are that
    Conv's filters (batch norm folded in by the exporter); a sum of two convolutions has none."""
    import onnx
    from onnx import numpy_helper

    from convscope_server.audit.engine import first_layer_filters
    from tiny_models import TINY_CONFIG

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.SiLU()
            self.side = torch.nn.Conv2d(3, 4, 1)
            self.head = torch.nn.Linear(4, NUM_CLASSES)

        def forward(self, x):
            y = self.act(self.bn(self.conv(x)))
            z = y + self.side(x)
            return self.head(z.mean(dim=(2, 3)))

    folder = tmp_path / "swish"
    export(Stem().eval(), folder / "model.onnx")
    (folder / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    model = load_folder("swish", folder)
    proto = onnx.load(str(folder / "model.onnx"))
    mul = next(n for n in proto.graph.node if n.op_type == "Mul")
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    conv = next(n for n in proto.graph.node if n.op_type == "Conv" and n.output[0] in mul.input)
    weights = next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == conv.input[1])
    np.testing.assert_array_equal(first_layer_filters(model, mul.output[0]), weights)
    assert first_layer_filters(model, add.output[0]) is None


def test_near_duplicates_and_outliers_carry_their_images(audited):
    """A dataset folder's near-duplicate pairs and outliers come with thumbnails of their own files."""
    from convscope_server import render
    from convscope_server.forward.neighbors import thumbnail

    model, native, data, base, report, _ = audited
    dataset = report["dataset"]
    assert dataset["near_duplicates"] and dataset["outliers"]
    for entry, key in ([(p, "first") for p in dataset["near_duplicates"]] + [(p, "second") for p in
                       dataset["near_duplicates"]] + [(o, "") for o in dataset["outliers"]]):
        name, png = (entry[key], entry[f"{key}_png"]) if key else (entry["id"], entry["png"])
        pixels = np.asarray(Image.open(data / name).convert("RGB"))
        expected = thumbnail(render.display_image(
            ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(2, 0, 1), model.config), 96)
        assert np.abs(_decode(png) - expected.astype(np.int32)).max() <= 1, name
