"""Shared fixtures: a model repository built for the tests, a real in-process server, a real client."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convscope import Client
from convscope_server.app import create_server
from convscope_server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "efficientnet_lite0"


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    """models/: efficientnet_lite0, tiny, tiny_nhwc, tiny_fixed_batch and broken folders (see tiny_models)."""
    from tiny_models import build_repository

    if not (DEFAULT_MODEL / "model.onnx").exists():
        pytest.fail("models/efficientnet_lite0/model.onnx is missing: run scripts/setup")
    base = tmp_path_factory.mktemp("repository")
    build_repository(base / "models", DEFAULT_MODEL, base / "outside")
    return base / "models"


def start(repository: Path, **settings):
    return create_server(ServerConfig(host="127.0.0.1", port=0, repository=repository, workers=4,
                                      grace_seconds=1.0, **settings))


@pytest.fixture(scope="session")
def server(repository):
    running = start(repository)
    yield running
    running.stop(0)


@pytest.fixture()
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    from skimage import data

    return data.coffee()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
