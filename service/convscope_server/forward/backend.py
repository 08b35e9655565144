"""The onnxruntime handle that forward techniques run on."""

from __future__ import annotations

import numpy as np


class OrtBackend:
    """Runs a loaded model: class scores from the prediction session, any tensors from probe sessions."""

    def __init__(self, model):
        self.model = model

    @property
    def input_name(self) -> str:
        return self.model.config.input_name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, ...) model inputs -> (N, classes) scores of the logits output."""
        (scores,) = self.model.run(batch, [self.model.config.logits_output])
        return scores.reshape(len(batch), -1)

    def tensors(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """(N, ...) model inputs -> {name: (N, ...) values} for any tensors of the graph."""
        names = list(dict.fromkeys(names))
        session = self.model.probes.session(names)
        values = self.model.run(batch, names, session)
        return dict(zip(names, values))


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
