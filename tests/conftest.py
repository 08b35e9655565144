"""Shared fixtures: a model repository built for the tests, a real in-process server, a real client."""

from __future__ import annotations

import atexit
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convscope import Client
from convscope_server.app import create_server
from convscope_server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "efficientnet_lite0"
AUDIT_ROOTS = Path(tempfile.mkdtemp(prefix="convscope-test-audits-"))   # each test server's audit root below
atexit.register(shutil.rmtree, AUDIT_ROOTS, ignore_errors=True)


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
    """A real server on a free loopback port. Gradient warm-up is off unless asked for: most test servers
    never run a gradient method, and converting every model of the repository would only load the cores."""
    settings.setdefault("gradient_warmup", False)
    settings.setdefault("audit_root", Path(tempfile.mkdtemp(dir=AUDIT_ROOTS)))  # never the checkout's
    return create_server(ServerConfig(host="127.0.0.1", port=0, repository=repository, workers=4,
                                      grace_seconds=1.0, **settings))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root: demo/ (4 crops per class of the demo photos, datasets/build_demo.py), broken/ (good
    images beside a corrupt file, a truncated PNG and a symlink to a file outside the root) and linked/ (a
    symlink to a folder outside the root)."""
    import sys

    sys.path.insert(0, str(ROOT / "datasets"))
    from build_demo import build

    base = tmp_path_factory.mktemp("data")
    root, outside = base / "root", base / "outside"
    build(root / "demo", per_class=4)
    outside.mkdir()
    secret = png_bytes(np.full((32, 32, 3), 200, np.uint8))
    (outside / "secret.png").write_bytes(secret)
    broken = root / "broken"
    broken.mkdir()
    good = png_bytes(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    (broken / "a_good.png").write_bytes(good)
    (broken / "b_corrupt.jpg").write_bytes(b"this is not a jpeg")
    (broken / "c_truncated.png").write_bytes(good[: len(good) // 2])
    (broken / "d_escape.png").symlink_to(outside / "secret.png")
    (broken / "e_good.png").write_bytes(png_bytes(np.zeros((30, 30, 3), np.uint8)))
    (root / "linked").symlink_to(outside, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def server(repository, data_root, tmp_path_factory):
    running = start(repository, data_root=data_root, gallery_root=tmp_path_factory.mktemp("galleries"),
                    gradient_warmup=True)
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


def reference_input(pixels: np.ndarray) -> np.ndarray:
    """The default model's documented preprocessing written out independently of the server: stretch to
    224x224 (bilinear), [0, 1], (x - 0.5) / 0.5, CHW."""
    resized = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BILINEAR), dtype=np.float32)
    return ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()


@pytest.fixture(scope="session")
def chelsea_input(chelsea) -> np.ndarray:
    return reference_input(chelsea)


@pytest.fixture(scope="session")
def lite0():
    """The native EfficientNet-Lite0 (torch, same weights) as the build script makes it."""
    import sys

    sys.path.insert(0, str(ROOT / "models"))
    from build_efficientnet_lite0 import load_pretrained

    return load_pretrained()


@pytest.fixture(scope="session")
def fused_lite0():
    """The native EfficientNet-Lite0 (torch) computing the function the ONNX file holds: each batch-norm
    fused into its conv, then the conv weights and biases taken from the file's initializers (matched to
    the native convs in forward order, shapes checked). Fusing alone rounds differently from the export
    (weights ~2e-6 apart with torch 2.14), enough to flip a ReLU6 unit sitting within float noise of its
    threshold, and a piecewise-linear network's gradient jumps there (9% apart on chelsea). The
    architecture and the gradient code stay the native model's own."""
    import sys

    import onnx
    import torch
    from onnx import numpy_helper
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    sys.path.insert(0, str(ROOT / "models"))
    from build_efficientnet_lite0 import load_pretrained

    model = load_pretrained()
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        if block.has_expand:
            pairs.append((block, "_expand_conv", "_bn0"))
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, torch.nn.Identity())

    called = []
    hooks = [m.register_forward_hook(lambda m, i, o: called.append(m)) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    graph = onnx.load(str(DEFAULT_MODEL / "model.onnx")).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == len(called), "the ONNX file and the native model have different convolutions"
    with torch.no_grad():
        for module, node in zip(called, convs):
            for parameter, name in ((module.weight, node.input[1]), (module.bias, node.input[2])):
                assert tuple(parameter.shape) == values[name].shape, f"{node.name}: shapes differ"
                parameter.copy_(torch.from_numpy(values[name].copy()))
    return model
