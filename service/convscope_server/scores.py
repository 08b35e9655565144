"""The one rule that turns a model's logits output (N, K) into class probabilities, a prediction and the
per-class loss the attacks climb; every technique that speaks of probabilities uses it (numpy on the
onnxruntime side, torch on the gradient side; torch is imported by the caller, never here).

- ``[output] softmax = true`` and K > 1: the output holds logits; p = softmax(z), log p = log_softmax(z).
- ``softmax = true`` and K == 1: one logit, a binary classifier scored by a sigmoid; p(class 0) =
  sigmoid(z), log p = logsigmoid(z). Its prediction is class 0 when p > 0.5, else no class (-1).
- ``softmax = false``: the output already holds probabilities (a Softmax or a Sigmoid head, multi-label
  allowed): p is the output as it is, log p = log(max(p, tiny)). K == 1 predicts as above.

The prediction of K > 1 is the argmax of the output (whichever head: softmax and sigmoid keep the order).
The loss of ``labels`` is -sum log p(label): FGSM and the basic iterative method climb it, targeted
attacks descend it. With softmax = true and K > 1 every function computes exactly what it did before
this module (the same calls: ``forward.backend.softmax``, ``F.cross_entropy``, ``torch.softmax``).
"""

from __future__ import annotations

import numpy as np

from convscope_server.forward.backend import softmax as _softmax

NO_CLASS = -1   # the prediction of a single-output model that says "not class 0"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """exp(-log(1 + exp(-z))): no overflow at either end, the input's float type kept."""
    return np.exp(-np.logaddexp(np.zeros((), z.dtype), -z))


def class_probabilities(logits: np.ndarray, softmax: bool = True) -> np.ndarray:
    """(N, K) logits output -> (N, K) class probabilities (see the module docstring)."""
    logits = np.asarray(logits)
    if not softmax:
        return logits
    if logits.shape[-1] == 1:
        return _sigmoid(logits)
    return _softmax(logits)


def predicted_classes(logits: np.ndarray, softmax: bool = True) -> np.ndarray:
    """(N, K) logits output -> (N,) predicted class: the argmax, or for K == 1 class 0 when p > 0.5, else
    ``NO_CLASS``."""
    logits = np.asarray(logits)
    if logits.shape[-1] == 1:
        return np.where(class_probabilities(logits, softmax)[:, 0] > 0.5, 0, NO_CLASS).astype(np.int64)
    return logits.argmax(axis=-1)


def decided_from_probabilities(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class (N,), its confidence (N,)) from (N, K) class probabilities: for K > 1 the argmax
    and the top probability; for K == 1 class 0 or ``NO_CLASS`` with max(p, 1 - p), the probability of
    the binary decision taken."""
    probabilities = np.asarray(probabilities)
    if probabilities.shape[-1] == 1:
        p = probabilities[:, 0]
        return np.where(p > 0.5, 0, NO_CLASS).astype(np.int64), np.maximum(p, 1 - p)
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


# torch variants: ``logits`` are (N, K) torch tensors.

def class_probabilities_torch(logits, softmax: bool = True):
    import torch

    if not softmax:
        return logits
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, 1)


def log_probabilities_torch(logits, softmax: bool = True):
    """(N, K) log p of every class, for losses."""
    import torch
    import torch.nn.functional as F

    if not softmax:
        return torch.log(torch.clamp(logits, min=torch.finfo(logits.dtype).tiny))
    if logits.shape[1] == 1:
        return F.logsigmoid(logits)
    return F.log_softmax(logits, 1)


def label_loss_torch(logits, labels, softmax: bool = True):
    """-sum over the batch of log p(labels[i]) (a scalar): cross-entropy for a softmax over K > 1 logits."""
    import torch.nn.functional as F

    if softmax and logits.shape[1] > 1:
        return F.cross_entropy(logits, labels, reduction="sum")
    return -log_probabilities_torch(logits, softmax).gather(1, labels.view(-1, 1)).sum()


def predicted_classes_torch(logits, softmax: bool = True):
    """(N,) predicted classes, as :func:`predicted_classes`."""
    import torch

    if logits.shape[1] == 1:  # p > 0.5: 1 - 1 = class 0; else 0 - 1 = NO_CLASS
        return (class_probabilities_torch(logits, softmax)[:, 0] > 0.5).to(torch.int64) - 1
    return logits.argmax(1)
