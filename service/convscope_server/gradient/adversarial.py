"""Adversarial examples: the fast gradient sign method (Goodfellow et al. 2015, "Explaining and Harnessing
Adversarial Examples") and iterative targeted fooling (Kurakin et al. 2017; the lecture's "make this
image a <class>"), the untargeted basic iterative method, with a robustness curve of top-1 accuracy
against epsilon. Epsilon is in [0, 1] pixel
units, whatever the model's normalisation. Probabilities, the loss -log p(label) and the prediction follow
``convscope_server.scores`` (``softmax`` is the model's ``[output] softmax``): cross-entropy over K > 1
logits, a sigmoid for a single logit, the output itself when it already holds probabilities.
"""

from __future__ import annotations

import numpy as np

from convscope_server import scores


def _loss_gradient(torch_model, space, x, labels, softmax: bool = True):
    x = x.detach().clone().requires_grad_(True)
    logits = torch_model.logits(space.model_input(x))
    scores.label_loss_torch(logits, labels, softmax).backward()
    return x.grad, logits.detach()


def fgsm(torch_model, space, x, labels, epsilon: float, softmax: bool = True):
    """x + epsilon * sign(grad of the loss -log p(``labels``)), clipped to valid pixels. x: (N, C, H, W)."""
    import torch

    low, high = space.bounds()
    grad, _ = _loss_gradient(torch_model, space, x, labels, softmax)
    adversarial = x + epsilon * space.per_pixel_unit() * grad.sign()
    return torch.maximum(torch.minimum(adversarial, high), low).detach()


def iterative(torch_model, space, x, labels, epsilon: float, steps: int = 10, softmax: bool = True):
    """The basic iterative method (Kurakin et al. 2017): ``steps`` FGSM steps of epsilon / steps * 2.5 up the
    loss of ``labels``, each projected back into the L-inf ball of ``epsilon`` around x and onto valid
    pixels. x: (N, C, H, W)."""
    import torch

    if epsilon <= 0 or steps <= 0:
        return x
    low, high = space.bounds()
    unit = space.per_pixel_unit()
    step = 2.5 * epsilon / steps
    floor, ceiling = torch.maximum(x - epsilon * unit, low), torch.minimum(x + epsilon * unit, high)
    adversarial = x.detach()
    for _ in range(steps):
        grad, _ = _loss_gradient(torch_model, space, adversarial, labels, softmax)
        adversarial = torch.maximum(torch.minimum(adversarial + step * unit * grad.sign(), ceiling), floor).detach()
    return adversarial


def targeted(torch_model, space, x, target: int, step_size: float, epsilon: float, steps: int,
             stop_probability: float, report=None, should_stop=None, softmax: bool = True):
    """Iterative sign steps down the loss of ``target`` within an L-inf ball of ``epsilon`` until
    p(target) >= ``stop_probability``. Returns (x, probabilities per step) or None when stopped."""
    import torch

    low, high = space.bounds()
    unit = space.per_pixel_unit()
    labels = torch.tensor([target], device=torch_model.device)
    adversarial = x.detach().clone()
    history = []
    for step in range(1, steps + 1):
        if should_stop is not None and should_stop():
            return None
        grad, logits = _loss_gradient(torch_model, space, adversarial, labels, softmax)
        probability = float(scores.class_probabilities_torch(logits, softmax)[0, target])
        if probability >= stop_probability:
            break
        with torch.no_grad():
            adversarial = adversarial - step_size * unit * grad.sign()
            adversarial = torch.maximum(torch.minimum(adversarial, x + epsilon * unit), x - epsilon * unit)
            adversarial = torch.maximum(torch.minimum(adversarial, high), low)
        history.append(probability)
        if report is not None:
            report(step, probability, adversarial)
    with torch.no_grad():
        final = float(scores.class_probabilities_torch(torch_model.logits(space.model_input(adversarial)),
                                                       softmax)[0, target])
    history.append(final)
    return adversarial, history


def robustness_curve(torch_model, space, xs, labels, epsilons: list[float], chunk: int, progress=None,
                     should_stop=None, softmax: bool = True) -> np.ndarray | None:
    """Top-1 accuracy under FGSM at each epsilon, over images ``xs`` (N, C, H, W) with ``labels`` (N,) (the
    prediction of ``scores.predicted_classes_torch``: for a single output, class 0 when p > 0.5)."""
    import torch

    accuracy = np.zeros(len(epsilons))
    total = len(epsilons) * len(xs)
    done = 0
    for i, epsilon in enumerate(epsilons):
        correct = 0
        for begin in range(0, len(xs), chunk):
            if should_stop is not None and should_stop():
                return None
            x, y = xs[begin: begin + chunk], labels[begin: begin + chunk]
            adversarial = fgsm(torch_model, space, x, y, epsilon, softmax) if epsilon > 0 else x
            with torch.no_grad():
                logits = torch_model.logits(space.model_input(adversarial))
                correct += int((scores.predicted_classes_torch(logits, softmax) == y).sum())
            done += len(x)
            if progress is not None:
                progress(done, total, f"epsilon {epsilon:g}")
        accuracy[i] = correct / len(xs)
    return accuracy
