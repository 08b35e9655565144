"""Galleries: one code per image (a layer's activations, flattened) plus a thumbnail, stored on disk.

File format (``<gallery_root>/<name>.gallery``), written once and never modified::

    b"CSGALLRY" | u64 header length | header (JSON) | codes (count x dim float32) | thumbnails
    (count x size x size x 3 uint8) | SHA-256 of everything before it (32 bytes)

The header names the model (with a fingerprint of its graph), the layer, the shapes and offsets, and each
image's id, label and predicted class. A build streams codes and thumbnails to temporary files as the scan
goes (memory does not grow with the number of images), then assembles the gallery in a temporary file in
the same folder, fsyncs it and renames it over the name: a reader sees the old gallery or the new one,
never half of one. Loading checks the magic, the header, the length and the checksum, so a truncated or
corrupt file is reported (ListGalleries, FAILED_PRECONDITION on use) instead of served; the arrays are then
memory-mapped, so a 50,000-image gallery costs page cache, not server memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convscope_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("convscope_server")

MAGIC = b"CSGALLRY"
VERSION = 1
SUFFIX = ".gallery"
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class GalleryFileError(Exception):
    pass


@dataclass
class Gallery:
    name: str
    path: Path
    header: dict
    codes: np.ndarray        # (count, dim) float32, memory-mapped
    thumbnails: np.ndarray   # (count, size, size, 3) uint8, memory-mapped
    _squared_norms: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        return int(self.header["count"])

    @property
    def ids(self) -> list[str]:
        return self.header["ids"]

    @property
    def labels(self) -> list[str]:
        return self.header["labels"]

    @property
    def predicted(self) -> list[int]:
        return self.header["predicted"]

    def squared_norms(self, space: str) -> np.ndarray:
        """Per-image squared L2 norms of the codes ("feature") or thumbnails ("pixel"), computed once."""
        if space not in self._squared_norms:
            data = self.codes if space == "feature" else self.thumbnails.reshape(self.size, -1)
            norms = np.empty(self.size, np.float64)
            for begin in range(0, self.size, 4096):
                chunk = np.asarray(data[begin: begin + 4096], np.float64)
                norms[begin: begin + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)
            self._squared_norms[space] = norms
        return self._squared_norms[space]


def check_name(name: str, field: str) -> str:
    if not NAME.match(name or ""):
        raise InvalidArgument(field, f"{name!r}: a gallery name is 1-128 letters, digits, '.', '_' or '-', "
                              "not starting with '.' or '-'")
    return name


def read_gallery(path: Path, name: str) -> Gallery:
    """Open and verify a gallery file; raises GalleryFileError saying what is wrong."""
    try:
        total = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            start = f.read(16)
            if len(start) < 16 or start[:8] != MAGIC:
                raise GalleryFileError("not a convscope gallery file (bad magic)")
            header_len = int.from_bytes(start[8:16], "little")
            if header_len <= 0 or 16 + header_len + 32 > total:
                raise GalleryFileError(f"truncated: the header claims {header_len} bytes, the file has {total}")
            raw_header = f.read(header_len)
            header = json.loads(raw_header)
            expected = header["thumbnails_offset"] + header["count"] * header["thumbnail_size"] ** 2 * 3 + 32
            if total != expected:
                raise GalleryFileError(f"truncated or padded: {total} bytes, the header describes {expected}")
            digest.update(start)
            digest.update(raw_header)
            f.seek(16 + header_len)
            remaining = total - 32 - (16 + header_len)
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 22))
                if not chunk:
                    raise GalleryFileError("truncated while reading")
                digest.update(chunk)
                remaining -= len(chunk)
            if f.read(32) != digest.digest():
                raise GalleryFileError("checksum mismatch: the file is corrupt")
    except GalleryFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise GalleryFileError(f"unreadable: {type(error).__name__}: {error}") from None
    if header.get("version") != VERSION:
        raise GalleryFileError(f"format version {header.get('version')}, this server reads {VERSION}")
    count, dim, side = header["count"], header["dim"], header["thumbnail_size"]
    if count == 0:
        codes = np.zeros((0, dim), np.float32)
        thumbnails = np.zeros((0, side, side, 3), np.uint8)
    else:
        codes = np.memmap(path, np.float32, "r", header["codes_offset"], (count, dim))
        thumbnails = np.memmap(path, np.uint8, "r", header["thumbnails_offset"], (count, side, side, 3))
    return Gallery(name, path, header, codes, thumbnails)


class GalleryWriter:
    """Collects codes and thumbnails for a new gallery in temporary files beside the final one."""

    def __init__(self, folder: Path, dim: int, thumbnail_size: int):
        self.folder = folder
        self.dim = dim
        self.thumbnail_size = thumbnail_size
        self._codes = tempfile.NamedTemporaryFile(dir=folder, prefix=".codes-", delete=False)
        self._thumbs = tempfile.NamedTemporaryFile(dir=folder, prefix=".thumbs-", delete=False)
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.predicted: list[int] = []

    def add(self, codes: np.ndarray, thumbnails: np.ndarray, ids, labels, predicted) -> None:
        self._codes.write(np.ascontiguousarray(codes, np.float32).tobytes())
        self._thumbs.write(np.ascontiguousarray(thumbnails, np.uint8).tobytes())
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.predicted.extend(int(p) for p in predicted)

    def finish(self, path: Path, meta: dict) -> None:
        """Assemble the gallery file and rename it over ``path`` (atomic on POSIX)."""
        self._codes.flush()
        self._thumbs.flush()
        header = dict(meta, version=VERSION, count=len(self.ids), dim=self.dim, thumbnail_size=self.thumbnail_size,
                      ids=self.ids, labels=self.labels, predicted=self.predicted)
        # Offsets depend on the header's own length: pad the header so the arrays start 64-byte aligned.
        header.update(codes_offset=0, thumbnails_offset=0)
        codes_offset = _align(16 + len(json.dumps(header).encode()) + 64)  # slack for the offsets' digits
        header.update(codes_offset=codes_offset, thumbnails_offset=codes_offset + len(self.ids) * self.dim * 4)
        encoded = json.dumps(header).encode()
        assert 16 + len(encoded) <= codes_offset
        padded = encoded + b" " * (header["codes_offset"] - 16 - len(encoded))
        digest = hashlib.sha256()
        final = tempfile.NamedTemporaryFile(dir=self.folder, prefix=f".{path.name}-", delete=False)
        try:
            with final:
                for piece in (MAGIC, len(padded).to_bytes(8, "little"), padded):
                    final.write(piece)
                    digest.update(piece)
                for part in (self._codes.name, self._thumbs.name):
                    with open(part, "rb") as source:
                        while chunk := source.read(1 << 22):
                            final.write(chunk)
                            digest.update(chunk)
                final.write(digest.digest())
                final.flush()
                os.fsync(final.fileno())
            os.replace(final.name, path)
            _fsync_folder(self.folder)
        except BaseException:
            Path(final.name).unlink(missing_ok=True)
            raise
        finally:
            self.discard()

    def discard(self) -> None:
        for part in (self._codes, self._thumbs):
            part.close()
            Path(part.name).unlink(missing_ok=True)


def _align(offset: int, to: int = 64) -> int:
    return (offset + to - 1) // to * to


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GalleryStore:
    """Every ``*.gallery`` file under ``root``, loaded (and verified) at start; failures kept with reasons.
    The folder is created by the first build."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self._galleries: dict[str, Gallery] = {}
        self._errors: dict[str, str] = {}
        self._building: set[str] = set()
        self._lock = threading.Lock()

    def load_all(self) -> None:
        if self.root is None or not self.root.is_dir():  # created by the first build
            return
        for leftover in self.root.glob(".*"):  # temporary files of builds interrupted by a crash
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            self._load(path.name[: -len(SUFFIX)], path)

    def _load(self, name: str, path: Path) -> None:
        try:
            gallery = read_gallery(path, name)
        except GalleryFileError as error:
            log.warning("gallery %s not loaded: %s", name, error)
            with self._lock:
                self._galleries.pop(name, None)
                self._errors[name] = str(error)
            return
        with self._lock:
            self._galleries[name] = gallery
            self._errors.pop(name, None)
        log.info("gallery %s loaded (%d images, %s %s)", name, gallery.size, gallery.header["model"],
                 gallery.header["layer"])

    def path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._galleries) | set(self._errors))

    def status(self, name: str) -> tuple[Gallery | None, str]:
        with self._lock:
            return self._galleries.get(name), self._errors.get(name, "")

    def get(self, name: str, field: str = "gallery") -> Gallery:
        if not name:
            raise InvalidArgument(field, "required: name a gallery (see ListGalleries)")
        gallery, error = self.status(name)
        if gallery is not None:
            return gallery
        if error:
            raise FailedPrecondition(f"{field}: gallery {name!r} is not available: {error}")
        raise NotFound(field, "gallery", name, self.names())

    def begin(self, name: str, overwrite: bool, field: str = "spec.name") -> None:
        """Reserve ``name`` for a build (one build per name at a time)."""
        if self.root is None:
            raise FailedPrecondition("this server has no gallery root (--gallery-root)")
        check_name(name, field)
        with self._lock:
            if name in self._building:
                raise AlreadyExists(f"{field}: gallery {name!r} is being built by another call")
            if not overwrite and (name in self._galleries or name in self._errors):
                raise AlreadyExists(f"{field}: gallery {name!r} exists; set overwrite to replace it")
            self._building.add(name)

    def writer(self, dim: int, thumbnail_size: int) -> GalleryWriter:
        self.root.mkdir(parents=True, exist_ok=True)
        return GalleryWriter(self.root, dim, thumbnail_size)

    def publish(self, name: str, writer: GalleryWriter, meta: dict) -> Gallery:
        """Write a finished build under ``name``, load it, and release the name."""
        try:
            writer.finish(self.path(name), dict(meta, created=time.time()))
            self._load(name, self.path(name))
            return self.get(name)
        finally:
            self.release(name)

    def release(self, name: str) -> None:
        """End a build reserved by ``begin`` (published, failed or stopped)."""
        with self._lock:
            self._building.discard(name)

    def delete(self, name: str) -> None:
        check_name(name, "name")
        with self._lock:
            if name in self._building:
                raise FailedPrecondition(f"name: gallery {name!r} is being built")
            if name not in self._galleries and name not in self._errors:
                raise NotFound("name", "gallery", name, sorted(set(self._galleries) | set(self._errors)))
            self._galleries.pop(name, None)
            self._errors.pop(name, None)
        self.path(name).unlink(missing_ok=True)
