"""Texture synthesis and style transfer (Gatys et al. 2015, "Texture Synthesis Using Convolutional Neural
Networks"; 2016, "Image Style Transfer Using Convolutional Neural Networks").

Style is the Gram matrices of chosen layers' features; content is one layer's features. Texture
synthesis matches the style alone from a random start; style transfer starts from the content image and
minimises content_weight * content + style_weight * style + tv_weight * TV with Adam or L-BFGS. The
convolutional part runs on images of any size within the server's limits.
"""

from __future__ import annotations

from convscope_server.gradient.synthesis.common import total_variation


def gram(features):
    """(1, C, H, W) -> (C, C) Gram matrix normalised by C * H * W."""
    _, c, h, w = features.shape
    flat = features.reshape(c, h * w)
    return flat @ flat.t() / (c * h * w)


def _features(torch_model, space, x, layers):
    with torch_model.capture(layers) as store:
        try:
            torch_model.logits(space.model_input(x))
        except RuntimeError as error:  # a head that needs the training size; features were still captured
            if not all(name in store for name in layers):
                raise error
    return {name: store[name] for name in layers}


def stylize(torch_model, space, style, content, style_layers: list[str], content_layer: str | None, steps: int,
            lr: float, style_weight: float, content_weight: float, tv_weight: float, optimizer: str,
            start, report=None, should_stop=None):
    """Returns (x, losses) or None when stopped. ``content`` None means texture synthesis; ``start`` is the
    initial image (the content image, or noise)."""
    import torch

    low, high = space.bounds()
    with torch.no_grad():
        style_grams = {n: gram(f) for n, f in _features(torch_model, space, style, style_layers).items()}
        content_target = (_features(torch_model, space, content, [content_layer])[content_layer]
                          if content is not None and content_layer else None)
    layers = style_layers + ([content_layer] if content_target is not None else [])
    x = start.detach().clone().requires_grad_(True)
    losses = []

    def objective():
        features = _features(torch_model, space, x, layers)
        loss = style_weight * sum(((gram(features[n]) - g) ** 2).sum() for n, g in style_grams.items())
        if content_target is not None:
            loss = loss + content_weight * ((features[content_layer] - content_target) ** 2).mean()
        return loss + tv_weight * total_variation(x)

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS([x], lr=lr, max_iter=1)
    else:
        opt = torch.optim.Adam([x], lr=lr)
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            return None
        value = {}

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            value["loss"] = float(loss.detach())
            return loss

        opt.step(closure)
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
        losses.append(value["loss"])
        if report is not None:
            report(step, value["loss"], x)
    return x.detach(), losses
