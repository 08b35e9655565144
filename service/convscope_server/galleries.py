"""Galleries: one code per image (a layer's activations, flattened) plus a thumbnail, stored on disk.

File format (``<gallery_root>/<name>.gallery``), written once and never modified::

    b"CSGALLRY" | u64 header length | header (JSON) | codes (count x dim float32) | thumbnails
    (count x size x size x 3 uint8) | SHA-256 of everything before it (32 bytes)

The header names the model (with a fingerprint of its graph), the layer, the shapes and offsets, and each
image's id, label and predicted class. A build streams codes and thumbnails to temporary files as the scan
goes (memory does not grow with the number of images), then assembles the gallery in a temporary file in
the same folder, fsyncs it and renames it over the name: a reader sees the old gallery or the new one,
never half of one. Loading checks the magic, the header, the length, the checksum and that every code is
finite, so a truncated, corrupt or NaN-holding file is reported (ListGalleries, FAILED_PRECONDITION on use)
instead of served; the arrays are then memory-mapped from the verified file, so a 50,000-image gallery
costs page cache, not server memory.

Sharing the root. Several servers may use one gallery root (replicas); nothing locks the whole root.
Coordination is by ``flock`` on files of the server's own, all named ``.convscope-...`` so they never
collide with a user's files (dotfiles, notes, ``.gitignore`` are never touched):

- ``.convscope-build-<name>.lock``: held from ``begin`` to ``publish``/``release``, so one build per name
  at a time across every server on the root; a second one is refused with ALREADY_EXISTS saying so. The
  holder removes it when done.
- ``.convscope-tmp-<pid>-<random>.{codes,thumbs,gallery}.tmp``: a build's temporary files, each locked by
  its writer while open.

At start-up only those files are cleaned, and only the ones whose lock can be taken (their owner is gone:
the kernel drops a dead process's locks); files a live build holds are left alone. A file is created,
then locked, then checked to still be the one at its path (a cleaner may remove it in between; then a new
one is made), so a cleaner can never delete a live build's file.

Files changing under a running server. Every use of a gallery (get, status, ListGalleries) compares the
file's stat (device, inode, size, mtime, ctime) with the one it was verified from; a new, changed or
vanished file is opened and verified again, or dropped, or listed as failed with the reason, so another
server's build of the same root, a file copied in, or a corrupt one replacing a good one is noticed
without a restart, and cached row norms never outlive their file. Replace galleries by renaming a new
file over the name (as builds do): requests already running keep the old mapping. Rewriting a file in
place is noticed at the next use, but a request reading the file while it is being rewritten can see
mixed data, and truncating a memory-mapped file can crash the reader (SIGBUS); a same-size rewrite within
the file system's timestamp granularity of the previous write is not noticed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
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
TEMP_PREFIX = ".convscope-tmp-"
LOCK_PREFIX = ".convscope-build-"
# The server's own files in the root: the only ones start-up may remove.
OWN_FILE = re.compile(r"^(\.convscope-tmp-\d+-[0-9a-f]{16}\.(codes|thumbs|gallery)\.tmp"
                      r"|\.convscope-build-[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.lock)$")


class GalleryFileError(Exception):
    pass


@dataclass
class Gallery:
    name: str
    path: Path
    header: dict
    codes: np.ndarray        # (count, dim) float32, memory-mapped
    thumbnails: np.ndarray   # (count, size, size, 3) uint8, memory-mapped
    signature: tuple | None = None  # the stat of the file it was verified from (see file_signature)
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


def file_signature(info: os.stat_result) -> tuple:
    """What tells a changed file: (device, inode, size, mtime_ns, ctime_ns)."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def _signature_at(path: Path) -> tuple | None:
    try:
        return file_signature(os.stat(path))
    except OSError:
        return None


def read_gallery(path: Path, name: str) -> Gallery:
    """Open and verify a gallery file; raises GalleryFileError saying what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the server
    except OSError as error:
        raise GalleryFileError(f"unreadable: {type(error).__name__}: {error}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise GalleryFileError("not a regular file")
    with open(fd, "rb") as f:
        try:
            header = _verified_header(f, info.st_size)
        except GalleryFileError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise GalleryFileError(f"unreadable: {type(error).__name__}: {error}") from None
        count, dim, side = header["count"], header["dim"], header["thumbnail_size"]
        if count == 0:
            codes = np.zeros((0, dim), np.float32)
            thumbnails = np.zeros((0, side, side, 3), np.uint8)
        else:  # mapped from the file just verified, never reopened by name
            codes = np.memmap(f, np.float32, "r", header["codes_offset"], (count, dim))
            thumbnails = np.memmap(f, np.uint8, "r", header["thumbnails_offset"], (count, side, side, 3))
    return Gallery(name, path, header, codes, thumbnails, file_signature(info))


def _verified_header(f, total: int) -> dict:
    """Read the whole file once: magic, header, layout, length, checksum, finite codes."""
    start = f.read(16)
    if len(start) < 16 or start[:8] != MAGIC:
        raise GalleryFileError("not a convscope gallery file (bad magic)")
    header_len = int.from_bytes(start[8:16], "little")
    if header_len <= 0 or 16 + header_len + 32 > total:
        raise GalleryFileError(f"truncated: the header claims {header_len} bytes, the file has {total}")
    raw_header = f.read(header_len)
    header = json.loads(raw_header)
    if not isinstance(header, dict):
        raise GalleryFileError("the header is not a JSON object")
    if header.get("version") != VERSION:
        raise GalleryFileError(f"format version {header.get('version')}, this server reads {VERSION}")
    count, dim, side = header["count"], header["dim"], header["thumbnail_size"]
    if not all(isinstance(n, int) and n >= 0 for n in (count, dim, side)):
        raise GalleryFileError(f"bad shape in the header: count {count!r}, dim {dim!r}, thumbnail size {side!r}")
    codes_bytes, thumb_bytes = count * dim * 4, count * side * side * 3
    expected = header["thumbnails_offset"] + thumb_bytes + 32
    if total != expected:
        raise GalleryFileError(f"truncated or padded: {total} bytes, the header describes {expected}")
    if (header["codes_offset"] != 16 + header_len or header["thumbnails_offset"] != 16 + header_len + codes_bytes
            or not len(header["ids"]) == len(header["labels"]) == len(header["predicted"]) == count):
        raise GalleryFileError("the header's offsets or lists do not match its shapes")
    digest = hashlib.sha256(start + raw_header)
    finite = True
    for size, codes in ((codes_bytes, True), (thumb_bytes, False)):
        while size > 0:
            chunk = f.read(min(size, 1 << 22))  # 4-byte aligned: codes start right after the header
            if not chunk:
                raise GalleryFileError("truncated while reading")
            digest.update(chunk)
            if codes and finite:
                finite = bool(np.isfinite(np.frombuffer(chunk, np.float32)).all())
            size -= len(chunk)
    if f.read(32) != digest.digest():
        raise GalleryFileError("checksum mismatch: the file is corrupt")
    if not finite:
        raise GalleryFileError("its codes hold NaN or infinite values; rebuild it")
    return header


# -- locks and temporary files --------------------------------------------------------------------------

def _still_at(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a cleaner may have removed it)."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _new_locked_file(folder: Path, part: str):
    """A new temporary file of ours, open for writing and locked for as long as it is open."""
    while True:
        path = folder / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}.{part}.tmp"
        file = open(path, "x+b")
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)  # waits only while a cleaner looks at it
        if _still_at(path, file.fileno()):
            return file, path
        file.close()  # removed between creation and locking: take another name


def _lock_name(path: Path, wait: float = 0.5) -> int | None:
    """Lock a build's name file; None when another build holds it (after ``wait`` seconds of retries,
    which covers a cleaner or a finishing build holding it for an instant)."""
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
            continue
        if _still_at(path, fd):
            return fd
        os.close(fd)  # removed by its previous holder meanwhile: lock a new one


def _unlock_and_remove(path: Path, fd: int) -> None:
    """Remove a lock or temporary file while still holding its lock, then release it."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def clean_leftovers(root: Path) -> list[str]:
    """Remove this server family's files whose owner is gone (their lock is free); returns their names."""
    removed = []
    try:
        entries = sorted(os.listdir(root))
    except OSError as error:
        log.warning("gallery root %s not readable: %s", root, error)
        return removed
    for entry in entries:
        if not OWN_FILE.match(entry):
            continue
        path = root / entry
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live build
            os.close(fd)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode) and _still_at(path, fd):
            _unlock_and_remove(path, fd)
            removed.append(entry)
        else:
            os.close(fd)
    return removed


class GalleryWriter:
    """Collects codes and thumbnails for a new gallery in temporary files beside the final one."""

    def __init__(self, folder: Path, dim: int, thumbnail_size: int):
        self.folder = folder
        self.dim = dim
        self.thumbnail_size = thumbnail_size
        self._parts = []
        try:
            self._codes, _ = self._new("codes")
            self._thumbs, _ = self._new("thumbs")
        except BaseException:
            self.discard()
            raise
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.predicted: list[int] = []

    def _new(self, part: str):
        file, path = _new_locked_file(self.folder, part)
        self._parts.append((file, path))
        return file, path

    def add(self, codes: np.ndarray, thumbnails: np.ndarray, ids, labels, predicted) -> None:
        self._codes.write(np.ascontiguousarray(codes, np.float32).tobytes())
        self._thumbs.write(np.ascontiguousarray(thumbnails, np.uint8).tobytes())
        self.ids.extend(ids)
        self.labels.extend(labels)
        self.predicted.extend(int(p) for p in predicted)

    def finish(self, path: Path, meta: dict) -> None:
        """Assemble the gallery file and rename it over ``path`` (atomic on POSIX)."""
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
        try:
            final, final_path = self._new("gallery")
            for piece in (MAGIC, len(padded).to_bytes(8, "little"), padded):
                final.write(piece)
                digest.update(piece)
            for part in (self._codes, self._thumbs):
                part.flush()
                part.seek(0)
                while chunk := part.read(1 << 22):
                    final.write(chunk)
                    digest.update(chunk)
            final.write(digest.digest())
            final.flush()
            os.fsync(final.fileno())
            os.replace(final_path, path)  # still locked: the name now holds it, nothing to clean
            _fsync_folder(self.folder)
        finally:
            self.discard()

    def discard(self) -> None:
        """Close and remove the temporary files (each removed before its lock is released)."""
        while self._parts:
            file, path = self._parts.pop()
            try:
                path.unlink(missing_ok=True)
            finally:
                file.close()


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
    """Every ``*.gallery`` file under ``root``, verified when first seen and again whenever it changes on
    disk; failures kept with reasons. The folder is created by the first build."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None
        self._galleries: dict[str, Gallery] = {}
        self._errors: dict[str, str] = {}
        self._seen: dict[str, tuple | None] = {}   # the file signature each entry was made from
        self._building: dict[str, int | None] = {}  # name -> its lock file's descriptor
        self._lock = threading.Lock()
        self._reload = threading.Lock()  # one (re)verification at a time

    def load_all(self) -> None:
        """Remove dead builds' leftovers, then load every gallery."""
        if self.root is None or not self.root.is_dir():  # created by the first build
            return
        for name in clean_leftovers(self.root):
            log.info("removed %s, left by an interrupted build", name)
        self.names()

    def _on_disk(self) -> set[str]:
        try:
            entries = os.listdir(self.root)
        except OSError:
            return set()
        stems = (entry[: -len(SUFFIX)] for entry in entries if entry.endswith(SUFFIX))
        return {stem for stem in stems if NAME.match(stem)}

    def _refresh(self, name: str) -> None:
        """Bring ``name`` in line with its file: (re)load it when new or changed, drop it when gone."""
        if self.root is None or not NAME.match(name or ""):
            return
        path = self.path(name)
        current = _signature_at(path)
        with self._lock:
            if self._seen[name] == current if name in self._seen else current is None:
                return  # unchanged, or never seen and still absent
        with self._reload:
            signature = _signature_at(path)
            with self._lock:
                known = name in self._seen
                if known and self._seen[name] == signature:
                    return  # another request reloaded it meanwhile
                if signature is None:
                    self._galleries.pop(name, None)
                    self._errors.pop(name, None)
                    self._seen.pop(name, None)
            if signature is None:
                if known:
                    log.info("gallery %s: its file was removed", name)
                return
            if known:
                log.info("gallery %s changed on disk; verifying it again", name)
            self._load(name, path, signature)

    def _load(self, name: str, path: Path, signature: tuple | None = None) -> None:
        try:
            gallery = read_gallery(path, name)
        except GalleryFileError as error:
            log.warning("gallery %s not loaded: %s", name, error)
            with self._lock:
                self._galleries.pop(name, None)
                self._errors[name] = str(error)
                self._seen[name] = signature or _signature_at(path)
            return
        with self._lock:
            self._galleries[name] = gallery
            self._errors.pop(name, None)
            self._seen[name] = gallery.signature
        log.info("gallery %s loaded (%d images, %s %s)", name, gallery.size, gallery.header["model"],
                 gallery.header["layer"])

    def path(self, name: str) -> Path:
        return self.root / f"{name}{SUFFIX}"

    def names(self) -> list[str]:
        """Every gallery in the root, including ones another server wrote since."""
        if self.root is None:
            return []
        with self._lock:
            known = set(self._seen)
        for name in sorted(known | self._on_disk()):
            self._refresh(name)
        with self._lock:
            return sorted(set(self._galleries) | set(self._errors))

    def status(self, name: str) -> tuple[Gallery | None, str]:
        self._refresh(name)
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
        """Reserve ``name`` for a build: one build per name at a time, across every server on the root."""
        if self.root is None:
            raise FailedPrecondition("this server has no gallery root (--gallery-root)")
        check_name(name, field)
        with self._lock:
            if name in self._building:
                raise AlreadyExists(f"{field}: gallery {name!r} is being built by another call")
            self._building[name] = None
        try:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = _lock_name(self.root / f"{LOCK_PREFIX}{name}.lock")
            except OSError as error:
                raise FailedPrecondition(f"{field}: cannot lock gallery {name!r} in the gallery root: "
                                         f"{type(error).__name__}: {error}") from None
            if fd is None:
                raise AlreadyExists(f"{field}: gallery {name!r} is being built by another server sharing the "
                                    "gallery root; try again when that build has finished")
        except BaseException:
            with self._lock:
                self._building.pop(name, None)
            raise
        with self._lock:
            self._building[name] = fd
        self._refresh(name)  # another server may have written it
        with self._lock:
            exists = name in self._galleries or name in self._errors
        if exists and not overwrite:
            self.release(name)
            raise AlreadyExists(f"{field}: gallery {name!r} exists; set overwrite to replace it")

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
            fd = self._building.pop(name, None)
        if fd is not None:
            _unlock_and_remove(self.root / f"{LOCK_PREFIX}{name}.lock", fd)

    def delete(self, name: str) -> None:
        check_name(name, "name")
        self._refresh(name)
        with self._lock:
            if name in self._building:
                raise FailedPrecondition(f"name: gallery {name!r} is being built")
            if name not in self._galleries and name not in self._errors:
                raise NotFound("name", "gallery", name, sorted(set(self._galleries) | set(self._errors)))
            self._galleries.pop(name, None)
            self._errors.pop(name, None)
            self._seen.pop(name, None)
        self.path(name).unlink(missing_ok=True)
