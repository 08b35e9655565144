"""A seeded fuzz of every RPC: valid requests mutated at random (numbers NaN / infinite / huge / negative,
unknown enum values, empty and huge strings, random bytes as images, tensors of wrong datatype or shape),
sent to a real in-process server on the tiny models. No answer may be INTERNAL or UNKNOWN, and the server
still answers Predict afterwards.

Bounded: a fixed seed and count, small limits on the fuzz server (forward passes, steps, job seconds), so
it takes about a minute on 2 cores.
"""

from __future__ import annotations

import collections
import math
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from convscope import Client
from convscope.tensors import to_tensor
from convscope.v1 import (attribution_pb2 as a, audit_pb2 as au, dataset_pb2 as d, inspect_pb2 as i, model_pb2 as m,
                          synthesis_pb2 as s, tensor_pb2 as t)
from conftest import png_bytes, start

SEED = int(os.environ.get("CONVSCOPE_FUZZ_SEED", "20261122"))  # another seed explores other requests
REQUESTS = int(os.environ.get("CONVSCOPE_FUZZ_REQUESTS", "3000"))
MODELS = ["tiny", "tiny", "tiny", "tiny_nhwc", "tiny_fixed_batch", "tiny_contrib_op", "truncated", "nope", ""]
LAYERS = ["/conv1/Conv_output_0", "/conv2/Conv_output_0", "/conv3/Conv_output_0", "/Add_output_0",
          "/pool/MaxPool_output_0", "/relu1/Relu_output_0", "logits", "input", "/conv1/Conv", "nope", ""]
GALLERY = "fuzz"
BAD = "fuzz"                    # a stand-in for "make this field bad"


def _tiny_image(rng) -> t.Image:
    kind = rng.integers(4)
    if kind == 0:
        return t.Image(array=to_tensor(rng.normal(0, 0.5, (3, 32, 32)).astype(np.float32)))
    if kind == 1:
        return t.Image(array=to_tensor(rng.integers(0, 256, (int(rng.integers(1, 48)), int(rng.integers(1, 48)), 3),
                                                    dtype=np.uint8)))
    return t.Image(encoded=png_bytes(rng.integers(0, 256, (int(rng.integers(1, 64)), int(rng.integers(1, 64)), 3),
                                                  dtype=np.uint8)))


def _base_requests(rng):
    """One valid request per RPC: (name, kind, builder) where builder(rng) -> message (or list for streams)."""
    img = lambda: _tiny_image(rng)  # noqa: E731
    opt = lambda: s.Optimization(steps=2)  # noqa: E731
    item = lambda n: d.DatasetItem(id=f"item{n}", image=img(), label="x")  # noqa: E731
    return {
        "ListModels": lambda: m.ListModelsRequest(),
        "DescribeModel": lambda: m.DescribeModelRequest(model="tiny", layers=["/conv1/Conv_output_0"]),
        "Predict": lambda: m.PredictRequest(model="tiny", images=[img(), img()], top_k=3),
        "Filters": lambda: i.FiltersRequest(model="tiny", layer="/conv1/Conv_output_0", render=True),
        "Activations": lambda: i.ActivationsRequest(model="tiny", images=[img()], layers=["/conv2/Conv_output_0"],
                                                    render=True),
        "DeadFilters": lambda: i.DeadFiltersRequest(model="tiny", images=[img()]),
        "Occlusion": lambda: i.OcclusionRequest(model="tiny", image=img(), window_h=16, render=True),
        "ScoreCam": lambda: i.ScoreCamRequest(model="tiny", image=img(), layer="/conv3/Conv_output_0"),
        "Saliency": lambda: a.SaliencyRequest(model="tiny", image=img(), method=int(rng.integers(3)), samples=3,
                                              steps=4),
        "GuidedBackprop": lambda: a.GuidedBackpropRequest(model="tiny", image=img(), layer="/conv3/Conv_output_0",
                                                          channel=2),
        "GradCam": lambda: a.GradCamRequest(model="tiny", image=img(), layer="/conv3/Conv_output_0",
                                            method=int(rng.integers(4))),
        "SanityCheck": lambda: a.SanityCheckRequest(model="tiny", image=img(), layers=1, steps=2,
                                                    methods=["vanilla"]),
        "Visualize": lambda: s.VisualizeRequest(model="tiny", target=1, blur_every=1, jitter=2, optimization=opt()),
        "Invert": lambda: s.InvertRequest(model="tiny", image=img(), layers=["/conv2/Conv_output_0"],
                                          optimization=opt()),
        "DeepDream": lambda: s.DeepDreamRequest(model="tiny", image=img(), layer="/conv3/Conv_output_0", octaves=2,
                                                optimization=opt()),
        "Style": lambda: s.StyleRequest(model="tiny", style=img(), content=img(), style_layers=["/conv1/Conv_output_0"],
                                        content_layer="/conv3/Conv_output_0", optimization=opt()),
        "Adversarial": lambda: s.AdversarialRequest(model="tiny", image=img(), method=int(rng.integers(2)), target=3,
                                                    optimization=opt()),
        "Robustness": lambda: s.RobustnessRequest(model="tiny", images=[img(), img()], epsilons=[0.0, 0.01]),
        "ListDatasets": lambda: d.ListDatasetsRequest(),
        "TopPatches": lambda: [d.TopPatchesRequest(spec=d.TopPatchesSpec(
            model="tiny", layer="/conv3/Conv_output_0", k=2, render=True, patches=True,
            source=d.ImageSource(dataset="" if rng.integers(2) else "demo", limit=4)))]
            + [d.TopPatchesRequest(item=item(n)) for n in range(3)],
        "BuildGallery": lambda: [d.BuildGalleryRequest(spec=d.GallerySpec(
            name=f"fuzz-{rng.integers(3)}", model="tiny", overwrite=True,
            source=d.ImageSource(dataset="" if rng.integers(2) else "demo", limit=4)))]
            + [d.BuildGalleryRequest(item=item(n)) for n in range(3)],
        "ListGalleries": lambda: d.ListGalleriesRequest(),
        "DeleteGallery": lambda: d.DeleteGalleryRequest(name=f"fuzz-{rng.integers(3)}"),
        "NearestNeighbors": lambda: d.NearestNeighborsRequest(gallery=GALLERY, image=img(), k=2, render=True),
        "Embed": lambda: d.EmbedRequest(gallery=GALLERY, method=int(rng.integers(2)), iterations=50, render=True,
                                        grid_size=3),
        "RunAudit": lambda: [au.AuditRequest(spec=au.AuditSpec(
            name=f"fuzz-{rng.integers(3)}", model="tiny", overwrite=True,
            source=d.ImageSource(dataset="" if rng.integers(2) else "demo", limit=4),
            budget=au.AuditBudget(unit_layers=1, attribution_images=1, curve_steps=2, robustness_images=2,
                                  epsilons=[0.0, 0.01], methods=["vanilla", "occlusion"]),
            label_map={"x": au.LabelClasses(classes=[1])}))]
            + [au.AuditRequest(item=item(n)) for n in range(3)],
        "ListAudits": lambda: au.ListAuditsRequest(),
        "GetAudit": lambda: au.GetAuditRequest(name=f"fuzz-{rng.integers(3)}"),
        "DeleteAudit": lambda: au.DeleteAuditRequest(name=f"fuzz-{rng.integers(3)}"),
    }


def _random_number(rng, field):
    floats = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-30, 1e30, 100.0, 0.5,
              float(rng.normal(0, 10)), float(rng.uniform(0, 1))]
    ints = [0, 1, -1, 2, 3, 8, 100, 255, 2**31 - 1, -(2**31), 10**9, int(rng.integers(-50, 50))]
    if field.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return floats[rng.integers(len(floats))]
    value = ints[rng.integers(len(ints))]
    if field.type in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        value = [value, 2**63 - 1, -(2**63), 2**40][rng.integers(4)]
    if field.type in (FD.TYPE_UINT64, FD.TYPE_UINT32, FD.TYPE_FIXED64):
        value = abs(value) if field.type != FD.TYPE_UINT32 else abs(value) % 2**32
        value = [value, 2**64 - 1][rng.integers(2)] if field.type == FD.TYPE_UINT64 else value
    return value


def _random_string(rng) -> str:
    choices = ["", "x" * int(rng.integers(1, 5000)), "../../etc/passwd", "/abs", "ünïcødé \u0000 nul", "demo",
               "demo/cat", GALLERY, "lbfgs", "adam", "vanilla", "gradcam", "integrated_gradients", "%s%n",
               *MODELS, *LAYERS]
    return choices[rng.integers(len(choices))]


def _random_tensor(rng) -> t.Tensor:
    dtypes = ["UINT8", "FP32", "FP16", "INT64", "BOOL", "FP64", "FLOAT", ""]
    shapes = [[], [100], [0], [0, 5], [3, 32, 32], [1, 3, 32, 32], [32, 32, 3], [32, 32, 3, 1], [2**32, 2**32],
              [2**62, 4], [-1, 3], [5, 5, 2], [1, 1], [2**31, 2**31, 1]]
    dtype = dtypes[rng.integers(len(dtypes))]
    shape = shapes[rng.integers(len(shapes))]
    size = 1
    for dim in shape:
        size *= max(dim, 0)
    itemsize = {"UINT8": 1, "BOOL": 1, "FP16": 2, "FP32": 4, "INT64": 8, "FP64": 8}.get(dtype, 4)
    nbytes = size * itemsize if size * itemsize < 1 << 16 and rng.integers(4) else int(rng.integers(0, 64))
    raw = rng.bytes(nbytes)
    if dtype == "FP32" and rng.integers(2):
        raw = np.full(nbytes // 4, [math.nan, math.inf, 1e30, 1.0][rng.integers(4)], np.float32).tobytes()
    return t.Tensor(datatype=dtype, shape=shape, raw_data=raw)


def _random_bytes(rng) -> bytes:
    good = png_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    choices = [b"", rng.bytes(int(rng.integers(1, 2000))), good[: int(rng.integers(1, len(good)))],
               b"\x89PNG\r\n\x1a\n" + rng.bytes(64), b"GIF89a" + rng.bytes(32), b"\xff\xd8\xff" + rng.bytes(100),
               _one_bit_png(int(rng.integers(1, 2000)), int(rng.integers(1, 2000)))]
    return choices[rng.integers(len(choices))]


def _one_bit_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _fields(message):
    """Every (message, field) reachable from ``message`` (into set sub-messages and repeated ones)."""
    found = []
    for field in message.DESCRIPTOR.fields:
        found.append((message, field))
        if field.type == FD.TYPE_MESSAGE:
            value = getattr(message, field.name)
            if field.message_type.GetOptions().map_entry:  # a map: its message values (keys: see _mutate)
                for key in value:
                    if not isinstance(value[key], (str, int, float, bool, bytes)):
                        found += _fields(value[key])
            elif field.is_repeated:
                for element in value:
                    found += _fields(element)
            elif message.HasField(field.name):
                found += _fields(value)
    return found


def _mutate(rng, message) -> None:
    fields = _fields(message)
    if not fields:  # ListModels, ListDatasets, ListGalleries: nothing to change
        return
    owner, field = fields[rng.integers(len(fields))]
    if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        container = getattr(owner, field.name)
        if rng.integers(2):
            container.clear()
        else:  # AuditSpec.label_map: a random label mapped to random classes
            container[_random_string(rng)].classes.extend(int(rng.integers(-5, 2000)) for _ in range(2))
        return
    if field.type == FD.TYPE_MESSAGE:
        if field.message_type.name == "Tensor":
            value = _random_tensor(rng)
        elif field.message_type.name == "Image":
            value = (t.Image(encoded=_random_bytes(rng)) if rng.integers(2) else t.Image(array=_random_tensor(rng)))
        else:
            value = None
        if field.is_repeated:
            container = getattr(owner, field.name)
            if value is not None and rng.integers(2):
                container.add().CopyFrom(value)
            else:
                del container[:]
        elif value is not None:
            getattr(owner, field.name).CopyFrom(value)
        else:
            owner.ClearField(field.name)
        return
    if field.type == FD.TYPE_STRING:
        make = lambda: _random_string(rng)  # noqa: E731
    elif field.type == FD.TYPE_BYTES:
        make = lambda: _random_bytes(rng)  # noqa: E731
    elif field.type == FD.TYPE_BOOL:
        make = lambda: bool(rng.integers(2))  # noqa: E731
    elif field.type == FD.TYPE_ENUM:
        make = lambda: int(rng.choice([0, 1, 2, 3, 4, -1, 99, 2**31 - 1]))  # noqa: E731
    else:
        make = lambda: _random_number(rng, field)  # noqa: E731
    if field.is_repeated:
        container = getattr(owner, field.name)
        if rng.integers(3):
            container.extend(make() for _ in range(int(rng.choice([1, 2, 3, 200]))))
        else:
            del container[:]
    else:
        setattr(owner, field.name, make())


def _requests(seed: int, count: int):
    rng = np.random.default_rng(seed)
    builders = _base_requests(rng)
    names = sorted(builders)
    made = []
    for _ in range(count):
        name = names[rng.integers(len(names))]
        request = builders[name]()
        messages = request if isinstance(request, list) else [request]
        for _ in range(int(rng.integers(1, 4))):
            target = messages[0] if rng.integers(3) else messages[rng.integers(len(messages))]
            _mutate(rng, target)
        made.append((name, request))
    return made


STUBS = {"ListModels": "_models", "DescribeModel": "_models", "Predict": "_models", "Filters": "_inspect",
         "Activations": "_inspect", "DeadFilters": "_inspect", "Occlusion": "_inspect", "ScoreCam": "_inspect",
         "Saliency": "_attribution", "GuidedBackprop": "_attribution", "GradCam": "_attribution",
         "SanityCheck": "_attribution"}


AUDIT_RPCS = ("RunAudit", "ListAudits", "GetAudit", "DeleteAudit")


def _send(client: Client, name: str, request) -> grpc.StatusCode:
    if name in AUDIT_RPCS:
        from convscope.v1 import audit_pb2_grpc

        stub = audit_pb2_grpc.AuditServiceStub(client._channel)
    else:
        stub = getattr(client, STUBS.get(name, "_synthesis" if name in (
            "Visualize", "Invert", "DeepDream", "Style", "Adversarial", "Robustness") else "_dataset"))
    method = getattr(stub, name)
    try:
        answer = method(iter(request) if isinstance(request, list) else request, timeout=30)
        if not hasattr(answer, "ByteSize"):  # a stream: read it to the end
            for _ in answer:
                pass
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details()


@pytest.fixture(scope="module")
def fuzz_server(repository, data_root, tmp_path_factory):
    running = start(repository, data_root=data_root, gallery_root=tmp_path_factory.mktemp("fuzz-galleries"),
                    max_forward_passes=64, max_steps=6, max_job_seconds=3.0, max_batch=4, max_image_pixels=4_000_000,
                    max_scan_images=8, max_top_k=4, max_embed_points=64, max_message_bytes=4 << 20,
                    gradient_warmup=True)
    with Client(running.address, timeout=60) as c:
        c.build_gallery(GALLERY, "tiny", dataset="demo", limit=8)
    yield running
    running.stop(0)


def test_fuzz_every_rpc_never_answers_internal(fuzz_server):
    requests = _requests(SEED, REQUESTS)
    assert len({name for name, _ in requests}) == 29  # every RPC of the six services
    codes = collections.Counter()
    failures = []
    with Client(fuzz_server.address, timeout=30) as client:
        with ThreadPoolExecutor(4) as pool:
            for (name, request), answer in zip(requests, pool.map(lambda r: _send(client, *r), requests)):
                code, details = answer
                codes[code.name] += 1
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    failures.append(f"{name}: {code.name}: {details}\n{request}"[:2000])
        assert not failures, f"{len(failures)} of {len(requests)} answered INTERNAL/UNKNOWN:\n" + "\n".join(failures[:5])
        assert codes["OK"] > 100 and codes["INVALID_ARGUMENT"] > 100, codes
        assert client.predict("tiny", np.zeros((3, 32, 32), np.float32), top=1)  # still serving
