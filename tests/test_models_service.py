"""ListModels, DescribeModel and Predict through the real server and client."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from conftest import png_bytes, reference_input
from tiny_models import HAND_RECEPTIVE_FIELDS, NUM_CLASSES, SIZE, tiny_net

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_list_models_reports_loaded_and_failed(client):
    models = {m.name: m for m in client.models()}
    assert {"efficientnet_lite0", "tiny", "tiny_nhwc", "tiny_fixed_batch"} <= set(models)
    assert models["efficientnet_lite0"].ready and models["efficientnet_lite0"].num_classes == 1000
    assert models["efficientnet_lite0"].execution_provider == "CPUExecutionProvider"
    for broken in ("truncated", "symlink_outside", "external_outside"):
        assert not models[broken].ready and models[broken].error


def test_default_model_classifies_chelsea_and_coffee(client, chelsea, coffee):
    cat, espresso = client.predict("efficientnet_lite0", [png_bytes(chelsea), png_bytes(coffee)], top=5)
    assert cat[0].index in CAT_CLASSES and cat[0].label in {"tabby", "tiger cat", "Persian cat", "Siamese cat",
                                                            "Egyptian cat"}
    assert espresso[0].index == ESPRESSO and espresso[0].label == "espresso"
    assert espresso[0].probability > 0.5
    assert [s.probability for s in cat] == sorted((s.probability for s in cat), reverse=True)


def test_image_forms_agree(client, chelsea):
    """Encoded PNG, uint8 array and PIL image go through the same preprocessing."""
    as_png = client.predict("efficientnet_lite0", png_bytes(chelsea), top=3)
    as_array = client.predict("efficientnet_lite0", chelsea, top=3)
    as_pil = client.predict("efficientnet_lite0", Image.fromarray(chelsea), top=3)
    assert [s.index for s in as_png] == [s.index for s in as_array] == [s.index for s in as_pil]
    np.testing.assert_allclose([s.logit for s in as_png], [s.logit for s in as_array], rtol=1e-6)


@pytest.mark.parametrize("kind", ["grey16", "rgb16", "rgba", "palette", "grey8"])
def test_image_files_in_other_modes_read_as_opencv_reads_them(client, chelsea, tmp_path, kind):
    """16-bit grey / RGB PNGs, RGBA, palette and 8-bit grey files give the pixels OpenCV's imread gives
    (IMREAD_COLOR: the top 8 bits of 16, alpha dropped, grey repeated): the same prediction as sending
    those pixels. Pillow's own convert would clip a 16-bit grey image to white."""
    import cv2

    path = tmp_path / f"{kind}.png"
    grey = chelsea.mean(axis=2)
    if kind == "grey16":
        cv2.imwrite(str(path), (grey * 257).astype(np.uint16))
    elif kind == "rgb16":
        cv2.imwrite(str(path), (chelsea[..., ::-1].astype(np.uint16) * 257 + 100))
    elif kind == "rgba":
        alpha = np.linspace(0, 255, chelsea.shape[1]).astype(np.uint8)[None, :].repeat(chelsea.shape[0], 0)
        Image.fromarray(np.dstack([chelsea, alpha])).save(path)
    elif kind == "palette":
        Image.fromarray(chelsea).quantize(64).save(path)
    else:
        Image.fromarray(grey.astype(np.uint8)).save(path)
    expected = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert expected.std() > 10   # a real picture, not a flat one
    from_file = client.predict("efficientnet_lite0", path, top=5)
    from_pixels = client.predict("efficientnet_lite0", expected, top=5)
    assert [s.index for s in from_file] == [s.index for s in from_pixels]
    np.testing.assert_allclose([s.logit for s in from_file], [s.logit for s in from_pixels], rtol=1e-5, atol=1e-5)


def test_a_float_tiff_in_zero_to_one_is_scaled_to_pixels(client, chelsea, tmp_path):
    grey = chelsea.mean(axis=2).astype(np.uint8)
    Image.fromarray((grey / 255.0).astype(np.float32), "F").save(tmp_path / "grey.tiff")
    from_file = client.predict("efficientnet_lite0", tmp_path / "grey.tiff", top=5)
    from_pixels = client.predict("efficientnet_lite0", np.repeat(grey[..., None], 3, axis=2), top=5)
    np.testing.assert_allclose([s.logit for s in from_file], [s.logit for s in from_pixels], rtol=1e-5, atol=1e-5)


def test_float32_input_is_used_unchanged_and_matches_onnxruntime(client, repository, chelsea):
    x = reference_input(chelsea)
    session = ort.InferenceSession(str(repository / "efficientnet_lite0" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x[None]})[0][0]
    got = client.predict("efficientnet_lite0", x, top=5)
    np.testing.assert_allclose([s.logit for s in got], expected[[s.index for s in got]], rtol=1e-5, atol=1e-5)
    assert [s.index for s in got] == list(np.argsort(-expected)[:5])
    # ... and the server's own preprocessing of the pixels is that same documented preprocessing.
    from_pixels = client.predict("efficientnet_lite0", chelsea, top=5)
    np.testing.assert_allclose([s.logit for s in from_pixels], [s.logit for s in got], rtol=1e-4, atol=1e-4)


def test_batch_predictions_equal_single_ones(client, chelsea, coffee):
    batch = client.predict("efficientnet_lite0", [chelsea, coffee, chelsea], top=3)
    single = [client.predict("efficientnet_lite0", image, top=3) for image in (chelsea, coffee, chelsea)]
    for many, one in zip(batch, single):
        assert [s.index for s in many] == [s.index for s in one]
        np.testing.assert_allclose([s.logit for s in many], [s.logit for s in one], rtol=1e-4, atol=1e-4)


def _torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_fixed_batch_model_is_looped_not_widened(client):
    """tiny_fixed_batch's graph holds a constant Reshape to [1, -1]: three images must give three
    independent, correct answers (computed here by the native torch model, one image at a time)."""
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    got = client.predict("tiny_fixed_batch", list(xs), top=NUM_CLASSES)
    native = tiny_net(fixed_batch=True)
    for x, scores in zip(xs, got):
        expected = _torch_logits(native, x[None])[0]
        order = sorted(scores, key=lambda s: s.index)
        np.testing.assert_allclose([s.logit for s in order], expected, rtol=1e-4, atol=1e-5)
    assert client.describe("tiny_fixed_batch").fixed_batch == 1
    assert client.describe("tiny").fixed_batch == 0


def test_nhwc_model_predicts_like_its_nchw_twin(client):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, SIZE, SIZE)).astype(np.float32)
    nchw = client.predict("tiny", x, top=NUM_CLASSES)
    nhwc = client.predict("tiny_nhwc", np.ascontiguousarray(x.transpose(1, 2, 0)), top=NUM_CLASSES)
    assert [s.index for s in nchw] == [s.index for s in nhwc]
    np.testing.assert_allclose([s.logit for s in nchw], [s.logit for s in nhwc], rtol=1e-4, atol=1e-5)
    expected = _torch_logits(tiny_net(), x[None])[0]
    np.testing.assert_allclose(sorted(s.logit for s in nchw), np.sort(expected), rtol=1e-4, atol=1e-5)


def test_nhwc_pixels_are_preprocessed_into_the_nhwc_layout(client, chelsea):
    """tiny_nhwc has no config.toml: layout NHWC and ImageNet mean/std are guessed, and uint8 pixels are
    laid out as H x W x C for it (checked against the same preprocessing written out here)."""
    d = client.describe("tiny_nhwc")
    assert d.preprocessing["layout"] == "NHWC" and "input.layout" in d.guessed
    resized = np.asarray(Image.fromarray(chelsea).resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255.0
    x = (resized - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    from_pixels = client.predict("tiny_nhwc", chelsea, top=NUM_CLASSES)
    from_array = client.predict("tiny_nhwc", x.astype(np.float32), top=NUM_CLASSES)
    assert [s.index for s in from_pixels] == [s.index for s in from_array]
    np.testing.assert_allclose([s.logit for s in from_pixels], [s.logit for s in from_array], rtol=1e-4, atol=1e-5)


def test_labels_and_top_k(client):
    x = np.zeros((3, SIZE, SIZE), np.float32)
    scores = client.predict("tiny", x, top=NUM_CLASSES)
    assert len(scores) == NUM_CLASSES
    assert {s.label for s in scores} == {f"thing {i}" for i in range(NUM_CLASSES)}
    unlabelled = client.predict("tiny_fixed_batch", x, top=2)
    assert unlabelled[0].label == f"class {unlabelled[0].index}"


def test_describe_default_model(client):
    d = client.describe("efficientnet_lite0")
    assert d.inputs[0]["shape"] == [-1, 3, 224, 224] and d.inputs[0]["dim_names"][0] == "batch"
    assert d.logits_output == "logits" and d.num_classes == 1000 and d.fixed_batch == 0
    assert d.preprocessing["mean"] == [0.5, 0.5, 0.5] and d.preprocessing["resize"] == "stretch"
    assert d.guessed == []
    convs = [layer for layer in d.layers if layer.op_type == "Conv"]
    assert len(convs) == 49
    stem = d.layer("/_conv_stem/Conv_output_0")
    assert stem.weight_shape == (32, 3, 3, 3) and stem.shape == (-1, 32, 112, 112) and stem.layout == "NCHW"
    # By hand, TF "same" padding puts the stride-2 stem's extra row at the bottom (pads [0, 0, 1, 1]):
    # unit 0 sees pixels 0..2, centre 1; the next unit is 2 pixels on.
    assert stem.receptive_field.size == (3, 3) and stem.receptive_field.jump == (2, 2)
    assert stem.receptive_field.start == (1.0, 1.0)
    # Block 0's 3x3 depthwise conv (stride 1, pad 1) on top: 3 + 2*2 = 7, centre unchanged.
    dw0 = d.layer("/_blocks.0/_depthwise_conv/Conv_output_0").receptive_field
    assert (dw0.size, dw0.jump, dw0.start) == ((7, 7), (2, 2), (1.0, 1.0))
    # Block 1's stride-2 depthwise (pads [0, 0, 1, 1]): 7 + 2*2 = 11, jump 4, centre 1 + (1 - 0)*2 = 3.
    dw1 = d.layer("/_blocks.1/_depthwise_conv/Conv_output_0").receptive_field
    assert (dw1.size, dw1.jump, dw1.start) == ((11, 11), (4, 4), (3.0, 3.0))
    head = d.layer("/_conv_head/Conv_output_0")
    assert head.receptive_field.jump == (32, 32) and head.shape == (-1, 1280, 7, 7)
    fc = d.layer("logits")
    assert fc.op_type == "Gemm" and fc.weight_shape == (1000, 1280) and not fc.spatial
    assert fc.receptive_field is None


@pytest.mark.parametrize("model", ["tiny", "tiny_nhwc", "tiny_fixed_batch"])
def test_receptive_fields_of_tiny_models_by_hand(client, model):
    d = client.describe(model)
    for name, (size, jump, start) in HAND_RECEPTIVE_FIELDS.items():
        rf = d.layer(name).receptive_field
        assert (rf.size, rf.jump, rf.start) == ((size, size), (jump, jump), (start, start)), name
    assert not d.layer("/GlobalAveragePool_output_0").spatial


def test_describe_nhwc_input_layout(client):
    d = client.describe("tiny_nhwc")
    source = d.layer("input")
    assert source.layout == "NHWC" and source.shape == (-1, SIZE, SIZE, 3)
    transposed = d.layer("/Transpose_output_0")
    assert transposed.layout == "NCHW" and transposed.receptive_field.size == (1, 1)
    assert d.preprocessing["height"] == SIZE and "input.mean" in d.guessed


def test_describe_every_node_output_is_listed(client, repository):
    import onnx

    proto = onnx.load(str(repository / "tiny" / "model.onnx"))
    expected = {out for node in proto.graph.node if node.op_type != "Constant" for out in node.output}
    names = {layer.name for layer in client.describe("tiny").layers}
    assert expected <= names and "input" in names


def test_describe_selected_layers_by_tensor_or_node_name(client):
    full = client.describe("efficientnet_lite0")
    conv = next(layer for layer in full.layers if layer.op_type == "Conv" and layer.node_name != layer.name)
    some = client.describe("efficientnet_lite0", layers=["logits", conv.node_name])
    assert [layer.name for layer in some.layers] == ["logits", conv.name]
