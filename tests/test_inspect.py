"""InspectService against independent references: native torch (same weights), Captum's Occlusion,
pytorch-grad-cam's ScoreCAM, scipy, and brute-force numpy."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from convscope import Client, InvalidArgument, NotFound, ResourceExhausted
from conftest import ROOT, reference_input, start
from tiny_models import DEAD_CHANNEL, SIZE, tiny_net

RNG = np.random.default_rng(7)
X_TINY = RNG.normal(size=(3, SIZE, SIZE)).astype(np.float32)


def _hooked(model, modules: dict, x: np.ndarray) -> dict:
    """Outputs of ``modules`` (name -> nn.Module) for input ``x`` on the native torch model."""
    seen = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, out.detach().numpy()))
               for n, m in modules.items()]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in handles:
        h.remove()
    return seen


def test_activations_equal_native_torch(client):
    native = tiny_net()
    xs = np.stack([X_TINY, RNG.normal(size=(3, SIZE, SIZE)).astype(np.float32)])
    got = client.activations("tiny", list(xs), ["/conv1/Conv_output_0", "/pool/MaxPool_output_0",
                                                 "/conv3/Conv_output_0", "/Add_output_0"])
    with torch.no_grad():
        t = torch.from_numpy(xs)
        conv1 = native.bn1(native.conv1(t))  # the exporter folds batch-norm into conv1
        pool = native.pool(torch.relu(native.conv2(torch.relu(conv1))))
        conv3 = native.conv3(pool)
        add = pool + torch.clamp(conv3, 0, 6)
    for name, expected in (("/conv1/Conv_output_0", conv1), ("/pool/MaxPool_output_0", pool),
                           ("/conv3/Conv_output_0", conv3), ("/Add_output_0", add)):
        np.testing.assert_allclose(got[name].values, expected.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # Per-channel statistics, brute force.
    values = got["/Add_output_0"].values
    stats = got["/Add_output_0"].stats
    np.testing.assert_allclose(stats["mean"], values.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["max"], values.max(axis=(0, 2, 3)))
    np.testing.assert_allclose(stats["zero_fraction"], (values == 0).mean(axis=(0, 2, 3)))


def test_activations_of_the_default_model_equal_native_torch(client, chelsea, lite0):
    names = {"/_blocks.3/_depthwise_conv/Conv_output_0": lite0._blocks[3]._bn1,
             "/_conv_head/Conv_output_0": lite0._bn1}
    got = client.activations("efficientnet_lite0", chelsea, list(names))
    expected = _hooked(lite0, names, reference_input(chelsea)[None])
    for name in names:
        scale = np.abs(expected[name]).max()
        np.testing.assert_allclose(got[name].values, expected[name], rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_probes_never_touch_the_prediction_session(client, server, chelsea):
    model = server.repository.get("efficientnet_lite0")
    session = model.session
    before = client.predict("efficientnet_lite0", chelsea, top=3)
    client.activations("efficientnet_lite0", chelsea, ["/_blocks.5/Clip_output_0"])
    after = client.predict("efficientnet_lite0", chelsea, top=3)
    assert model.session is session and len(model.probes) >= 1
    assert before == after
    assert [o.name for o in session.get_outputs()] == ["logits"]


def test_probe_sessions_of_all_models_stay_within_one_bound(client, server):
    """--max-probe-sessions bounds the sessions of every model together (each holds a model copy);
    evicted ones are rebuilt on demand with the same results."""
    from convscope_server.onnx import probes

    tiny, nhwc = server.repository.get("tiny"), server.repository.get("tiny_nhwc")
    first = client.activations("tiny", X_TINY, ["/conv1/Conv_output_0"])["/conv1/Conv_output_0"].values
    saved = probes.SESSIONS.capacity
    probes.SESSIONS.capacity = 2
    try:
        for layer in ("/conv2/Conv_output_0", "/conv3/Conv_output_0"):
            client.activations("tiny", X_TINY, [layer])
        client.activations("tiny_nhwc", np.ascontiguousarray(X_TINY.transpose(1, 2, 0)), ["/conv1/Conv_output_0"])
        assert len(tiny.probes) + len(nhwc.probes) <= 2 and len(nhwc.probes) == 1
        again = client.activations("tiny", X_TINY, ["/conv1/Conv_output_0"])["/conv1/Conv_output_0"].values
        np.testing.assert_array_equal(again, first)
    finally:
        probes.SESSIONS.capacity = saved


def test_nhwc_and_fixed_batch_activations(client):
    nchw = client.activations("tiny", X_TINY, ["/conv1/Conv_output_0"])["/conv1/Conv_output_0"].values
    nhwc = client.activations("tiny_nhwc", np.ascontiguousarray(X_TINY.transpose(1, 2, 0)),
                              ["/conv1/Conv_output_0"])["/conv1/Conv_output_0"].values
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-4, atol=1e-5)
    xs = [X_TINY, X_TINY * 0.5, -X_TINY]  # three images through a graph fixed to batch 1: looped
    many = client.activations("tiny_fixed_batch", xs, ["/Add_output_0"])["/Add_output_0"].values
    for x, value in zip(xs, many):
        single = client.activations("tiny_fixed_batch", x, ["/Add_output_0"])["/Add_output_0"].values[0]
        np.testing.assert_allclose(value, single, rtol=1e-5, atol=1e-6)


def test_activation_grid_png(client, chelsea):
    got = client.activations("efficientnet_lite0", [chelsea, chelsea], ["/_blocks.1/Clip_output_0"],
                             render=True, max_channels=16)
    pngs = got["/_blocks.1/Clip_output_0"].png
    assert len(pngs) == 2
    image = np.asarray(Image.open(io.BytesIO(pngs[0])))
    assert image.ndim == 3 and image.shape[0] > 56 * 4 and image.max() == 255


def test_dead_filters_found_by_construction_and_by_brute_force(client):
    xs = [RNG.normal(size=(3, SIZE, SIZE)).astype(np.float32) for _ in range(5)]
    layers = ["/conv2/Conv_output_0", "/relu2/Relu_output_0"]
    report = client.dead_filters("tiny", xs, layers)
    assert DEAD_CHANNEL in report["/relu2/Relu_output_0"].dead
    assert DEAD_CHANNEL in report["/conv2/Conv_output_0"].constant
    values = client.activations("tiny", xs, layers)
    relu = values["/relu2/Relu_output_0"].values
    assert report["/relu2/Relu_output_0"].dead == [c for c in range(relu.shape[1]) if not relu[:, c].any()]
    default = client.dead_filters("tiny", xs)  # every Conv output
    assert set(default) == {"/conv1/Conv_output_0", "/conv2/Conv_output_0", "/conv3/Conv_output_0"}


def test_filters_equal_the_native_weights(client, lite0):
    native = tiny_net()
    conv2 = client.filters("tiny", "/conv2/Conv_output_0", render=True)
    np.testing.assert_array_equal(conv2.weights, native.conv2.weight.detach().numpy())
    assert not conv2.rgb and not conv2.depthwise and conv2.png
    stem = client.filters("efficientnet_lite0", "/_conv_stem/Conv_output_0", render=True)
    bn = lite0._bn0
    folded = lite0._conv_stem.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None, None, None]
    np.testing.assert_allclose(stem.weights, folded.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert stem.rgb and np.asarray(Image.open(io.BytesIO(stem.png))).shape[2] == 3
    depthwise = client.filters("efficientnet_lite0", "/_blocks.0/_depthwise_conv/Conv_output_0")
    assert depthwise.depthwise and depthwise.weights.shape == (32, 1, 3, 3) and depthwise.group == 32


def _captum_occlusion(model, x, target, window, stride, baseline, probability):
    from captum.attr import Occlusion

    forward = (lambda t: torch.softmax(model(t), dim=1)) if probability else model
    with torch.no_grad():
        attribution = Occlusion(forward).attribute(
            torch.from_numpy(x[None]), sliding_window_shapes=(3, *window), strides=(3, *stride), target=target,
            baselines=torch.from_numpy(np.ascontiguousarray(baseline[None])), perturbations_per_eval=32)
    return attribution[0].numpy()


def _assert_same_map(ours, reference):
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("baseline", ["constant", "mean", "blur"])
def test_occlusion_equals_captum_on_tiny(client, baseline):
    from scipy.ndimage import gaussian_filter

    native = tiny_net()
    x = X_TINY
    window, stride = (7, 6), (5, 4)  # strides that do not divide: Captum clips the last window
    reference_baseline = {"constant": np.full_like(x, 0.3),
                          "mean": np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape),
                          "blur": gaussian_filter(x, sigma=(0, 2, 2), mode="mirror", truncate=3.0)}[baseline]
    kwargs = {"baseline": 0.3} if baseline == "constant" else {"baseline": baseline, "blur_sigma": 2.0}
    for score in ("logit", "probability"):
        got = client.occlusion("tiny", x, target=4, window=window, stride=stride, score=score, **kwargs)
        expected = _captum_occlusion(native, x, 4, window, stride, reference_baseline, score == "probability")
        for channel in expected:  # the window spans every channel, so each channel has the same map
            _assert_same_map(got.attribution, channel)
    assert got.probability.shape == (len(got.rows), len(got.cols)) == (6, 8)  # ceil(25/5)+1, ceil(26/4)+1


def test_occlusion_equals_captum_on_the_default_model(client, chelsea, lite0):
    x = reference_input(chelsea)
    got = client.occlusion("efficientnet_lite0", x, target=285, window=32, stride=16, render=True)
    expected = _captum_occlusion(lite0, x, 285, (32, 32), (16, 16), np.zeros_like(x), probability=True)
    _assert_same_map(got.attribution, expected[0])
    assert got.forward_passes == 13 * 13 + 1 and got.label == "Egyptian cat"
    # The window grid itself: the probability with the window at (row, col), checked at one position
    # against a plain forward pass of the native model.
    occluded = x.copy()
    occluded[:, 96:128, 112:144] = 0
    with torch.no_grad():
        p = torch.softmax(lite0(torch.from_numpy(occluded[None])), 1)[0, 285].item()
    assert abs(got.probability[got.rows.index(96), got.cols.index(112)] - p) < 1e-4
    overlay = np.asarray(Image.open(io.BytesIO(got.overlay_png)))
    assert overlay.shape == (224, 224, 3)


def test_occlusion_streams_progress(client):
    seen = []
    client.occlusion("tiny", X_TINY, window=4, stride=2, progress=lambda step, total, stage: seen.append((step, total)))
    assert seen and seen[-1][0] == seen[-1][1] == 15 * 15
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)


def test_score_cam_equals_pytorch_grad_cam(client, chelsea, lite0):
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    native = tiny_net()
    with ScoreCAM(model=native, target_layers=[native.conv3]) as cam:
        expected = cam(input_tensor=torch.from_numpy(X_TINY[None]), targets=[ClassifierOutputTarget(2)])[0]
    got = client.score_cam("tiny", X_TINY, "/conv3/Conv_output_0", target=2)
    np.testing.assert_allclose(got.cam, expected, rtol=1e-4, atol=1e-4)

    # After a ReLU, a dead channel is zero everywhere: one pass scores every such channel.
    with ScoreCAM(model=native, target_layers=[native.relu2]) as cam:
        expected = cam(input_tensor=torch.from_numpy(X_TINY[None]), targets=[ClassifierOutputTarget(2)])[0]
    activation = client.activations("tiny", X_TINY, ["/relu2/Relu_output_0"])["/relu2/Relu_output_0"].values[0]
    silent = int((~activation.reshape(len(activation), -1).any(axis=1)).sum())
    assert silent >= 1  # DEAD_CHANNEL at least
    got = client.score_cam("tiny", X_TINY, "/relu2/Relu_output_0", target=2)
    np.testing.assert_allclose(got.cam, expected, rtol=1e-4, atol=1e-4)

    x = reference_input(chelsea)
    with ScoreCAM(model=lite0, target_layers=[lite0._blocks[15]._bn2]) as cam:
        cam.batch_size = 64
        expected = cam(input_tensor=torch.from_numpy(x[None]), targets=[ClassifierOutputTarget(285)])[0]
    got = client.score_cam("efficientnet_lite0", x, "/_blocks.15/_project_conv/Conv_output_0", target=285,
                           batch_size=64, render=True)
    np.testing.assert_allclose(got.cam, expected, rtol=1e-4, atol=1e-4)
    assert got.forward_passes == 320 + 2 and got.overlay_png


def test_bad_inspect_requests(client, chelsea):
    m = "efficientnet_lite0"
    with pytest.raises(InvalidArgument, match="window_h: window of 300 pixels is larger than the 224-pixel input"):
        client.occlusion(m, chelsea, window=300)
    with pytest.raises(InvalidArgument, match="stride_h: must be a positive number of pixels, got 0"):
        client.occlusion(m, chelsea, window=16, stride=0)
    with pytest.raises(InvalidArgument, match="stride_w: must be a positive number of pixels, got -2"):
        client.occlusion(m, chelsea, window=16, stride=(4, -2))
    with pytest.raises(InvalidArgument, match="stride_h: stride 20 is larger than the window"):
        client.occlusion(m, chelsea, window=16, stride=20)
    with pytest.raises(InvalidArgument, match=r"target: 1000 is outside the model's classes 0..999"):
        client.occlusion(m, chelsea, target=1000)
    with pytest.raises(InvalidArgument, match=r"target: -1 is outside"):
        client.score_cam(m, chelsea, "/_conv_head/Conv_output_0", target=-1)
    with pytest.raises(NotFound, match=r"layers\[1\]: unknown layer '/_conv_head/Conv_output'.*Conv_output_0"):
        client.activations(m, chelsea, ["/_conv_head/Conv", "/_conv_head/Conv_output"])  # node name, typo
    with pytest.raises(NotFound, match="layer: unknown layer 'nope'"):
        client.score_cam(m, chelsea, "nope")
    with pytest.raises(InvalidArgument, match="layer: 'logits' is not a spatial"):
        client.score_cam(m, chelsea, "logits")
    with pytest.raises(InvalidArgument, match="layer: '/Clip_output_0' is made by Clip, not Conv"):
        client.filters(m, "/Clip_output_0")
    with pytest.raises(InvalidArgument, match="layers: name at least one tensor"):
        client.activations(m, chelsea, [])
    assert client.predict(m, chelsea, top=1)[0].index == 285  # still serving


def test_forward_pass_limit(repository, chelsea):
    strict = start(repository, max_forward_passes=100)
    try:
        with Client(strict.address, timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="window and stride: 170 forward passes is over the limit of 100"):
                c.occlusion("efficientnet_lite0", chelsea, window=32, stride=16)
            with pytest.raises(ResourceExhausted, match="layer: 1282 forward passes"):
                c.score_cam("efficientnet_lite0", chelsea, "/_conv_head/Conv_output_0")
    finally:
        strict.stop(0)


def _running_jobs() -> int:
    from convscope_server.api.streaming import running_jobs

    return running_jobs()


def test_cancelling_occlusion_stops_the_work(client, chelsea):
    """A grid of 111 x 111 windows takes about a minute; cancelling after the first progress event must
    stop the server's work within a batch or two, and the server keeps serving."""
    started = threading.Event()

    def progress(step, total, stage):
        started.set()
        raise KeyboardInterrupt  # what Ctrl-C in a CLI does: the client cancels the call

    with pytest.raises(KeyboardInterrupt):
        client.occlusion("efficientnet_lite0", chelsea, window=4, stride=2, progress=progress)
    assert started.is_set()
    deadline = time.monotonic() + 10
    while _running_jobs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running_jobs() == 0
    assert client.predict("efficientnet_lite0", chelsea, top=1)[0].index == 285


def test_forward_package_never_imports_torch():
    forward = ROOT / "service" / "convscope_server" / "forward"
    for path in forward.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "torch" for n in names), f"{path.name} imports torch"
    code = ("import sys; import convscope_server.api.inspect_service, convscope_server.app; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_occlusion_score_cam_and_filters_on_an_nhwc_model(client):
    """tiny_nhwc is tiny with an NHWC input (Transpose in the graph): the maps must be the NCHW model's
    (whose maps are checked against Captum and pytorch-grad-cam above) for the transposed input."""
    x_nhwc = np.ascontiguousarray(X_TINY.transpose(1, 2, 0))
    for baseline in ("mean", "blur"):
        nchw = client.occlusion("tiny", X_TINY, target=1, window=(6, 5), stride=(3, 4), baseline=baseline)
        nhwc = client.occlusion("tiny_nhwc", x_nhwc, target=1, window=(6, 5), stride=(3, 4), baseline=baseline)
        _assert_same_map(nhwc.attribution, nchw.attribution)
        np.testing.assert_allclose(nhwc.probability, nchw.probability, rtol=1e-4, atol=1e-6)
    nchw = client.score_cam("tiny", X_TINY, "/Add_output_0", target=1)
    nhwc = client.score_cam("tiny_nhwc", x_nhwc, "/Add_output_0", target=1, render=True)
    np.testing.assert_allclose(nhwc.cam, nchw.cam, rtol=1e-4, atol=1e-4)
    assert nhwc.overlay_png
    first = client.filters("tiny_nhwc", "/conv1/Conv_output_0", render=True)
    assert first.rgb and first.weights.shape == (8, 3, 3, 3)
