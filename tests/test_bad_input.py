"""Every malformed request gets a clear error naming the field, with the right status; the server lives on."""

from __future__ import annotations

import numpy as np
import pytest

from convscope import (Client, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                       Unauthenticated)
from convscope.tensors import to_tensor
from convscope.v1 import model_pb2, tensor_pb2
from conftest import png_bytes, start

MODEL = "efficientnet_lite0"


@pytest.fixture(autouse=True)
def server_still_serves(client, chelsea):
    yield
    assert client.predict(MODEL, chelsea, top=1)[0].index in {281, 282, 283, 284, 285}


def test_unknown_model_suggests_close_names(client, chelsea):
    with pytest.raises(NotFound, match=r"model: unknown model 'efficientnet_lite'.*'efficientnet_lite0'"):
        client.predict("efficientnet_lite", chelsea)
    with pytest.raises(NotFound, match="model: unknown model 'nope'"):
        client.describe("nope")


def test_missing_model_name(client, chelsea):
    with pytest.raises(InvalidArgument, match="model: required"):
        client.predict("", chelsea)


def test_unknown_layer_suggests_close_names(client):
    with pytest.raises(NotFound, match=r"layers\[1\]: unknown layer '/_conv_stem/Conv'.*'/_conv_stem/Conv_output_0'"):
        client.describe(MODEL, layers=["logits", "/_conv_stem/Conv"])


def test_corrupt_image_bytes(client):
    with pytest.raises(InvalidArgument, match=r"images\[1\]\.encoded: cannot decode image"):
        client.predict(MODEL, [png_bytes(np.zeros((8, 8, 3), np.uint8)), b"\x89PNG\r\n\x1a\n not really"])
    truncated = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[:200]
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.encoded: cannot decode image"):
        client.predict(MODEL, truncated)
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.encoded: empty image bytes"):
        client.predict(MODEL, b"")


def test_wrong_tensor_shape(client):
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.array: .*shape \[3, 224, 224\].*got \[3, 100, 100\]"):
        client.predict(MODEL, np.zeros((3, 100, 100), np.float32))
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.array: uint8 pixels must be HxW or HxWxC"):
        client.predict(MODEL, np.zeros((4, 4, 5), np.uint8))


def test_wrong_tensor_dtype_and_bytes(client):
    stub_request = model_pb2.PredictRequest(model=MODEL, images=[tensor_pb2.Image(array=to_tensor(
        np.zeros((3, 224, 224), np.int32)))])
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.array: datatype INT32 is not accepted"):
        client._call(client._models.Predict, stub_request)
    bad_bytes = tensor_pb2.Tensor(datatype="FP32", shape=[3, 224, 224], raw_data=b"\0" * 12)
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.array: raw_data has 12 bytes but shape"):
        client._call(client._models.Predict, model_pb2.PredictRequest(model=MODEL, images=[
            tensor_pb2.Image(array=bad_bytes)]))
    unknown = tensor_pb2.Tensor(datatype="FLOAT", shape=[1], raw_data=b"\0" * 4)
    with pytest.raises(InvalidArgument, match=r"unknown datatype 'FLOAT'"):
        client._call(client._models.Predict, model_pb2.PredictRequest(model=MODEL, images=[
            tensor_pb2.Image(array=unknown)]))
    with pytest.raises(InvalidArgument, match=r"images\[0\]: no image given"):
        client._call(client._models.Predict, model_pb2.PredictRequest(model=MODEL, images=[tensor_pb2.Image()]))
    with pytest.raises(InvalidArgument, match="NaN"):
        client.predict(MODEL, np.full((3, 224, 224), np.nan, np.float32))


def test_no_images_and_bad_top_k(client, chelsea):
    with pytest.raises(InvalidArgument, match="images: at least one image"):
        client.predict(MODEL, [])
    with pytest.raises(InvalidArgument, match="top_k: 1001 is more than the model's 1000 classes"):
        client.predict(MODEL, chelsea, top=1001)
    with pytest.raises(InvalidArgument, match="top_k: must be positive"):
        client.predict(MODEL, chelsea, top=-1)


@pytest.mark.parametrize("model", ["truncated", "external_outside", "symlink_outside"])
def test_unloadable_models_answer_failed_precondition(client, model, chelsea):
    reasons = {"truncated": "not a valid ONNX file", "external_outside": "outside the model folder: refused",
               "symlink_outside": "resolves outside the model folder: refused"}
    with pytest.raises(FailedPrecondition, match=reasons[model]):
        client.predict(model, chelsea)
    with pytest.raises(FailedPrecondition, match=reasons[model]):
        client.describe(model)


@pytest.fixture(scope="module")
def strict_server(repository):
    running = start(repository, max_message_bytes=1 << 20, max_batch=2, max_image_pixels=100_000)
    yield running
    running.stop(0)


def test_limits(strict_server, chelsea):
    with Client(strict_server.address, timeout=30) as strict:
        big = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)  # 1.9 MB message
        with pytest.raises(ResourceExhausted):
            strict.predict(MODEL, big)
        with pytest.raises(ResourceExhausted, match=r"images: 3 images is over the limit of 2"):
            strict.predict(MODEL, [chelsea[:10, :10]] * 3)
        with pytest.raises(ResourceExhausted, match=r"images\[0\]\.encoded: image is 451x300 = 135300 pixels"):
            strict.predict(MODEL, png_bytes(chelsea))
        with pytest.raises(ResourceExhausted, match=r"images\[0\]\.array: image is 451x300 pixels"):
            strict.predict(MODEL, chelsea)
        assert strict.predict(MODEL, chelsea[:200, :200], top=1)  # and it keeps serving


def test_token_is_required_when_configured(repository, chelsea):
    secured = start(repository, token="s3cret")
    try:
        with Client(secured.address, timeout=30) as anonymous:
            with pytest.raises(Unauthenticated, match="missing authorization"):
                anonymous.models()
        with Client(secured.address, token="wrong", timeout=30) as wrong:
            with pytest.raises(Unauthenticated, match="invalid token"):
                wrong.models()
        with Client(secured.address, token="s3cret", timeout=30) as good:
            assert any(m.name == MODEL for m in good.models())
    finally:
        secured.stop(0)


# -- numeric fields: NaN, infinities and out-of-range values answer INVALID_ARGUMENT naming the field ------
# (issue 12: each of these answered INTERNAL, or OK with NaN results)

NAN, HUGE = float("nan"), 3.4e38
TINY_X = np.random.default_rng(0).normal(0, 0.5, (3, 32, 32)).astype(np.float32)


def _stream(client, method, request):
    return client._stream(method, request)


def _synthesis_cases(c):
    from convscope.v1 import synthesis_pb2 as s

    image = tensor_pb2.Image(array=to_tensor(TINY_X))
    layer = "/conv3/Conv_output_0"

    def opt(**kw):
        return s.Optimization(steps=2, **kw)

    return [
        ("optimization.learning_rate", c._synthesis.Invert, s.InvertRequest(
            model="tiny", image=image, layers=[layer], optimization=opt(learning_rate=NAN))),
        ("optimization.learning_rate", c._synthesis.Invert, s.InvertRequest(
            model="tiny", image=image, layers=[layer], optimization=opt(learning_rate=HUGE))),
        ("optimization.learning_rate", c._synthesis.Style, s.StyleRequest(
            model="tiny", style=image, style_layers=[layer], optimization=opt(learning_rate=NAN))),
        ("optimization.learning_rate", c._synthesis.Style, s.StyleRequest(
            model="tiny", style=image, style_layers=[layer], optimization=opt(learning_rate=HUGE))),
        ("style_weight", c._synthesis.Style, s.StyleRequest(
            model="tiny", style=image, style_layers=[layer], style_weight=NAN, optimization=opt())),
        ("optimization.learning_rate", c._synthesis.Visualize, s.VisualizeRequest(
            model="tiny", target=1, optimization=opt(learning_rate=NAN))),
        *[("blur_sigma", c._synthesis.Visualize, s.VisualizeRequest(
            model="tiny", target=1, blur_every=1, blur_sigma=sigma, optimization=opt())) for sigma in (NAN, 1e30, 100)],
        ("octaves", c._synthesis.DeepDream, s.DeepDreamRequest(
            model="efficientnet_lite0", image=tensor_pb2.Image(encoded=png_bytes(np.zeros((224, 224, 3), np.uint8))),
            layer="/_blocks.15/_project_conv/Conv_output_0", octaves=8, octave_scale=4, optimization=opt())),
    ]


def _other_cases(c):
    from convscope.v1 import attribution_pb2 as a
    from convscope.v1 import inspect_pb2 as i

    image = tensor_pb2.Image(array=to_tensor(TINY_X))
    return [
        *[("blur_sigma", c._inspect.Occlusion, i.OcclusionRequest(
            model="tiny", image=image, baseline=i.BASELINE_BLUR, blur_sigma=sigma)) for sigma in (NAN, 1e30, 100)],
        ("constant", c._inspect.Occlusion, i.OcclusionRequest(model="tiny", image=image, constant=NAN)),
        ("baseline", c._attribution.Saliency, a.SaliencyRequest(
            model="tiny", image=image, method=a.SALIENCY_INTEGRATED_GRADIENTS, baseline=NAN)),
        ("noise", c._attribution.Saliency, a.SaliencyRequest(
            model="tiny", image=image, method=a.SALIENCY_SMOOTHGRAD, noise=NAN)),
    ]


@pytest.mark.parametrize("index", range(10))
def test_bad_numbers_in_synthesis(client, index):
    field, method, request = _synthesis_cases(client)[index]
    with pytest.raises(InvalidArgument, match=rf"^INVALID_ARGUMENT: {field}: "):
        _stream(client, method, request)


@pytest.mark.parametrize("index", range(6))
def test_bad_numbers_in_inspection_and_attribution(client, index):
    field, method, request = _other_cases(client)[index]
    with pytest.raises(InvalidArgument, match=rf"^INVALID_ARGUMENT: {field}: "):
        _stream(client, method, request)


def test_smoothgrad_with_a_billion_samples_is_refused_before_any_work(client):
    with pytest.raises(ResourceExhausted, match=r"samples: 1000000000 forward passes is over the limit"):
        client.saliency("tiny", TINY_X, method="smoothgrad", samples=10**9)


@pytest.mark.parametrize("shape,data", [([100], 100), ([], 1), ([2**32, 2**32], 0), ([2**62, 4], 0),
                                        ([0, 5], 0), ([2, 2, 2, 2], 16)])
def test_uint8_arrays_of_wrong_shape(client, shape, data):
    image = tensor_pb2.Image(array=tensor_pb2.Tensor(datatype="UINT8", shape=shape, raw_data=b"\1" * data))
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.array: "):
        client._call(client._models.Predict, model_pb2.PredictRequest(model="tiny", images=[image]))


def test_float_inputs_too_large_are_refused(client):
    with pytest.raises(InvalidArgument, match=r"images\[0\]\.array: values must be within"):
        client.predict("tiny", np.full((3, 32, 32), 1e30, np.float32))


def test_bad_streamed_items_become_item_errors(client):
    from convscope.v1 import dataset_pb2 as d

    good = tensor_pb2.Image(encoded=png_bytes(np.zeros((32, 32, 3), np.uint8)))
    bad = [tensor_pb2.Image(array=tensor_pb2.Tensor(datatype="UINT8", shape=shape, raw_data=b"\1" * n))
           for shape, n in (([100], 100), ([], 1), ([2**32, 2**32], 0), ([2**62, 4], 0))]
    spec = d.TopPatchesSpec(model="tiny", layer="/conv3/Conv_output_0", k=2)
    requests = [d.TopPatchesRequest(spec=spec)] + [
        d.TopPatchesRequest(item=d.DatasetItem(id=f"i{n}", image=image)) for n, image in enumerate([good, *bad, good])]
    errors = []
    result = client._stream(client._dataset.TopPatches, iter(requests), item_error=errors.append)
    assert result.images == 2 and result.skipped == 4   # images read; the 4 unreadable are skipped
    assert [e.id for e in errors] == ["i1", "i2", "i3", "i4"]
    assert all("image.array" in e.reason for e in errors)


@pytest.fixture(scope="module")
def tiny_gallery(server):
    name = "bad-input-gallery"
    with Client(server.address, timeout=60) as c:
        c.build_gallery(name, "tiny", dataset="demo", overwrite=True)
        yield name
        c.delete_gallery(name)


@pytest.mark.parametrize("field,kwargs", [("seed", {"seed": -1}), ("perplexity", {"perplexity": NAN}),
                                          ("perplexity", {"perplexity": 1e-30})])
def test_bad_embedding_numbers(client, tiny_gallery, field, kwargs):
    from convscope.v1 import dataset_pb2 as d

    with pytest.raises(InvalidArgument, match=rf"^INVALID_ARGUMENT: {field}: "):
        client._stream(client._dataset.Embed, d.EmbedRequest(gallery=tiny_gallery, iterations=50, **kwargs))
