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

def _bound(value):
    return None if value is None else float(value)


@contextlib.contextmanager
def modified_relus(torch_model, rule: str):
    """Within the block, backward through ReLU and through Clip with lower bound 0 (ReLU6) follows
    ``rule``. At a Clip only the rectification is replaced: the upper bound keeps its mask (x < max), as
    ReLU followed by clamp(max) would under the same rule."""
    import torch
    import torch.nn.functional as F

    seen: dict = {}  # module -> (forward input, upper bound), for the rectifying Clips

    def remember(module, inputs, output):
        lower = _bound(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _bound(module.min)
        upper = _bound(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else _bound(module.max)
        seen[module] = (inputs[0].detach(), upper) if lower == 0.0 else None

    def rewrite(module, grad_input, grad_output):
        if isinstance(module, torch.nn.Hardtanh):  # a constant-bound Clip(0, max) after the bridge's swap
            if rule == "deconvnet":
                x = seen[module]
                return (F.relu(grad_output[0] * (x < module.max_val)),) + tuple(grad_input[1:])
            return (F.relu(grad_input[0]),) + tuple(grad_input[1:])
        if type(module).__name__ == "Clip":
            state = seen.get(module)
            if state is None:  # a clamp that does not rectify: leave its gradient alone
                return None
            x, upper = state
            if rule == "deconvnet":
                passed = grad_output[0] if upper is None else grad_output[0] * (x < upper)
                return (F.relu(passed),) + tuple(grad_input[1:])
        source = grad_output if rule == "deconvnet" else grad_input
        return (F.relu(source[0]),) + tuple(grad_input[1:])  # only the data input's gradient changes

    handles = []
    for module in torch_model.module.modules():
        kind = type(module).__name__
        rectifying_hardtanh = isinstance(module, torch.nn.Hardtanh) and module.min_val == 0.0
        if kind == "Clip":
            handles.append(module.register_forward_hook(remember))
        if rectifying_hardtanh:
            handles.append(module.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0].detach())))
        if kind in ("ReLU", "Clip") or rectifying_hardtanh:
            handles.append(module.register_full_backward_hook(rewrite))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def modified_gradient(torch_model, sample: np.ndarray, rule: str, target: int | None = None,
                      layer: str | None = None, channel: int = 0, channel_axis: int = 1,
                      position: tuple[int, int] | None = None) -> np.ndarray:
    """Gradient of the target logit, or of ``layer``'s channel ``channel`` (summed, or the one neuron at
    ``position`` = (row, col)), w.r.t. the input."""
    x = torch_model.tensor(sample[None]).requires_grad_(True)
    with modified_relus(torch_model, rule), torch_model.capture([layer] if layer else []) as store:
        logits = torch_model.logits(x)
        if layer is None:
            objective = logits[:, target].sum()
        else:
            plane = store[layer].select(channel_axis, channel)  # (N, H, W) whatever the layout
            objective = plane.sum() if position is None else plane[:, position[0], position[1]].sum()
        objective.backward()
    return torch_model.as_numpy(x.grad)[0]
