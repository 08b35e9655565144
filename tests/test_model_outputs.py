"""Models whose input or output is not the plain RGB classifier's: 4 and 5 input channels, a 1x1
convolution head (N, K, 1, 1), a segmentation-like output (N, C, H, W), a Softmax head whose
probabilities the server must not soften again, and a two-class model's default top-k. Through the real
server and client, against onnxruntime on the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from convscope import Client, FailedPrecondition, InvalidArgument
from conftest import png_bytes, start

SIZE = 32


class Body(nn.Module):
    """Two small convolutions: what every model here shares."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))


class Classifier(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 6, head: str = "linear"):
        super().__init__()
        self.body, self.head = Body(channels), head
        self.fc = nn.Linear(8, classes)
        self.conv_head = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        features = self.body(x)
        if self.head == "conv1x1":   # SqueezeNet style: 1x1 conv, then global pooling kept 4-D
            return self.conv_head(features).mean(dim=(2, 3), keepdim=True)
        logits = self.fc(features.mean(dim=(2, 3)))
        return torch.softmax(logits, dim=1) if self.head == "softmax" else logits


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Body(3)
        self.out = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.out(self.body(x))


def write(folder: Path, model: nn.Module, channels: int, config: str = "") -> Path:
    torch.manual_seed(0)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.3)
    folder.mkdir(parents=True)
    torch.onnx.export(model.eval(), (torch.zeros(1, channels, SIZE, SIZE),), str(folder / "model.onnx"),
                      dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    mean = ", ".join(["0.5"] * channels)
    (folder / "config.toml").write_text(f'[input]\nheight = {SIZE}\nwidth = {SIZE}\nlayout = "NCHW"\nscale = 1.0\n'
                                        f"mean = [{mean}]\nstd = [{mean}]\n{config}")
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs") / "models"
    write(root / "rgba", Classifier(channels=4), 4)
    write(root / "five_channels", Classifier(channels=5), 5)
    write(root / "conv_head", Classifier(head="conv1x1"), 3)
    write(root / "segmenter", Segmenter(), 3)
    write(root / "softmax_head", Classifier(head="softmax"), 3)
    write(root / "two_classes", Classifier(classes=2), 3)
    return root


@pytest.fixture(scope="module")
def client(repository):
    server = start(repository)
    with Client(server.address, timeout=60) as connected:
        yield connected
    server.stop(0)


def run(repository: Path, name: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(repository / name / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x[None].astype(np.float32)})[0][0]


def picture(seed: int = 0, channels: int = 3) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (SIZE // 4, SIZE // 4, channels), dtype=np.uint8)
    return coarse.repeat(4, axis=0).repeat(4, axis=1)


def test_a_four_channel_model_takes_rgba_pictures(client, repository):
    """An RGBA picture fills the four channels as they are; an RGB one gets alpha 255."""
    rgba = picture(1, 4)
    expected = run(repository, "rgba", (rgba.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
    for image in (rgba, png_bytes(rgba)):
        got = client.predict("rgba", image, top=6)
        np.testing.assert_allclose(sorted(s.logit for s in got), np.sort(expected), rtol=1e-5, atol=1e-5)
    rgb = picture(2, 3)
    opaque = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    expected = run(repository, "rgba", (opaque.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
    got = client.predict("rgba", png_bytes(rgb), top=6)
    np.testing.assert_allclose(sorted(s.logit for s in got), np.sort(expected), rtol=1e-5, atol=1e-5)
    # gradient methods take it too, and show it over the picture's colours
    assert client.saliency("rgba", rgba, render=True).overlay_png[:4] == b"\x89PNG"


def test_a_five_channel_model_takes_model_inputs_and_says_why_not_pictures(client, repository):
    with pytest.raises(InvalidArgument) as error:
        client.predict("five_channels", picture())
    assert "images[0].array" in str(error.value) and "5 channels" in str(error.value)
    assert "float32 model input of shape [5, 32, 32]" in str(error.value)
    with pytest.raises(InvalidArgument, match="images\\[0\\].encoded.*5 channels"):
        client.predict("five_channels", png_bytes(picture()))
    x = np.random.default_rng(3).normal(size=(5, SIZE, SIZE)).astype(np.float32)
    got = client.predict("five_channels", x, top=6)
    np.testing.assert_allclose(sorted(s.logit for s in got), np.sort(run(repository, "five_channels", x)),
                               rtol=1e-5, atol=1e-5)
    assert client.saliency("five_channels", x, render=True).overlay_png[:4] == b"\x89PNG"   # the channels' mean
    assert client.predict("rgba", picture()) and client.models()        # the server still serves


def test_a_conv_head_with_singleton_axes_has_one_class_per_channel(client, repository):
    summary = {m.name: m for m in client.models()}["conv_head"]
    assert summary.num_classes == 6 and not summary.no_classes
    pixels = picture(4)
    expected = run(repository, "conv_head", (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5).reshape(-1)
    got = client.predict("conv_head", pixels, top=6)
    assert [s.index for s in got] == list(np.argsort(-expected, kind="stable"))
    assert client.saliency("conv_head", pixels, target=2).target == 2


def test_a_segmentation_output_serves_layer_methods_and_refuses_class_methods(client, repository):
    summary = {m.name: m for m in client.models()}["segmenter"]
    assert summary.ready and summary.num_classes == 0
    assert "[5, 32, 32]" in summary.no_classes and "[output] logits" in summary.no_classes
    description = client.describe("segmenter")
    assert description.no_classes == summary.no_classes and description.num_classes == 0
    pixels = picture(5)
    for call in (lambda: client.predict("segmenter", pixels),
                 lambda: client.saliency("segmenter", pixels),
                 lambda: client.occlusion("segmenter", pixels),
                 lambda: client.cam("segmenter", pixels),
                 lambda: client.class_visualization("segmenter", target=1, steps=2),
                 lambda: client.adversarial("segmenter", pixels)):
        with pytest.raises(FailedPrecondition, match="no class scores.*\\[5, 32, 32\\]"):
            call()
    # the layer methods work: the activations are the graph's own tensor, by onnxruntime
    layer = description.layers[-1].name
    activation = client.activations("segmenter", pixels, layer)[layer]
    expected = run(repository, "segmenter", (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
    np.testing.assert_allclose(activation.values[0], expected, rtol=1e-5, atol=1e-5)
    assert client.labels("segmenter") == []
    # guided backprop of one of its units needs no class: equal to the rule written out on the native net
    unit = client.guided_backprop("segmenter", pixels, layer=layer, channel=2)
    assert unit.label == ""
    np.testing.assert_allclose(unit.attribution, guided_reference(pixels, channel=2), rtol=1e-4, atol=1e-6)


class GuidedReLU(torch.autograd.Function):
    """Springenberg et al.'s rule at a ReLU: the gradient passes where the input and the gradient are > 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * (grad > 0)


def guided_reference(pixels: np.ndarray, channel: int) -> np.ndarray:
    """Guided backprop of the segmenter's output channel (summed), by hand on the native module with the
    weights ``write`` gave the exported file."""
    native = Segmenter()
    torch.manual_seed(0)
    for parameter in native.parameters():
        nn.init.normal_(parameter, std=0.3)
    x = torch.from_numpy(((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32))
    x.requires_grad_(True)
    body = native.body
    out = native.out(GuidedReLU.apply(body.conv2(GuidedReLU.apply(body.conv1(x)))))
    out[:, channel].sum().backward()
    return x.grad[0].numpy()


def test_a_softmax_head_is_not_softened_twice(client, repository):
    description = client.describe("softmax_head")
    assert "output.softmax" in description.guessed
    pixels = picture(6)
    expected = run(repository, "softmax_head", (pixels.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5)
    got = client.predict("softmax_head", pixels, top=6)
    np.testing.assert_allclose([s.probability for s in got], np.sort(expected)[::-1], rtol=1e-5, atol=1e-6)
    assert abs(sum(s.probability for s in got) - 1) < 1e-5


def test_a_two_class_model_predicts_both_classes_by_default(client):
    got = client.predict("two_classes", picture(7))
    assert sorted(s.index for s in got) == [0, 1]
    with pytest.raises(InvalidArgument, match="top_k: 3 is more than the model's 2 classes"):
        client.predict("two_classes", picture(7), top=3)


def test_corruptions_of_a_four_channel_input_work_per_channel():
    """Blur and JPEG corrupt each of the four channels as a grey picture (Pillow by hand), noise all."""
    from PIL import Image, ImageFilter

    from convscope_server.audit.robustness import corrupted_input
    from convscope_server.repository import build_config

    config = build_config(_four_channel_proto(), {"input": {"scale": 1.0, "mean": [0.5] * 4, "std": [0.5] * 4}})
    pixels = picture(8, 4)
    sample = ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)
    blurred = corrupted_input(sample, config, "gaussian_blur", 2.0, np.random.default_rng(0))
    by_hand = np.stack([np.asarray(Image.fromarray(pixels[..., c]).filter(ImageFilter.GaussianBlur(2.0)))
                        for c in range(4)], axis=2)
    np.testing.assert_allclose(blurred, ((by_hand / 255.0 - 0.5) / 0.5).transpose(2, 0, 1), atol=1e-6)
    noisy = corrupted_input(sample, config, "gaussian_noise", 0.08, np.random.default_rng(0))
    assert noisy.shape == sample.shape and 0.05 < np.abs(noisy - sample).mean() < 0.5


def _four_channel_proto():
    import io

    import onnx

    buffer = io.BytesIO()
    torch.onnx.export(Classifier(channels=4).eval(), (torch.zeros(1, 4, SIZE, SIZE),), buffer, dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["logits"])
    return onnx.load_from_string(buffer.getvalue())


def test_an_audit_of_a_four_channel_model_runs_every_section(client):
    pictures = [png_bytes(picture(20 + n, 4)) for n in range(6)]
    info = client.run_audit("rgba-audit", "rgba", pictures, unit_layers=1, attribution_images=2, curve_steps=4,
                            robustness_images=4, epsilons=[0.0, 2 / 255], feature_steps=-1, worst_images=-1)
    assert info.images == 6
    report = client.audit("rgba-audit")
    corruptions = report["robustness"]["corruptions"]
    assert set(corruptions) >= {"clean", "gaussian_blur", "jpeg", "gaussian_noise", "occlusion"}


class LeakyNet(nn.Module):
    """No ReLU anywhere: LeakyReLU and GELU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = nn.functional.gelu(self.conv2(nn.functional.leaky_relu(self.conv1(x), 0.1)))
        return self.fc(x.mean(dim=(2, 3)))


def test_guided_backprop_says_when_there_is_no_rectifier_to_modify(tmp_path):
    """On a net without ReLU the rules change nothing: the result equals the plain gradient (Captum's
    Saliency on the native module, signed), and the response says why; with ReLUs there is no note."""
    from captum.attr import Saliency

    torch.manual_seed(0)
    native = LeakyNet().eval()
    write(tmp_path / "models" / "leaky", native, 3)
    write(tmp_path / "models" / "relu", Classifier(), 3)
    server = start(tmp_path / "models")
    try:
        with Client(server.address, timeout=60) as client:
            pixels = picture(9)
            guided = client.guided_backprop("leaky", pixels, target=1)
            x = torch.from_numpy(((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32))
            expected = Saliency(native).attribute(x, target=1, abs=False)[0].numpy()
            np.testing.assert_allclose(guided.attribution, expected, rtol=1e-4, atol=1e-6)
            assert "no ReLU" in guided.note and "plain gradient" in guided.note
            assert "no ReLU" in client.deconvnet("leaky", pixels, target=1).note
            assert "no ReLU" in client.cam("leaky", pixels, target=1, method="guided_gradcam").note
            assert client.guided_backprop("relu", pixels, target=1).note == ""
    finally:
        server.stop(0)
