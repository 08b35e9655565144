"""Load an ONNX file without ever reading outside its model folder.

The file itself and every external-data location must resolve (symlinks followed) inside the model's
folder; the proto is validated with ``onnx.checker`` and shapes are inferred.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper


class ModelLoadError(Exception):
    """The model file cannot be served; the message says why."""


def inside(path: Path, folder: Path) -> bool:
    """True when ``path`` (symlinks resolved) lies in ``folder`` (symlinks resolved)."""
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def _check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location or ""
        target = folder / location
        if not location or os.path.isabs(location) or not inside(target, folder):
            raise ModelLoadError(f"tensor {tensor.name!r} has external data at {location!r}, outside the "
                                 "model folder: refused")
        if not target.is_file():
            raise ModelLoadError(f"tensor {tensor.name!r}: external data file {location!r} is missing")
        size = target.stat().st_size
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else size - offset
        if offset < 0 or offset + length > size:
            raise ModelLoadError(f"tensor {tensor.name!r}: external data {location!r} is shorter than "
                                 f"offset {offset} + length {length}")


def load_model(path: Path, folder: Path) -> onnx.ModelProto:
    """Read, confine, validate and shape-infer ``path``. Raises :class:`ModelLoadError`."""
    if not inside(path, folder):
        raise ModelLoadError(f"{path.name} resolves outside the model folder: refused")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as error:
        raise ModelLoadError(f"{path.name} is not a valid ONNX file (truncated or corrupt): {error}") from None
    _check_external_data(model, folder)
    try:
        external_data_helper.load_external_data_for_model(model, str(folder))
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError, OSError) as error:
        raise ModelLoadError(f"{path.name} failed ONNX validation: {error}") from None
    if not inferred.graph.node:
        raise ModelLoadError(f"{path.name} has an empty graph")
    return inferred
