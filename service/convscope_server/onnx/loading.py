"""Load an ONNX file without ever reading outside its model folder.

The file itself and every external-data location must resolve (symlinks followed) inside the model's
folder and be regular files: a directory, FIFO, socket or device is refused from its ``stat`` without
being opened, so nothing in a model folder can block or feed the loader. The proto is validated with
``onnx.checker`` and shapes are inferred.
"""

from __future__ import annotations

import os
import stat
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


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def open_regular(path: Path, folder: Path, what: str) -> int:
    """A read-only file descriptor on ``path``, which must resolve inside ``folder`` and be a regular file.
    Non-regular files are refused from ``stat`` and never opened (a FIFO would block). ``what`` names the
    file in the reason. Raises :class:`ModelLoadError`."""
    real = os.path.realpath(path)
    if not inside(Path(real), folder):
        raise ModelLoadError(f"{what} resolves outside the model folder: refused")
    try:
        info = os.stat(real)
    except OSError as error:
        raise ModelLoadError(f"{what} cannot be read: {error.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{what} is {file_kind(info.st_mode)}, not a regular file: refused")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise ModelLoadError(f"{what} cannot be read: {error.strerror}") from None
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        raise ModelLoadError(f"{what} changed while it was opened: refused")
    return fd


def read_regular(path: Path, folder: Path, what: str, limit: int = 0) -> bytes:
    """The bytes of ``path`` (see :func:`open_regular`); with ``limit``, files larger than that many bytes
    are refused."""
    fd = open_regular(path, folder, what)
    try:
        size = os.fstat(fd).st_size
        if limit and size > limit:
            raise ModelLoadError(f"{what} has {size} bytes, over the limit of {limit}: refused")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read(limit + 1) if limit else file.read()
    except OSError as error:
        raise ModelLoadError(f"{what} cannot be read: {error.strerror}") from None
    finally:
        os.close(fd)
    if limit and len(data) > limit:
        raise ModelLoadError(f"{what} is over the limit of {limit} bytes: refused")
    return data


def _load_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Read every external-data tensor into the proto, each location confined to ``folder`` and opened
    once (the model's weights may all sit in one large file)."""
    files: dict[str, int] = {}
    try:
        for tensor in external_data_helper._get_all_tensors(model):
            if not external_data_helper.uses_external_data(tensor):
                continue
            info = external_data_helper.ExternalDataInfo(tensor)
            location = info.location or ""
            what = f"tensor {tensor.name!r}: external data {location!r}"
            if not location or os.path.isabs(location) or not inside(folder / location, folder):
                raise ModelLoadError(f"tensor {tensor.name!r} has external data at {location!r}, outside the "
                                     "model folder: refused")
            if location not in files:
                files[location] = open_regular(folder / location, folder, what)
            fd = files[location]
            size = os.fstat(fd).st_size
            offset = int(info.offset or 0)
            length = int(info.length) if info.length else size - offset
            if offset < 0 or length < 0 or offset + length > size:
                raise ModelLoadError(f"{what} is shorter than offset {offset} + length {length}")
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise ModelLoadError(f"{what} is shorter than offset {offset} + length {length}")
            tensor.raw_data = data
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    except OSError as error:
        raise ModelLoadError(f"external data cannot be read: {error.strerror}") from None
    finally:
        for fd in files.values():
            os.close(fd)


def load_model(path: Path, folder: Path) -> onnx.ModelProto:
    """Read, confine, validate and shape-infer ``path``. Raises :class:`ModelLoadError`."""
    data = read_regular(path, folder, path.name)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError) as error:
        raise ModelLoadError(f"{path.name} is not a valid ONNX file (truncated or corrupt): {error}") from None
    del data
    _load_external_data(model, folder)
    try:
        onnx.checker.check_model(model)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError, OSError) as error:
        raise ModelLoadError(f"{path.name} failed ONNX validation: {error}") from None
    if not inferred.graph.node:
        raise ModelLoadError(f"{path.name} has an empty graph")
    return inferred
