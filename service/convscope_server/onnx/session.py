"""onnxruntime sessions: provider and precision choice, and shape-stable batched runs.

On CUDA the provider is configured for this service's pattern of work, as measured on an H100 (see
docs/BENCHMARKS.md): TF32 off unless the model's precision policy says ``tf32`` (onnxruntime's CUDA provider
computes float32 convolutions in TF32 by default, ~1e-3 relative off the CPU's logits), and cuDNN's
convolution algorithm chosen by heuristics instead of an exhaustive search, which otherwise runs again for
every new input shape and costs about a second each time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

PRECISIONS = ("exact", "tf32")
# Graph input types an image can be fed as (Describe's datatype names).
INPUT_DATATYPES = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "UINT8": np.uint8,
                   "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}
CPU_BATCH, CUDA_BATCH = 16, 128


@dataclass(frozen=True)
class SessionSettings:
    """How every session of one model is made: ``device`` "auto" or "cpu", intra-op ``threads`` (0: let
    onnxruntime choose), ``precision`` "exact" (float32) or "tf32"."""

    device: str = "auto"
    threads: int = 0
    precision: str = "exact"


def providers_for(settings: SessionSettings) -> list:
    """CUDA first (with its options) when this onnxruntime build has it and the device allows, then CPU."""
    chosen: list = []
    if settings.device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        chosen.append(("CUDAExecutionProvider", {
            "use_tf32": "1" if settings.precision == "tf32" else "0",
            "cudnn_conv_algo_search": "HEURISTIC",
        }))
    chosen.append("CPUExecutionProvider")
    return chosen


def create_session(model_bytes: bytes, settings: SessionSettings = SessionSettings(),
                   optimize: bool = True) -> ort.InferenceSession:
    """A session over a serialized model. The provider in use is ``session.get_providers()[0]``:
    onnxruntime falls back to CPU silently when CUDA cannot start, so always report that, not the wish."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if settings.threads:
        options.intra_op_num_threads = settings.threads
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    return ort.InferenceSession(model_bytes, options, providers=providers_for(settings))


def graph_input(batch: np.ndarray, dtype) -> np.ndarray:
    """Model inputs (float32, as every technique computes them) in the graph input's type: integer inputs
    get the values rounded and clipped to the type's range (a perturbed or synthesised image is what the
    deployed model would see once written as pixels)."""
    if batch.dtype == dtype:
        return batch
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(batch), info.min, info.max).astype(dtype)
    return batch.astype(dtype)


def default_batch(provider: str) -> int:
    """Samples per run when the server setting leaves it to the device: a GPU wants hundreds."""
    return CUDA_BATCH if provider == "CUDAExecutionProvider" else CPU_BATCH


def stable_size(real: int, chunk: int) -> int:
    """The batch a run of ``real`` samples is padded to on a device that pays per new input shape: the
    next power of two, at most ``chunk`` (so a session sees at most log2(chunk) + 1 shapes)."""
    return min(chunk, 1 << max(real - 1, 0).bit_length())


def run_batched(session: ort.InferenceSession, input_name: str, batch: np.ndarray, outputs: list[str],
                fixed_batch: int, chunk: int, stable_shapes: bool = False) -> list[np.ndarray]:
    """Run ``batch`` (N, ...) through ``session`` and concatenate each output along axis 0.

    A dynamic-batch graph takes ``chunk`` samples per run; with ``stable_shapes`` (a CUDA session) each
    run is padded to :func:`stable_size`, so cuDNN meets the same few shapes again instead of new ones. A
    graph fixed to batch B is never widened: it is fed exactly B samples per run. Padding repeats the
    run's last sample and is dropped from the results.
    """
    step = fixed_batch or max(1, chunk)
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for begin in range(0, len(batch), step):
        piece = batch[begin: begin + step]
        real = len(piece)
        size = fixed_batch or (stable_size(real, step) if stable_shapes else real)
        if real < size:
            piece = np.concatenate([piece, np.repeat(piece[-1:], size - real, axis=0)])
        results = session.run(outputs, {input_name: np.ascontiguousarray(piece)})
        for store, result in zip(parts, results):
            store.append(result[:real])
    return [np.concatenate(store) for store in parts]
