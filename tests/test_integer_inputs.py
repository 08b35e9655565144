"""Models whose graph input is uint8 pixels with the preprocessing inside (as TF/TFLite exports often are):
images go in as the graph expects, Describe says so, and forward and gradient methods work and equal
their references on the native module."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from convscope import Client
from conftest import png_bytes, start
from tiny_models import NUM_CLASSES, SIZE, tiny_net


class Uint8Nhwc(nn.Module):
    """uint8 NHWC pixels -> [0, 1] -> (x - 0.5) / 0.25 -> NCHW -> tiny: Cast, Div, Sub, Div, Transpose."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, pixels):
        x = pixels.float() / 255.0
        return self.net(((x - 0.5) / 0.25).permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def uint8_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("uint8") / "models"
    (root / "tiny_uint8").mkdir(parents=True)
    native = Uint8Nhwc().eval()
    torch.onnx.export(native, (torch.zeros(1, SIZE, SIZE, 3, dtype=torch.uint8),),
                      str(root / "tiny_uint8" / "model.onnx"), dynamo=False, opset_version=17,
                      input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    server = start(root)
    # The exported module itself is the reference: building another one would draw from torch's global
    # generator, which a server converting models in the background may be using at the same time.
    yield server, root / "tiny_uint8" / "model.onnx", native
    server.stop(0)


def pixels_of(image: np.ndarray) -> np.ndarray:
    """The picture resized to the model as uint8 pixels (stretch, bilinear), the graph's own input."""
    return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BILINEAR))


def test_describe_says_the_input_takes_uint8_pixels(uint8_server):
    server = uint8_server[0]
    with Client(server.address) as client:
        description = client.describe("tiny_uint8")
    assert description.inputs[0]["datatype"] == "UINT8"
    assert description.preprocessing["layout"] == "NHWC"
    assert description.preprocessing["scale"] == 255.0
    assert description.preprocessing["mean"] == [0.0] * 3 and description.preprocessing["std"] == [1.0] * 3
    assert {"input.scale", "input.mean", "input.std"} <= set(description.guessed)


def test_images_go_in_as_uint8_pixels(uint8_server, chelsea):
    server, path, _ = uint8_server
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"pixels": pixels_of(chelsea)[None]})
    with Client(server.address) as client:
        top = client.predict("tiny_uint8", png_bytes(chelsea), top=NUM_CLASSES)
        assert top[0].index == int(expected[0].argmax())
        got = {score.index: score.logit for score in top}
        np.testing.assert_allclose([got[i] for i in range(NUM_CLASSES)], expected[0], rtol=1e-5, atol=1e-5)
        # occlusion on onnxruntime: the occluded pixels are what the graph receives
        occluded = client.occlusion("tiny_uint8", png_bytes(chelsea), target=2, window=8, stride=8)
    x = pixels_of(chelsea)[None]
    blocked = x.copy()
    blocked[0, :8, :8] = 0
    (scores,) = session.run(None, {"pixels": np.concatenate([x, blocked])})
    probabilities = np.exp(scores - scores.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(occluded.probability[0, 0], probabilities[1, 2], rtol=1e-5)
    np.testing.assert_allclose(occluded.attribution[0, 0], probabilities[0, 2] - probabilities[1, 2], rtol=1e-4,
                               atol=1e-7)


def test_saliency_is_the_gradient_per_pixel_value(uint8_server, chelsea):
    """The gradient of the logit with respect to the pixel values (0..255), as Captum computes it on the
    native module fed the same pixels as floats (the graph's Cast makes them floats first)."""
    from captum.attr import Saliency

    server, _, native = uint8_server
    x = pixels_of(chelsea).astype(np.float32)
    with Client(server.address) as client:
        got = client.saliency("tiny_uint8", png_bytes(chelsea), target=4)
        assert client.describe("tiny_uint8").gradient["state"] == "ready"
    reference = Saliency(native).attribute(torch.from_numpy(x[None]), target=4,
                                                                      abs=False)[0].numpy()
    np.testing.assert_allclose(got.attribution, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
