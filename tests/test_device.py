"""Every tensor that meets the converted module lives on the module's device, on machines without a GPU.

Two checks (issue 10: on CUDA, synthesis answered "Input type (torch.FloatTensor) and weight type
(torch.cuda.FloatTensor) should be the same"):

- static: every torch tensor factory call in the gradient code and its servicers is given ``device=``, is
  (part of) the receiver of ``.to(...)``, is wrapped by ``torch_model.tensor(...)``, or leaves torch at once
  (``.tolist()`` / ``.item()``); read-backs go through ``TorchModel.as_numpy`` (no ``.cpu()`` / ``.numpy()``
  elsewhere). A short allow-list names the functions with a legitimate CPU use.
- dynamic: a server whose converted modules live on torch's "meta" device, made strict by
  :class:`FakeAccelerator` (entered by the model's ``scope()``, so a job that forgets the scope fails too),
  answers every gradient and synthesis RPC.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convscope import Client
from conftest import start
from convscope_server.gradient.bridge import TorchModel
from tiny_models import SIZE

SERVER = Path(__file__).resolve().parent.parent / "service" / "convscope_server"
SCANNED = sorted(SERVER.glob("gradient/**/*.py")) + [SERVER / "api" / "attribution_service.py",
                                                     SERVER / "api" / "synthesis_service.py"]

# torch functions that make a new tensor, on the CPU unless told otherwise.
FACTORIES = {"from_numpy", "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace",
             "logspace", "eye", "rand", "randn", "randint", "randperm", "normal", "scalar_tensor"}
LEAVES_TORCH = {"tolist", "item"}
READ_BACKS = {"cpu", "numpy"}
# (file under convscope_server/, function): why a CPU tensor or a read-back is right there.
ALLOWED = {
    ("gradient/bridge.py", "_fast_clips"): "Clip bounds read as Python floats at conversion, before the move",
    ("gradient/bridge.py", "TorchModel.as_numpy"): "the one read-back",
}


def stray_tensors(source: str, path: str) -> list[str]:
    """``path:line function: call`` for each factory call left on the CPU and each read-back not through
    ``as_numpy``, in ``source``."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []

    def function_of(node) -> str:
        names = []
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(node.name)
        return ".".join(reversed(names))

    def placed(call) -> bool:
        """Given device=, or inside the receiver of .to(...) / .tolist() / .item(), or an argument of
        ``<model>.tensor(...)``, within the same expression."""
        if any(k.arg == "device" for k in call.keywords):
            return True
        child, parent = call, parents.get(call)
        while parent is not None and not isinstance(parent, ast.stmt):
            if (isinstance(parent, ast.Attribute) and parent.value is child and parent.attr in {"to"} | LEAVES_TORCH
                    and isinstance(parents.get(parent), ast.Call) and parents[parent].func is parent):
                return True
            if (isinstance(parent, ast.Call) and child in parent.args and isinstance(parent.func, ast.Attribute)
                    and parent.func.attr == "tensor" and not _is_torch(parent.func.value)):
                return True
            child, parent = parent, parents.get(parent)
        return False

    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        function = function_of(node)
        if (path, function) in ALLOWED:
            continue
        attr = node.func.attr
        if _is_torch(node.func.value) and attr in FACTORIES and not placed(node):
            found.append(f"{path}:{node.lineno} {function}: torch.{attr}(...) is not placed on the model's device")
        elif attr in READ_BACKS and not node.args:
            found.append(f"{path}:{node.lineno} {function}: .{attr}() read-back; use TorchModel.as_numpy")
    return found


def _is_torch(node) -> bool:
    return isinstance(node, ast.Name) and node.id == "torch"


def _scan(path: Path) -> list[str]:
    return stray_tensors(path.read_text(), path.relative_to(SERVER).as_posix())


def test_gradient_code_creates_tensors_on_the_model_device():
    assert len(SCANNED) > 10
    strays = [line for path in SCANNED for line in _scan(path)]
    assert not strays, "\n".join(strays)


@pytest.mark.parametrize("path, before, after", [
    ("gradient/synthesis/deepdream.py", ", device=torch_model.device)", ")"),
    ("gradient/adversarial.py", "torch.tensor([target], device=torch_model.device)", "torch.tensor([target])"),
    ("gradient/synthesis/common.py", "torch.from_numpy(values).to(self.device)", "torch.from_numpy(values)"),
    ("gradient/synthesis/common.py", "generator=generator).to(self.device)", "generator=generator)"),
    ("api/synthesis_service.py", ".to(torch_model.device)\n", "\n"),
    ("gradient/attribution.py", "    return grads\n", "    torch.zeros(3)\n    return grads\n"),
    ("gradient/cam.py", "torch_model.as_numpy(activation)[0]", "activation.detach().cpu().numpy()[0]"),
])
def test_the_static_check_catches_a_stray_cpu_tensor(path, before, after):
    """The real file, with one placement undone: exactly the mutated line is reported."""
    source = (SERVER / path).read_text()
    assert source.count(before) == 1, f"{path} changed; update this test's mutation"
    line = source[: source.index(before)].count("\n") + 1
    strays = stray_tensors(source.replace(before, after), path)
    assert strays and all(s.startswith(f"{path}:{line} ") for s in strays), (line, strays)


def test_the_static_check_accepts_the_placements():
    placed = """
import torch
def f(torch_model, x, g):
    a = torch.zeros(3, device=x.device)
    b = torch.from_numpy(x).to(torch_model.device)
    c = (0.5 + torch.randn(3, generator=g)).to(torch_model.device)
    d = torch_model.tensor(torch.ones(3))
    e = torch.randint(0, 3, (2,), generator=g).tolist()
    return torch_model.as_numpy(a + b + c + d)
"""
    assert stray_tensors(placed, "gradient/example.py") == []
    assert len(stray_tensors("import torch\nx = torch.tensor([1])\ny = x.cpu()\n", "gradient/example.py")) == 2


# -- dynamic: the modules on a strict "meta" device ------------------------------------------------------

aten = torch.ops.aten
CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
                aten._copy_from_and_resize.default}


class FakeAccelerator(TorchDispatchMode):
    """Makes torch's "meta" device (data-less, on every machine) act as a strict accelerator: an op that mixes
    a meta tensor with a CPU tensor of one or more dimensions raises, as CUDA does (meta's own kernels let
    some through, convolution among them); read-backs of meta tensors (``.cpu()``, ``.item()``) give zeros
    instead of raising, so a whole job runs. Only copies may cross devices. Thread-local: entered by the
    meta model's ``scope()`` in the thread doing the torch work."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        first = tensors[0] if tensors else None
        to_cpu = kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
        if func is aten._to_copy.default and first.is_meta and to_cpu:
            return torch.zeros(first.shape, dtype=kwargs.get("dtype") or first.dtype)
        if func is aten._local_scalar_dense.default and first.is_meta:
            return False if first.dtype == torch.bool else 0.0 if first.dtype.is_floating_point else 0
        if func not in CROSS_DEVICE and any(t.is_meta for t in tensors):
            stray = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if stray:
                raise RuntimeError(f"{func}: CPU tensors of shapes {stray} meet tensors on the model's device")
        return func(*args, **kwargs)


class MetaModel(TorchModel):
    """A converted model's copy on the strict meta device. Its module also refuses inputs from another
    device outside the scope (meta's convolution takes a CPU input and answers on the CPU)."""

    def __init__(self, real: TorchModel):
        super().__init__(copy.deepcopy(real.module).to("meta"), torch.device("meta"), real.logits_index,
                         real.precision)
        self.module.register_forward_pre_hook(_inputs_on_meta)

    def scope(self):
        return FakeAccelerator()


def _inputs_on_meta(module, inputs):
    devices = [x.device.type for x in inputs if isinstance(x, torch.Tensor)]
    if any(d != "meta" for d in devices):
        raise RuntimeError(f"the module on the model's device got inputs on {devices}")


@pytest.fixture(scope="module")
def meta_server(repository):
    """A server whose gradient requests get :class:`MetaModel` copies of the converted modules."""
    running = start(repository)
    real_get, metas = running.bridges.get, {}

    def get(model):
        if model.name not in metas:
            metas[model.name] = MetaModel(real_get(model))
        return metas[model.name]

    running.bridges.get = get  # the servicers hold this bridges object
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def meta_client(meta_server):
    with Client(meta_server.address, timeout=120) as client:
        yield client


X = np.random.default_rng(3).normal(size=(3, SIZE, SIZE)).astype(np.float32)
X_NHWC = np.ascontiguousarray(X.transpose(1, 2, 0))
PHOTO = np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # resized to any size
LAYER = "/conv3/Conv_output_0"

CALLS = {
    "vanilla": lambda c: c.saliency("tiny", X, target=1),
    "smoothgrad": lambda c: c.saliency("tiny", X, target=1, method="smoothgrad", samples=3, batch_size=2),
    "integrated_gradients": lambda c: c.saliency("tiny_nhwc", X_NHWC, target=1, method="integrated_gradients",
                                                 steps=3, render=True),
    "guided_backprop": lambda c: c.guided_backprop("tiny", X, layer=LAYER, channel=2, neuron=(1, 1)),
    "deconvnet": lambda c: c.deconvnet("tiny_nhwc", X_NHWC, target=2, render=True),
    "gradcam++": lambda c: c.cam("tiny_nhwc", X_NHWC, target=2, layer=LAYER, method="gradcam++"),
    "guided_gradcam": lambda c: c.cam("tiny", X, target=2, layer=LAYER, method="guided_gradcam", render=True),
    "sanity_check": lambda c: c.sanity_check("tiny", X, target=3, steps=2, layers=2, return_maps=True),
    "class_visualization": lambda c: c.class_visualization(
        "tiny", 3, steps=3, jitter=2, blur_every=1, decay=0.01, clip_norm_percentile=10,
        clip_contribution_percentile=10, preview_every=1, frames=True),
    "feature_visualization": lambda c: c.class_visualization("tiny_nhwc", layer=LAYER, channel=1, neuron=(2, 2),
                                                             steps=2, zero_start=True),
    "invert": lambda c: c.invert("tiny", X, [LAYER], steps=2),
    "deepdream": lambda c: c.deepdream("tiny", X, LAYER, octaves=2, steps=2, jitter=1),
    "style_adam": lambda c: c.style_transfer("tiny", X, X, style_layers=[LAYER], content_layer=LAYER, steps=2),
    "texture_lbfgs": lambda c: c.style_transfer("tiny_nhwc", PHOTO, style_layers=[LAYER], optimizer="lbfgs",
                                                height=24, width=40, steps=2),
    "fgsm": lambda c: c.adversarial("tiny", X, label=1),
    "targeted": lambda c: c.adversarial("tiny_nhwc", X_NHWC, "targeted", target=4, steps=3),
    "robustness": lambda c: c.robustness("tiny", [X, X * 0.5, X * 2], labels=[1, 2, 3], epsilons=[0, 0.01],
                                         batch_size=2, render=True),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_every_gradient_rpc_keeps_its_tensors_on_the_model_device(meta_client, name):
    """An INTERNAL answer here names the op that met a CPU tensor, or "Cannot copy out of meta tensor" for
    a read-back outside the model's scope()."""
    assert CALLS[name](meta_client) is not None


def test_the_fake_accelerator_catches_a_cpu_tensor(meta_server):
    """The harness itself: FGSM with an input space left on the CPU fails inside the scope, and a read-back
    outside the scope raises."""
    from convscope_server.gradient import adversarial
    from convscope_server.gradient.synthesis.common import InputSpace

    model = meta_server.bridges.get(meta_server.repository.get("tiny"))
    cpu_space = InputSpace.of(meta_server.repository.get("tiny").config)  # device left at "cpu"
    x = model.tensor(X[None])
    labels = torch.tensor([1], device=model.device)
    with pytest.raises(RuntimeError, match="meet tensors on the model's device"), model.scope():
        adversarial.fgsm(model, cpu_space, x, labels, 0.01)
    with pytest.raises(NotImplementedError, match="meta"):
        model.as_numpy(x)
