"""The precision policy (exact float32 by default, TF32 on request, per model), how it reaches both
backends, the torch module's state in Describe, and shape-stable onnxruntime runs. GPU-only checks are at
the end and skip on machines without CUDA."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from convscope import Client
from conftest import ROOT, start
from tiny_models import SIZE, export, tiny_net
from convscope_server.config import ServerConfig
from convscope_server.app import create_server
from convscope_server.gradient.bridge import PROBE_TOLERANCE, PrecisionGate, tf32_allowed
from convscope_server.onnx import session as sessions

CUDA = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def precision_repository(tmp_path_factory):
    """tiny (server default), tiny_tf32 ([runtime] precision = "tf32"), tiny_bad (an unknown precision)."""
    root = tmp_path_factory.mktemp("precision") / "models"
    for name, runtime in (("tiny", None), ("tiny_tf32", "tf32"), ("tiny_exact", "exact"), ("tiny_bad", "fast")):
        folder = root / name
        folder.mkdir(parents=True)
        export(tiny_net(), folder / "model.onnx")
        if runtime:
            (folder / "config.toml").write_text(f'[runtime]\nprecision = "{runtime}"\n')
    return root


def test_describe_reports_precision_per_model_and_the_server_default(precision_repository):
    for default in ("exact", "tf32"):
        server = start(precision_repository, precision=default)
        try:
            with Client(server.address) as client:
                assert client.describe("tiny").precision == default
                assert client.describe("tiny_tf32").precision == "tf32"
                assert client.describe("tiny_exact").precision == "exact"
                bad = {m.name: m for m in client.models()}["tiny_bad"]
                assert not bad.ready and "precision" in bad.error and "'fast'" in bad.error
        finally:
            server.stop(0)


def test_an_unknown_server_precision_is_refused_at_start(precision_repository):
    with pytest.raises(ValueError, match="precision"):
        create_server(ServerConfig(host="127.0.0.1", port=0, repository=precision_repository, precision="fp8"))
    done = subprocess.run([sys.executable, "-m", "convscope_server.app", "--precision", "fp8", "--repository",
                           str(precision_repository)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "--precision" in done.stderr and "exact" in done.stderr


def test_describe_follows_the_torch_module_from_queued_to_ready(precision_repository):
    server = start(precision_repository, gradient_warmup=False)
    try:
        with Client(server.address) as client:
            path = client.describe("tiny").gradient
            assert path["state"] == "not converted" and path["tolerance"] == PROBE_TOLERANCE["exact"]
            client.saliency("tiny", np.zeros((3, SIZE, SIZE), np.float32), target=1)
            path = client.describe("tiny").gradient
            assert path["state"] == "ready" and path["device"] == ("cuda:0" if CUDA else "cpu")
            assert 0 <= path["probe_difference"] <= path["tolerance"]
            tf32 = client.describe("tiny_tf32").gradient
            assert tf32["tolerance"] == PROBE_TOLERANCE["tf32"]
    finally:
        server.stop(0)


def test_warmup_converts_every_model_in_the_background(precision_repository):
    server = start(precision_repository, gradient_warmup=True)
    try:
        with Client(server.address) as client:
            deadline = time.monotonic() + 120
            states = {}
            while time.monotonic() < deadline:
                states = {name: client.describe(name).gradient["state"] for name in ("tiny", "tiny_tf32")}
                if set(states.values()) == {"ready"}:
                    break
                assert set(states.values()) <= {"converting", "ready", "not converted"}
                time.sleep(0.1)
            assert set(states.values()) == {"ready"}
    finally:
        server.stop(0)


def test_converted_modules_beyond_the_limit_are_dropped_least_recently_used_first(precision_repository):
    server = start(precision_repository, max_gradient_models=1)
    x = np.zeros((3, SIZE, SIZE), np.float32)
    try:
        with Client(server.address) as client:
            first = client.saliency("tiny", x, target=1).attribution
            client.saliency("tiny_exact", x, target=1)
            assert client.describe("tiny").gradient["state"] == "not converted"
            assert client.describe("tiny_exact").gradient["state"] == "ready"
            np.testing.assert_array_equal(client.saliency("tiny", x, target=1).attribution, first)
            assert client.describe("tiny_exact").gradient["state"] == "not converted"
    finally:
        server.stop(0)


def test_precision_gate_holds_torch_switches_at_each_jobs_precision():
    """Jobs of one precision run together with TF32 set their way; a job of the other precision waits
    until they are done, then finds the switches set its own way."""
    gate = PrecisionGate()
    seen: list[tuple[str, bool]] = []
    exact_inside = threading.Event()
    release_exact = threading.Event()

    def exact_job():
        with gate.hold("exact"):
            seen.append(("exact", tf32_allowed()))
            exact_inside.set()
            release_exact.wait(10)

    def tf32_job():
        with gate.hold("tf32"):
            seen.append(("tf32", tf32_allowed()))

    first = threading.Thread(target=exact_job)
    first.start()
    assert exact_inside.wait(10)
    with gate.hold("exact"):  # same precision: enters while the first job runs
        assert not tf32_allowed()
    second = threading.Thread(target=tf32_job)
    second.start()
    time.sleep(0.2)
    assert [p for p, _ in seen] == ["exact"], "a tf32 job ran while an exact job held the switches"
    release_exact.set()
    first.join(10)
    second.join(10)
    assert seen == [("exact", False), ("tf32", True)]
    with gate.hold("exact"):
        assert not tf32_allowed()


def test_cuda_sessions_get_exact_float32_and_heuristic_algorithm_search(monkeypatch):
    """What onnxruntime is asked for on a CUDA build (the options are only read there)."""
    monkeypatch.setattr(sessions.ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    (cuda, options), cpu = sessions.providers_for(sessions.SessionSettings())
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert options == {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
    (_, options), _ = sessions.providers_for(sessions.SessionSettings(precision="tf32"))
    assert options["use_tf32"] == "1"
    assert sessions.providers_for(sessions.SessionSettings(device="cpu")) == ["CPUExecutionProvider"]


class RecordingSession:
    """A real onnxruntime session that remembers the batch size of each run."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def run(self, outputs, feeds):
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_stable_shapes_pad_runs_to_a_few_batch_sizes_and_drop_the_padding(tmp_path):
    export(tiny_net(), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    name, output = session.get_inputs()[0].name, session.get_outputs()[0].name
    x = np.random.default_rng(0).normal(size=(37, 3, SIZE, SIZE)).astype(np.float32)
    (expected,) = session.run([output], {name: x})
    for stable, sizes in ((False, [16, 16, 5]), (True, [16, 16, 8])):
        recording = RecordingSession(session)
        (got,) = sessions.run_batched(recording, name, x, [output], 0, 16, stable_shapes=stable)
        assert recording.sizes == sizes
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert [sessions.stable_size(n, 128) for n in (1, 2, 3, 5, 64, 65, 128)] == [1, 2, 4, 8, 64, 128, 128]


@pytest.mark.skipif(not CUDA, reason="needs CUDA (onnxruntime-gpu and torch with a GPU)")
def test_on_cuda_exact_precision_matches_the_cpu(server, chelsea_input, fused_lite0):
    """On a GPU, exact float32 on both backends: logits equal the CPU's within 1e-5 relative (TF32 would be
    ~1e-3 off) and saliency equals Captum's on the native model on the CPU within 1e-4."""
    from captum.attr import Saliency

    cpu = ort.InferenceSession(str(ROOT / "models/efficientnet_lite0/model.onnx"), providers=["CPUExecutionProvider"])
    (reference,) = cpu.run(None, {"input": chelsea_input[None]})
    with Client(server.address) as client:
        description = client.describe("efficientnet_lite0")
        assert description.execution_provider == "CUDAExecutionProvider" and description.precision == "exact"
        top = client.predict("efficientnet_lite0", chelsea_input, top=1)[0]
        assert abs(top.logit - reference[0].max()) <= 1e-5 * np.abs(reference).max()
        got = client.saliency("efficientnet_lite0", chelsea_input, target=285).attribution
        assert client.describe("efficientnet_lite0").gradient["device"].startswith("cuda")
    expected = Saliency(fused_lite0).attribute(torch.from_numpy(chelsea_input[None].copy()), target=285,
                                               abs=False)[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
