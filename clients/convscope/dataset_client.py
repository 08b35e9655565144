"""Client methods for dataset-scale inspection: patches, galleries, nearest neighbours, embeddings.

Images for a scan come from a dataset folder on the server (``dataset="demo"``) or from the caller: any
iterable of images, ``(id, image)`` or ``(id, image, label)`` tuples. File paths are their own ids
(relative to the folder a list of them shares); other images are numbered. Streamed images are sent lazily, one
message each, so a generator over a million files costs the client one image of memory at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from convscope.images import readable_text, to_image_message
from convscope.tensors import from_tensor
from convscope.v1 import dataset_pb2

SCAN_TIMEOUT = 24 * 3600.0   # scans stream progress; the server's --max-job-seconds bounds them


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset folder on the server (``Client.datasets``).

    Attributes:
        name: the folder's name under the server's data root; scans take it as ``dataset=``.
        images: the items a scan of it goes through (image files, hidden ones left out, and entries it will
            report unreadable).
        labels: its class sub-folders, when it has them.
    """
    name: str
    images: int
    labels: list[str]


@dataclass(frozen=True)
class ItemError:
    """An image a scan could not read; the scan went on without it.

    Attributes:
        index: its position in the scan.
        id: its id (file name or the id given).
        reason: why it could not be used.
    """
    index: int
    id: str
    reason: str


@dataclass(frozen=True)
class PatchHit:
    """One of a channel's top images (``TopPatches.channels``).

    Attributes:
        index: the image's position in the scan.
        id: the image's id.
        value: the channel's largest activation in that image.
        row: where, in the layer's grid (row).
        col: where, in the layer's grid (column).
        box: (top, left, bottom, right) of the unit's receptive field in model-input pixels, end exclusive.
        patch: uint8 pixels under the receptive field, with ``patches=True``; else None.
    """
    index: int
    id: str
    value: float
    row: int
    col: int
    box: tuple[int, int, int, int]
    patch: np.ndarray | None


@dataclass(frozen=True)
class TopPatches:
    """The images that excite each channel most (``Client.top_patches``).

    Attributes:
        layer: the layer scanned.
        images: how many images were read and scanned (the unreadable ones are ``skipped``).
        skipped: how many were unreadable (listed in ``errors``).
        channels: channel -> hits, best first.
        grid_png: one row of patches per channel, when rendered.
        grid_channels: the channels of the grid's rows, top to bottom.
        errors: the unreadable images.
        execution_provider: onnxruntime's provider that ran the scan.
        placement: where it ran: "server" or "cluster" (the server's Ray cluster).
    """
    layer: str
    images: int
    skipped: int
    channels: dict[int, list[PatchHit]]
    grid_png: bytes
    grid_channels: list[int]
    errors: list[ItemError]
    execution_provider: str
    placement: str = "server"


@dataclass(frozen=True)
class Gallery:
    """A server-side gallery of codes and thumbnails (``Client.build_gallery``, ``Client.galleries``).

    Attributes:
        name: the gallery's name.
        ready: False for a corrupt file or a missing or changed model.
        error: why it is not ready.
        model: the model whose codes it holds.
        layer: the layer the codes come from.
        size: how many images it holds.
        dim: the length of one code.
        thumbnail_size: the thumbnails' side in pixels.
        source: where the images came from (a dataset name or "stream").
        created: when it was built (seconds since the epoch).
        file_bytes: the file's size.
        errors: images skipped while building (build_gallery only).
    """
    name: str
    ready: bool
    error: str
    model: str
    layer: str
    size: int
    dim: int
    thumbnail_size: int
    source: str
    created: float
    file_bytes: int
    errors: tuple[ItemError, ...] = ()


@dataclass(frozen=True)
class Neighbor:
    """A gallery image near the query.

    Attributes:
        index: its position in the gallery.
        id: its id.
        label: its label, when the gallery has labels.
        predicted: the class the model predicts for it.
        distance: its distance to the query (L2, or 1 - cosine similarity).
    """
    index: int
    id: str
    label: str
    predicted: int
    distance: float


@dataclass(frozen=True)
class Neighbors:
    """The nearest gallery images to a query (``Client.nearest_neighbors``).

    Attributes:
        feature: nearest by the gallery layer's codes, nearest first.
        pixel: nearest by raw thumbnail pixels, for comparison.
        query_predicted: the class the model predicts for the query.
        query_predicted_label: its name.
        grid_png: query and neighbours side by side, when rendered.
    """
    feature: list[Neighbor]
    pixel: list[Neighbor]
    query_predicted: int
    query_predicted_label: str
    grid_png: bytes


@dataclass(frozen=True)
class Embedding:
    """A 2-D map of a gallery's codes (``Client.embedding``).

    Attributes:
        method: "tsne" or "pca".
        coordinates: (points, 2).
        indices: each point's gallery position.
        ids: each point's id.
        predicted: each point's predicted class.
        labels: each point's label, when the gallery has labels.
        explained_variance_ratio: PCA: the variance each axis explains; else None.
        kl_divergence: t-SNE: the final KL divergence.
        scatter_png: the points coloured by predicted class, when rendered.
        grid_png: t-SNE: the thumbnails laid on a grid by position, when rendered.
    """
    method: str
    coordinates: np.ndarray
    indices: list[int]
    ids: list[str]
    predicted: list[int]
    labels: list[str]
    explained_variance_ratio: np.ndarray | None
    kl_divergence: float
    scatter_png: bytes
    grid_png: bytes


_METRICS = {"l2": dataset_pb2.METRIC_L2, "cosine": dataset_pb2.METRIC_COSINE}
# Where a scan runs: the server's choice, the server itself, or its Ray cluster (server flag --ray).
PLACEMENTS = {"default": dataset_pb2.PLACEMENT_DEFAULT, "server": dataset_pb2.PLACEMENT_SERVER,
              "cluster": dataset_pb2.PLACEMENT_CLUSTER}
_EMBEDDINGS = {"tsne": dataset_pb2.EMBED_TSNE, "pca": dataset_pb2.EMBED_PCA}


def _source(images, dataset: str, limit: int, placement: str = "default") -> dataset_pb2.ImageSource:
    if (images is None) == (not dataset):
        raise ValueError("give either images (streamed from here) or dataset= (a folder on the server)")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, not {placement!r}")
    expected = len(images) if images is not None and hasattr(images, "__len__") else 0
    return dataset_pb2.ImageSource(dataset=dataset, expected=expected, limit=limit, placement=PLACEMENTS[placement])


def _common_folder(images) -> str:
    """For a list of file paths, the folder they share (ids are relative to it); else ""."""
    if not isinstance(images, (list, tuple)) or not images:
        return ""
    if not all(isinstance(entry, (str, os.PathLike)) for entry in images):
        return ""
    paths = [os.path.abspath(entry) for entry in images]
    return os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath([os.path.dirname(p) for p in paths])


def _items(images) -> Iterable[dataset_pb2.DatasetItem]:
    """Items to stream. Ids: the id given in a tuple; for a file path, the path relative to the folder a
    list of paths shares ("cats/01.jpg"), or the path as given for other iterables; else the position."""
    common = _common_folder(images)
    for index, entry in enumerate(images or ()):
        if isinstance(entry, tuple):
            item_id, image, *rest = entry
            yield dataset_pb2.DatasetItem(id=str(item_id), image=to_image_message(image),
                                          label=str(rest[0]) if rest else "")
        elif isinstance(entry, (str, os.PathLike)):
            item_id = os.path.relpath(os.path.abspath(entry), common) if common else os.fspath(entry)
            yield dataset_pb2.DatasetItem(id=readable_text(os.fsdecode(item_id)), image=to_image_message(entry))
        else:
            yield dataset_pb2.DatasetItem(id=str(index), image=to_image_message(entry))


def _requests(request_type, spec, images):
    yield request_type(spec=spec)
    for item in _items(images):
        yield request_type(item=item)


def _error_collector(on_item_error):
    """A list of ItemErrors, and the callback that fills it (and tells ``on_item_error``)."""
    errors: list[ItemError] = []

    def item_error(message):
        errors.append(ItemError(message.index, message.id, message.reason))
        if on_item_error is not None:
            on_item_error(errors[-1])

    return errors, item_error


def _gallery(g, errors=()) -> Gallery:
    return Gallery(g.name, g.ready, g.error, g.model, g.layer, g.size, g.dim, g.thumbnail_size, g.source,
                   g.created, g.file_bytes, tuple(errors))


def _neighbors(items) -> list[Neighbor]:
    return [Neighbor(n.index, n.id, n.label, n.predicted, n.distance) for n in items]


class DatasetMethods:
    """Mixed into :class:`convscope.Client`."""

    def datasets(self) -> list[DatasetSummary]:
        """Dataset folders under the server's data root."""
        r = self._call(self._dataset.ListDatasets, dataset_pb2.ListDatasetsRequest())
        return [DatasetSummary(d.name, d.images, list(d.labels)) for d in r.datasets]

    def top_patches(self, model: str, layer: str, images=None, *, dataset: str = "", k: int = 9,
                    channels: Sequence[int] = (), limit: int = 0, patches: bool = False, render: bool = False,
                    render_channels: int = 0, tile_size: int = 0, progress=None, on_item_error=None,
                    placement: str = "default", timeout: float | None = SCAN_TIMEOUT) -> TopPatches:
        """For every channel of ``layer`` (or ``channels``), the ``k`` images that excite it most, with the
        receptive-field box of the strongest unit and, with ``patches=True``, its pixels. One pass over
        ``images`` (streamed) or the server's ``dataset`` folder; unreadable images are skipped and reported
        to ``on_item_error(ItemError)`` and in ``errors``. ``placement``: "default" (the server's choice),
        "server" or "cluster" (the server's Ray cluster; dataset folders only): the same result either way."""
        errors, item_error = _error_collector(on_item_error)
        spec = dataset_pb2.TopPatchesSpec(model=model, layer=layer, k=k, channels=list(channels),
                                          source=_source(images, dataset, limit, placement), patches=patches,
                                          render=render,
                                          render_channels=render_channels, tile_size=tile_size)
        r = self._stream(self._dataset.TopPatches, _requests(dataset_pb2.TopPatchesRequest, spec, images),
                         progress, timeout, item_error=item_error)
        found = {c.channel: [PatchHit(h.index, h.id, h.value, h.row, h.col, (h.top, h.left, h.bottom, h.right),
                                      from_tensor(h.patch).copy() if h.HasField("patch") else None)
                             for h in c.hits] for c in r.channels}
        return TopPatches(r.layer, r.images, r.skipped, found, r.grid_png, list(r.grid_channels), errors,
                          r.execution_provider, "cluster" if r.placement == dataset_pb2.PLACEMENT_CLUSTER else "server")

    def build_gallery(self, name: str, model: str, images=None, *, dataset: str = "", layer: str = "",
                      limit: int = 0, thumbnail_size: int = 0, overwrite: bool = False, progress=None,
                      on_item_error=None, placement: str = "default",
                      timeout: float | None = SCAN_TIMEOUT) -> Gallery:
        """Store one code per image (``layer``'s activations; default the penultimate layer) and a thumbnail
        as the server-side gallery ``name``, from ``images`` (streamed) or the server's ``dataset``.
        ``placement`` as for :meth:`top_patches`."""
        errors, item_error = _error_collector(on_item_error)
        spec = dataset_pb2.GallerySpec(name=name, model=model, layer=layer,
                                       source=_source(images, dataset, limit, placement),
                                       thumbnail_size=thumbnail_size, overwrite=overwrite)
        r = self._stream(self._dataset.BuildGallery, _requests(dataset_pb2.BuildGalleryRequest, spec, images),
                         progress, timeout, item_error=item_error)
        return _gallery(r, errors)

    def galleries(self) -> list[Gallery]:
        """Galleries on the server; ``ready`` False with ``error`` for corrupt files or missing models."""
        r = self._call(self._dataset.ListGalleries, dataset_pb2.ListGalleriesRequest())
        return [_gallery(g) for g in r.galleries]

    def delete_gallery(self, name: str) -> None:
        self._call(self._dataset.DeleteGallery, dataset_pb2.DeleteGalleryRequest(name=name))

    def nearest_neighbors(self, gallery: str, image, k: int = 5, *, metric: str = "l2", render: bool = False,
                          timeout: float | None = None) -> Neighbors:
        """The ``k`` gallery images nearest to ``image`` by the gallery layer's codes and by raw thumbnail
        pixels; ``metric`` "l2" or "cosine"."""
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {list(_METRICS)}")
        r = self._call(self._dataset.NearestNeighbors, dataset_pb2.NearestNeighborsRequest(
            gallery=gallery, image=to_image_message(image), k=k, metric=_METRICS[metric], render=render), timeout)
        return Neighbors(_neighbors(r.feature), _neighbors(r.pixel), r.query_predicted, r.query_predicted_label,
                         r.grid_png)

    def embedding(self, gallery: str, method: str = "tsne", *, perplexity: float = 0.0, iterations: int = 0,
                  seed: int = 0, max_points: int = 0, render: bool = False, grid_size: int = 0, progress=None,
                  timeout: float | None = SCAN_TIMEOUT) -> Embedding:
        """2-D ``method`` ("tsne" or "pca") embedding of a gallery's codes; with ``render``, a scatter plot
        coloured by predicted class and the t-SNE image grid (``grid_size`` cells per side)."""
        if method not in _EMBEDDINGS:
            raise ValueError(f"method must be one of {list(_EMBEDDINGS)}")
        r = self._stream(self._dataset.Embed, dataset_pb2.EmbedRequest(
            gallery=gallery, method=_EMBEDDINGS[method], perplexity=perplexity, iterations=iterations, seed=seed,
            max_points=max_points, render=render, grid_size=grid_size), progress, timeout)
        return Embedding(r.method, from_tensor(r.coordinates).copy(), list(r.indices), list(r.ids),
                         list(r.predicted), list(r.labels),
                         from_tensor(r.explained_variance_ratio).copy() if r.HasField("explained_variance_ratio")
                         else None, r.kl_divergence, r.scatter_png, r.grid_png)
