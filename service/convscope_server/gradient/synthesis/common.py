"""What every synthesis job shares: the model's input space, objectives, regularisers, previews.

Images are optimised as NCHW float tensors in the model's input space (after mean/std) on the converted
module's device; ``InputSpace`` knows the valid range per channel, converts to and from [0, 1] pixels, and
lays images out as the model wants (NHWC models get a permute).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convscope_server import render
from convscope_server.gradient.bridge import TorchModel


@dataclass
class InputSpace:
    mean: np.ndarray      # (C,) in [0, scale] pixel units
    std: np.ndarray
    scale: float
    layout: str
    bgr: bool
    device: object = "cpu"  # the torch module's device: every tensor made here lives there

    @classmethod
    def of(cls, config, device="cpu") -> InputSpace:
        return cls(np.asarray(config.mean, np.float32), np.asarray(config.std, np.float32), config.scale,
                   config.layout, config.channel_order == "BGR", device)

    def _per_channel(self, values: np.ndarray):
        """(C,) numpy -> (1, C, 1, 1) tensor on the device."""
        import torch

        return torch.from_numpy(values).to(self.device).view(1, -1, 1, 1)

    def bounds(self):
        """(low, high) per channel, shaped (1, C, 1, 1) torch tensors: the input of pixels 0 and 1."""
        low = (0 - self.mean) / self.std
        high = (self.scale - self.mean) / self.std
        return self._per_channel(low), self._per_channel(high)

    def per_pixel_unit(self):
        """How far one [0, 1] pixel unit moves each channel of the input, (1, C, 1, 1)."""
        return self._per_channel(self.scale / self.std)

    def from_sample(self, sample: np.ndarray):
        """One model-input sample (model layout) -> (1, C, H, W) torch tensor on the device."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(sample)).to(self.device)[None]
        return x.permute(0, 3, 1, 2).contiguous() if self.layout == "NHWC" else x

    def to_sample(self, x) -> np.ndarray:
        """(1, C, H, W) torch tensor -> one model-input sample in the model's layout."""
        x = TorchModel.as_numpy(x)[0]
        return (x.transpose(1, 2, 0) if self.layout == "NHWC" else x).astype(np.float32)

    def model_input(self, x):
        return x.permute(0, 2, 3, 1) if self.layout == "NHWC" else x

    def pixels(self, x) -> np.ndarray:
        """(1, C, H, W) input -> uint8 HxWx3 RGB for showing."""
        chw = TorchModel.as_numpy(x)[0]
        hwc = (chw.transpose(1, 2, 0) * self.std + self.mean) * (255.0 / self.scale)
        return render.shown_pixels(hwc, self.bgr)

    def random(self, height: int, width: int, seed: int, spread: float = 0.1):
        """A random image near mid-grey, (1, C, H, W), drawn on the CPU (a seed gives the same image on every
        device) and moved to the device."""
        import torch

        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, len(self.mean), height, width, generator=generator).to(self.device)
        return self.from_pixels01(0.5 + spread * noise)

    def from_pixels01(self, pixels):
        """(1, C, H, W) [0, 1] pixels on the device -> model input."""
        mean = self._per_channel(self.mean / self.scale)
        std = self._per_channel(self.std / self.scale)
        return ((pixels - mean) / std).float()


@dataclass
class Objective:
    """What to maximise: a class logit (pre-softmax), or a layer's channel mean, or one neuron."""

    target: int | None = None
    layer: str | None = None
    channel: int = 0
    position: tuple[int, int] | None = None
    channel_axis: int = 1

    def layers(self) -> list[str]:
        return [self.layer] if self.layer else []

    def value(self, logits, store):
        if self.layer is None:
            return logits[:, self.target].sum()
        plane = store[self.layer].select(self.channel_axis, self.channel)
        return plane.mean() if self.position is None else plane[:, self.position[0], self.position[1]].sum()


@dataclass
class ChannelsObjective:
    """One unit per image of a batch (feature visualisation of many units in one pass): image i maximises
    ``units[i]`` = (layer, channel axis, channel, position): the channel's mean, or with a (row, column)
    position that one neuron. The value is the sum over images."""

    units: list[tuple[str, int, int, tuple[int, int] | None]]

    def layers(self) -> list[str]:
        return list(dict.fromkeys(unit[0] for unit in self.units))

    def value(self, logits, store):
        total = 0
        for i, (layer, axis, channel, position) in enumerate(self.units):
            plane = store[layer][i].select(axis - 1, channel)
            total = total + (plane.mean() if position is None else plane[position[0], position[1]])
        return total


def gaussian_blur(x, sigma: float):
    """Separable Gaussian blur of a (1, C, H, W) tensor (reflect padding)."""
    import torch
    import torch.nn.functional as F

    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def total_variation(x, beta: float = 2.0):
    """TV^beta regulariser of Mahendran & Vedaldi (2015), mean over pixels."""
    dh = x[:, :, 1:, :-1] - x[:, :, :-1, :-1]
    dw = x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
    return ((dh ** 2 + dw ** 2) ** (beta / 2)).mean()
