"""Graph analysis (onnx/graph.py): layouts and receptive fields through the blocks real exports contain,
checked against brute force, and the forward techniques that read them, through the real server.

Small native torch models are exported the ways real ones are (the TorchScript exporter at opsets 11 and
17, the dynamo exporter at opset 20): a ConvNeXt-like network (LayerNorm2d stem, channels-last blocks of
depthwise conv, permute, LayerNorm, Linear, GELU, Linear, layer scale, permute back and residual; a pool +
LayerNorm2d + Flatten + Linear head), ShuffleNet's chunk and channel shuffle, InstanceNorm and GroupNorm, a
TF-style channels-last network (ReduceMean over axes 1, 2 and a MatMul head), a plain conv stack for tight
windows, and a network with its image axes swapped by a Transpose.

The brute force: every input pixel (or a grid of them) is perturbed on its own, onnxruntime exposes the
tensors, and a unit counts as changed by a pixel when its value moves. Every pixel that changes a unit must
lie inside the unit's computed window; on the linear conv stacks, exactly those pixels do.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convscope import Client, InvalidArgument
from conftest import start
from convscope_server.forward.class_activation import class_map, find_linear_head
from convscope_server.onnx.graph import constants, unresolved
from convscope_server.onnx.loading import load_model
from convscope_server.onnx.probes import with_outputs
from convscope_server.onnx.session import SessionSettings
from convscope_server.repository import load_folder

SIZE = 32
CLASSES = 10


# -- the models -------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: permute to NHWC, LayerNorm over channels, permute back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """torchvision's CNBlock: depthwise 7x7, then a channels-last MLP with a layer scale, and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.fc1 = nn.Linear(channels, 4 * channels)
        self.fc2 = nn.Linear(4 * channels, channels)
        self.scale = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + self.scale * y


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), LayerNorm2d(16, eps=1e-6))
        self.block1 = Block(16)
        self.down = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Conv2d(16, 32, 2, stride=2))
        self.block2 = Block(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Flatten(1), nn.Linear(32, CLASSES))

    def features(self, x):
        return self.block2(self.down(self.block1(self.stem(x))))

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def channel_shuffle(x, groups: int):
    """torchvision's ShuffleNetV2 channel_shuffle: view, transpose, view back (shapes read at run time)."""
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, -1, height, width)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.conv5 = nn.Conv2d(24, 40, 1)
        self.fc = nn.Linear(40, CLASSES)

    def features(self, x):
        x = torch.relu(self.conv1(x))
        kept, branch = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((kept, self.conv2(branch)), dim=1), 3)
        return torch.relu(self.conv5(x))

    def forward(self, x):
        return self.fc(self.features(x).mean([2, 3]))


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gnorm = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, CLASSES)

    def features(self, x):
        x = torch.relu(self.inorm(self.conv1(x)))
        return torch.relu(self.gnorm(self.conv2(x)))

    def forward(self, x):
        return self.fc(self.features(x).mean([2, 3]))


class ChannelsLast(nn.Module):
    """As tf2onnx exports Keras: an NHWC input, channels-last tensors, Transposes around each Conv, a Dense
    layer as MatMul, global pooling as ReduceMean over axes 1, 2 and a MatMul + Add head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(12)
        self.dense = nn.Linear(12, 20)
        self.conv2 = nn.Conv2d(20, 24, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(24, CLASSES) * 0.3)
        self.bias = nn.Parameter(torch.randn(CLASSES) * 0.1)

    def features(self, x):
        x = self.conv1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = torch.relu(self.dense(self.norm(x)))
        return torch.relu(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def forward(self, x):
        return self.features(x).mean(dim=(1, 2)) @ self.weight + self.bias


class Stack(nn.Module):
    """Linear, positive weights: a unit depends on exactly the in-image pixels of its window (the dilated
    conv's taps overlap, so its window has no holes)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=2, dilation=2)
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(5, 6, (3, 5), padding=(1, 2))
        self.conv4 = nn.Conv2d(6, 6, 3)
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x):
        x = self.conv3(self.pool(self.conv2(self.conv1(x))))
        x = self.conv4(F.pad(x, (1, 0, 2, 1)))[:, :, 1:, ::2]
        return self.fc(x.mean([2, 3]))


class Swapped(nn.Module):
    """A Transpose swaps the image axes: (N, C, W, H) tensors, which are neither NCHW nor NHWC."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, (3, 5), padding=(1, 2))
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.fc(self.conv2(self.conv1(x).transpose(2, 3)).mean([2, 3]))


class MlpHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, CLASSES)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).mean([2, 3]))))


def _positive(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.zero_()
    return model


BUILDERS = {"convnext": ConvNeXtish, "shuffle": Shuffle, "norms": Norms, "nhwc": ChannelsLast,
            "stack": lambda: _positive(Stack()), "swapped": lambda: _positive(Swapped()), "mlphead": MlpHead}
EXPORTS = {  # model folder -> (builder, exporter, opset)
    **{f"{name}_{kind}{opset}": (name, kind, opset) for name in ("convnext", "shuffle", "norms")
       for kind, opset in (("legacy", 11), ("legacy", 17), ("dynamo", 20))},
    "nhwc_legacy11": ("nhwc", "legacy", 11), "nhwc_legacy17": ("nhwc", "legacy", 17),
    "stack_legacy17": ("stack", "legacy", 17), "swapped_legacy17": ("swapped", "legacy", 17),
    "mlphead_legacy17": ("mlphead", "legacy", 17),
}
CONFIG = """
[input]
height = 32
width = 32
layout = "{layout}"
scale = 1.0
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]
"""


def _export(model: nn.Module, path, kind: str, opset: int, nhwc: bool) -> None:
    shape = (1, SIZE, SIZE, 3) if nhwc else (1, 3, SIZE, SIZE)
    path.parent.mkdir(parents=True)
    options = dict(opset_version=opset, input_names=["input"], output_names=["logits"])
    if kind == "legacy":
        options["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=kind == "dynamo", **options)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(repository folder, {builder name: native module}): one native module per builder (seeded), exported
    once per exporter and opset."""
    root = tmp_path_factory.mktemp("graph_models")
    natives = {}
    for index, name in enumerate(BUILDERS):
        torch.manual_seed(index)
        natives[name] = BUILDERS[name]().eval()
    for folder, (name, kind, opset) in EXPORTS.items():
        _export(natives[name], root / folder / "model.onnx", kind, opset, name == "nhwc")
        (root / folder / "config.toml").write_text(CONFIG.format(layout="NHWC" if name == "nhwc" else "NCHW"))
    return root, natives


@pytest.fixture(scope="module")
def graph_server(models):
    running = start(models[0])
    yield running
    running.stop(0)


@pytest.fixture()
def client(graph_server):
    with Client(graph_server.address, timeout=60) as c:
        yield c


def _load(models, folder: str):
    return load_folder(folder, models[0] / folder, SessionSettings("cpu", 1))


def _input(name: str, seed: int = 0, batch: int = 1) -> np.ndarray:
    shape = (batch, SIZE, SIZE, 3) if name.startswith("nhwc") else (batch, 3, SIZE, SIZE)
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# -- layouts and receptive fields against brute force ------------------------------------------------------

def _runtime_values(loaded) -> dict[str, np.ndarray]:
    names = [layer.name for layer in loaded.layers if layer.op_type != "Input"]
    session = ort.InferenceSession(with_outputs(loaded.proto, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"input": _input(loaded.name)})))


def _layout_by_shape(shape) -> str:
    """The layout the sizes tell (the models' channel counts differ from their spatial sizes)."""
    if len(shape) != 4:
        return ""
    if shape[2] == shape[3] > 1 and shape[1] != shape[2]:
        return "NCHW"
    if shape[1] == shape[2] > 1 and shape[3] != shape[1]:
        return "NHWC"
    return ""


@pytest.mark.parametrize("folder", [f for f, (name, _, _) in EXPORTS.items() if name in
                                    ("convnext", "shuffle", "norms", "nhwc")])
def test_layout_of_every_image_tensor(models, folder):
    loaded = _load(models, folder)
    checked = 0
    for name, value in _runtime_values(loaded).items():
        if value.dtype != np.float32 or not _layout_by_shape(value.shape):
            continue
        layer = loaded.layer(name)
        assert layer.layout == _layout_by_shape(value.shape), (name, layer.op_type, value.shape)
        checked += 1
    assert checked >= {"convnext": 30, "shuffle": 8, "norms": 8, "nhwc": 8}[folder.split("_")[0]]


def _changed(loaded, layers, pixels) -> dict[str, np.ndarray]:
    """For each layer, (pixels, rows, cols): which units move when one pixel (all its channels) moves."""
    names = [layer.name for layer in layers]
    session = ort.InferenceSession(with_outputs(loaded.proto, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    base = _input(loaded.name, seed=1)[0]
    h_axis, w_axis = (0, 1) if loaded.config.layout == "NHWC" else (1, 2)
    step = loaded.fixed_batch or 64
    found = {name: [] for name in names}
    for begin in range(0, len(pixels), step):
        batch = np.repeat(base[None], min(step, len(pixels) - begin) + 1, axis=0)
        for i, (row, col) in enumerate(pixels[begin: begin + step], 1):
            index = [i, slice(None), slice(None), slice(None)]
            index[1 + h_axis], index[1 + w_axis] = row, col
            batch[tuple(index)] += 3.0
        if loaded.fixed_batch:
            outputs = [np.concatenate(parts) for parts in zip(*(session.run(names, {"input": batch[j: j + 1]})
                                                                for j in range(len(batch))))]
        else:
            outputs = session.run(names, {"input": batch})
        for layer, value in zip(layers, outputs):
            moved = np.abs(value[1:] - value[:1]) > 1e-5 * (1 + np.abs(value[:1]))
            others = tuple(a for a in range(1, moved.ndim) if a not in layer.axes)
            moved = moved.any(axis=others) if others else moved
            if layer.axes[0] > layer.axes[1]:  # units indexed (row, col) whatever the axis order
                moved = moved.transpose(0, 2, 1)
            found[layer.name].append(moved)
    return {name: np.concatenate(parts) for name, parts in found.items()}


def _inside(layer, pixels, rows: int, cols: int) -> np.ndarray:
    """(pixels, rows, cols): the pixel lies in the unit's computed window."""
    spatial = layer.spatial
    masks = []
    for field, units, coordinate in ((spatial.h, rows, pixels[:, 0]), (spatial.w, cols, pixels[:, 1])):
        centre = field.start + np.arange(units) * field.jump
        half = (field.size - 1) / 2
        masks.append((coordinate[:, None] >= centre - half) & (coordinate[:, None] <= centre + half))
    return masks[0][:, :, None] & masks[1][:, None, :]


@pytest.mark.parametrize("folder", [f for f, (name, _, _) in EXPORTS.items() if name != "mlphead"])
def test_receptive_fields_against_brute_force(models, folder):
    loaded = _load(models, folder)
    every = 3 if loaded.fixed_batch else 1  # the dynamo exports fix the batch to 1: a grid of pixels
    pixels = np.array([(r, c) for r in range(0, SIZE, every) for c in range(0, SIZE, every)])
    local = [layer for layer in loaded.layers if layer.spatial is not None and layer.op_type != "Input"]
    changed = _changed(loaded, local, pixels)
    tight = folder.split("_")[0] in ("stack", "swapped")
    for layer in local:
        moved = changed[layer.name]
        inside = _inside(layer, pixels, *moved.shape[1:])
        outside = moved & ~inside
        assert not outside.any(), (f"{layer.name}: pixel {pixels[np.argwhere(outside)[0][0]]} changes unit "
                                   f"{np.argwhere(outside)[0][1:]} outside its window {layer.spatial}")
        if tight and layer.op_type != "Pad":  # the zeros a Pad adds depend on nothing
            assert (moved == inside).all(), f"{layer.name}: window {layer.spatial} is not tight"
    if not folder.startswith("norms"):  # no window lost on the way: every tensor with image axes has one
        assert all(layer.spatial for layer in loaded.layers if layer.axes), \
            [layer.name for layer in loaded.layers if layer.axes and not layer.spatial]


def test_plain_stack_windows_by_hand(models):
    """(size, jump, start) by hand: conv 3 p1 -> 3, 1, 0; conv 3 dilation 2 p2 -> 3 + 2*2*1 = 7, 1, 0;
    avgpool 2/2 -> 8, 2, 0.5; conv (3, 5) p(1, 2) -> rows 12, cols 16, 2, 0.5; Pad top 2, left 1 -> starts
    0.5 - 2*2 = -3.5, 0.5 - 1*2 = -1.5; conv 3 -> rows 16, cols 20, starts -1.5, 0.5; Slice rows 1: ->
    start -1.5 + 2 = 0.5, cols ::2 -> jump 4."""
    fields = {layer.op_type: layer.spatial for layer in _load(models, "stack_legacy17").layers if layer.spatial}
    as_tuples = {op: ((s.h.size, s.h.jump, s.h.start), (s.w.size, s.w.jump, s.w.start)) for op, s in fields.items()}
    assert as_tuples["AveragePool"] == ((8, 2, 0.5), (8, 2, 0.5))
    assert as_tuples["Pad"] == ((12, 2, -3.5), (16, 2, -1.5))
    assert as_tuples["Slice"] == ((16, 2, 0.5), (20, 4, 0.5))


def test_whole_image_normalisations_keep_their_layout_and_claim_no_window(models):
    """InstanceNorm and GroupNorm statistics span the image: one pixel moves every unit after them, so
    they report their layout and no receptive field."""
    for folder in ("norms_legacy11", "norms_legacy17", "norms_dynamo20"):
        loaded = _load(models, folder)
        after = [layer for layer in loaded.layers if layer.layout and layer.op_type != "Input"][1:]
        assert after and all(layer.spatial is None and layer.layout == "NCHW" for layer in after), folder
        last = after[-1]
        moved = _changed(loaded, [last], np.array([(0, 0)]))[last.name]
        assert moved[0, -1, -1], "a far pixel should move the corner unit"


def test_probe_run_resolves_shapes_left_open_by_shape_inference(models, repository):
    """ShuffleNet's channel shuffle reshapes to shapes computed at run time: shape inference leaves them
    open at opset 11, one probe run at load measures them, and conv5 is (N, 40, 16, 16) with its window."""
    loaded = _load(models, "shuffle_legacy11")
    assert unresolved(loaded.proto)
    conv5 = loaded.layer("/conv5/Conv_output_0")
    assert conv5.shape == (-1, 40, 16, 16) and conv5.layout == "NCHW" and conv5.spatial.h.size == 7
    shuffled = loaded.layer("/Transpose_output_0")
    assert shuffled.shape == (-1, 8, 3, 16, 16) and shuffled.axes == (3, 4) and shuffled.layout == ""
    for static in ("efficientnet_lite0", "tiny"):  # shape inference knows every shape: no probe run at load
        assert not unresolved(load_model(repository / static / "model.onnx", repository / static))


# -- CAM heads ---------------------------------------------------------------------------------------------

def _features(native, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return native.features(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("folder", ["convnext_legacy11", "convnext_legacy17", "convnext_dynamo20"])
def test_cam_through_a_layer_norm_head_is_exact(models, client, folder):
    """ConvNeXt's head: pool -> LayerNorm2d (permute, LayerNorm, permute) -> Flatten -> Linear. The CAM
    M_c = sum_k (v_ck - mean_k v_ck) A_k / sigma, v = W gamma, sigma from the pooled vector, averages over
    positions to the logit less the head's constant W_c . beta + b_c (checked on the native module)."""
    native = models[1]["convnext"]
    x = _input(folder, seed=5)
    features = _features(native, x)[0]
    pooled = features.mean(axis=(1, 2))
    norm, linear = native.head[0], native.head[2]
    v = (linear.weight * norm.weight).detach().numpy().astype(np.float64)
    v -= v.mean(axis=1, keepdims=True)
    sigma = np.sqrt(pooled.var() + norm.eps)
    maps = np.tensordot(v, features, axes=1) / sigma
    with torch.no_grad():
        logits = native(torch.from_numpy(x))[0].numpy()
        constant = (linear.weight @ norm.bias + linear.bias).numpy()
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + constant, logits, rtol=1e-4, atol=1e-5)

    proto = _load(models, folder).proto
    head = find_linear_head(proto, constants(proto), "logits")
    np.testing.assert_allclose(head.weights, v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(class_map(features, head, 3), maps[3], rtol=1e-4, atol=1e-5)

    from convscope_server.gradient.cam import finish

    got = client.cam(folder, x[0], target=3, method="cam")
    np.testing.assert_allclose(got.attribution, v[3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.map, finish(np.maximum(maps[3], 0), SIZE, SIZE), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("folder", ["nhwc_legacy11", "nhwc_legacy17", "shuffle_legacy11", "shuffle_dynamo20",
                                    "norms_legacy11", "norms_legacy17"])
def test_cam_of_plain_heads(models, client, folder):
    """ReduceMean over (1, 2) + MatMul + Add on channels-last maps, and mean over (2, 3) + Gemm after a
    run-time channel shuffle and after GroupNorm: CAM = ReLU(sum_k w_ck A_k)."""
    from convscope_server.gradient.cam import finish

    name = folder.split("_")[0]
    native = models[1][name]
    x = _input(folder, seed=6)
    features = _features(native, x)[0]
    if name == "nhwc":
        weights, features = native.weight.detach().numpy().T, features.transpose(2, 0, 1)
    else:
        weights = native.fc.weight.detach().numpy()
    expected = finish(np.maximum(np.tensordot(weights[2], features, axes=1), 0), SIZE, SIZE)
    got = client.cam(folder, x[0], target=2, method="cam")
    np.testing.assert_allclose(got.attribution, weights[2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.map, expected, rtol=1e-4, atol=1e-4)


def test_cam_refuses_a_head_with_a_hidden_layer(models, client):
    with pytest.raises(InvalidArgument, match="reads Relu"):
        client.cam("mlphead_legacy17", _input("mlphead")[0], target=0, method="cam")


# -- techniques through the server -------------------------------------------------------------------------

def test_activations_of_channels_last_tensors(models, client):
    """Inside a ConvNeXt block the tensors are (N, H, W, C): statistics are per C, the last axis."""
    native = models[1]["convnext"]
    xs = _input("convnext", seed=2, batch=2)
    names = {"/block1/norm/LayerNormalization_output_0": native.block1.norm,
             "/block1/fc1/Add_output_0": native.block1.fc1}
    got = client.activations("convnext_legacy17", list(xs), list(names), render=True, max_channels=8)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach().numpy()))
             for n, m in names.items()]
    with torch.no_grad():
        native(torch.from_numpy(xs))
    for hook in hooks:
        hook.remove()
    for name in names:
        entry = got[name]
        assert entry.layout == "NHWC" and entry.values.shape[-1] in (16, 64)
        np.testing.assert_allclose(entry.values, seen[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(entry.stats["mean"], seen[name].mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
        assert len(entry.stats["max"]) == seen[name].shape[-1] and len(entry.png) == 2


def test_top_patches_of_a_channels_last_tensor(models, client):
    layer = "/block1/fc1/Add_output_0"
    images = [np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(12)]
    scan = client.top_patches("convnext_legacy17", layer, images, k=3)
    values = client.activations("convnext_legacy17", images, [layer])[layer].values  # (12, 8, 8, 64)
    rf = client.describe("convnext_legacy17", [layer]).layers[0].receptive_field
    assert set(scan.channels) == set(range(64)) and rf.size == (28, 28) and rf.jump == (4, 4)
    flat = values.reshape(12, 64, 64)
    for channel, hits in scan.channels.items():
        per_image = flat[:, :, channel]
        order = np.lexsort((np.arange(12), -per_image.max(axis=1)))[:3]
        assert [h.index for h in hits] == order.tolist()
        for hit, index in zip(hits, order):
            assert hit.row * 8 + hit.col == per_image[index].argmax()
            centre = rf.start[0] + 4 * np.array([hit.row, hit.col])
            low = np.maximum(np.floor(centre - 13.5 + 0.5), 0).astype(int)
            high = np.minimum(np.floor(centre + 13.5 + 0.5) + 1, SIZE).astype(int)
            assert hit.box == (low[0], low[1], high[0], high[1])


@pytest.mark.parametrize("folder", ["convnext_legacy17", "convnext_dynamo20", "shuffle_legacy11", "norms_legacy17"])
def test_score_cam_equals_pytorch_grad_cam(models, client, folder):
    """The last ConvNeXt block (1, 32, 4, 4), ShuffleNet's conv5 behind a run-time channel shuffle, and
    the map after GroupNorm are accepted, and equal pytorch-grad-cam's ScoreCAM on the native module."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name = folder.split("_")[0]
    native = models[1][name]
    target_layer = getattr(native, {"convnext": "block2", "shuffle": "conv5", "norms": "gnorm"}[name])
    x = _input(folder, seed=4)
    with ScoreCAM(model=native, target_layers=[target_layer]) as cam:
        expected = cam(input_tensor=torch.from_numpy(x), targets=[ClassifierOutputTarget(1)])[0]
    proto = _load(models, folder).proto
    layer = {"convnext": find_linear_head(proto, constants(proto), "logits").feature_map,
             "shuffle": "/conv5/Conv_output_0",
             "norms": next(n.output[0] for n in proto.graph.node if n.op_type == "Add")}[name]
    got = client.score_cam(folder, x[0], layer, target=1)
    np.testing.assert_allclose(got.cam, expected, rtol=1e-4, atol=1e-4)


def test_unknown_layouts_are_refused_naming_the_field(models, client):
    """A Transpose that swaps H and W leaves (N, C, W, H) tensors, and GroupNorm's reshape an (N, g, L)
    one: techniques that need channels and image axes refuse them instead of reading a wrong axis."""
    x = _input("swapped")[0]
    swapped = "/Transpose_output_0"
    with pytest.raises(InvalidArgument, match=r"layer: '/Transpose_output_0' is not a spatial \(N, C, H, W\) "
                                              r"tensor: its height and width are axes \(3, 2\)"):
        client.score_cam("swapped_legacy17", x, swapped)
    with pytest.raises(InvalidArgument, match=r"layers\[0\]: '/Transpose_output_0': which axis holds the channels"):
        client.dead_filters("swapped_legacy17", [x], [swapped])
    with pytest.raises(InvalidArgument, match=r"layers\[1\]: '/Transpose_output_0'"):
        client.activations("swapped_legacy17", x, ["/conv1/Conv_output_0", swapped], render=True)
    got = client.activations("swapped_legacy17", x, [swapped, "/conv2/Conv_output_0"])
    assert got[swapped].layout == "" and len(got[swapped].stats["mean"]) == 0  # values, no guessed statistics
    assert len(got["/conv2/Conv_output_0"].stats["mean"]) == 8  # a Conv output's axis 1 is its filters
    with pytest.raises(InvalidArgument, match=r"layer: '/gnorm/Reshape_output_0' is not a spatial \(N, C, H, W\) "
                                              r"tensor: it has shape \[-1, 2, 4096\]"):
        client.score_cam("norms_legacy17", _input("norms")[0], "/gnorm/Reshape_output_0")
