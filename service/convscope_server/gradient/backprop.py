"""DeconvNet (Zeiler & Fergus 2014) and guided backpropagation (Springenberg et al. 2015): the gradient
of a class score or of one neuron/channel with the backward pass through every ReLU-like op replaced.

- guided backprop: pass back only positive gradients where the forward input was active,
  ``relu(grad_in)`` with ``grad_in`` the op's own masked gradient;
- DeconvNet: pass back positive gradients regardless of the forward input, ``relu(grad_out)``.

The rules are applied to every ReLU and Clip (ReLU6 as exported) module of the converted graph, in the
calling request's autograd graph only (see ``modified_relus``); the forward pass is unchanged.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np


def _bound(value):
    return None if value is None else float(value)


def _rule_function():
    """An autograd Function standing in for one op's output: forward returns the op's output, backward
    sends ``backward(x, grad)`` straight to the op's input, so the op's own backward never runs."""
    import torch

    class Rewritten(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y, backward):
            ctx.save_for_backward(x)
            ctx.backward = backward
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return ctx.backward(x, grad), None, None

    return Rewritten


def rectifiers(torch_model) -> list:
    """The modules whose backward the rules replace: ReLU, Clip (a Clip with a lower bound other than 0 is
    left alone at run time) and Hardtanh from 0."""
    import torch

    return [module for module in torch_model.module.modules()
            if type(module).__name__ in ("ReLU", "Clip")
            or (isinstance(module, torch.nn.Hardtanh) and module.min_val == 0.0)]


NO_RECTIFIER = ("the model has no ReLU or ReLU6 (Clip from 0) for the rule to modify (its activations are of "
                "other kinds), so this is the plain gradient")


@contextlib.contextmanager
def modified_relus(torch_model, rule: str):
    """Within the block, backward through ReLU and through Clip with lower bound 0 (ReLU6) follows
    ``rule``: guided backprop passes ``relu`` of the op's own gradient, DeconvNet ``relu`` of the incoming
    gradient, at a Clip masked by its upper bound (x < max) as ReLU followed by clamp(max) would be.

    The converted module is shared by concurrent requests, so nothing about it changes: a forward hook,
    active only on the calling thread, replaces each rectifier's output in this request's graph by a
    Function whose backward applies the rule (on any device, whichever thread runs the backward)."""
    import torch
    import torch.nn.functional as F

    owner = threading.get_ident()
    rewritten = _rule_function()

    def hook(module, inputs, output):
        if threading.get_ident() != owner or not torch.is_grad_enabled() or not inputs[0].requires_grad:
            return None
        upper = None
        if isinstance(module, torch.nn.Hardtanh):
            upper = float(module.max_val)
        elif type(module).__name__ == "Clip":  # onnx2pytorch's: bounds as inputs or attributes
            lower = _bound(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _bound(module.min)
            if lower != 0.0:
                return None  # a clamp that does not rectify: its gradient is left alone
            upper = _bound(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else _bound(module.max)
        extra = inputs[1:]

        def backward(x, grad):
            if rule == "deconvnet":
                return F.relu(grad if upper is None else grad * (x < upper))
            with torch.enable_grad():  # the op's own gradient, then only its positive part
                again = x.detach().requires_grad_(True)
                (own,) = torch.autograd.grad(module.forward(again, *extra), again, grad)
            return F.relu(own)

        return rewritten.apply(inputs[0], output, backward)

    handles = [module.register_forward_hook(hook) for module in rectifiers(torch_model)]
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
