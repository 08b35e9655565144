"""Gradient methods on graphs the converted torch module used to get wrong, through the real server and
client, against references computed here: onnxruntime on the same file, Captum on the native torch
module, and brute force.

- Two graph outputs (logits and an embedding): the sanity check (Adebayo et al.) and the audit's
  randomisation section re-initialise only the layers the logits depend on; which those are is found by
  brute force (re-initialise one layer's weights in the ONNX file, run onnxruntime, see if the logits move).
- GroupNorm and InstanceNorm (affine or not) as the TorchScript exporter writes them (GroupNorm:
  Reshape -> InstanceNormalization with Constant scale and bias): the bridge's logits equal onnxruntime's
  and saliency equals Captum's on the native module.
- Layer parameters fed by Constant nodes (Conv, BatchNormalization, InstanceNormalization, Gemm; one
  through an Identity, one a float16 Constant cast to float32).
- float16 graphs (weights and I/O in float16, or float32 I/O cast to float16 inside): the module computes
  in float32, so saliency equals Captum on the native module holding the same float16-rounded weights in
  float32 (1e-4; measured 0), and stays within 5e-3 of the native module with its original float32
  weights (measured 3.9e-4).

Measured on the CPU (relative to the largest reference value): saliency vs Captum 1.4e-7 (GroupNorm), 0
(InstanceNorm, Constant parameters); bridge logits vs onnxruntime 1.1e-7 to 2.2e-7, float16 I/O 4.3e-4.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from convscope import Client
from conftest import start

SIZE = 16
CLASSES = 10
CONFIG = f"""
[input]
height = {SIZE}
width = {SIZE}
layout = "NCHW"
scale = 1.0
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[output]
logits = "logits"
"""
X = np.random.default_rng(3).normal(size=(3, SIZE, SIZE)).astype(np.float32)


def close(ours, reference, rtol):
    """Relative difference <= rtol, measured against the largest reference value."""
    reference = np.asarray(reference)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def relative(ours, reference) -> float:
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


# -- the native models --------------------------------------------------------------------------------
class TwoHeads(nn.Module):
    """Logits and an embedding from a shared stem; the embedding head has a convolution of its own. With
    ``embedding_first`` the embedding is computed (and declared) before the logits, and the logits are
    reshaped by the embedding's batch size, a dependence on its shape only (Shape -> Gather -> Reshape)."""

    def __init__(self, embedding_first: bool):
        super().__init__()
        self.embedding_first = embedding_first
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, CLASSES)
        self.conv_e = nn.Conv2d(8, 8, 3, padding=1)
        self.emb = nn.Linear(8, 6)

    def embedding(self, h):
        return self.emb(F.adaptive_avg_pool2d(F.relu(self.conv_e(h)), 1).flatten(1))

    def logits(self, h):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(h)), 1).flatten(1))

    def forward(self, x):
        h = F.relu(self.conv1(x))
        if self.embedding_first:
            e = self.embedding(h)
            return e, self.logits(h).reshape(e.shape[0], -1)
        logits = self.logits(h)
        return logits, self.embedding(h)


class LogitsOnly(nn.Module):
    """The classifier path of a TwoHeads, for Captum (which needs one output)."""

    def __init__(self, two: TwoHeads):
        super().__init__()
        self.two = two

    def forward(self, x):
        return self.two.logits(F.relu(self.two.conv1(x)))


class Norms(nn.Module):
    """conv -> norm -> ReLU -> conv (stride 2) -> norm without affine -> ReLU -> pool -> linear."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        if kind == "group":
            self.norm1, self.norm2 = nn.GroupNorm(2, 8), nn.GroupNorm(4, 16, affine=False)
        else:
            self.norm1, self.norm2 = nn.InstanceNorm2d(8, affine=True), nn.InstanceNorm2d(16)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Stored(nn.Module):
    """conv -> batch-norm -> ReLU -> conv -> instance-norm -> ReLU -> mean -> linear; exported unfolded,
    then every parameter is moved into a Constant node."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.inorm(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights from a generator of the model's own; norm scales around 1 and shifts around 0 (not the
    trivial 1 / 0), batch-norm statistics away from 0 / 1."""
    generator = torch.Generator().manual_seed(seed)

    def draw(shape):
        return torch.rand(shape, generator=generator) * 2 - 1

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = module.weight[0].numel() ** -0.5 * 1.7
                module.weight.copy_(draw(module.weight.shape) * bound)
                module.bias.copy_(draw(module.bias.shape) * 0.1)
            elif isinstance(module, (nn.GroupNorm, nn.InstanceNorm2d, nn.BatchNorm2d)) and module.weight is not None:
                module.weight.copy_(1 + 0.4 * draw(module.weight.shape))
                module.bias.copy_(0.3 * draw(module.bias.shape))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.5 * draw(module.running_mean.shape))
                module.running_var.copy_(1 + 0.5 * draw(module.running_var.shape))
    return model.eval()


def export(model: nn.Module, folder: Path, outputs=("logits",), dtype=torch.float32, **options) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in ("input", *outputs)}
    torch.onnx.export(model, (torch.zeros(1, 3, SIZE, SIZE, dtype=dtype),), str(folder / "model.onnx"),
                      dynamo=False, opset_version=17, input_names=["input"], output_names=list(outputs),
                      dynamic_axes=axes, **options)
    (folder / "config.toml").write_text(CONFIG)


def parameters_as_constants(path: Path) -> None:
    """Every Conv / BatchNormalization / InstanceNormalization / Gemm parameter becomes a Constant node's
    output; the second convolution's weight reaches it through an Identity, the linear weight is a float16
    Constant cast to float32."""
    proto = onnx.load(str(path))
    graph = proto.graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    aliases = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}
    kept = [node for node in graph.node if node.op_type != "Identity"]
    made, head = {}, []
    for node in kept:
        for position in range(1, len(node.input)):
            name = aliases.get(node.input[position], node.input[position])
            if name not in values or node.op_type not in ("Conv", "BatchNormalization", "InstanceNormalization",
                                                          "Gemm"):
                continue
            if name not in made:
                value = values[name]
                out = f"{name}_constant"
                if node.op_type == "Gemm" and position == 1:
                    head.append(helper.make_node("Constant", [], [out + "_half"],
                                                 value=numpy_helper.from_array(value.astype(np.float16))))
                    head.append(helper.make_node("Cast", [out + "_half"], [out], to=onnx.TensorProto.FLOAT))
                elif node.op_type == "Conv" and position == 1 and name.startswith("conv2"):
                    head.append(helper.make_node("Constant", [], [out + "_before"],
                                                 value=numpy_helper.from_array(value)))
                    head.append(helper.make_node("Identity", [out + "_before"], [out]))
                else:
                    head.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value)))
                made[name] = out
            node.input[position] = made[name]
    del graph.node[:]
    graph.node.extend(head + kept)
    remaining = [init for init in graph.initializer if init.name not in made]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def float_io(source: Path, target: Path) -> None:
    """A float16 graph given float32 input and output: Cast to float16 after the input, Cast to float32
    before the output, as mixed-precision converters that keep the I/O types write it."""
    proto = onnx.load(str(source))
    graph = proto.graph
    for node in graph.node:
        node.input[:] = ["input_half" if name == "input" else name for name in node.input]
        node.output[:] = ["logits_half" if name == "logits" else name for name in node.output]
    graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_half"], to=onnx.TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Cast", ["logits_half"], ["logits"], to=onnx.TensorProto.FLOAT))
    graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.checker.check_model(proto)
    target.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(target / "model.onnx"))
    (target / "config.toml").write_text(CONFIG)


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """(repository, native modules by model name); the float16 models' natives hold the float16-rounded
    weights in float32 (``<name>`` ) and the original float32 weights (``<name>:float32``)."""
    root = tmp_path_factory.mktemp("edge") / "models"
    natives = {}
    for name, first in (("two_heads_embedding_after", False), ("two_heads_embedding_before", True)):
        two = seeded(TwoHeads(first), 1)
        outputs = ("embedding", "logits") if first else ("logits", "embedding")
        export(two, root / name, outputs)
        natives[name] = LogitsOnly(two)
    for name, kind in (("groupnorm", "group"), ("instancenorm", "instance")):
        natives[name] = seeded(Norms(kind), 2)
        export(natives[name], root / name)
    natives["constant_parameters"] = stored = seeded(Stored(), 3)
    export(stored, root / "constant_parameters", do_constant_folding=False)
    parameters_as_constants(root / "constant_parameters" / "model.onnx")
    with torch.no_grad():  # the float16 Constant the linear weight went through
        stored.fc.weight.copy_(stored.fc.weight.half().float())
    plain = seeded(Plain(), 4)
    export(copy.deepcopy(plain).half(), root / "fp16", dtype=torch.float16)
    float_io(root / "fp16" / "model.onnx", root / "fp16_float_io")
    for name in ("fp16", "fp16_float_io"):
        natives[name] = copy.deepcopy(plain).half().float()
        natives[f"{name}:float32"] = plain
    return root, natives


@pytest.fixture(scope="module")
def served(edge):
    root, natives = edge
    server = start(root)
    with Client(server.address, timeout=60) as client:
        yield client, root, natives
    server.stop(0)


def onnxruntime_logits(path: Path, x: np.ndarray, proto=None) -> np.ndarray:
    proto = proto or onnx.load(str(path))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    kind = session.get_inputs()[0].type
    x = x.astype(np.float16 if "float16" in kind else np.float32)
    names = [o.name for o in session.get_outputs()]
    return session.run(None, {"input": x})[names.index("logits")].astype(np.float64)


def brute_force_classifier_layers(path: Path) -> list[str]:
    """The Conv / Gemm / MatMul outputs whose weights move the logits when re-drawn, from the top down."""
    proto = onnx.load(str(path))
    batch = np.random.default_rng(5).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    clean = onnxruntime_logits(path, batch, proto)
    found = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        changed = onnx.ModelProto()
        changed.CopyFrom(proto)
        for init in changed.graph.initializer:
            if init.name == node.input[1]:
                value = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(
                    np.random.default_rng(index).normal(size=value.shape).astype(value.dtype), init.name))
        if np.abs(onnxruntime_logits(path, batch, changed) - clean).max() > 1e-6:
            found.append(node.output[0])
    return found[::-1]


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x[None]))


def captum_saliency(native, x, target):
    from captum.attr import Saliency

    return Saliency(native).attribute(_t(x), target=target, abs=False)[0].detach().numpy()


# -- 1. the sanity check and the audit randomise the classifier's layers only ----------------------------
@pytest.mark.parametrize("name", ["two_heads_embedding_after", "two_heads_embedding_before"])
def test_sanity_check_randomises_only_the_layers_the_logits_depend_on(served, name):
    from scipy.stats import spearmanr

    client, root, natives = served
    expected = brute_force_classifier_layers(root / name / "model.onnx")
    top = "logits" if name.endswith("after") else "/fc/Gemm_output_0"  # before: Reshape(fc) is the output
    assert expected == [top, "/conv2/Conv_output_0", "/conv1/Conv_output_0"]
    report = client.sanity_check(name, X, target=4, methods=["vanilla"], seed=1, return_maps=True)
    assert report.layers == expected
    assert not any("conv_e" in layer or "emb" in layer for layer in report.layers)
    original = report.original_maps["vanilla"]
    close(original, np.abs(captum_saliency(natives[name], X, 4)).max(axis=0), 1e-4)
    first = report.randomized_maps["vanilla"][0]  # the classifier's top layer re-drawn
    rho = spearmanr(original.ravel(), first.ravel()).statistic
    assert report.spearman["vanilla"][0] == pytest.approx(rho, abs=1e-5)
    assert rho < 0.99 and np.abs(first - original).max() > 1e-3 * np.abs(original).max()


def test_the_audit_randomisation_section_takes_the_same_layers(edge):
    """The audit's section (audit/engine.py ``_randomisation``, which runs gradient/sanity.py's cascade) on
    the model whose embedding head comes after the logits."""
    from convscope_server.audit.engine import _randomisation
    from convscope_server.gradient.bridge import TorchBridges
    from convscope_server.repository import load_folder

    root, _ = edge
    name = "two_heads_embedding_after"
    model = load_folder(name, root / name)
    torch_model = TorchBridges("cpu").get(model)
    section = _randomisation(model, torch_model, "", X[None], [4], ["vanilla"], None, 2, lambda: False)
    assert section["layers"] == brute_force_classifier_layers(root / name / "model.onnx")[:2]
    assert section["correlations"]["vanilla"][0] < 0.99


# -- 2. GroupNorm / InstanceNorm and Constant-node parameters ------------------------------------------
NORM_MODELS = ["groupnorm", "instancenorm", "constant_parameters"]


@pytest.mark.parametrize("name", NORM_MODELS)
def test_saliency_on_norm_and_constant_parameter_graphs_equals_captum(served, name):
    client, root, natives = served
    got = client.saliency(name, X, target=2)
    close(got.attribution, captum_saliency(natives[name], X, 2), 1e-4)
    gradient = client.describe(name).gradient
    assert gradient["state"] == "ready" and gradient["probe_difference"] <= 1e-5


@pytest.mark.parametrize("name", NORM_MODELS)
def test_the_bridge_logits_equal_onnxruntime_and_the_native_module(edge, name):
    """The converted module in eval mode, and in train mode (a norm tracking running statistics would
    differ between the two, and drift), against onnxruntime on the file and the native module."""
    from convscope_server.gradient.bridge import TorchBridges
    from convscope_server.repository import load_folder

    root, natives = edge
    model = load_folder(name, root / name)
    torch_model = TorchBridges("cpu").get(model)
    batch = np.random.default_rng(8).normal(size=(4, 3, SIZE, SIZE)).astype(np.float32)
    expected = onnxruntime_logits(root / name / "model.onnx", batch)
    with torch.no_grad():
        got = torch_model.as_numpy(torch_model.logits(torch_model.tensor(batch)))
        assert relative(got, expected) <= 1e-5
        assert relative(got, natives[name](torch.from_numpy(batch)).numpy()) <= 1e-5
        if name != "constant_parameters":  # batch-norm rightly differs in train mode
            module = copy.deepcopy(torch_model.module).train()
            for _ in range(2):
                trained = module(torch.from_numpy(batch))
            assert relative(trained.numpy(), expected) <= 1e-5
    assert not [m for m in torch_model.module.modules() if getattr(m, "track_running_stats", False)
                and "Instance" in type(m).__name__]


def test_instance_norm_with_runtime_scale_and_bias_equals_onnxruntime(edge):
    """onnx2pytorch builds a lazy, statistics-tracking norm when scale and B are not initializers (and
    takes a lone initializer for the scale whatever its position); the bridge's replacement takes them as
    inputs. Converted here without the bridge's graph preparation, so they stay Constant-node outputs."""
    from onnx2pytorch import ConvertModel

    from convscope_server.gradient.bridge import _instance_norms, _lazy_layers

    root, _ = edge
    proto = onnx.load(str(root / "groupnorm" / "model.onnx"))
    norms = [n for n in proto.graph.node if n.op_type == "InstanceNormalization"]
    constants = {n.output[0] for n in proto.graph.node if n.op_type == "Constant"}
    assert norms and all(n.input[1] in constants and n.input[2] in constants for n in norms)
    module = ConvertModel(proto, experimental=True)
    assert len(_lazy_layers(module)) == len(norms)
    assert _instance_norms(module, proto) == len(norms) and not _lazy_layers(module)
    batch = np.random.default_rng(9).normal(size=(2, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        got = module.eval()(torch.from_numpy(batch)).numpy()
    assert relative(got, onnxruntime_logits(root / "groupnorm" / "model.onnx", batch)) <= 1e-5


# -- 3. float16 graphs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fp16", "fp16_float_io"])
def test_float16_saliency_equals_captum_on_the_float32_module(served, name):
    """The module computes in float32 with the file's float16 weights: equal to Captum on the native module
    holding those weights in float32 (1e-4, measured 0); within 5e-3 of the native module with its
    original float32 weights (measured 3.9e-4: the weights' float16 rounding, up to 2^-11 relative)."""
    client, root, natives = served
    got = client.saliency(name, X, target=6)
    close(got.attribution, captum_saliency(natives[name], X, 6), 1e-4)
    assert relative(got.attribution, captum_saliency(natives[f"{name}:float32"], X, 6)) <= 5e-3
    gradient = client.describe(name).gradient
    assert gradient["state"] == "ready", gradient["reason"]


@pytest.mark.parametrize("name", ["fp16", "fp16_float_io"])
def test_float16_bridge_logits_are_within_float16_rounding_of_onnxruntime(edge, name):
    """onnxruntime rounds float16 tensors (at least the float16 output), the module computes in float32:
    relative difference of the logits within 2e-3 (4 units of float16 roundoff; measured 4.3e-4 with
    float16 I/O, 2.3e-7 with float32 I/O, where onnxruntime's CPU provider computes in float32 between
    its casts); the load probe accepts 20 units (~1e-2)."""
    from convscope_server.gradient.bridge import LOW_PRECISION_TOLERANCE, TorchBridges, graph_precision
    from convscope_server.repository import load_folder

    root, natives = edge
    model = load_folder(name, root / name)
    assert graph_precision(model.proto) == "float16"
    torch_model = TorchBridges("cpu").get(model)
    assert torch_model.tolerance == LOW_PRECISION_TOLERANCE["float16"]
    assert 0 < torch_model.probe_difference <= 2e-3
    batch = np.random.default_rng(10).normal(size=(4, 3, SIZE, SIZE)).astype(np.float16).astype(np.float32)
    expected = onnxruntime_logits(root / name / "model.onnx", batch)
    with torch.no_grad():
        got = torch_model.as_numpy(torch_model.logits(torch_model.tensor(batch)))
        assert relative(got, expected) <= 2e-3
        assert relative(got, natives[name](torch.from_numpy(batch)).numpy()) <= 1e-5
