"""Gradient attribution on the input: vanilla saliency (Simonyan et al. 2014, "Deep Inside Convolutional
Networks"), SmoothGrad (Smilkov et al. 2017) and Integrated Gradients (Sundararajan et al. 2017, with
Gauss-Legendre quadrature as Captum's default).

Each returns the attribution in the input's own shape and layout; the saliency map shown is the maximum
of its absolute value over channels.
"""

from __future__ import annotations

import numpy as np


def input_gradients(torch_model, inputs: np.ndarray, target: int, chunk: int, should_stop=None,
                    progress=None, done: int = 0, total: int = 0) -> np.ndarray | None:
    """d logits[:, target] / d inputs for a batch (N, ...), ``chunk`` samples per backward pass."""
    grads = np.empty_like(inputs, dtype=np.float32)
    for begin in range(0, len(inputs), chunk):
        if should_stop is not None and should_stop():
            return None
        x = torch_model.tensor(inputs[begin: begin + chunk]).requires_grad_(True)
        torch_model.logits(x)[:, target].sum().backward()
        grads[begin: begin + len(x)] = torch_model.as_numpy(x.grad)
        if progress is not None:
            progress(done + begin + len(x), total or len(inputs))
    return grads


def vanilla(torch_model, sample: np.ndarray, target: int) -> np.ndarray:
    return input_gradients(torch_model, sample[None], target, 1)[0]


def smoothgrad(torch_model, sample: np.ndarray, target: int, samples: int, sigma: float, seed: int, chunk: int,
               should_stop=None, progress=None) -> np.ndarray | None:
    """Mean gradient over ``samples`` copies of ``sample`` plus Gaussian noise (std ``sigma``). The noise is
    drawn ``chunk`` copies at a time from one generator seeded with ``seed``: the same values as one
    ``default_rng(seed).normal(0, sigma, (samples, ...))`` draw, without holding them all."""
    rng = np.random.default_rng(seed)
    total = np.zeros(sample.shape, np.float64)
    for begin in range(0, samples, chunk):
        count = min(chunk, samples - begin)
        noisy = sample[None] + rng.normal(0, sigma, (count, *sample.shape)).astype(np.float32)
        grads = input_gradients(torch_model, noisy, target, chunk, should_stop)
        if grads is None:
            return None
        total += grads.sum(axis=0, dtype=np.float64)
        if progress is not None:
            progress(begin + count, samples)
    return (total / samples).astype(np.float32)


def integrated_gradients(torch_model, sample: np.ndarray, target: int, baseline: np.ndarray, steps: int,
                         chunk: int, should_stop=None, progress=None) -> np.ndarray | None:
    """(x - x') * integral over alpha of the gradient at x' + alpha (x - x'), by Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas, step_sizes = (0.5 * (nodes + 1)).astype(np.float32), 0.5 * weights
    # float32 throughout, as the model computes: a path point rounded differently can flip a unit that
    # sits within float noise of a ReLU threshold, and the gradient jumps there.
    delta = (sample - baseline).astype(np.float32)
    path = baseline[None].astype(np.float32) + alphas.reshape(-1, *([1] * sample.ndim)) * delta[None]
    grads = input_gradients(torch_model, path, target, chunk, should_stop, progress)
    if grads is None:
        return None
    integral = (grads * step_sizes.reshape(-1, *([1] * sample.ndim))).sum(axis=0)
    return ((sample - baseline) * integral).astype(np.float32)


def saliency_map(attribution: np.ndarray, channel_axis: int) -> np.ndarray:
    """Simonyan et al.: the maximum absolute value over channels, (H, W)."""
    return np.abs(attribution).max(axis=channel_axis)
