"""Tensor messages -> numpy on the server: the shared codec plus field-named errors.

The shape is checked with Python integers before numpy sees it: a product of int64 dimensions can wrap
(``[2**32, 2**32]`` multiplies to 0 in int64 and would match empty ``raw_data``)."""

from __future__ import annotations

import numpy as np

from convscope.tensors import DATATYPES, TensorFormatError, from_tensor, to_tensor  # noqa: F401 - re-exported
from convscope_server.errors import InvalidArgument

MAX_DIMS = 8            # more axes than any image or model input has
MAX_DIM = 2**31 - 1     # any one axis


def element_count(shape) -> int:
    """The number of elements of ``shape``, exactly (Python ints never wrap)."""
    count = 1
    for size in shape:
        count *= int(size)
    return count


def read_tensor(tensor, field: str) -> np.ndarray:
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(field, f"unknown datatype {tensor.datatype!r}; expected one of {', '.join(DATATYPES)}")
    shape = [int(d) for d in tensor.shape]
    if len(shape) > MAX_DIMS:
        raise InvalidArgument(field, f"shape has {len(shape)} axes; at most {MAX_DIMS} are accepted")
    if any(d < 0 for d in shape):
        raise InvalidArgument(field, f"shape {shape} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise InvalidArgument(field, f"shape {shape} has a dimension over {MAX_DIM}")
    needed = element_count(shape) * dtype.itemsize
    if needed != len(tensor.raw_data):
        raise InvalidArgument(field, f"raw_data has {len(tensor.raw_data)} bytes but shape {shape} of "
                              f"{tensor.datatype} needs {needed}")
    try:
        return from_tensor(tensor)
    except (TensorFormatError, ValueError) as error:
        raise InvalidArgument(field, str(error)) from None
