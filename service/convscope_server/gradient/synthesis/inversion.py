"""Feature inversion (Mahendran & Vedaldi 2015, "Understanding Deep Image Representations by Inverting
Them"): find an image whose code at a layer matches a given image's, minimising
||phi(x) - phi(x0)||^2 / ||phi(x0)||^2 + lambda_TV * TV^beta(x) with Adam from a random start.
Deeper layers keep less of the image: inverting several layers in one call shows it.
"""

from __future__ import annotations

from convscope_server.gradient.synthesis.common import total_variation


def invert(torch_model, space, x0, layer: str, steps: int, lr: float, tv_weight: float, seed: int = 0,
           report=None, should_stop=None):
    """Returns (x, losses) or None when stopped. ``x0`` is (1, C, H, W)."""
    import torch

    low, high = space.bounds()
    with torch.no_grad(), torch_model.capture([layer]) as store:
        torch_model.logits(space.model_input(x0))
        target = store[layer].detach()
    norm = (target ** 2).sum().clamp_min(1e-12)
    x = space.random(x0.shape[2], x0.shape[3], seed).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    losses = []
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            return None
        optimizer.zero_grad()
        with torch_model.capture([layer]) as store:
            torch_model.logits(space.model_input(x))
            reconstruction = ((store[layer] - target) ** 2).sum() / norm
        loss = reconstruction + tv_weight * total_variation(x)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
        losses.append(float(reconstruction.detach()))
        if report is not None:
            report(step, losses[-1], x)
    return x.detach(), losses
