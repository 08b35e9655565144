"""AttributionService on the torch module converted from ONNX, against Captum and pytorch-grad-cam on the
native torch models (same weights) and inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convscope import Client, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from conftest import start
from tiny_models import NUM_CLASSES, SIZE, tiny_net

X = np.random.default_rng(11).normal(size=(3, SIZE, SIZE)).astype(np.float32)


def close(ours, reference, rtol=1e-4):
    """Relative difference <= rtol, measured against the largest reference value."""
    reference = np.asarray(reference)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x[None]))


def test_vanilla_saliency_equals_captum(client, fused_lite0, chelsea_input):
    from captum.attr import Saliency

    got = client.saliency("tiny", X, target=3)
    close(got.attribution, Saliency(tiny_net()).attribute(_t(X), target=3, abs=False)[0].numpy())
    close(got.map, np.abs(got.attribution).max(axis=0), 1e-6)
    got = client.saliency("efficientnet_lite0", chelsea_input, target=285)
    close(got.attribution, Saliency(fused_lite0).attribute(_t(chelsea_input), target=285, abs=False)[0].numpy())


def test_smoothgrad_equals_captum_saliency_over_the_same_noise(client):
    from captum.attr import Saliency

    samples, level, seed = 6, 0.2, 42
    got = client.saliency("tiny", X, target=1, method="smoothgrad", samples=samples, noise=level, seed=seed,
                          batch_size=4)
    noise = np.random.default_rng(seed).normal(0, level * (X.max() - X.min()), (samples, *X.shape)).astype(np.float32)
    saliency = Saliency(tiny_net())
    expected = np.mean([saliency.attribute(_t(X + n), target=1, abs=False)[0].numpy() for n in noise], axis=0)
    close(got.attribution, expected)
    assert got.backward_passes == samples


def test_integrated_gradients_equal_captum(client, server, chelsea_input):
    """On TinyNet against Captum on the native model. On Lite0 the path's 8 scaled images put some of its
    ~3M ReLU6 units within float noise of a threshold, where the gradient jumps, so Captum runs on the
    bridge's converted module (proved equal to native torch by the vanilla test and the load-time probe):
    this checks the quadrature, path and batching independently of the module."""
    from captum.attr import IntegratedGradients

    got = client.saliency("tiny", X, target=7, method="integrated_gradients", steps=20, baseline=0.25)
    expected = IntegratedGradients(tiny_net()).attribute(_t(X), baselines=0.25, target=7, n_steps=20,
                                                         method="gausslegendre")[0].numpy()
    close(got.attribution, expected)
    got = client.saliency("efficientnet_lite0", chelsea_input, target=285, method="integrated_gradients",
                          steps=8, batch_size=8)
    converted = server.bridges.get(server.repository.get("efficientnet_lite0")).module
    expected = IntegratedGradients(converted).attribute(_t(chelsea_input), baselines=0.0, target=285, n_steps=8,
                                                        method="gausslegendre", internal_batch_size=8)[0]
    close(got.attribution, expected.detach().numpy())


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_guided_backprop_and_deconvnet_equal_captum(client, rule):
    """On TinyNet (ReLU, ReLU6, max-pool, residual add). Captum rewrites nn.ReLU modules only, so its model
    writes ReLU6 as ReLU + clamp(max=6); the served ONNX has the exporter's Clip(0, 6)."""
    from captum.attr import Deconvolution, GuidedBackprop, NeuronDeconvolution, NeuronGuidedBackprop

    native = tiny_net(captum_relu6=True)
    method = client.guided_backprop if rule == "guided" else client.deconvnet
    got = method("tiny", X, target=5)
    reference = (GuidedBackprop if rule == "guided" else Deconvolution)(native)
    close(got.attribution, reference.attribute(_t(X), target=5)[0].numpy())
    # One channel of an inner layer instead of a class score.
    got = method("tiny", X, layer="/conv3/Conv_output_0", channel=2)
    neuron = (NeuronGuidedBackprop if rule == "guided" else NeuronDeconvolution)(native, native.conv3)
    expected = neuron.attribute(_t(X), neuron_selector=lambda out: out[:, 2].sum(dim=(1, 2)))[0].numpy()
    close(got.attribution, expected)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_grad_cam_equals_pytorch_grad_cam(client, method, fused_lite0, chelsea_input):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference = GradCAM if method == "gradcam" else GradCAMPlusPlus
    native = tiny_net()
    with reference(model=native, target_layers=[native.conv3]) as cam:
        expected = cam(input_tensor=_t(X), targets=[ClassifierOutputTarget(4)])[0]
    close(client.cam("tiny", X, target=4, layer="/conv3/Conv_output_0", method=method).map, expected)
    with reference(model=fused_lite0, target_layers=[fused_lite0._bn1]) as cam:  # fused: the conv-head output
        expected = cam(input_tensor=_t(chelsea_input), targets=[ClassifierOutputTarget(285)])[0]
    got = client.cam("efficientnet_lite0", chelsea_input, target=285, layer="/_conv_head/Conv_output_0",
                     method=method, render=True)
    close(got.map, expected)
    assert got.overlay_png and got.attribution.shape == (1280,)


def test_nhwc_and_fixed_batch_models(client):
    x_nhwc = np.ascontiguousarray(X.transpose(1, 2, 0))
    nchw = client.saliency("tiny", X, target=2, method="integrated_gradients", steps=6)
    nhwc = client.saliency("tiny_nhwc", x_nhwc, target=2, method="integrated_gradients", steps=6)
    close(nhwc.attribution, nchw.attribution.transpose(1, 2, 0))  # gradients come back in the input's layout
    close(client.cam("tiny_nhwc", x_nhwc, target=2, layer="/conv3/Conv_output_0").map,
          client.cam("tiny", X, target=2, layer="/conv3/Conv_output_0").map)
    fixed = client.saliency("tiny_fixed_batch", X, target=2, method="smoothgrad", samples=5, batch_size=4)
    dynamic = client.saliency("tiny", X, target=2, method="smoothgrad", samples=5, batch_size=4)
    close(fixed.attribution, dynamic.attribution)


def test_saliency_streams_progress(client):
    seen = []
    client.saliency("tiny", X, method="integrated_gradients", steps=12, batch_size=4,
                    progress=lambda step, total, stage: seen.append((step, total)))
    assert seen == [(4, 12), (8, 12), (12, 12)]


def test_unconvertible_model_answers_failed_precondition(client):
    with pytest.raises(FailedPrecondition, match="no gradient path: onnx2pytorch cannot convert.*QuickGelu"):
        client.saliency("tiny_contrib_op", X)
    with pytest.raises(FailedPrecondition, match="QuickGelu"):
        client.guided_backprop("tiny_contrib_op", X)
    assert len(client.predict("tiny_contrib_op", X, top=3)) == 3  # forward methods keep working
    assert client.occlusion("tiny_contrib_op", X, window=8).attribution.shape == (SIZE, SIZE)


def test_bad_attribution_requests(client, chelsea):
    with pytest.raises(InvalidArgument, match="target: 10 is outside the model's classes 0..9"):
        client.saliency("tiny", X, target=NUM_CLASSES)
    with pytest.raises(InvalidArgument, match="layer: 'logits' is not a spatial"):
        client.cam("tiny", X, layer="logits")
    with pytest.raises(NotFound, match="layer: unknown layer '/conv9/Conv_output_0'"):
        client.cam("tiny", X, layer="/conv9/Conv_output_0")
    with pytest.raises(InvalidArgument, match="channel: 16 is outside '/conv3/Conv_output_0''s channels 0..15"):
        client.guided_backprop("tiny", X, layer="/conv3/Conv_output_0", channel=16)
    with pytest.raises(InvalidArgument, match=r"noise: must be in \(0, 10\]"):
        client.saliency("tiny", X, method="smoothgrad", noise=-1)
    with pytest.raises(InvalidArgument, match="steps: must be positive"):
        client.saliency("tiny", X, method="integrated_gradients", steps=-3)
    with pytest.raises(ResourceExhausted, match="batch_size: 1000 is over the limit of 64"):
        client.saliency("tiny", X, method="smoothgrad", batch_size=1000)
    assert client.saliency("efficientnet_lite0", chelsea).target == 285  # still serving


def test_step_limit(repository):
    strict = start(repository, max_forward_passes=30)
    try:
        with Client(strict.address, timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="steps: 50 forward passes is over the limit of 30"):
                c.saliency("tiny", X, method="integrated_gradients")
            with pytest.raises(ResourceExhausted, match="samples: 40 forward passes"):
                c.saliency("tiny", X, method="smoothgrad", samples=40)
    finally:
        strict.stop(0)


def test_cam_equals_grad_cam_at_the_pooled_layer(client, chelsea):
    """With a global-average-pool + linear head, d logit_c / d A_k = w_ck / (h w) everywhere, so Grad-CAM at
    the pooled tensor is CAM exactly (after scaling); CAM itself runs on onnxruntime without gradients."""
    for model, image, pooled in (("tiny", X, "/Add_output_0"), ("efficientnet_lite0", chelsea, "/Clip_1_output_0")):
        cam_map = client.cam(model, image, method="cam")
        grad_map = client.cam(model, image, layer=pooled, method="gradcam")
        assert cam_map.target == grad_map.target
        close(cam_map.map, grad_map.map, 1e-4)
    with pytest.raises(InvalidArgument, match="layer: CAM uses the pooled tensor '/Add_output_0'"):
        client.cam("tiny", X, layer="/conv3/Conv_output_0", method="cam")
    assert client.cam("tiny_contrib_op", X, method="cam").map.shape == (SIZE, SIZE)  # no torch needed


def test_guided_grad_cam_equals_captum(client):
    from captum.attr import GuidedGradCam

    native = tiny_net(captum_relu6=True)
    expected = GuidedGradCam(native, native.conv3).attribute(_t(X), target=6)[0].detach().numpy()
    got = client.cam("tiny", X, target=6, layer="/conv3/Conv_output_0", method="guided_gradcam", render=True)
    close(got.attribution, expected)
    assert got.map.shape == (SIZE, SIZE) and got.overlay_png


def test_sanity_check_correlations_equal_scipy_and_leave_the_model_alone(client):
    from scipy.stats import spearmanr

    before = client.saliency("tiny", X, target=3)
    report = client.sanity_check("tiny", X, target=3, seed=5, steps=6, return_maps=True, render=True)
    assert report.layers == ["logits", "/conv3/Conv_output_0", "/conv2/Conv_output_0", "/conv1/Conv_output_0"]
    assert set(report.spearman) == {"vanilla", "integrated_gradients", "guided_backprop", "gradcam"}
    for method, values in report.spearman.items():
        original = report.original_maps[method]
        expected = [spearmanr(original.ravel(), m.ravel()).statistic for m in report.randomized_maps[method]]
        np.testing.assert_allclose(values, expected, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(report.original_maps["vanilla"], np.abs(before.attribution).max(axis=0), rtol=1e-6)
    after = client.saliency("tiny", X, target=3)  # the cascade ran on a copy
    np.testing.assert_array_equal(after.attribution, before.attribution)
    assert report.png
    again = client.sanity_check("tiny", X, target=3, seed=5, steps=6, methods=["vanilla"], layers=2)
    np.testing.assert_allclose(again.spearman["vanilla"], report.spearman["vanilla"][:2], atol=1e-6)


def test_bad_sanity_requests(client, repository):
    with pytest.raises(InvalidArgument, match=r"methods: unknown \['smooth'\]"):
        client.sanity_check("tiny", X, methods=["smooth"])
    with pytest.raises(InvalidArgument, match="layers: must be >= 0"):
        client.sanity_check("tiny", X, layers=-1)
    with pytest.raises(NotFound, match="cam_layer: unknown layer 'nope'"):
        client.sanity_check("tiny", X, cam_layer="nope")
    strict = start(repository, max_forward_passes=50)
    try:
        with Client(strict.address, timeout=30) as c:
            with pytest.raises(ResourceExhausted, match="layers: 95 forward passes is over the limit of 50"):
                c.sanity_check("tiny", X)  # (4 layers + 1) x (1 + 16 + 1 + 1)
    finally:
        strict.stop(0)


def test_saliency_segmentation_is_grabcut_seeded_by_the_map(client, chelsea):
    import cv2

    from convscope_server.gradient.segmentation import seed_mask

    got = client.saliency("efficientnet_lite0", chelsea, method="smoothgrad", samples=8, segment=True, render=True)
    assert got.mask.shape == (224, 224) and 0.05 < got.mask.mean() < 0.95 and got.mask_png
    # The same seeds handed to OpenCV directly give the same mask.
    from PIL import Image

    image = np.asarray(Image.fromarray(chelsea).resize((224, 224), Image.BILINEAR))
    mask = seed_mask(got.map)
    bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), mask, None, bgd, fgd, 5, cv2.GC_INIT_WITH_MASK)
    expected = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    assert (got.mask == expected).mean() > 0.99  # the server's image is the model input, de-normalised


@pytest.mark.parametrize("rule", ["guided", "deconvnet"])
def test_backprop_of_one_neuron_and_on_nhwc(client, rule):
    from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop

    native = tiny_net(captum_relu6=True)
    method = client.guided_backprop if rule == "guided" else client.deconvnet
    got = method("tiny", X, layer="/conv3/Conv_output_0", channel=2, neuron=(3, 5))
    neuron = (NeuronGuidedBackprop if rule == "guided" else NeuronDeconvolution)(native, native.conv3)
    close(got.attribution, neuron.attribute(_t(X), neuron_selector=(2, 3, 5))[0].numpy())
    x_nhwc = np.ascontiguousarray(X.transpose(1, 2, 0))
    close(method("tiny_nhwc", x_nhwc, target=5).attribution, method("tiny", X, target=5).attribution.transpose(1, 2, 0))
    with pytest.raises(InvalidArgument, match="row: 8 is outside '/conv3/Conv_output_0''s 0..7"):
        method("tiny", X, layer="/conv3/Conv_output_0", neuron=(8, 0))


def test_concurrent_gradient_requests_do_not_see_each_others_hooks(client):
    """One converted module serves every request: guided backprop's rules and Grad-CAM's captures are
    confined to their own request, so vanilla saliency running beside them is unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    references = {
        "vanilla": client.saliency("tiny", X, target=3).attribution,
        "guided": client.guided_backprop("tiny", X, target=3).attribution,
        "deconvnet": client.deconvnet("tiny", X, target=3).attribution,
        "gradcam": client.cam("tiny", X, target=3, layer="/conv3/Conv_output_0").map,
    }
    calls = {
        "vanilla": lambda: client.saliency("tiny", X, target=3).attribution,
        "guided": lambda: client.guided_backprop("tiny", X, target=3).attribution,
        "deconvnet": lambda: client.deconvnet("tiny", X, target=3).attribution,
        "gradcam": lambda: client.cam("tiny", X, target=3, layer="/conv3/Conv_output_0").map,
    }
    order = [name for _ in range(12) for name in calls]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: (name, calls[name]()), order))
    for name, value in results:
        np.testing.assert_allclose(value, references[name], rtol=1e-5, atol=1e-7, err_msg=name)
