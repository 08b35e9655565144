"""numpy arrays <-> ``convscope.v1.Tensor`` (Open Inference Protocol datatypes, raw little-endian bytes).

Shared by the client and the server so both sides read the wire format the same way.
"""

from __future__ import annotations

import numpy as np

from convscope.v1 import tensor_pb2

DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "UINT16": np.dtype("<u2"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype: name for name, dtype in DATATYPES.items()}


class TensorFormatError(ValueError):
    """A Tensor message that does not describe a valid array (the message says why)."""


def datatype_name(dtype) -> str:
    dtype = np.dtype(dtype)
    key = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    try:
        return _NAMES[key]
    except KeyError:
        raise TensorFormatError(f"unsupported dtype {dtype}; supported: {', '.join(DATATYPES)}") from None


def to_tensor(array, out: tensor_pb2.Tensor | None = None) -> tensor_pb2.Tensor:
    """Encode ``array``. With ``out`` (a Tensor field of a message being built), fill it in place: for
    large arrays this avoids copying the bytes again when the Tensor is put into its parent message."""
    array = np.asarray(array)
    name = datatype_name(array.dtype)
    little = np.ascontiguousarray(array, dtype=DATATYPES[name])
    tensor = tensor_pb2.Tensor() if out is None else out
    tensor.datatype = name
    tensor.shape[:] = list(array.shape)
    tensor.raw_data = little.tobytes()
    return tensor


def from_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor into a (read-only) numpy array, checking datatype, shape and byte count."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise TensorFormatError(f"unknown datatype {tensor.datatype!r}; expected one of {', '.join(DATATYPES)}")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"shape {list(shape)} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(tensor.raw_data):
        raise TensorFormatError(
            f"raw_data has {len(tensor.raw_data)} bytes but shape {list(shape)} of {tensor.datatype} "
            f"needs {count * dtype.itemsize}")
    return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
