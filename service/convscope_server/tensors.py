"""Tensor messages -> numpy on the server: the shared codec plus field-named errors."""

from __future__ import annotations

import numpy as np

from convscope.tensors import TensorFormatError, from_tensor, to_tensor  # noqa: F401 - re-exported
from convscope_server.errors import InvalidArgument


def read_tensor(tensor, field: str) -> np.ndarray:
    try:
        return from_tensor(tensor)
    except TensorFormatError as error:
        raise InvalidArgument(field, str(error)) from None
