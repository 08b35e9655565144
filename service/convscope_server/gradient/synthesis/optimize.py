"""Class-model and feature visualisation by regularised gradient ascent.

Simonyan et al. (2014), "Deep Inside Convolutional Networks": maximise a class score (pre-softmax) minus
an L2 penalty, from a zero or random image. Yosinski et al. (2015), "Understanding Neural Networks
Through Deep Visualization": L2 decay, Gaussian blur every few steps, clipping pixels of small norm and of
small contribution, plus jitter (random shifts) as in later work. The same loop maximises one channel or
neuron of any layer (feature visualisation). Steps are normalised by the mean absolute gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from convscope_server.gradient.synthesis.common import gaussian_blur


@dataclass
class Regularizers:
    l2: float = 0.0              # Simonyan's lambda: objective - l2 * mean(x^2)
    decay: float = 0.0           # Yosinski's L2 decay: x *= (1 - decay) every step
    blur_every: int = 0          # Gaussian blur every k steps (0: never)
    blur_sigma: float = 0.5
    jitter: int = 0              # random shift of up to this many pixels before each step
    clip_norm_percentile: float = 0.0          # pixels whose norm is below this percentile -> 0 (the mean)
    clip_contribution_percentile: float = 0.0  # pixels contributing least (|x * grad|) -> 0


def _percentile_mask(values, percentile: float):
    """1 where ``values`` (N, 1, H, W) reach their image's ``percentile``, else 0."""
    import torch

    threshold = torch.quantile(values.flatten(1), percentile / 100.0, dim=1)
    return (values >= threshold.view(-1, *([1] * (values.dim() - 1)))).to(values.dtype)


def ascend(torch_model, space, objective, x, steps: int, lr: float, reg: Regularizers, seed: int = 0,
           report=None, should_stop=None):
    """Gradient ascent of ``objective`` from ``x`` (N, C, H, W). Each image's step is normalised by its own
    mean absolute gradient and its clipping percentiles are its own, so a batch of N images with an
    objective that sums one term per image ascends each as it would alone. Returns (x, losses) or None
    when stopped."""
    import torch

    low, high = space.bounds()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    x = x.detach().clone()
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            return None
        dy, dx = (torch.randint(-reg.jitter, reg.jitter + 1, (2,), generator=generator).tolist()
                  if reg.jitter else (0, 0))
        shifted = torch.roll(x, (dy, dx), (2, 3)).requires_grad_(True)
        with torch_model.capture(objective.layers()) as store:
            logits = torch_model.logits(space.model_input(shifted))
            value = objective.value(logits, store)
            total = value - reg.l2 * (shifted ** 2).mean()
            total.backward()
        grad = torch.roll(shifted.grad, (-dy, -dx), (2, 3))
        with torch.no_grad():
            x = x + lr * grad / (grad.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-12)
            if reg.decay:
                x = x * (1 - reg.decay)
            if reg.blur_every and step % reg.blur_every == 0:
                x = gaussian_blur(x, reg.blur_sigma)
            if reg.clip_norm_percentile:
                x = x * _percentile_mask(x.norm(dim=1, keepdim=True), reg.clip_norm_percentile)
            if reg.clip_contribution_percentile:
                contribution = (x * grad).abs().sum(dim=1, keepdim=True)
                x = x * _percentile_mask(contribution, reg.clip_contribution_percentile)
            x = torch.maximum(torch.minimum(x, high), low)
        losses.append(float(value.detach()))
        if report is not None:
            report(step, losses[-1], x)
    return x, losses
