"""DeconvNet (Zeiler & Fergus 2014) and guided backpropagation (Springenberg et al. 2015): the gradient
of a class score or of one neuron/channel with the backward pass through every ReLU-like op replaced.

- guided backprop: pass back only positive gradients where the forward input was active,
  ``relu(grad_in)`` with ``grad_in`` the op's own masked gradient;
- DeconvNet: pass back positive gradients regardless of the forward input, ``relu(grad_out)``.

The rules are applied to every ReLU and Clip (ReLU6 as exported) module of the converted graph through
backward hooks; the forward pass is unchanged.
"""

from __future__ import annotations

import contextlib

import numpy as np

RELU_LIKE = ("ReLU", "Clip")


@contextlib.contextmanager
def modified_relus(torch_model, rule: str):
    import torch.nn.functional as F

    def hook(module, grad_input, grad_output):
        source = grad_output if rule == "deconvnet" else grad_input
        return (F.relu(source[0]),) + tuple(grad_input[1:])  # only the data input's gradient changes

    handles = [m.register_full_backward_hook(hook) for m in torch_model.module.modules()
               if type(m).__name__ in RELU_LIKE]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def modified_gradient(torch_model, sample: np.ndarray, rule: str, target: int | None = None,
                      layer: str | None = None, channel: int = 0, channel_axis: int = 1) -> np.ndarray:
    """Gradient of the target logit, or of the sum of ``layer``'s channel ``channel``, w.r.t. the input."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(sample[None])).to(torch_model.device).requires_grad_(True)
    with modified_relus(torch_model, rule), torch_model.capture([layer] if layer else []) as store:
        logits = torch_model.logits(x)
        objective = logits[:, target].sum() if layer is None else store[layer].select(channel_axis, channel).sum()
        objective.backward()
    return x.grad.detach().cpu().numpy()[0]
