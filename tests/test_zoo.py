"""Real architectures (tests/zoo.py: torchvision families exported by the TorchScript exporter at opsets 17
and 11 and by the dynamo exporter at opset 20, and NHWC / uint8 graphs shaped like TensorFlow exports)
through the real server and client: what must work on any CNN people deploy (issue 11).

References run on the native torch modules: Predict against the native module itself; gradients against
Captum and pytorch-grad-cam on the native architecture holding the file's weights (``ZooEntry.reference``:
the exporter's folded batch-norms fused, conv weights taken from the file), because a ReLU or max-pool
within float noise of a threshold otherwise moves the gradient by up to ~2e-2 (benchmarks/zoo_matrix.py
prints both numbers). Maps are compared at 1e-3 (relative to the largest reference value; CAMs, both
min-max scaled, absolute).

Failures known today are marked ``xfail(strict=True)`` with the issue item: a fix turns them into
failures, and the mark goes.
"""

from __future__ import annotations

import numpy as np
import pytest

import zoo
from convscope import Client, FailedPrecondition
from conftest import png_bytes, start

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # onnx2pytorch's

ENTRIES = [f"{family}_{exporter}{opset}" for family, exporter, opset in zoo.exports()]
TOLERANCE = 1e-3

# (test, entry) -> reason, for what fails today.
KNOWN: dict[tuple[str, str], str] = {}


def cases(test: str, names=None) -> list:
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(test, name)]))
            if (test, name) in KNOWN else name for name in (ENTRIES if names is None else names)]


def family(name: str) -> str:
    return name.rsplit("_", 1)[0]


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return root, {entry.name: entry for entry in zoo.build_zoo(root)}


@pytest.fixture(scope="module")
def zoo_server(zoo_root):
    # Conversions run while the forward tests do; every module is kept (the tests visit each model thrice).
    running = start(zoo_root[0], gradient_warmup=True, max_gradient_models=len(ENTRIES))
    yield running
    running.stop(0)


@pytest.fixture()
def zoo_client(zoo_server):
    with Client(zoo_server.address, timeout=120) as c:
        yield c


@pytest.fixture()
def entries(zoo_root):
    return zoo_root[1]


def close(ours, reference, rtol=TOLERANCE):
    """Relative difference <= rtol, measured against the largest reference value."""
    reference = np.asarray(reference)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def native_target(entry, x) -> int:
    return int(np.argmax(zoo.native_logits(entry, x)))


def test_every_model_loads(zoo_client):
    summaries = {m.name: m for m in zoo_client.models()}
    assert sorted(summaries) == sorted(ENTRIES)
    assert {name: m.error for name, m in summaries.items() if not m.ready} == {}


@pytest.mark.parametrize("name", cases("predict"))
def test_predicts_the_native_top1(zoo_client, entries, chelsea, name):
    """The top-1 class of the native module (or one within 1e-4 of it: random weights make near-ties),
    and the top-5 logits within 1e-4 of the native ones, relative to the largest."""
    entry = entries[name]
    x = entry.sample(chelsea)
    logits = zoo.native_logits(entry, x)
    scale = np.abs(logits).max()
    top = zoo_client.predict(name, x, top=5)
    assert top[0].index in np.flatnonzero(logits >= logits.max() - 1e-4 * scale)
    np.testing.assert_allclose([s.logit for s in top], logits[[s.index for s in top]], atol=1e-4 * scale)


@pytest.mark.parametrize("name", cases("bridge"))
def test_gradient_bridge_converts_and_passes_its_probe(zoo_client, entries, chelsea, name):
    x = entries[name].sample(chelsea)
    try:
        zoo_client.saliency(name, x)  # waits for (or runs) the conversion
    except FailedPrecondition:
        pass
    gradient = zoo_client.describe(name, layers=[entries[name].tensors["early"]]).gradient
    assert (gradient["state"], gradient["reason"]) == ("ready", "")
    assert gradient["probe_difference"] <= gradient["tolerance"]


@pytest.mark.parametrize("name", cases("saliency"))
def test_vanilla_saliency_equals_captum(zoo_client, entries, chelsea, name):
    entry = entries[name]
    x = entry.sample(chelsea)
    target = native_target(entry, x)
    got = zoo_client.saliency(name, x, target=target)
    close(got.attribution, zoo.captum_saliency(entry, x, target))


GRAD_CAM = [f"{name}:{role}" for name in ENTRIES for role in ("last_block", "concat")
            if role in zoo.FAMILIES[family(name)].layers
            and not (role == "concat" and zoo.FAMILIES[family(name)].layers["last_block"]
                     == zoo.FAMILIES[family(name)].layers["concat"])]  # GoogLeNet, Inception: one tensor


@pytest.mark.parametrize("case", cases("grad_cam", GRAD_CAM))
def test_grad_cam_equals_pytorch_grad_cam(zoo_client, entries, chelsea, case):
    """At the last block (the tensor the global pooling reads; a Concat in GoogLeNet and Inception v3) and
    at the last Concat (DenseNet, SqueezeNet, ShuffleNet)."""
    name, role = case.split(":")
    entry = entries[name]
    x = entry.sample(chelsea)
    target = native_target(entry, x)
    got = zoo_client.cam(name, x, target=target, layer=entry.tensors[role], method="gradcam")
    expected = zoo.grad_cam_reference(entry, x, target, role)
    assert got.map.shape == expected.shape
    assert np.abs(got.map - expected).max() <= TOLERANCE


# CAM needs global average pooling followed by a linear head; MobileNet v3 (linear, HardSwish, linear) and
# SqueezeNet (a conv classifier before the pooling) have none, and CAM rightly refuses them.
CAM = [name for name in ENTRIES if zoo.FAMILIES[family(name)].cam_head]


@pytest.mark.parametrize("name", cases("cam", CAM))
def test_cam_equals_its_reference(zoo_client, entries, chelsea, name):
    """CAM (forward-only, weights from the graph) against pytorch-grad-cam's Grad-CAM at the pooled tensor,
    which it equals for linear heads, and against the LayerNorm-head decomposition for ConvNeXt (issue 11
    item 4: the head reads a Transpose-fed LayerNorm)."""
    entry = entries[name]
    x = entry.sample(chelsea)
    target = native_target(entry, x)
    got = zoo_client.cam(name, x, target=target, method="cam")
    expected = zoo.cam_reference(entry, x, target)
    assert got.map.shape == expected.shape
    assert np.abs(got.map - expected).max() <= TOLERANCE


def _perturbed(x: np.ndarray, layout: str, row: int, col: int) -> np.ndarray:
    """``x`` with one pixel (all channels) moved far: +5 in normalised units, or inverted for uint8."""
    y = x.copy()
    index = (slice(None), row, col) if layout == "NCHW" else (row, col, slice(None))
    y[index] = 255 - y[index] if y.dtype == np.uint8 else y[index] + 5.0
    return y


@pytest.mark.parametrize("name", cases("receptive_fields"))
def test_receptive_fields_contain_every_pixel_that_changes_a_unit(zoo_client, entries, chelsea, name):
    """Brute force: move one input pixel at a time (a corner, the middle, the other corner) and see which
    units of a few tensors change (Activations on onnxruntime). The unit's window from Describe must
    contain every pixel that changes it; the field is an upper bound, so this is the direction tested.
    Tensors fed by a global pooling (squeeze-and-excitation gates) may have no field; every other spatial
    tensor must have one, and Describe's layout must be the one the graph's Transposes give."""
    entry = entries[name]
    roles = {}
    for role in ("early", "mid", "concat", "last_block", "channels_last"):
        if role in entry.tensors and entry.tensors[role] not in roles.values():
            roles[role] = entry.tensors[role]
    described = zoo_client.describe(name, layers=list(roles.values()))
    x = entry.sample(chelsea)
    size = entry.size
    pixels = [(0, 0), (size // 2, size // 3), (size - 1, size - 1)]
    batch = [x] + [_perturbed(x, entry.layout, r, c) for r, c in pixels]
    values = {tensor: a.values for tensor, a in zoo_client.activations(name, batch, list(roles.values())).items()}
    for role, tensor in roles.items():
        layer = described.layer(tensor)
        layout = entry.layouts[role]
        assert layer.layout == layout, f"{role} {tensor}: layout {layer.layout!r}, the graph says {layout}"
        field = layer.receptive_field
        if field is None:
            assert role in entry.whole_image, f"{role} {tensor}: no receptive field"
            continue
        channel_axis = 0 if layout == "NCHW" else 2  # of one sample
        clean = values[tensor][0]
        for k, (row, col) in enumerate(pixels, start=1):
            delta = np.abs(values[tensor][k] - clean).max(axis=channel_axis)
            changed = np.argwhere(delta > 1e-5 * max(np.abs(clean).max(), 1e-12))
            if role == "early" and k == 2:  # (a corner may be cropped off by unpadded strided convs)
                assert len(changed), f"{tensor}: moving pixel {(row, col)} changed nothing"
            for i, j in changed:
                top = field.start[0] + i * field.jump[0] - (field.size[0] - 1) / 2
                left = field.start[1] + j * field.jump[1] - (field.size[1] - 1) / 2
                assert top <= row <= top + field.size[0] - 1 and left <= col <= left + field.size[1] - 1, (
                    f"{role} {tensor} unit ({i}, {j}): window rows {top}..{top + field.size[0] - 1}, cols "
                    f"{left}..{left + field.size[1] - 1} ({field}) misses pixel {(row, col)}, which changes it")


CHANNELS_LAST = [name for name in ENTRIES if family(name) in ("convnext", "tf_nhwc", "uint8_nhwc")]


@pytest.mark.parametrize("name", cases("channels_last", CHANNELS_LAST))
def test_channels_last_activations_are_read_on_the_last_axis(zoo_client, entries, chelsea, name):
    """ConvNeXt's blocks and TF-style heads work on (N, H, W, C) tensors: Activations reports them NHWC
    and its per-channel statistics run over the last axis."""
    entry = entries[name]
    tensor = entry.tensors["channels_last"]
    got = zoo_client.activations(name, entry.sample(chelsea), [tensor])[tensor]
    assert got.layout == "NHWC"
    channels = got.values.shape[-1]
    np.testing.assert_allclose(got.stats["mean"], got.values.reshape(-1, channels).mean(axis=0), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(got.stats["max"], got.values.reshape(-1, channels).max(axis=0), rtol=1e-6)


@pytest.mark.parametrize("name", cases("channels_last_patches", CHANNELS_LAST))
def test_top_patches_of_a_channels_last_tensor_rank_its_last_axis(zoo_client, entries, chelsea, coffee, name):
    """Top patches of an (N, H, W, C) tensor: each channel's best value over the scan is that channel's
    maximum on the last axis, found by brute force over Activations of the same images."""
    from skimage import data

    entry = entries[name]
    tensor = entry.tensors["channels_last"]
    images = [entry.sample(pixels) for pixels in (chelsea, coffee, data.astronaut(), chelsea[:, ::-1].copy())]
    values = np.stack([zoo_client.activations(name, x, [tensor])[tensor].values[0] for x in images])
    channels = [0, values.shape[-1] // 2, values.shape[-1] - 1]
    found = zoo_client.top_patches(name, tensor, images, k=2, channels=channels)
    assert found.images == len(images)
    for channel in channels:
        per_image = values[..., channel].reshape(len(images), -1).max(axis=1)
        best = np.sort(per_image)[::-1][:2]
        np.testing.assert_allclose([hit.value for hit in found.channels[channel]], best, rtol=1e-5, atol=1e-6)
        top_hit = found.channels[channel][0]
        assert values[top_hit.index, top_hit.row, top_hit.col, channel] == pytest.approx(best[0], rel=1e-5)


@pytest.mark.parametrize("name, op", [("convnext_legacy17", "Erf"), ("convnext_legacy11", "Sqrt")])
def test_exported_gelus_and_layer_norms_run_fused_and_stay_capturable(zoo_server, zoo_client, entries, chelsea,
                                                                      name, op):
    """The TorchScript exporter writes ConvNeXt's GELU as Div / Erf / Add / Mul / Mul and, at opset 11, its
    LayerNorm as ReduceMean / Sub / Pow / ReduceMean / Add / Sqrt / Div; the forward plan runs torch's fused
    gelu and layer_norm there (the same functions) unless one of those tensors is hooked, and a hooked
    intermediate (the Erf or Sqrt output) still holds the value onnxruntime computes."""
    import torch

    from convscope_server.gradient.bridge import _Fused

    torch_model = zoo_server.bridges.get(zoo_server.repository.get(name))
    ops = [node.op_type for step in torch_model.plan.steps if isinstance(step[0], _Fused)
           for node in torch_model.module.onnx_model.graph.node
           if torch_model.module.mapping.get(node.output[0]) == step[0].steps[-1][0]]
    assert ops and set(ops) <= {"Mul", "Div"}, "no exported GELU / LayerNorm was fused"
    x = torch.from_numpy(entries[name].sample(chelsea)[None])
    with torch.no_grad():
        np.testing.assert_allclose(torch_model.logits(x).numpy(), torch_model.module(x).numpy(), rtol=1e-5,
                                   atol=1e-5)
    tensor = next(node.output[0] for node in torch_model.module.onnx_model.graph.node if node.op_type == op)
    with torch.no_grad(), torch_model.capture([tensor]) as store:
        torch_model.logits(x)
    expected = zoo_client.activations(name, entries[name].sample(chelsea), [tensor])[tensor].values
    np.testing.assert_allclose(store[tensor].numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["convnext_dynamo20", "efficientnet_b0_legacy17", "googlenet_legacy11",
                                  "uint8_nhwc_legacy17"])
def test_an_audit_runs_every_section(zoo_client, chelsea, name):
    """The audit on architectures unlike the default model (LayerNorm and GELU, a Swish stem, Inception
    concatenations, a channels-last uint8 graph): every section, feature visualisations of every sampled
    channel, Grad-CAM of the worst images, and first-layer filters where the stem reads the image."""
    rng = np.random.default_rng(3)
    images = [(f"{label}/{n}.png", png_bytes(np.roll(chelsea, int(rng.integers(0, 100)), axis=1)), label)
              for n, label in enumerate(["1", "2"] * 4)]
    zoo_client.run_audit(f"zoo-{name}", name, images, overwrite=True, unit_layers=2, attribution_images=1,
                         curve_steps=2, robustness_images=2, epsilons=[0.0, 0.01], methods=["vanilla", "gradcam"],
                         feature_steps=2, worst_images=2)
    report = zoo_client.audit(f"zoo-{name}")
    assert set(report["faithfulness"]["methods"]) == {"vanilla", "gradcam", "random"}
    pages = [card for layer in report["units"].values() for card in layer.get("pages", [])]
    assert len(report["units"]) == 2 and pages and all("feature_png" in card for card in pages)
    assert [bool(w.get("cam_label_png")) for w in report["classes"]["worst"][:2]] == [True, True]
    assert any("filter_png" in card for card in pages) == (not name.startswith("convnext"))  # a LayerNorm stem
    assert report["robustness"]["fgsm"]["accuracy"] and report["randomisation"]["correlations"]
