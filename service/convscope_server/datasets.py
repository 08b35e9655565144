"""Where dataset scans get their images: folders under the data root, or a client's stream.

A dataset is any folder under the configured data root, read recursively in sorted path order (each
folder's entries by name, files and sub-folders together: the order of sorted ``pathlib`` paths); an
item's id is its path relative to the dataset folder and its label the first sub-folder
(``demo/cat/01.jpg`` -> label ``cat``). Hidden files and folders (names starting with ``.``: ``.git``,
macOS ``._`` files) are not part of a dataset. Names and files must resolve inside the data root: ``..``,
absolute paths and symlinks that lead outside are refused. Symlinked folders inside the root are followed
(once: a link back to a folder being walked is a loop). Nothing is dropped in silence: a file that is not
a regular file (a FIFO would block the scan), is larger than any image of the pixel limit can be, or a
folder that cannot be listed or leads outside the root becomes an ``ItemError`` of its own. Ids and labels
of names that are not UTF-8 show the bytes as ``\\xNN`` (the file is still read by its real name).
Streamed items arrive as ``DatasetItem`` messages after the request's spec.

Either way the scan sees a sequence of :class:`Item` whose pixels are decoded lazily, so an unreadable
image becomes an ``ItemError`` for that item alone. :func:`batches` decodes ahead in a pool of threads
(Pillow releases the GIL while decoding and resizing; the numpy step is one multiply-add) so the model is
not kept waiting, and holds at most a few batches: memory does not grow with the number of images. Scans
decode large JPEGs in draft mode (reduced DCT scale, see ``images``), which single-image requests don't.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convscope.images import IMAGE_EXTENSIONS, readable_text
from convscope_server.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError
from convscope_server.images import encoded_to_input, to_model_input
from convscope_server.onnx.loading import file_kind, inside

log = logging.getLogger("convscope_server")

BYTES_PER_PIXEL = 8   # a file over max_pixels * 8 bytes (16-bit RGBA, uncompressed) + 1 MiB is no image we take


@dataclass
class Item:
    index: int
    id: str
    label: str
    load: Callable[[], np.ndarray]   # -> one model-input sample; raises ServiceError when unusable. Holds
                                     # only the file path or the message as sent, so patch scans keep it
                                     # (not decoded pixels) for the images they may crop at the end
    path: Path | None = None         # the file, for items of a dataset folder (Ray scans decode it there)
    problem: str = ""                # why a dataset folder's entry cannot be scanned (its load raises it)


@dataclass
class Batch:
    indices: list[int]
    ids: list[str]
    labels: list[str]
    inputs: np.ndarray               # (B, ...) model inputs
    loaders: list[Callable[[], np.ndarray]]


@dataclass
class ItemFailure:
    index: int
    id: str
    reason: str


class DataRoot:
    """The folder whose sub-folders are datasets. ``None`` (no data root) refuses every dataset name."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None

    def folder(self, name: str, field: str = "source.dataset") -> Path:
        """Resolve a dataset name to its folder, confined to the data root."""
        if self.root is None or not self.root.is_dir():
            raise InvalidArgument(field, "this server has no data root (--data-root); stream the images instead")
        if not name or name.startswith(("/", "\\")) or Path(name).is_absolute():
            raise InvalidArgument(field, f"{name!r}: give a folder name relative to the data root")
        if ".." in Path(name).parts:
            raise InvalidArgument(field, f"{name!r}: '..' is not allowed; datasets are folders under the data root")
        if len(name) > 1024 or "\0" in name:
            raise InvalidArgument(field, f"{name[:64]!r}...: not a folder name (too long, or holds NUL)")
        if not Path(name).parts:
            raise InvalidArgument(field, f"{name!r}: name a dataset folder under the data root, not the root itself")
        if any(part.startswith(".") for part in Path(name).parts):
            raise InvalidArgument(field, f"{name!r}: hidden folders (names starting with '.') are not datasets")
        folder = self.root / name
        try:
            outside, missing = not inside(folder, self.root), not folder.is_dir()
        except (OSError, ValueError) as error:
            raise InvalidArgument(field, f"{name[:64]!r}: cannot be read as a folder: {error.strerror or error}"
                                  if isinstance(error, OSError) else f"{name[:64]!r}: {error}") from None
        if outside:
            raise InvalidArgument(field, f"{name!r} resolves outside the data root: refused")
        if missing:
            raise NotFound(field, "dataset", name, [d.name for d in self.summaries()])
        return folder

    def summaries(self) -> list:
        """(name, image count, labels) of every top-level dataset folder: what a scan of it would go
        through (its items, unreadable ones included) and the labels its items carry."""
        if self.root is None or not self.root.is_dir():
            return []
        found = []
        for name, is_folder in _entries(self.root)[0]:
            path = self.root / name
            if not is_folder or not inside(path, self.root):
                continue
            count, labels = 0, set()
            for entry in _walk(path, self.root):
                count += 1
                labels.add(entry.label)
            found.append(DatasetSummary(readable_text(name), count, sorted(labels - {""})))
        return found


@dataclass
class DatasetSummary:
    name: str
    images: int
    labels: list[str]


@dataclass
class _Entry:
    path: Path
    parts: tuple[str, ...]   # relative to the dataset folder
    problem: str = ""        # why it cannot be scanned ("" for an image file to decode)
    folder: bool = False     # a folder that cannot be walked (its id ends in "/")

    @property
    def id(self) -> str:
        return readable_text("/".join(self.parts)) + ("/" if self.folder else "")

    @property
    def label(self) -> str:
        return readable_text(self.parts[0]) if len(self.parts) > 1 else ""


def _entries(folder: Path) -> tuple[list[tuple[str, bool]], str]:
    """((name, is a folder) of a folder's visible entries sorted by name, "") or ([], why it cannot be
    listed). From one ``scandir``: the entry types come with the listing, no stat per file."""
    try:
        with os.scandir(folder) as listing:
            found = []
            for entry in listing:
                if not entry.name.startswith("."):
                    try:
                        found.append((entry.name, entry.is_dir()))   # follows a symlink, as walking does
                    except OSError:
                        found.append((entry.name, False))
    except OSError as error:
        return [], error.strerror or str(error)
    return sorted(found), ""


def _walk(folder: Path, root: Path, parts: tuple[str, ...] = (), seen: frozenset = frozenset()) -> Iterator[_Entry]:
    """The items of ``folder`` in sorted path order, lazily (one folder's listing at a time)."""
    seen = seen | {os.path.realpath(folder)}
    entries, problem = _entries(folder)
    if problem:
        yield _Entry(folder, parts, f"folder cannot be listed: {problem}", folder=True)
    for name, is_folder in entries:
        if not is_folder and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        path, here = folder / name, (*parts, name)
        if is_folder:
            if not inside(path, root):
                yield _Entry(path, here, "folder resolves outside the data root: refused", folder=True)
            elif os.path.realpath(path) in seen:
                yield _Entry(path, here, "folder is a link back to a folder it is in (a loop): skipped",
                             folder=True)
            else:
                yield from _walk(path, root, here, seen)
        else:
            yield _Entry(path, here)


def count_images(folder: Path, root: Path) -> int:
    """The items a scan of ``folder`` (under the data root ``root``) goes through, unreadable ones included."""
    return sum(1 for _ in _walk(folder, root))


def folder_items(folder: Path, root: Path, config, max_pixels: int) -> Iterator[Item]:
    """The images of a dataset folder as lazily decoded items (one that cannot be scanned fails on load)."""
    for index, entry in enumerate(_walk(folder, root)):
        load = (functools.partial(_refused, entry.problem) if entry.problem else
                functools.partial(load_file, entry.path, root, config, max_pixels))
        yield Item(index, entry.id, entry.label, load, None if entry.problem else entry.path, entry.problem)


def _refused(problem: str) -> np.ndarray:
    raise InvalidArgument("file", problem)


def load_file(path: Path, root: Path, config, max_pixels: int) -> np.ndarray:
    """One dataset file as a model input. Refused: files resolving outside ``root`` (symlinks), anything
    but a regular file (a FIFO would block the read), and files larger than an image within ``max_pixels``
    can be (read whole, a huge one would hold the memory and the decode thread)."""
    if not inside(path, root):
        raise InvalidArgument("file", "resolves outside the data root: refused")
    limit = max_pixels * BYTES_PER_PIXEL + (1 << 20)
    try:
        with open(path, "rb", opener=_nonblocking) as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise InvalidArgument("file", f"is {file_kind(info.st_mode)}, not a regular file: refused")
            if info.st_size > limit:
                raise InvalidArgument("file", f"is {info.st_size} bytes, over the {limit} an image of at most "
                                      f"{max_pixels} pixels can take (--max-image-pixels)")
            data = file.read()
    except OSError as error:
        raise InvalidArgument("file", f"cannot read: {error.strerror or error}") from None
    return encoded_to_input(data, config, "image", max_pixels, draft=True)


def _nonblocking(path, flags):
    """Open without blocking: a FIFO opened for reading would wait for a writer (fstat then refuses it)."""
    return os.open(path, flags | os.O_NONBLOCK)


def stream_items(messages: Iterable, config, max_pixels: int) -> Iterator[Item]:
    """Streamed ``*Request`` messages after the spec: each must carry an ``item``."""
    for index, message in enumerate(messages):
        if message.WhichOneof("part") != "item":
            raise InvalidArgument(f"requests[{index + 1}]", "only the first message carries a spec; the rest "
                                  "must be items")
        item = message.item
        yield Item(index, item.id or str(index), item.label, _message_loader(item, config, max_pixels))


def _message_loader(item, config, max_pixels: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if not item.HasField("image"):
            raise InvalidArgument("image", "required")
        return to_model_input(item.image, config, "image", max_pixels, draft=True)
    return load


def limited(items: Iterator[Item], limit: int, max_images: int) -> Iterator[Item]:
    """Stop after ``limit`` items (0: none given); more than ``max_images`` is RESOURCE_EXHAUSTED."""
    for item in items:
        if limit and item.index >= limit:
            return
        if item.index >= max_images:
            raise ResourceExhausted(f"the scan is over the server's limit of {max_images} images "
                                    "(--max-scan-images); set source.limit or scan a smaller set")
        yield item


def usable_cores() -> int:
    """The cores this process may run on (CPU affinity, as container CPU sets restrict it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # platforms without affinity
        return os.cpu_count() or 1


def batches(items: Iterator[Item], size: int, on_failure: Callable[[ItemFailure], None],
            should_stop: Callable[[], bool], workers: int = 0, depth: int = 2) -> Iterator[Batch]:
    """Decode items in a pool of ``workers`` threads (0: one per core) and yield them ``size`` at a time in
    index order, up to ``depth`` batches ahead of the consumer, so the next batches decode while the model
    runs. A reader thread walks ``items``, keeps ``4 * workers`` loads in flight (a slow image holds up
    little) and collects them oldest first: the batches are those of a sequential read, and at most
    ``depth + 2`` batches (the consumer's, those queued, the one being filled) and ``4 * workers`` loads are
    held whatever the number of items. Unusable items go to ``on_failure`` in index order and are left out;
    an error of ``items`` itself is raised here. Stops early when ``should_stop()`` turns true or the
    consumer stops iterating; the pool's threads have ended when this generator has."""
    workers = workers or usable_cores()
    window = 4 * workers
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = threading.Event()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="convscope-decode")

    def put(value) -> bool:
        while not done.is_set():
            try:
                ready.put(value, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            loading: deque[tuple[Item, Future]] = deque()
            pending: list[tuple[Item, np.ndarray]] = []
            remaining = iter(items)
            while not done.is_set() and not should_stop():
                if len(loading) < window and (item := next(remaining, None)) is not None:
                    loading.append((item, pool.submit(item.load)))
                    continue
                if not loading:
                    break
                item, future = loading.popleft()
                try:
                    pending.append((item, future.result()))
                except Exception as error:  # noqa: BLE001 - one bad item never aborts the scan
                    on_failure(item_failure(item.index, item.id, error))
                    continue
                if len(pending) == size:
                    if not put(_stack(pending)):
                        return
                    pending = []
            if pending and not put(_stack(pending)):
                return
            put(None)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(error)

    reader = threading.Thread(target=read, name="convscope-reader", daemon=True)
    reader.start()
    try:
        while True:
            try:
                value = ready.get(timeout=0.2)
            except queue.Empty:
                if should_stop() or (not reader.is_alive() and ready.empty()):
                    return
                continue
            if value is None:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
            if should_stop():
                return
    finally:
        done.set()
        pool.shutdown(wait=True, cancel_futures=True)


def no_readable_images(failures: list[ItemFailure]) -> InvalidArgument:
    """The error of a scan in which no image could be read: how many failed and why the first did."""
    first = f" (the first, {failures[0].id}: {failures[0].reason})" if failures else ""
    return InvalidArgument("spec.source", f"no readable images: all {len(failures)} items failed{first}")


def item_failure(index: int, item_id: str, error: Exception) -> ItemFailure:
    """The ItemError an item's load raised: a ServiceError's message, or the unexpected error named (and
    logged). Shared with the Ray scans, whose workers decode items elsewhere."""
    if isinstance(error, ServiceError):
        return ItemFailure(index, item_id, str(error))
    log.warning("dataset item %d (%s) failed: %s: %s", index, item_id, type(error).__name__, error)
    return ItemFailure(index, item_id, f"cannot use this image: {type(error).__name__}: {error}")


def _stack(pending: list[tuple[Item, np.ndarray]]) -> Batch:
    return Batch([item.index for item, _ in pending], [item.id for item, _ in pending],
                 [item.label for item, _ in pending], np.stack([x for _, x in pending]),
                 [item.load for item, _ in pending])
