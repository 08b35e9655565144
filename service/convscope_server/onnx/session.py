"""onnxruntime sessions: provider choice, and running a batch on fixed- or dynamic-batch graphs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


def providers_for(device: str) -> list[str]:
    """CUDA first when this onnxruntime build has it and ``device`` allows, then CPU."""
    available = ort.get_available_providers()
    chosen = []
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


def create_session(model_bytes: bytes, device: str = "auto", threads: int = 0,
                   optimize: bool = True) -> ort.InferenceSession:
    """A session over a serialized model. The provider in use is ``session.get_providers()[0]``:
    onnxruntime falls back to CPU silently when CUDA cannot start, so always report that, not the wish."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return ort.InferenceSession(model_bytes, options, providers=providers_for(device))


def run_batched(session: ort.InferenceSession, input_name: str, batch: np.ndarray, outputs: list[str],
                fixed_batch: int, chunk: int) -> list[np.ndarray]:
    """Run ``batch`` (N, ...) through ``session`` and concatenate each output along axis 0.

    A dynamic-batch graph takes ``chunk`` samples per run. A graph fixed to batch B is never widened: it is
    fed exactly B samples per run, the last run padded by repeating its final sample and the padding
    dropped from the results.
    """
    step = fixed_batch or max(1, chunk)
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for begin in range(0, len(batch), step):
        piece = batch[begin: begin + step]
        real = len(piece)
        if fixed_batch and real < fixed_batch:
            piece = np.concatenate([piece, np.repeat(piece[-1:], fixed_batch - real, axis=0)])
        results = session.run(outputs, {input_name: np.ascontiguousarray(piece)})
        for store, result in zip(parts, results):
            store.append(result[:real])
    return [np.concatenate(store) for store in parts]
