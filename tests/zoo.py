"""A zoo of real CNN architectures exported to ONNX, for tests/test_zoo.py and benchmarks/zoo_matrix.py.

Each family is a torchvision architecture (the smallest variant, or a small configuration of the same
class where the stock one is slow: DenseNet, ConvNeXt) with seeded random weights and non-trivial
normalisation (``scatter_norms``): random affine parameters, running statistics calibrated on a seeded
random batch and then scattered, so no batch-norm is an identity and folding one changes the conv's
weights; ConvNeXt's layer scales (1e-6 at init: every block nearly the identity) are random too.

Exports (``exports()``): every family with the TorchScript exporter at opsets 17 and 11 (``dynamo=False``:
it folds batch-norms into convs where it can and feeds shared weights through Identity nodes), and the
families in ``DYNAMO_FAMILIES`` also with the dynamo exporter at opset 20 (``dynamo=True``, onnxscript; its
tensor names differ from the TorchScript ones). Two hand-built models are shaped like TensorFlow / TFLite
exports: ``tf_nhwc`` (NHWC input, Transpose to NCHW, a head working channels-last: ReduceMean over axes
(1, 2), MatMul + Add) and ``uint8_nhwc`` (uint8 NHWC pixels; Cast, scaling, mean/std and the Transpose
inside the graph).

A zoo entry records the native torch module (eval mode), the exported file, its config.toml, and the
tensors tests look at, found in each graph by structure rather than by name (``find_tensors``):
``last_block`` (what the global pooling before the head reads), ``concat`` (the last 4-D Concat output),
``channels_last`` (the last NHWC tensor with spatial size > 1), ``early`` and ``mid`` (Conv outputs at
~1/8 and ~1/2 of the convolutions), with each one's layout and whether a global pooling feeds it
(squeeze-and-excitation). ``native_layers`` names the native submodule whose output is the same tensor,
for pytorch-grad-cam. ShuffleNet's last Concat is followed by its channel shuffle inside the same native
block; Grad-CAM sums over channels, so the block's output (the Concat's channels permuted) has the same
map.

References: ``native_logits`` runs the native module itself; the gradient references (``captum_saliency``,
``grad_cam_reference``) run ``ZooEntry.reference``, the native architecture holding the file's weights
(``file_weights``), which computes exactly the exported function.

    build_zoo(root)  ->  [ZooEntry], with root/<name>/model.onnx and root/<name>/config.toml
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ZooEntry:
    name: str                       # the model's folder in the repository: <family>_<exporter><opset>
    family: str
    exporter: str                   # "legacy" (TorchScript) or "dynamo"
    opset: int
    size: int                       # input height = width
    native: nn.Module               # eval mode, shared by the entries of a family
    path: Path                      # root/<name>/model.onnx
    layout: str = "NCHW"            # of the model input
    input_dtype: str = "float32"    # "uint8" for uint8_nhwc
    tensors: dict[str, str] = field(default_factory=dict)          # role -> ONNX tensor name
    layouts: dict[str, str] = field(default_factory=dict)          # role -> "NCHW" / "NHWC"
    whole_image: frozenset[str] = frozenset()                      # roles fed by a global pooling
    export_seconds: float = 0.0
    _reference: nn.Module | None = field(default=None, repr=False)

    @property
    def native_layers(self) -> dict[str, str]:
        """role -> name of the native submodule computing that role's tensor (for the roles it has)."""
        return {role: name for role, name in FAMILIES[self.family].layers.items() if role in self.tensors}

    @property
    def reference(self) -> nn.Module:
        """The native module computing exactly the function of this entry's file (see file_weights)."""
        if self._reference is None:
            self._reference = file_weights(self.native, self.path)
        return self._reference

    def sample(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 pixels -> this model's input without the batch axis, preprocessed as config.toml
        says (bilinear stretch to size, ImageNet mean/std), written out independently of the server."""
        from PIL import Image

        resized = np.asarray(Image.fromarray(pixels).resize((self.size, self.size), Image.BILINEAR))
        if self.input_dtype == "uint8":
            return np.ascontiguousarray(resized)
        x = (resized.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        x = x.astype(np.float32)
        return np.ascontiguousarray(x if self.layout == "NHWC" else x.transpose(2, 0, 1))


# -- native models ------------------------------------------------------------------------------------

def scatter_norms(model: nn.Module, size: int, seed: int, channels_last_input: bool = False,
                  dtype=torch.float32) -> nn.Module:
    """Random affine parameters for every BatchNorm and LayerNorm, BatchNorm running statistics
    calibrated on a seeded random batch and then scattered a little (calibrating after scattering the
    affines keeps activations in range through 50+ layers; scattering statistics first would compound
    layer after layer: EfficientNet-B0's logits reached ~1e3), and random ConvNeXt layer scales. Leaves
    the model in eval mode with no in-place activations (Captum and pytorch-grad-cam hook module
    outputs)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        return low + (high - low) * torch.rand(t.shape, generator=generator)

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "inplace"):
                module.inplace = False
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.weight is not None:
                module.weight.copy_(uniform(module.weight, 0.6, 1.4))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(getattr(module, "layer_scale", None), nn.Parameter):
                module.layer_scale.copy_(uniform(module.layer_scale, 0.3, 1.0))
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: the calibration batch's own statistics
        shape = (8, size, size, 3) if channels_last_input else (8, 3, size, size)
        batch = torch.randn(shape, generator=generator)
        if dtype == torch.uint8:
            batch = (batch * 60 + 128).clamp(0, 255).to(torch.uint8)
        model.eval()  # dropout and stochastic depth stay off while the batch-norms calibrate
        for module in norms:
            module.train()
        model(batch)
        model.eval()
        for module in norms:
            module.momentum = 0.1
            module.running_mean += 0.05 * module.running_var.sqrt() * torch.randn(
                module.running_mean.shape, generator=generator)
            module.running_var *= uniform(module.running_var, 0.9, 1.1)
    return model


class TfStyleNet(nn.Module):
    """A small MobileNet-like CNN laid out as tf2onnx writes Keras models: NHWC input transposed to NCHW
    for the convolutions, then back to NHWC for the head, which averages over axes (1, 2) (ReduceMean, not
    GlobalAveragePool) and applies its dense layer as MatMul + Add."""

    def __init__(self, classes: int = 100):
        super().__init__()
        from torchvision.ops.misc import Permute

        def block(cin, cout, stride, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU6())

        self.to_nchw = Permute([0, 3, 1, 2])
        self.features = nn.Sequential(block(3, 16, 2), block(16, 16, 1, groups=16), block(16, 32, 2),
                                      block(32, 32, 1, groups=32), block(32, 64, 2), block(64, 64, 1))
        self.to_nhwc = Permute([0, 2, 3, 1])
        self.weight = nn.Parameter(torch.randn(64, classes) * 0.1)
        self.bias = nn.Parameter(torch.randn(classes) * 0.1)

    def forward(self, x):
        x = self.to_nhwc(self.features(self.to_nchw(x)))
        return torch.matmul(x.mean(dim=(1, 2)), self.weight) + self.bias


class Uint8Net(nn.Module):
    """A TFLite-style graph input: uint8 NHWC pixels; Cast, scale to [0, 1], ImageNet mean/std and the
    Transpose to NCHW all happen inside the graph. The native module also takes float pixel values
    (0..255), where ``float()`` does nothing, so gradients with respect to the pixels can be referenced."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 1, 3) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 1, 3) * 255)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = ((x.float() - self.mean) / self.std).permute(0, 3, 1, 2)
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@dataclass(frozen=True)
class Family:
    name: str
    size: int
    build: Callable[[], nn.Module]
    layers: dict[str, str]   # role -> name of the native submodule whose output is that role's tensor
    layout: str = "NCHW"
    input_dtype: str = "float32"
    cam_head: bool = True    # global average pooling then a linear layer (CAM applies)


def _densenet():
    from torchvision.models import DenseNet

    class SmallDenseNet(DenseNet):
        """torchvision's DenseNet with its final ReLU as a module (torchvision calls ``F.relu(...,
        inplace=True)`` there): the same function and the same export, and pytorch-grad-cam can hook the
        tensor the global pooling reads."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.relu = nn.ReLU()

        def forward(self, x):
            out = nn.functional.adaptive_avg_pool2d(self.relu(self.features(x)), (1, 1))
            return self.classifier(torch.flatten(out, 1))

    return SmallDenseNet(growth_rate=12, block_config=(2, 2, 2, 2), num_init_features=24, bn_size=2)


def _convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(24, 48, 1), CNBlockConfig(48, 96, 1), CNBlockConfig(96, 192, 2),
                     CNBlockConfig(192, None, 1)])


def _tv(name, **kwargs):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)
    return build


FAMILIES = {f.name: f for f in [
    Family("resnet18", 96, _tv("resnet18"), {"last_block": "layer4"}),
    Family("mobilenet_v3_small", 80, _tv("mobilenet_v3_small"), {"last_block": "features"},
           cam_head=False),  # linear, HardSwish, linear
    Family("densenet", 80, _densenet, {"last_block": "relu", "concat": "features.denseblock4"}),
    Family("squeezenet1_1", 72, _tv("squeezenet1_1"), {"last_block": "classifier.2", "concat": "features.12"},
           cam_head=False),  # a conv classifier before the pooling
    Family("shufflenet_v2_x0_5", 96, _tv("shufflenet_v2_x0_5"), {"last_block": "conv5", "concat": "stage4.3"}),
    Family("googlenet", 80, _tv("googlenet", aux_logits=False, init_weights=True),
           {"last_block": "inception5b", "concat": "inception5b"}),
    Family("inception_v3", 112, _tv("inception_v3", aux_logits=False, init_weights=True),
           {"last_block": "Mixed_7c", "concat": "Mixed_7c"}),
    Family("regnet_x_400mf", 64, _tv("regnet_x_400mf"), {"last_block": "trunk_output"}),
    Family("convnext", 64, _convnext, {"last_block": "features"}),
    Family("efficientnet_b0", 72, _tv("efficientnet_b0"), {"last_block": "features"}),
    Family("tf_nhwc", 64, TfStyleNet, {"last_block": "to_nhwc"}, layout="NHWC"),
    Family("uint8_nhwc", 64, Uint8Net, {"last_block": "features"}, layout="NHWC", input_dtype="uint8"),
]}

# Which exports each family gets. The TorchScript exporter takes about a second per model; the dynamo
# exporter 3-14 s on two cores, so it covers the families whose graphs it writes differently: DenseNet's
# BatchNormalization after Concat, ShuffleNet's Split, squeeze-and-excitation as ReduceMean with axes as an
# input (opset 18+), HardSwish, LayerNormalization, and the plain ResNet and GoogLeNet as controls.
LEGACY_OPSETS = (17, 11)
DYNAMO_FAMILIES = ("resnet18", "mobilenet_v3_small", "densenet", "googlenet", "shufflenet_v2_x0_5", "convnext",
                   "efficientnet_b0")
DYNAMO_OPSET = 20
HAND_BUILT = ("tf_nhwc", "uint8_nhwc")   # legacy exporter, opset 17 only


def native(family: str, seed: int = 0) -> nn.Module:
    """The family's native module with its seeded weights and scattered normalisation, eval mode, frozen."""
    spec = FAMILIES[family]
    torch.manual_seed(seed)
    model = scatter_norms(spec.build(), spec.size, seed + 1, spec.layout == "NHWC",
                          torch.uint8 if spec.input_dtype == "uint8" else torch.float32)
    for parameter in model.parameters():  # frozen like the server's module: no weight gradients
        parameter.requires_grad_(False)
    return model


def exports(families=None) -> list[tuple[str, str, int]]:
    """(family, exporter, opset) for every zoo entry."""
    chosen = list(FAMILIES) if families is None else list(families)
    plan = []
    for family in chosen:
        opsets = (17,) if family in HAND_BUILT else LEGACY_OPSETS
        plan += [(family, "legacy", opset) for opset in opsets]
        if family in DYNAMO_FAMILIES:
            plan.append((family, "dynamo", DYNAMO_OPSET))
    return plan


def export(model: nn.Module, path: Path, example: torch.Tensor, exporter: str, opset: int) -> None:
    """Dynamic batch either way; the dynamo exporter traces a batch of 2 (a batch of 1 would be
    specialised by torch.export)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.onnx.export(model, (torch.cat([example, example]),), str(path), dynamo=True,
                              opset_version=opset, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: batch},), verbose=False)


# -- tensors of interest, found in the graph ----------------------------------------------------------

def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every node output's shape, from running the graph once on zeros (batch 1) with onnxruntime: shape
    inference leaves H and W unknown after run-time Reshapes (ShuffleNet's channel shuffle)."""
    import onnxruntime

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    names = [out for node in copy.graph.node for out in node.output if out]
    present = {value.name for value in copy.graph.output}
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in present)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        dtype = np.uint8 if "uint8" in value.type else np.float32
        feeds[value.name] = np.zeros([d if isinstance(d, int) else 1 for d in value.shape], dtype)
    outputs = session.run(None, feeds)
    return {value.name: tuple(array.shape) for value, array in zip(session.get_outputs(), outputs)}


def _ints(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints)
    return None


def _reduce_axes(node, constants) -> list[int] | None:
    axes = _ints(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1] in constants:
        axes = [int(a) for a in constants[node.input[1]].ravel()]
    return axes


@dataclass(frozen=True)
class GraphFacts:
    tensors: dict[str, str]      # role -> tensor name
    layouts: dict[str, str]      # role -> "NCHW" / "NHWC", tracked through the graph's Transposes
    whole_image: frozenset[str]  # roles whose units see the whole image: a global pooling feeds them
                                 # (squeeze-and-excitation gates), so no local receptive field exists


POOLING = {"GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum", "AveragePool",
           "MaxPool"}


def find_tensors(proto: onnx.ModelProto, input_layout: str = "NCHW") -> GraphFacts:
    """The tensors of interest, found by graph structure (see the module docstring), with their layouts
    and whether a global pooling feeds them."""
    from onnx import numpy_helper

    shapes = _shapes(proto)
    graph = proto.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    image = {v.name for v in graph.input if v.name not in constants}
    layout = {name: input_layout for name in image}   # what a 4-D image-dependent tensor is laid out as
    whole: set[str] = set()
    found: dict[str, str] = {}
    convs = []

    def height(name, layout_name):
        shape = shapes.get(name, ())
        return shape[1 if layout_name == "NHWC" else 2] if len(shape) == 4 else 0

    for node in graph.node:
        inputs = [i for i in node.input if i in image]
        if not inputs or node.op_type in ("Shape", "Size"):  # shape arithmetic is not image data
            continue
        image.update(o for o in node.output if o)
        out = node.output[0]
        source = layout.get(inputs[0], "")
        perm = tuple(_ints(node, "perm") or ()) if node.op_type == "Transpose" else ()
        if len(perm) == 4:
            layout[out] = {("NCHW", (0, 2, 3, 1)): "NHWC", ("NHWC", (0, 3, 1, 2)): "NCHW"}.get((source, perm), "")
        else:  # everything else keeps the layout, ShuffleNet's 5-D channel shuffle included
            layout.update((o, source) for o in node.output if o)
        pooled = (node.op_type in POOLING and height(inputs[0], source) > 1
                  and (height(out, source) == 1 or len(shapes.get(out, ())) < 4))
        if pooled or any(i in whole for i in inputs) or 0 < len(shapes.get(out, ())) < 4:
            whole.update(o for o in node.output if o)
        if node.op_type == "Conv":
            convs.append(out)
        elif node.op_type == "Concat" and layout[out] == "NCHW" and height(out, "NCHW") > 1:
            found["concat"] = out
        elif node.op_type in ("GlobalAveragePool", "ReduceMean", "AveragePool") and pooled:
            axes = _reduce_axes(node, constants) if node.op_type == "ReduceMean" else [2, 3]
            h_w = [1, 2] if source == "NHWC" else [2, 3]
            if axes is not None and sorted(a % 4 for a in axes) == h_w or node.op_type != "ReduceMean":
                found["last_block"] = node.input[0]
        if layout[out] == "NHWC" and height(out, "NHWC") > 1:
            found["channels_last"] = out
    if convs:
        found["early"] = convs[len(convs) // 8]
        found["mid"] = convs[len(convs) // 2]
    return GraphFacts(found, {role: layout[name] for role, name in found.items()},
                      frozenset(role for role, name in found.items() if name in whole))


# -- the repository -----------------------------------------------------------------------------------

def config_toml(entry: ZooEntry) -> str:
    """The folder's config.toml: size, layout, stretch resize and ImageNet mean/std. uint8_nhwc takes the
    resized pixels themselves (scale 255, mean 0, std 1: pixel values 0..255, NHWC), which the server
    rounds into the graph's uint8 input; written out although they are the server's defaults for integer
    inputs, as a TFLite model's card would state them."""
    if entry.input_dtype == "uint8":
        mean, std, scale = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 255.0
    else:
        mean, std, scale = IMAGENET_MEAN, IMAGENET_STD, 1.0
    return (f'[input]\nheight = {entry.size}\nwidth = {entry.size}\nlayout = "{entry.layout}"\n'
            f"scale = {scale}\nmean = {list(mean)}\nstd = {list(std)}\nresize = \"stretch\"\n\n"
            f'[output]\nlogits = "logits"\n')


def build_zoo(root: Path, families=None, reuse: bool = False, size: int | None = None) -> list[ZooEntry]:
    """Export every (family, exporter, opset) of ``families`` (all by default) to root/<name>/ with its
    config.toml. ``reuse``: keep a model.onnx already there (the natives are rebuilt from their seeds
    either way, so they match). ``size``: export every model at this input size instead of its family's
    small test size (benchmarks time the families at 224 px, the size they are deployed at)."""
    root = Path(root)
    entries = []
    natives: dict[str, nn.Module] = {}
    for family, exporter, opset in exports(families):
        spec = FAMILIES[family]
        if family not in natives:
            natives[family] = native(family)
        model = natives[family]
        name = f"{family}_{exporter}{opset}"
        path = root / name / "model.onnx"
        started = time.perf_counter()
        if not (reuse and path.exists()):
            side = size or spec.size
            shape = (1, side, side, 3) if spec.layout == "NHWC" else (1, 3, side, side)
            dtype = torch.uint8 if spec.input_dtype == "uint8" else torch.float32
            export(model, path, torch.zeros(shape, dtype=dtype), exporter, opset)
        entry = ZooEntry(name, family, exporter, opset, size or spec.size, model, path, spec.layout, spec.input_dtype,
                         export_seconds=time.perf_counter() - started)
        facts = find_tensors(onnx.load(str(path)), spec.layout)
        entry.tensors, entry.layouts, entry.whole_image = facts.tensors, facts.layouts, facts.whole_image
        (root / name / "config.toml").write_text(config_toml(entry))
        entries.append(entry)
    return entries


# -- references on the native modules -----------------------------------------------------------------

def file_weights(native: nn.Module, path: Path) -> nn.Module:
    """A copy of ``native`` computing exactly the function the ONNX file holds, as tests/conftest.py's
    ``fused_lite0`` does for the default model: every batch-norm the exporter folded into its conv is
    fused (replaced by an identity), and every conv takes the file's weight and bias (matched to the native
    convs in forward order, shapes checked; Identity-fed weights followed). Folding rounds differently from
    the native BN arithmetic, and a ReLU or max-pool within float noise of a threshold or tie then routes
    the gradient elsewhere: GoogLeNet's saliency moved by 4e-3 relative on 2 of 5 random inputs, Inception
    v3's by up to 2.4e-2, though the logits agreed to 1e-6. The architecture and the gradient code stay
    the native model's own."""
    import copy

    from onnx import numpy_helper

    model = copy.deepcopy(native)
    graph = onnx.load(str(path)).graph
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def value(name):
        while name not in values and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        return values[name]

    calls = []  # (module name, module, input, output) of every Conv2d and BatchNorm2d call, in order
    names = {module: name for name, module in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((names[m], m, i[0], o)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    first = next(v for v in graph.input if v.name not in values)
    dims = [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]
    with torch.no_grad():
        model(torch.zeros(dims))
    for hook in hooks:
        hook.remove()
    convs = [call for call in calls if isinstance(call[1], nn.Conv2d)]
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == len(nodes), f"{path}: {len(nodes)} Conv nodes, {len(convs)} native convolutions"
    after = {id(call[2]): call for call in calls if isinstance(call[1], nn.BatchNorm2d)}
    with torch.no_grad():
        for (name, conv, _, output), node in zip(convs, nodes):
            weight = torch.from_numpy(value(node.input[1]).copy())
            assert weight.shape == conv.weight.shape, f"{node.name}: {weight.shape} vs native {name}"
            conv.weight.copy_(weight)
            if len(node.input) > 2 and node.input[2]:
                if conv.bias is None:
                    conv.bias = nn.Parameter(torch.zeros(conv.out_channels), requires_grad=False)
                conv.bias.copy_(torch.from_numpy(value(node.input[2]).copy()))
            norm = after.get(id(output))
            kept = any(c.op_type == "BatchNormalization" for c in consumers.get(node.output[0], []))
            if norm is not None and not kept:
                parent, _, attribute = norm[0].rpartition(".")
                setattr(model.get_submodule(parent), attribute, nn.Identity())
    return model.eval()


def native_batch(entry: ZooEntry, x: np.ndarray) -> torch.Tensor:
    """One model input (no batch axis) as the native module's float32 batch of 1; uint8 pixels become
    float pixel values 0..255, which the native uint8 model's ``float()`` leaves as they are."""
    return torch.from_numpy(np.ascontiguousarray(x[None], dtype=np.float32))


def native_logits(entry: ZooEntry, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return entry.native(native_batch(entry, x))[0].numpy()


def captum_saliency(entry: ZooEntry, x: np.ndarray, target: int, model: nn.Module | None = None) -> np.ndarray:
    """Captum's Saliency (signed gradient), input-shaped, on ``model`` (default: the file-weights
    reference)."""
    from captum.attr import Saliency

    model = entry.reference if model is None else model
    batch = native_batch(entry, x).requires_grad_(True)
    return Saliency(model).attribute(batch, target=target, abs=False)[0].detach().numpy()


class ChannelsFirstInput(nn.Module):
    """An NHWC model taking NCHW input: pytorch-grad-cam reads the image size from the last two axes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.permute(0, 2, 3, 1))


def grad_cam_reference(entry: ZooEntry, x: np.ndarray, target: int, role: str,
                       model: nn.Module | None = None) -> np.ndarray:
    """pytorch-grad-cam's GradCAM map (H, W), min-max scaled, at the submodule of ``model`` (default: the
    file-weights reference) computing ``role``'s tensor (channels-last tensors are transposed for it; NHWC
    inputs are fed through ChannelsFirstInput)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = entry.reference if model is None else model
    layer = model.get_submodule(entry.native_layers[role])
    batch = native_batch(entry, x).requires_grad_(True)  # the module is frozen: the input carries the graph
    if entry.layout == "NHWC":
        model, batch = ChannelsFirstInput(model), batch.permute(0, 3, 1, 2)
    transform = (lambda t: t.permute(0, 3, 1, 2)) if entry.layouts.get(role) == "NHWC" else None
    with GradCAM(model=model, target_layers=[layer], reshape_transform=transform) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(target)])[0]


def cam_reference(entry: ZooEntry, x: np.ndarray, target: int) -> np.ndarray:
    """CAM's map (H, W). For a global-average-pool + linear head, d logit / d A_k = w_k / (h w) everywhere,
    so CAM is pytorch-grad-cam's Grad-CAM at the pooled tensor. ConvNeXt's head (pool -> LayerNorm2d ->
    Flatten -> Linear) is written out from the native module as the decomposition the server documents
    (forward/class_activation.py): with v_k = w_ck gamma_k and sigma the LayerNorm's deviation of the
    pooled vector, logit_c = const + mean_ij M(i, j) for M = sum_k (v_k - mean v) A_k / sigma; the map is
    ReLU(M), min-max scaled and resized as pytorch-grad-cam does."""
    if entry.family != "convnext":
        return grad_cam_reference(entry, x, target, "last_block")
    from pytorch_grad_cam.utils.image import scale_cam_image

    model = entry.reference
    seen = {}
    hook = model.features.register_forward_hook(lambda module, inputs, output: seen.setdefault("A", output))
    with torch.no_grad():
        model(native_batch(entry, x))
    hook.remove()
    features = seen["A"][0].double().numpy()
    norm, linear = model.classifier[0], model.classifier[2]
    pooled = features.mean(axis=(1, 2))
    sigma = np.sqrt(pooled.var() + norm.eps)
    v = linear.weight[target].double().numpy() * norm.weight.double().numpy()
    heat = np.maximum(np.tensordot(v - v.mean(), features, axes=1) / sigma, 0)
    return scale_cam_image(heat[None].astype(np.float32), (entry.size, entry.size))[0]


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference over the largest reference magnitude."""
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.abs(np.asarray(ours, dtype=np.float64) - reference).max() / max(np.abs(reference).max(), 1e-30))
