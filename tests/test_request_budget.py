"""Memory per request (issue 12): estimated from the request before any work and refused over the budget
with RESOURCE_EXHAUSTED naming the number; repeated layers count once; memory is handed back afterwards."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from PIL import Image

from convscope import Client, ResourceExhausted
from convscope.v1 import inspect_pb2, tensor_pb2
from convscope_server import memory
from conftest import png_bytes, start

MODEL = "efficientnet_lite0"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def one_bit_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def budget_client(repository):
    running = start(repository, max_job_seconds=3.0)
    with Client(running.address, timeout=120) as c:
        yield c
    running.stop(0)


def test_a_layer_repeated_200_times_is_computed_once(budget_client):
    layer = "/_conv_stem/Conv_output_0"
    tiny_png = png_bytes(np.zeros((1, 1, 3), np.uint8))
    before = rss_bytes()
    request = inspect_pb2.ActivationsRequest(model=MODEL, images=[tensor_pb2.Image(encoded=tiny_png)],
                                             layers=[layer] * 200)
    got = budget_client._call(budget_client._inspect.Activations, request)
    assert [entry.layer for entry in got.layers] == [layer]
    assert rss_bytes() - before < 200 << 20  # was +2.87 GB: 200 copies of a 4.8 MB tensor and their bytes


def test_a_response_over_the_message_limit_is_refused_before_the_run(budget_client, chelsea):
    layers = [layer.name for layer in budget_client.describe(MODEL).layers]
    start_time, before = time.monotonic(), rss_bytes()
    with pytest.raises(ResourceExhausted) as refused:
        budget_client.activations(MODEL, [chelsea] * 16, layers)
    message = str(refused.value)
    assert re.search(r"layers: the values of \d+ layers for 16 images would be [\d,]+ bytes \(\d+ MiB\), over the "
                     r"message limit of 67,108,864 bytes", message), message
    assert time.monotonic() - start_time < 5 and rss_bytes() - before < 100 << 20


def test_a_huge_integrated_gradients_path_is_refused_before_allocating(budget_client, chelsea):
    before = rss_bytes()
    with pytest.raises(ResourceExhausted, match=r"steps: a path of 1000 images and their gradients needs about "
                                                r"1,148 MiB.*over the per-request memory budget of 1,024 MiB"):
        budget_client.saliency(MODEL, chelsea, method="integrated_gradients", steps=1000)
    with pytest.raises(ResourceExhausted, match=r"steps: 5000 is over the limit of 1000"):
        budget_client.saliency(MODEL, chelsea, method="integrated_gradients", steps=5000)
    assert rss_bytes() - before < 100 << 20


def test_a_huge_smoothgrad_is_refused_or_stopped_without_holding_its_noise(budget_client):
    x = np.zeros((3, 32, 32), np.float32)
    with pytest.raises(ResourceExhausted, match=r"samples: 1000000000 forward passes is over the limit"):
        budget_client.saliency("tiny", x, method="smoothgrad", samples=10**9)
    # 20,000 samples (the pass limit) of the default model: noise drawn per chunk of 16, never all at once
    # (was 20000 x 602 KB = 12 GB before the job started); stopped by --max-job-seconds 3
    sample = np.zeros((3, 224, 224), np.float32)
    budget_client.saliency(MODEL, sample, target=1)  # converts the model first
    before, started = rss_bytes(), time.monotonic()
    with pytest.raises(ResourceExhausted, match=r"ran past the server's limit"):
        budget_client.saliency(MODEL, sample, target=1, method="smoothgrad", samples=20_000)
    assert time.monotonic() - started < 10
    assert rss_bytes() - before < 300 << 20


def test_decoded_pixels_are_budgeted_from_the_header(budget_client):
    big = one_bit_png(6000, 6000)  # 36 M pixels in a few KB
    assert len(big) < 100_000
    assert budget_client.predict("tiny", big, top=1)
    with pytest.raises(ResourceExhausted, match=r"images\[1\]\.encoded: decoding 6000x6000 brings this request to "
                                                r"72,000,000 decoded pixels, over the per-request limit of 48,000,000"):
        budget_client.predict("tiny", [big, big], top=1)


def test_budget_and_trim_units():
    budget = memory.Budget(limit=100 << 20)
    budget.add(60 << 20, "a", "sixty")
    with pytest.raises(Exception, match=r"b: forty-one needs about 41 MiB, so this request would hold about 101 MiB"):
        budget.add(41 << 20, "b", "forty-one")
    assert memory.trim() in (True, False)  # glibc: True
