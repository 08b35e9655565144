"""The onnxruntime handle that forward techniques run on."""

from __future__ import annotations

import numpy as np

from convscope_server.onnx.session import run_batched


class OrtBackend:
    """Runs a loaded model: class scores from the prediction session, any tensors from probe sessions."""

    def __init__(self, model, chunk: int = 16):
        self.model = model
        self.chunk = chunk

    @property
    def input_name(self) -> str:
        return self.model.config.input_name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, ...) model inputs -> (N, classes) scores of the logits output."""
        (scores,) = run_batched(self.model.session, self.input_name, batch, [self.model.config.logits_output],
                                self.model.fixed_batch, self.chunk)
        return scores.reshape(len(batch), -1)

    def tensors(self, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        """(N, ...) model inputs -> {name: (N, ...) values} for any tensors of the graph."""
        names = list(dict.fromkeys(names))
        session = self.model.probes.session(names)
        values = run_batched(session, self.input_name, batch, names, self.model.fixed_batch, self.chunk)
        return dict(zip(names, values))


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)
