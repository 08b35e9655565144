"""Health, reflection, the stand-alone server process (SIGTERM), the CLI, and the stubs/packaging contract."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
from PIL import Image
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import ROOT, png_bytes

BIN = Path(sys.executable).parent


def test_health_overall_and_per_model(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def status(service):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        assert status("") == health_pb2.HealthCheckResponse.SERVING
        assert status("convscope.v1.ModelService") == health_pb2.HealthCheckResponse.SERVING
        assert status("model/efficientnet_lite0") == health_pb2.HealthCheckResponse.SERVING
        assert status("model/truncated") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            status("model/nope")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="convscope.v1.ModelService")]
        responses = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    services = {s.name for s in responses[0].list_services_response.service}
    assert {"convscope.v1.ModelService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert responses[1].file_descriptor_response.file_descriptor_proto  # clients in any language can discover


def _start_process(repository, *extra, stderr=None):
    process = subprocess.Popen([str(BIN / "convscope-server"), "--port", "0", "--host", "127.0.0.1",
                                "--repository", str(repository), "--log-level", "WARNING", *extra],
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
    line = process.stdout.readline()
    assert "listening on" in line, line
    return process, "127.0.0.1:" + line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]


def test_server_process_serves_and_stops_gracefully_on_sigterm(repository):
    process, address = _start_process(repository, "--grace-seconds", "5")
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_sigterm_during_streamed_jobs_stops_them_and_exits_cleanly(repository, chelsea):
    """An occlusion job on onnxruntime and a class visualisation on torch are running when SIGTERM comes:
    both are stopped between steps, the clients see the calls end, and the process exits 0 well within
    the grace period plus start-up work, without an abort from a thread still inside torch."""
    import threading
    import time

    from convscope import Client

    process, address = _start_process(repository, "--grace-seconds", "3", "--gradient-warmup", "false")
    started = {"occlusion": threading.Event(), "classvis": threading.Event()}
    ended = {}

    def run(name, call):
        def progress(*_):
            started[name].set()
        try:
            call(progress)
        except Exception as error:  # the server going away ends the call with an error
            ended[name] = error
        else:
            ended[name] = None

    try:
        with Client(address, timeout=120) as client:
            jobs = [threading.Thread(target=run, args=("occlusion", lambda p: client.occlusion(
                        "efficientnet_lite0", chelsea, window=4, stride=2, progress=p))),
                    threading.Thread(target=run, args=("classvis", lambda p: client.class_visualization(
                        "efficientnet_lite0", 130, steps=2000, progress=p)))]
            for job in jobs:
                job.start()
            for name, event in started.items():
                assert event.wait(120), f"{name} never reported progress"
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            stopped_after = time.monotonic() - signalled
            for job in jobs:
                job.join(30)
        assert set(ended) == {"occlusion", "classvis"}
        assert stopped_after < 3 + 15, f"the server took {stopped_after:.1f} s to stop"
    finally:
        if process.poll() is None:
            process.kill()


def _reflection_garbage(address, opened):
    """Two reflection streams left open: one sent garbage after a valid request, one sent a request and
    then nothing. Returns when the server ends them."""
    import threading

    from grpc_reflection.v1alpha import reflection_pb2

    hold = threading.Event()

    def requests(garbage):
        yield reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        if garbage:
            yield b"\xff\xff\xff\xff\x0f"
        opened.set()
        hold.wait(120)

    def one(garbage):
        with grpc.insecure_channel(address) as channel:
            call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            try:
                for _ in call(requests(garbage), timeout=120):
                    pass
            except grpc.RpcError:
                pass

    threads = [threading.Thread(target=one, args=(garbage,)) for garbage in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    hold.set()


@pytest.mark.parametrize("case", ["deepdream", "deepdream-no-grace", "scan", "reflection"])
def test_sigterm_exits_0_within_the_grace_period(repository, chelsea, tmp_path, case):
    """SIGTERM while a torch job (DeepDream, many steps), a streamed dataset scan on onnxruntime, or
    reflection streams holding garbage are open: the process exits 0 within grace + a few seconds and never
    aborts from a thread still inside torch or onnxruntime ("terminate called without an active exception").
    With a grace of 0 the job is still inside torch when the process exits."""
    import threading
    import time

    import numpy as np

    from convscope import Client

    # Jobs are stopped at SIGTERM, not after the grace period: with 20 s of grace they must end in far less.
    grace = {"deepdream": 20, "deepdream-no-grace": 0, "scan": 20, "reflection": 3}[case]
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        process, address = _start_process(repository, "--grace-seconds", str(grace), "--gradient-warmup", "false",
                                          "--max-steps", "200000", stderr=stderr)
    started = threading.Event()
    outcome = {}

    def progress(*_):
        started.set()

    def images():
        pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for _ in range(100_000):
            yield pixels

    def run():
        try:
            with Client(address, timeout=120) as client:
                if case.startswith("deepdream"):
                    client.deepdream("tiny", chelsea, "/conv3/Conv_output_0", steps=100_000, octaves=1,
                                     progress=progress)
                elif case == "scan":
                    client.top_patches("tiny", "/conv3/Conv_output_0", images(), k=4, progress=progress)
                else:
                    _reflection_garbage(address, started)
        except Exception as error:  # the server going away ends the call with an error
            outcome["error"] = error

    job = threading.Thread(target=run)
    try:
        job.start()
        waited = time.monotonic()
        while not started.wait(0.2) and "error" not in outcome and time.monotonic() - waited < 120:
            pass
        assert started.is_set(), f"{case} never started: {outcome.get('error')}"
        time.sleep(0.5)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        stopped_after = time.monotonic() - signalled
        job.join(30)
        errors = log.read_text()
        assert code == 0, (code, errors)
        assert "terminate called" not in errors and "Traceback" not in errors, errors
        assert stopped_after < min(grace, 3) + 6, f"the server took {stopped_after:.1f} s to stop (grace {grace} s)"
        assert not job.is_alive(), "the client call did not end"
        if case in ("deepdream", "scan"):  # the job was stopped and the call ended UNAVAILABLE ("shutting
            # down", or the transport's message when the process exited while the client was still sending)
            assert getattr(outcome.get("error"), "code", None) == grpc.StatusCode.UNAVAILABLE, outcome
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_models_describe_predict(server, tmp_path, chelsea, coffee):
    (tmp_path / "chelsea.png").write_bytes(png_bytes(chelsea))
    (tmp_path / "coffee.png").write_bytes(png_bytes(coffee))

    def cli(*args):
        return subprocess.run([str(BIN / "convscope"), "--server", server.address, *args],
                              capture_output=True, text=True, timeout=120)

    models = cli("models")
    assert models.returncode == 0 and "efficientnet_lite0" in models.stdout and "FAILED" in models.stdout
    describe = cli("describe", "efficientnet_lite0", "--op", "Conv")
    assert describe.returncode == 0
    assert "/_conv_stem/Conv_output_0" in describe.stdout and "49 of" in describe.stdout
    predict = cli("predict", "efficientnet_lite0", str(tmp_path / "chelsea.png"), str(tmp_path / "coffee.png"),
                  "--top", "3")
    assert predict.returncode == 0, predict.stderr
    assert "Egyptian cat" in predict.stdout and "espresso" in predict.stdout
    missing = cli("describe", "efficientnet_lite")
    assert missing.returncode == 3 and "NOT_FOUND" in missing.stderr and "efficientnet_lite0" in missing.stderr


def test_stubs_are_generated_from_protos(tmp_path):
    """clients/convscope/v1 must be exactly what scripts/gen_protos makes from protos/."""
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run([str(ROOT / "scripts" / "gen_protos"), str(tmp_path)], check=True, env=env)
    generated = sorted(p.name for p in (tmp_path / "convscope" / "v1").iterdir())
    committed = ROOT / "clients" / "convscope" / "v1"
    assert generated, "gen_protos produced nothing"
    stale = [name for name in generated
             if not (committed / name).exists() or not filecmp.cmp(tmp_path / "convscope" / "v1" / name,
                                                                    committed / name, shallow=False)]
    assert not stale, f"stale stubs, run scripts/gen_protos: {stale}"


def test_client_depends_on_grpc_protobuf_numpy_pillow_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "numpy", "pillow"}
    code = ("import sys, convscope, convscope.cli; heavy = {'torch', 'onnxruntime', 'onnx', 'convscope_server'}"
            " & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_picture_commands_write_pngs_and_a_page(server, tmp_path, chelsea):
    image = tmp_path / "chelsea.png"
    image.write_bytes(png_bytes(chelsea))

    def cli(*args):
        result = subprocess.run([str(BIN / "convscope"), "--server", server.address, *args],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    runs = {
        "filters": ["filters", "efficientnet_lite0", "/_conv_stem/Conv_output_0"],
        "activations": ["activations", "efficientnet_lite0", str(image), "--layer", "/_blocks.1/Clip_output_0"],
        "occlusion": ["occlusion", "efficientnet_lite0", str(image), "--window", "64", "--stride", "32"],
        "scorecam": ["scorecam", "tiny", str(image), "--layer", "/Add_output_0"],
        "saliency": ["saliency", "tiny", str(image), "--method", "integrated_gradients", "--steps", "8", "--segment"],
        "guided": ["guided", "tiny", str(image)],
        "deconvnet": ["deconvnet", "tiny", str(image), "--layer", "/conv3/Conv_output_0", "--channel", "1"],
        "cam": ["cam", "efficientnet_lite0", str(image), "--layer", "/Clip_1_output_0", "--method", "gradcam++"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        result = cli(*args, "--out", str(out))
        page = (out / "index.html").read_text()
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert pngs and all(p in page for p in pngs), name
        for png in pngs:
            assert Image.open(out / png).size[0] > 8
        if name == "occlusion":
            assert "Egyptian cat" in result.stdout and "occluding" in result.stderr  # the progress bar


def test_cli_synthesis_commands_write_pictures_gifs_and_a_page(server, tmp_path, chelsea):
    image = tmp_path / "chelsea.png"
    image.write_bytes(png_bytes(chelsea))
    runs = {
        "classvis": ["classvis", "tiny", "--target", "3", "--steps", "10"],
        "invert": ["invert", "tiny", str(image), "--layer", "/conv1/Conv_output_0", "--layer", "/Add_output_0",
                   "--steps", "10"],
        "deepdream": ["deepdream", "tiny", str(image), "--layer", "/conv3/Conv_output_0", "--steps", "4"],
        "style": ["style", "tiny", "--style", str(image), "--style-layer", "/conv1/Conv_output_0", "--steps", "5"],
        "adversarial": ["adversarial", "tiny", str(image), "--target", "2", "--steps", "20"],
    }
    for name, args in runs.items():
        out = tmp_path / name
        result = subprocess.run([str(BIN / "convscope"), "--server", server.address, *args, "--out", str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (name, result.stderr)
        page = (out / "index.html").read_text()
        pictures = sorted(p.name for p in out.iterdir() if p.suffix in (".png", ".gif"))
        assert pictures and all(p in page for p in pictures), name
        if name in ("classvis", "invert"):
            assert any(p.endswith(".gif") for p in pictures) and Image.open(next(out.glob("*.gif"))).n_frames > 1


def test_sighup_reloads_the_model_repository(tmp_path):
    """A folder added, one broken and one removed while the server runs: SIGHUP rescans the repository
    without a restart, and the models list and per-model health follow."""
    import shutil

    import numpy as np

    from convscope import Client
    from tiny_models import TINY_CONFIG, export, tiny_net

    root = tmp_path / "models"
    for name in ("a", "b"):
        export(tiny_net(), root / name / "model.onnx")
        (root / name / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    process, address = _start_process(root, "--grace-seconds", "2", "--gradient-warmup", "false")
    try:
        with Client(address) as client:
            assert {m.name: m.ready for m in client.models()} == {"a": True, "b": True}
            shutil.copytree(root / "a", root / "c")
            (root / "a" / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', "")
                                                    + '\n[runtime]\nprecision = "half"\n')
            shutil.rmtree(root / "b")
            process.send_signal(signal.SIGHUP)
            line = process.stdout.readline()
            assert "reloaded models" in line, line
            models = {m.name: m for m in client.models()}
            assert sorted(models) == ["a", "c"] and models["c"].ready and not models["a"].ready
            assert "precision" in models["a"].error
            with grpc.insecure_channel(address) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                assert check(health_pb2.HealthCheckRequest(service="model/c"), timeout=10).status == \
                    health_pb2.HealthCheckResponse.SERVING
                assert check(health_pb2.HealthCheckRequest(service="model/a"), timeout=10).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
            assert len(client.predict("c", np.zeros((3, 32, 32), np.float32), top=3)) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
