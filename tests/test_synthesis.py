"""SynthesisService: objectives improve, adversarial examples fool the served model, bad input, cancel."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from convscope import Client, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from conftest import start
from tiny_models import SIZE

MODEL = "efficientnet_lite0"


def mostly_rising(values, fraction=0.7) -> bool:
    """The objective improves 'monotonically enough': the end beats the start clearly and most
    10-step windows improve on the one before."""
    values = np.asarray(values)
    windows = values[: len(values) // 10 * 10].reshape(-1, 10).mean(axis=1)
    return values[-1] > values[0] and (np.diff(windows) > 0).mean() >= fraction


def test_class_visualization_raises_the_class_score(client):
    previews = []
    r = client.class_visualization(MODEL, 130, steps=40, jitter=4, blur_every=4, decay=0.001, preview_every=10,
                                   frames=True, preview=lambda step, loss, png: png and previews.append(step))
    assert mostly_rising(r.losses) and r.losses[-1] > r.losses[0] + 5
    assert previews == [10, 20, 30, 40] and len(r.frames) >= 4
    # The served onnxruntime model agrees: the image is now strongly class 130 (flamingo).
    scores = {s.index: s for s in client.predict(MODEL, r.image, top=5)}
    assert 130 in scores and scores[130].logit > 5
    assert Image.open(io.BytesIO(r.png)).size == (224, 224)


def test_feature_visualization_raises_the_channel(client):
    layer = "/_blocks.5/Clip_1_output_0"
    r = client.class_visualization(MODEL, layer=layer, channel=7, steps=30, jitter=2)
    assert mostly_rising(r.losses)
    start = client.activations(MODEL, np.zeros((3, 224, 224), np.float32), [layer])[layer].values[0, 7].mean()
    after = client.activations(MODEL, r.image, [layer])[layer].values[0, 7].mean()
    assert after > start + 1
    # One neuron of a conv output (a unit after ReLU6 that starts at 0 has no gradient to follow).
    neuron = client.class_visualization(MODEL, layer="/_blocks.5/_project_conv/Conv_output_0", channel=7,
                                        neuron=(7, 7), steps=10)
    assert neuron.losses[-1] > neuron.losses[0] + 1


def test_inversion_loss_falls_and_deeper_layers_lose_detail(client, chelsea_input):
    shallow, deep = client.invert(MODEL, chelsea_input, ["/_blocks.1/Clip_output_0", "/_blocks.10/Clip_1_output_0"],
                                  steps=80)
    for r in (shallow, deep):
        assert r.losses[-1] < 0.5 * r.losses[0]
    error = [float(np.mean((r.image - chelsea_input) ** 2)) for r in (shallow, deep)]
    assert error[0] < error[1], error  # the shallow code keeps more of the picture


def test_deepdream_amplifies_the_layer(client, chelsea_input):
    r = client.deepdream(MODEL, chelsea_input, "/_blocks.5/Clip_1_output_0", octaves=2, steps=8)
    assert len(r.losses) == 16 and r.losses[7] > r.losses[0] and r.losses[15] > r.losses[8]
    assert r.image.shape == (3, 224, 224)


def test_style_transfer_and_texture_at_other_sizes(client, chelsea, coffee):
    layers = ["/Clip_output_0", "/_blocks.1/Clip_1_output_0", "/_blocks.3/Clip_1_output_0"]
    r = client.style_transfer(MODEL, coffee, chelsea, style_layers=layers, content_layer="/_blocks.5/Clip_1_output_0",
                              steps=30)
    assert r.losses[-1] < 0.5 * r.losses[0]
    texture = client.style_transfer(MODEL, coffee, style_layers=layers, height=160, width=192, steps=30)
    assert texture.image.shape == (3, 160, 192) and texture.losses[-1] < 0.5 * texture.losses[0]


def test_fgsm_small_epsilon_changes_the_prediction_like_a_handwritten_fgsm(client, chelsea_input, fused_lite0):
    r = client.adversarial(MODEL, chelsea_input, epsilon=2 / 255)
    assert r.before[0].index == 285 and r.after[0].index != 285
    assert abs(r.linf_pixels - 2 / 255) < 1e-5
    # FGSM written out on the native model (batch-norm fused, as in the ONNX file):
    native = fused_lite0
    x = torch.from_numpy(chelsea_input[None]).requires_grad_(True)
    torch.nn.functional.cross_entropy(native(x), torch.tensor([285])).backward()
    expected = (x + (2 / 255) / 0.5 * x.grad.sign()).clamp(-1, 1).detach().numpy()[0]
    assert np.isclose(r.image, expected, atol=1e-5).mean() > 0.999
    assert Image.open(io.BytesIO(r.perturbation_png)).size == (224, 224)


def test_targeted_fooling_reaches_the_target(client, chelsea_input):
    r = client.adversarial(MODEL, chelsea_input, "targeted", target=967, steps=100)
    assert r.after[0].index == 967 and r.after[0].probability > 0.9  # the served onnxruntime model's verdict
    assert r.steps_taken < 100 and r.linf_pixels <= 16 / 255 + 1e-6


def test_robustness_curve_equals_per_image_fgsm(client, chelsea, coffee):
    epsilons = [0.0, 1 / 255, 4 / 255]
    curve = client.robustness(MODEL, [chelsea, coffee], epsilons=epsilons, render=True)
    assert curve.accuracy[0] == 1.0 and curve.png
    labels = [client.predict(MODEL, image, top=1)[0].index for image in (chelsea, coffee)]
    for epsilon, accuracy in zip(epsilons[1:], curve.accuracy[1:]):
        hits = [client.adversarial(MODEL, image, label=label, epsilon=epsilon).after[0].index == label
                for image, label in zip((chelsea, coffee), labels)]
        assert accuracy == np.mean(hits)


def test_nhwc_model(client):
    r = client.class_visualization("tiny_nhwc", 3, steps=10)
    assert r.image.shape == (SIZE, SIZE, 3) and r.losses[-1] > r.losses[0]


def test_bad_synthesis_requests(client, chelsea, repository):
    with pytest.raises(NotFound, match="layer: unknown layer 'nope'"):
        client.class_visualization(MODEL, layer="nope")
    with pytest.raises(InvalidArgument, match="channel: 1280 is outside"):
        client.class_visualization(MODEL, layer="/Clip_1_output_0", channel=1280)
    with pytest.raises(InvalidArgument, match="target: required"):
        client.class_visualization(MODEL)
    with pytest.raises(InvalidArgument, match="row: 14 is outside '/_blocks.5/Clip_1_output_0''s 0..13"):
        client.class_visualization(MODEL, layer="/_blocks.5/Clip_1_output_0", neuron=(14, 0), steps=2)
    with pytest.raises(InvalidArgument, match="col: -1 is outside"):
        client.class_visualization(MODEL, layer="/_blocks.5/Clip_1_output_0", neuron=(0, -1), steps=2)
    with pytest.raises(InvalidArgument, match="target: 1000 is outside"):
        client.class_visualization(MODEL, 1000)
    with pytest.raises(ResourceExhausted, match="optimization.steps: 5000 is over the limit of 2000"):
        client.class_visualization(MODEL, 1, steps=5000)
    with pytest.raises(InvalidArgument, match="octaves: 9 is more than 8"):
        client.deepdream(MODEL, chelsea, "/Clip_1_output_0", octaves=9)
    with pytest.raises(InvalidArgument, match=r"epsilon: must be in \(0, 1\]"):
        client.adversarial(MODEL, chelsea, epsilon=2.0)
    with pytest.raises(InvalidArgument, match="target: 1000 is outside"):
        client.adversarial(MODEL, chelsea, "targeted", target=1000)
    with pytest.raises(InvalidArgument, match="style_layers: name at least one"):
        client.style_transfer(MODEL, chelsea, style_layers=[])
    with pytest.raises(ResourceExhausted, match="height: 2000x2000 is over the limit"):
        client.style_transfer(MODEL, chelsea, style_layers=["/Clip_output_0"], height=2000, width=2000)
    with pytest.raises(InvalidArgument, match="layers: name at least one layer"):
        client.invert(MODEL, chelsea, [])
    with pytest.raises(FailedPrecondition, match="QuickGelu"):
        client.class_visualization("tiny_contrib_op", 1, steps=2)
    assert client.predict(MODEL, chelsea, top=1)[0].index == 285


def test_cancelling_a_synthesis_job_stops_it(client):
    def stop(step, total, stage):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.class_visualization(MODEL, 1, steps=2000, progress=stop)
    deadline = time.monotonic() + 15
    while any(t.name == "convscope-job" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(t.name == "convscope-job" for t in threading.enumerate())


def test_job_wall_time_limit(repository):
    quick = start(repository, max_job_seconds=1.0)
    try:
        with Client(quick.address, timeout=60) as c:
            with pytest.raises(ResourceExhausted, match="ran past the server's limit of 1 s"):
                c.class_visualization(MODEL, 1, steps=2000)
            assert c.predict(MODEL, np.zeros((3, 224, 224), np.float32), top=1)  # still serving
    finally:
        quick.stop(0)
