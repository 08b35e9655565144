"""Gradient-weighted class activation maps for any conv layer: Grad-CAM (Selvaraju et al. 2017) and
Grad-CAM++ (Chattopadhay et al. 2018). The channel weights follow pytorch-grad-cam's ``GradCAM`` and
``GradCAMPlusPlus``; the map is ReLU(sum_k w_k A_k), min-max scaled and resized to the input. Guided
Grad-CAM multiplies guided backprop by the unnormalised Grad-CAM, nearest-upsampled, as Captum's
``GuidedGradCam`` does.
"""

from __future__ import annotations

import numpy as np

from convscope_server import render


def _scale(cam: np.ndarray) -> np.ndarray:
    cam = cam - cam.min()
    return cam / (1e-7 + cam.max())


def layer_and_gradient(torch_model, sample: np.ndarray, target: int, layer: str):
    """The layer's activation and d logit[target] / d activation for one sample, as numpy."""
    x = torch_model.tensor(sample[None])
    with torch_model.capture([layer], keep_grad=True) as store:  # backward starts and stops at the layer
        torch_model.logits(x)[:, target].sum().backward()
        activation = store[layer]
    return torch_model.as_numpy(activation)[0], torch_model.as_numpy(activation.grad)[0]


def cam_weights(activation: np.ndarray, grads: np.ndarray, method: str) -> np.ndarray:
    """Channel weights from (C, h, w) activation and gradient."""
    if method == "gradcam":
        return grads.mean(axis=(1, 2))
    g2 = grads ** 2
    g3 = g2 * grads
    sums = activation.sum(axis=(1, 2))[:, None, None]
    aij = np.where(grads != 0, g2 / (2 * g2 + sums * g3 + 1e-6), 0)
    return (np.maximum(grads, 0) * aij).sum(axis=(1, 2))


def finish(low_res: np.ndarray, height: int, width: int) -> np.ndarray:
    """A non-negative layer-resolution map -> [0, 1] at the input size (pytorch-grad-cam's scaling)."""
    cam = render.resize(_scale(low_res), height, width)
    return _scale(np.maximum(cam, 0)).astype(np.float32)


def grad_cam(activation: np.ndarray, grads: np.ndarray, method: str, height: int, width: int) -> np.ndarray:
    weights = cam_weights(activation, grads, method)
    return finish(np.maximum((weights[:, None, None] * activation).sum(axis=0), 0), height, width)


def nearest_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) -> (height, width) by nearest neighbour (torch's interpolate(mode="nearest"))."""
    rows = np.floor(np.arange(height) * (maps.shape[0] / height)).astype(int)
    cols = np.floor(np.arange(width) * (maps.shape[1] / width)).astype(int)
    return maps[rows][:, cols]


def raw_grad_cam(activation: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """ReLU(sum_k mean(dY/dA_k) A_k) at the layer's resolution, not normalised (Captum's LayerGradCam)."""
    return np.maximum((grads.mean(axis=(1, 2))[:, None, None] * activation).sum(axis=0), 0)
