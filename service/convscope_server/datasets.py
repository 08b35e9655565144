"""Where dataset scans get their images: folders under the data root, or a client's stream.

A dataset is any folder under the configured data root, read recursively in sorted path order; an item's
id is its path relative to the dataset folder and its label the first sub-folder (``demo/cat/01.jpg`` ->
label ``cat``). Names and files must resolve inside the data root: ``..``, absolute paths and symlinks
that lead outside are refused. Streamed items arrive as ``DatasetItem`` messages after the request's spec.

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
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convscope_server.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError
from convscope_server.images import encoded_to_input, to_model_input
from convscope_server.onnx.loading import inside

log = logging.getLogger("convscope_server")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Item:
    index: int
    id: str
    label: str
    load: Callable[[], np.ndarray]   # -> one model-input sample; raises ServiceError when unusable. Holds
                                     # only the file path or the message as sent, so patch scans keep it
                                     # (not decoded pixels) for the images they may crop at the end
    path: Path | None = None         # the file, for items of a dataset folder (Ray scans decode it there)


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
        """(name, image count, labels) of every top-level dataset folder."""
        if self.root is None or not self.root.is_dir():
            return []
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not inside(folder, self.root):
                continue
            labels = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            found.append(DatasetSummary(folder.name, count_images(folder), labels))
        return found


@dataclass
class DatasetSummary:
    name: str
    images: int
    labels: list[str]


def _image_files(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` in sorted path order, without listing the whole tree at once."""
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(current) / name


def count_images(folder: Path) -> int:
    return sum(1 for _ in _image_files(folder))


def folder_items(folder: Path, root: Path, config, max_pixels: int) -> Iterator[Item]:
    """The images of a dataset folder as lazily decoded items."""
    for index, path in enumerate(_image_files(folder)):
        relative = path.relative_to(folder)
        label = relative.parts[0] if len(relative.parts) > 1 else ""
        yield Item(index, relative.as_posix(), label, functools.partial(load_file, path, root, config, max_pixels),
                   path)


def load_file(path: Path, root: Path, config, max_pixels: int) -> np.ndarray:
    """One dataset file as a model input; files resolving outside ``root`` (symlinks) are refused."""
    if not inside(path, root):
        raise InvalidArgument("file", "resolves outside the data root: refused")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidArgument("file", f"cannot read: {error.strerror or error}") from None
    return encoded_to_input(data, config, "image", max_pixels, draft=True)


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
