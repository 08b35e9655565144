"""Safe defaults: loopback bind, TLS and mutual TLS with the real client, tokens from a file or the
environment, authentication before anything else, malformed bodies answered INVALID_ARGUMENT without a
traceback, cancelled calls logged CANCELLED, and heavy-job admission."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import start
from convscope import Client, ConvscopeError
from convscope_server import config as config_module
from convscope_server.app import create_server
from convscope_server.config import ServerConfig

BIN = Path(sys.executable).parent
PIXELS = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
PREDICT = "/convscope.v1.ModelService/Predict"
GARBAGE = b"\xff\xff\xff\xff\x0f"  # not a protobuf message: a truncated varint of field 31


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A self-signed CA, a server certificate for localhost / 127.0.0.1 and a client certificate, made with
    the openssl command line (no network)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("tls")

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=convscope test CA")
    for name, extension in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def loaded(repository):
    """A loaded model repository shared by this module's servers (loading is the slow part of a start)."""
    first = start(repository)
    yield first.repository
    first.stop(0)


def serve(loaded, **settings):
    settings.setdefault("gradient_warmup", False)
    return create_server(ServerConfig(port=0, workers=4, grace_seconds=1.0, **settings), repository=loaded)


def predict_ok(client: Client) -> None:
    assert client.predict("tiny", PIXELS, top=1)[0].index >= 0


# -- defaults and flags ----------------------------------------------------------------------------------

def test_default_bind_is_loopback_and_host_can_be_overridden(monkeypatch):
    assert ServerConfig().host == "127.0.0.1"
    monkeypatch.delenv("CONVSCOPE_HOST", raising=False)
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    assert config_module.from_arguments(parser.parse_args([])).host == "127.0.0.1"
    assert config_module.from_arguments(parser.parse_args(["--host", "0.0.0.0"])).host == "0.0.0.0"
    monkeypatch.setenv("CONVSCOPE_HOST", "::1")
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    assert config_module.from_arguments(parser.parse_args([])).host == "::1"


def test_inconsistent_tls_flags_are_refused_at_start(tmp_path, certificates):
    cert, key, ca = (str(certificates[name]) for name in ("server.pem", "server.key", "ca.pem"))
    cases = [({"tls_cert": cert}, "--tls-cert needs --tls-key"),
             ({"tls_key": key}, "--tls-key needs --tls-cert"),
             ({"tls_client_ca": ca}, "--tls-client-ca needs --tls-cert"),
             ({"tls_cert": key, "tls_key": key}, "--tls-cert: .* is not a PEM certificate"),
             ({"tls_cert": cert, "tls_key": cert}, "--tls-key: .* is not a PEM private key"),
             ({"tls_cert": str(tmp_path / "missing.pem"), "tls_key": key}, "--tls-cert: cannot read"),
             ({"token": "a", "token_file": ca}, "--token-file: .* use one"),
             ({"token_file": str(tmp_path)}, "--token-file: cannot read")]
    for settings, expected in cases:
        # Checked before the repository is loaded: the missing repository is not what fails.
        settings = {k: (Path(v) if k != "token" else v) for k, v in settings.items()}
        with pytest.raises(ValueError, match=expected):
            create_server(ServerConfig(port=0, repository=tmp_path / "no-models", **settings))
    result = subprocess.run([str(BIN / "convscope-server"), "--port", "0", "--repository", str(tmp_path / "none"),
                             "--tls-cert", cert], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--tls-cert needs --tls-key" in result.stderr, result.stderr
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Client("localhost:1", tls=certificates["ca.pem"], tls_cert=certificates["client.pem"])


# -- TLS ---------------------------------------------------------------------------------------------

def test_tls_predict_with_the_ca_and_plaintext_is_refused(loaded, certificates):
    running = serve(loaded, tls_cert=certificates["server.pem"], tls_key=certificates["server.key"])
    try:
        assert running.tls == "on"
        with Client(f"localhost:{running.port}", tls=certificates["ca.pem"], timeout=30) as client:
            predict_ok(client)
        with Client(f"localhost:{running.port}", tls=certificates["ca.pem"].read_bytes(), timeout=30) as client:
            predict_ok(client)
        with Client(f"localhost:{running.port}", timeout=10) as client, pytest.raises(ConvscopeError) as error:
            client.models()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        # A server certificate the client does not trust (no CA given: system roots) is refused too.
        with Client(f"localhost:{running.port}", tls=True, timeout=10) as client, \
                pytest.raises(ConvscopeError) as error:
            client.models()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_mutual_tls_needs_a_client_certificate(loaded, certificates):
    running = serve(loaded, tls_cert=certificates["server.pem"], tls_key=certificates["server.key"],
                    tls_client_ca=certificates["ca.pem"])
    try:
        assert running.tls == "mutual"
        with Client(f"localhost:{running.port}", tls=certificates["ca.pem"], tls_cert=certificates["client.pem"],
                    tls_key=certificates["client.key"], timeout=30) as client:
            predict_ok(client)
        with Client(f"localhost:{running.port}", tls=certificates["ca.pem"], timeout=10) as client, \
                pytest.raises(ConvscopeError) as error:
            client.models()
        assert error.value.code == grpc.StatusCode.UNAVAILABLE
        # A certificate the client CA did not sign (the server's own key pair, self-signed by nobody) fails.
        with Client(f"localhost:{running.port}", tls=certificates["ca.pem"], tls_cert=certificates["ca.pem"],
                    tls_key=certificates["client.key"], timeout=10) as client, pytest.raises(ConvscopeError):
            client.models()
    finally:
        running.stop(0)


def test_cli_connects_with_mutual_tls_and_a_token_file(loaded, certificates, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-from-file\n")
    running = serve(loaded, tls_cert=certificates["server.pem"], tls_key=certificates["server.key"],
                    tls_client_ca=certificates["ca.pem"], token_file=token_file)
    try:
        common = [str(BIN / "convscope"), "--server", f"localhost:{running.port}", "--tls", str(certificates["ca.pem"])]
        result = subprocess.run([*common, "--tls-cert", str(certificates["client.pem"]), "--tls-key",
                                 str(certificates["client.key"]), "--token-file", str(token_file), "models"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "tiny" in result.stdout, result.stderr
        half = subprocess.run([*common, "--tls-cert", str(certificates["client.pem"]), "models"],
                              capture_output=True, text=True, timeout=60)
        assert half.returncode == 2 and "tls_key" in half.stderr, half.stderr
    finally:
        running.stop(0)


# -- tokens and what is logged --------------------------------------------------------------------------

def test_token_from_file_and_from_environment(loaded, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\nsecond line ignored\n")
    running = serve(loaded, token_file=token_file)
    try:
        with Client(running.address, token="from-file", timeout=30) as client:
            predict_ok(client)
        with Client(running.address, token="from-file-not", timeout=30) as client, \
                pytest.raises(ConvscopeError) as error:
            client.models()
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(0)

    monkeypatch.setenv("CONVSCOPE_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    config = config_module.from_arguments(parser.parse_args(["--port", "0", "--workers", "4"]))
    config.gradient_warmup = False
    running = create_server(config, repository=loaded)
    try:
        with Client(f"localhost:{running.port}", token="from-env", timeout=30) as client:
            predict_ok(client)
        with Client(f"localhost:{running.port}", timeout=30) as client, pytest.raises(ConvscopeError) as error:
            client.models()
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(0)


def _records_of(caplog, method: str):
    return [r for r in caplog.records if method in r.getMessage() or r.exc_info]


def test_wrong_token_is_refused_before_anything_else_is_logged(loaded, caplog):
    running = serve(loaded, token="right")
    try:
        with grpc.insecure_channel(running.address) as channel:
            for metadata in ((("authorization", "Bearer wrong"),), ()):
                for body in (GARBAGE, b""):  # the body is never parsed for an unauthenticated call
                    caplog.clear()
                    with caplog.at_level(logging.DEBUG):
                        with pytest.raises(grpc.RpcError) as error:
                            channel.unary_unary(PREDICT)(body, metadata=metadata, timeout=10)
                    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    records = [r for r in caplog.records if not r.name.startswith("grpc._cython")]
                    assert len(records) == 1, [r.getMessage() for r in records]
                    assert "UNAUTHENTICATED" in records[0].getMessage() and not records[0].exc_info
            # Unknown methods are refused the same way, not answered UNIMPLEMENTED to strangers.
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary("/convscope.v1.ModelService/Nope")(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health stays open for load balancers.
            health = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
            assert health
    finally:
        running.stop(0)


def test_garbage_body_is_invalid_argument_without_a_traceback(loaded, caplog):
    running = serve(loaded, token="right")
    metadata = (("authorization", "Bearer right"),)
    try:
        with grpc.insecure_channel(running.address) as channel, caplog.at_level(logging.DEBUG):
            calls = {PREDICT: channel.unary_unary(PREDICT),
                     "/convscope.v1.InspectService/Occlusion": channel.unary_stream(
                         "/convscope.v1.InspectService/Occlusion"),
                     "/convscope.v1.DatasetService/TopPatches": channel.stream_stream(
                         "/convscope.v1.DatasetService/TopPatches"),
                     "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": channel.stream_stream(
                         "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")}
            for method, call in calls.items():
                request = iter([GARBAGE] * 3) if "TopPatches" in method or "Reflection" in method else GARBAGE
                with pytest.raises(grpc.RpcError) as error:
                    response = call(request, metadata=metadata, timeout=10)
                    list(response) if not isinstance(response, bytes) else None
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.value)
                assert "could not be parsed" in error.value.details(), error.value.details()
            # The server is still serving.
            with Client(running.address, token="right", timeout=30) as client:
                predict_ok(client)
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
            [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert f"{PREDICT} INVALID_ARGUMENT" in logged and "ServerReflectionInfo INVALID_ARGUMENT" in logged
    finally:
        running.stop(0)


def test_cancelled_stream_is_logged_cancelled(loaded, caplog, chelsea):
    running = serve(loaded)
    try:
        with Client(running.address, timeout=60) as client, caplog.at_level(logging.INFO):
            def progress(step, total, *_):
                raise KeyboardInterrupt  # the client gives up: its stream is cancelled
            with pytest.raises(KeyboardInterrupt):
                client.occlusion("efficientnet_lite0", chelsea, window=4, stride=2, progress=progress)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "Occlusion CANCELLED" not in caplog.text:
                time.sleep(0.1)
        assert "InspectService/Occlusion CANCELLED" in caplog.text, caplog.text
        assert "InspectService/Occlusion OK" not in caplog.text
    finally:
        running.stop(0)


# -- admission --------------------------------------------------------------------------------------------

def test_full_heavy_queue_is_refused_quickly_and_light_calls_do_not_wait(loaded, chelsea):
    running = serve(loaded, max_concurrent_jobs=1, max_queued_jobs=1, queue_seconds=1.0)
    started, release = threading.Event(), threading.Event()
    outcomes = {}

    def long_job():
        def progress(*_):
            started.set()
            if release.is_set():
                raise KeyboardInterrupt  # cancels the call
        try:
            client.occlusion("efficientnet_lite0", chelsea, window=4, stride=2, progress=progress)
        except BaseException as error:  # noqa: BLE001
            outcomes["long"] = error

    def queued_job():
        begun = time.monotonic()
        try:
            client.occlusion("tiny", PIXELS, window=4, stride=2)
        except ConvscopeError as error:
            outcomes["queued"] = (error, time.monotonic() - begun)

    try:
        with Client(running.address, timeout=60) as client:
            jobs = [threading.Thread(target=long_job)]
            jobs[0].start()
            assert started.wait(60)
            jobs.append(threading.Thread(target=queued_job))
            jobs[1].start()
            time.sleep(0.3)  # the second job is waiting for the only slot
            begun = time.monotonic()
            with pytest.raises(ConvscopeError) as error:
                client.occlusion("tiny", PIXELS, window=4, stride=2)
            assert time.monotonic() - begun < 0.5
            assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-concurrent-jobs" in str(error.value) and "--max-queued-jobs" in str(error.value)
            for _ in range(5):  # light calls answer while the heavy slot and queue are full
                begun = time.monotonic()
                predict_ok(client)
                client.describe("tiny")
                assert time.monotonic() - begun < 1.0
            jobs[1].join(10)
            queued, waited = outcomes["queued"]
            assert queued.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "--queue-seconds" in str(queued)
            assert 0.9 < waited < 3.0, waited
            release.set()
            jobs[0].join(30)
            # The slot is free again once the cancelled job has returned.
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert client.occlusion("tiny", PIXELS, window=8, stride=8).forward_passes > 0
                    break
                except ConvscopeError as busy:
                    assert busy.code == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.2)
    finally:
        release.set()
        running.stop(0)


def test_job_limits_must_leave_a_request_thread():
    with pytest.raises(ValueError, match="--max-concurrent-jobs .* must be less than --workers"):
        config_module.job_limits(ServerConfig(workers=4, max_concurrent_jobs=3, max_queued_jobs=1))
    assert config_module.job_limits(ServerConfig(workers=8, max_concurrent_jobs=3, max_queued_jobs=2)) == (3, 2)
