"""Small native torch CNNs exported to ONNX for the tests, and the broken model folders the server must refuse.

TinyNet (32x32 input, 10 classes) has what real CNNs have: conv, batch-norm, ReLU, ReLU6, max-pool, a
residual add and a global-average-pool + linear head. Its receptive fields, by hand (size, jump, start):

    conv1  k3 s1 p1   ->  3, 1, 0.0
    conv2  k3 s2 p1   ->  5, 2, 0.0      (3 + 2*1; start 0 + (1 - 1)*1)
    pool   k2 s2      ->  7, 4, 1.0      (5 + 1*2; start 0 + (0.5 - 0)*2)
    conv3  k3 s1 p1   -> 15, 4, 1.0      (7 + 2*4)
    add(pool, conv3)  -> 15, 4, 1.0      (union of the two windows)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

NUM_CLASSES = 10
DEAD_CHANNEL = 3
SIZE = 32
HAND_RECEPTIVE_FIELDS = {  # tensor name -> (size, jump, start), the same on both axes
    "/conv1/Conv_output_0": (3, 1, 0.0),
    "/conv2/Conv_output_0": (5, 2, 0.0),
    "/pool/MaxPool_output_0": (7, 4, 1.0),
    "/conv3/Conv_output_0": (15, 4, 1.0),
    "/Add_output_0": (15, 4, 1.0),
}


class ReLUThenClamp6(nn.Module):
    """ReLU6 as an nn.ReLU module followed by clamp(max=6): Captum's guided backprop and DeconvNet rewrite
    nn.ReLU modules only, so this is how the reference model exposes its ReLU6 to them."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return torch.clamp(self.relu(x), max=6.0)


class TinyNet(nn.Module):
    def __init__(self, channels_last_input: bool = False, fixed_batch: bool = False, captum_relu6: bool = False):
        super().__init__()
        self.channels_last_input = channels_last_input
        self.fixed_batch = fixed_batch
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.relu6 = ReLUThenClamp6() if captum_relu6 else nn.ReLU6()  # exported: Clip(0, 6)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        if self.channels_last_input:  # as tf2onnx exports Keras models: NHWC input, Transpose to NCHW
            x = x.permute(0, 3, 1, 2)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = self.pool(x)
        x = x + self.relu6(self.conv3(x))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1)
        # A fixed-batch export keeps a constant [1, -1] Reshape, as many converters write.
        x = x.reshape(1, -1) if self.fixed_batch else x.flatten(1)
        return self.fc(x)


def tiny_net(seed: int = 0, **kwargs) -> TinyNet:
    """The same weights for the same seed whatever else runs: every value is drawn from a generator of its
    own (a server converting models in the background draws from torch's global one)."""
    generator = torch.Generator().manual_seed(seed)
    model = TinyNet(**kwargs)
    with torch.no_grad():
        for module in (model.conv1, model.conv2, model.conv3, model.fc):  # torch's default init, U(+-1/sqrt(fan_in))
            bound = module.weight[0].numel() ** -0.5
            for parameter in (module.weight, module.bias):
                parameter.copy_((torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound)
        # non-trivial batch-norm statistics so folding them is tested
        model.bn1.running_mean.copy_(torch.rand(8, generator=generator) - 0.5)
        model.bn1.running_var.copy_(torch.rand(8, generator=generator) * 1.5 + 0.5)
        # conv2's channel DEAD_CHANNEL is constant (-100) before its ReLU and zero after it, for any input.
        model.conv2.weight[DEAD_CHANNEL] = 0
        model.conv2.bias[DEAD_CHANNEL] = -100
    return model.eval()


def export(model: nn.Module, path: Path, dynamic_batch: bool = True) -> None:
    shape = (1, SIZE, SIZE, 3) if getattr(model, "channels_last_input", False) else (1, 3, SIZE, SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes=axes)


TINY_CONFIG = """
[input]
height = 32
width = 32
layout = "NCHW"
scale = 1.0
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[output]
labels = "labels.txt"
"""


def build_repository(root: Path, default_model: Path, outside: Path) -> None:
    """Fill ``root`` with the default model, the tiny models, and broken models; ``outside`` is a folder
    beside the repository for files the server must never read."""
    shutil.copytree(default_model, root / "efficientnet_lite0",
                    ignore=shutil.ignore_patterns("*.tmp", "__pycache__"))

    export(tiny_net(), root / "tiny" / "model.onnx")
    (root / "tiny" / "config.toml").write_text(TINY_CONFIG)
    (root / "tiny" / "labels.txt").write_text("".join(f"thing {i}\n" for i in range(NUM_CLASSES)))
    export(tiny_net(channels_last_input=True), root / "tiny_nhwc" / "model.onnx")  # no config: all guessed
    export(tiny_net(fixed_batch=True), root / "tiny_fixed_batch" / "model.onnx", dynamic_batch=False)
    (root / "tiny_fixed_batch" / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))

    # onnxruntime runs com.microsoft's QuickGelu; onnx2pytorch cannot convert it: forward methods work,
    # gradient methods answer FAILED_PRECONDITION naming the op.
    contrib = onnx.load(str(root / "tiny" / "model.onnx"))
    for node in contrib.graph.node:
        if node.op_type == "Relu":
            node.op_type, node.domain = "QuickGelu", "com.microsoft"
            break
    contrib.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    (root / "tiny_contrib_op").mkdir()
    onnx.save_model(contrib, str(root / "tiny_contrib_op" / "model.onnx"))

    good = (root / "tiny" / "model.onnx").read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "model.onnx").write_bytes(good[: len(good) // 2])

    outside.mkdir(parents=True, exist_ok=True)
    (outside / "model.onnx").write_bytes(good)
    (root / "symlink_outside").mkdir()
    (root / "symlink_outside" / "model.onnx").symlink_to(outside / "model.onnx")

    # Weights saved as external data, then pointed at a file outside the repository.
    proto = onnx.load(str(root / "tiny" / "model.onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save_model(proto, f"{tmp}/model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.bin", size_threshold=0)
        shutil.copy(f"{tmp}/weights.bin", outside / "weights.bin")
        external = onnx.load(f"{tmp}/model.onnx", load_external_data=False)
    for tensor in external.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../outside/weights.bin"
    (root / "external_outside").mkdir()
    onnx.save_model(external, str(root / "external_outside" / "model.onnx"))
