"""DeepDream (Mordvintsev et al. 2015, "Inceptionism"): amplify whatever a layer already sees by gradient
ascent on 0.5 * ||A||^2 (so the gradient at the layer is the activation itself), with jitter,
steps normalised by the mean absolute gradient, clipping to valid pixels, and octaves: the image is
processed from small to full size, carrying the added detail up each time.
"""

from __future__ import annotations


def deepdream(torch_model, space, x0, layer: str, octaves: int, octave_scale: float, steps: int, lr: float,
              jitter: int, seed: int = 0, report=None, should_stop=None):
    """Returns (x, losses) or None when stopped. ``steps`` per octave."""
    import torch
    import torch.nn.functional as F

    low, high = space.bounds()
    generator = torch.Generator().manual_seed(seed)
    height, width = x0.shape[2:]
    sizes = [(max(8, round(height / octave_scale ** k)), max(8, round(width / octave_scale ** k)))
             for k in reversed(range(octaves))]
    detail = torch.zeros(1, x0.shape[1], *sizes[0], device=torch_model.device)
    losses, done = [], 0
    x = x0
    for size in sizes:
        base = F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
        detail = F.interpolate(detail, size=size, mode="bilinear", align_corners=False)
        x = (base + detail).detach()
        for _ in range(steps):
            if should_stop is not None and should_stop():
                return None
            dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist() if jitter else (0, 0)
            shifted = torch.roll(x, (dy, dx), (2, 3)).requires_grad_(True)
            with torch_model.capture([layer]) as store:
                torch_model.logits(space.model_input(shifted))
                value = 0.5 * (store[layer] ** 2).mean()
                value.backward()
            grad = torch.roll(shifted.grad, (-dy, -dx), (2, 3))
            with torch.no_grad():
                x = x + lr * grad / (grad.abs().mean() + 1e-12)
                x = torch.maximum(torch.minimum(x, high), low)
            done += 1
            losses.append(float(value.detach()))
            if report is not None:
                report(done, losses[-1], x)
        detail = x - base
    return x.detach(), losses
