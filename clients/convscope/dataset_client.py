"""Client methods for dataset-scale inspection: patches, galleries, nearest neighbours, embeddings.

Images for a scan come from a dataset folder on the server (``dataset="demo"``) or from the caller: any
iterable of images, ``(id, image)`` or ``(id, image, label)`` tuples. Streamed images are sent lazily, one
message each, so a generator over a million files costs the client one image of memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from convscope.images import to_image_message
from convscope.tensors import from_tensor
from convscope.v1 import dataset_pb2

SCAN_TIMEOUT = 24 * 3600.0   # scans stream progress; the server's --max-job-seconds bounds them


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    images: int
    labels: list[str]


@dataclass(frozen=True)
class ItemError:
    index: int                 # position in the scan
    id: str
    reason: str


@dataclass(frozen=True)
class PatchHit:
    index: int                 # the image's position in the scan
    id: str
    value: float               # the channel's largest activation in that image
    row: int                   # where, in the layer's grid
    col: int
    box: tuple[int, int, int, int]  # (top, left, bottom, right) in model-input pixels, end exclusive
    patch: np.ndarray | None   # uint8 pixels under the receptive field, when asked


@dataclass(frozen=True)
class TopPatches:
    layer: str
    images: int                # scanned
    skipped: int               # unreadable, listed in ``errors``
    channels: dict[int, list[PatchHit]]   # channel -> hits, best first
    grid_png: bytes
    grid_channels: list[int]
    errors: list[ItemError]
    execution_provider: str


@dataclass(frozen=True)
class Gallery:
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
    errors: tuple[ItemError, ...] = ()   # images skipped while building (build_gallery only)


@dataclass(frozen=True)
class Neighbor:
    index: int
    id: str
    label: str
    predicted: int
    distance: float


@dataclass(frozen=True)
class Neighbors:
    feature: list[Neighbor]    # nearest by the gallery layer's codes
    pixel: list[Neighbor]      # nearest by raw thumbnail pixels
    query_predicted: int
    query_predicted_label: str
    grid_png: bytes


@dataclass(frozen=True)
class Embedding:
    method: str
    coordinates: np.ndarray    # (points, 2)
    indices: list[int]         # gallery positions
    ids: list[str]
    predicted: list[int]
    labels: list[str]
    explained_variance_ratio: np.ndarray | None   # PCA
    kl_divergence: float       # t-SNE
    scatter_png: bytes
    grid_png: bytes


_METRICS = {"l2": dataset_pb2.METRIC_L2, "cosine": dataset_pb2.METRIC_COSINE}
_EMBEDDINGS = {"tsne": dataset_pb2.EMBED_TSNE, "pca": dataset_pb2.EMBED_PCA}


def _source(images, dataset: str, limit: int) -> dataset_pb2.ImageSource:
    if (images is None) == (not dataset):
        raise ValueError("give either images (streamed from here) or dataset= (a folder on the server)")
    expected = len(images) if images is not None and hasattr(images, "__len__") else 0
    return dataset_pb2.ImageSource(dataset=dataset, expected=expected, limit=limit)


def _items(images) -> Iterable[dataset_pb2.DatasetItem]:
    for index, entry in enumerate(images or ()):
        if isinstance(entry, tuple):
            item_id, image, *rest = entry
            yield dataset_pb2.DatasetItem(id=str(item_id), image=to_image_message(image),
                                          label=str(rest[0]) if rest else "")
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
                    timeout: float | None = SCAN_TIMEOUT) -> TopPatches:
        """For every channel of ``layer`` (or ``channels``), the ``k`` images that excite it most, with the
        receptive-field box of the strongest unit and, with ``patches=True``, its pixels. One pass over
        ``images`` (streamed) or the server's ``dataset`` folder; unreadable images are skipped and reported
        to ``on_item_error(ItemError)`` and in ``errors``."""
        errors, item_error = _error_collector(on_item_error)
        spec = dataset_pb2.TopPatchesSpec(model=model, layer=layer, k=k, channels=list(channels),
                                          source=_source(images, dataset, limit), patches=patches, render=render,
                                          render_channels=render_channels, tile_size=tile_size)
        r = self._stream(self._dataset.TopPatches, _requests(dataset_pb2.TopPatchesRequest, spec, images),
                         progress, timeout, item_error=item_error)
        found = {c.channel: [PatchHit(h.index, h.id, h.value, h.row, h.col, (h.top, h.left, h.bottom, h.right),
                                      from_tensor(h.patch).copy() if h.HasField("patch") else None)
                             for h in c.hits] for c in r.channels}
        return TopPatches(r.layer, r.images, r.skipped, found, r.grid_png, list(r.grid_channels), errors,
                          r.execution_provider)

    def build_gallery(self, name: str, model: str, images=None, *, dataset: str = "", layer: str = "",
                      limit: int = 0, thumbnail_size: int = 0, overwrite: bool = False, progress=None,
                      on_item_error=None, timeout: float | None = SCAN_TIMEOUT) -> Gallery:
        """Store one code per image (``layer``'s activations; default the penultimate layer) and a thumbnail
        as the server-side gallery ``name``, from ``images`` (streamed) or the server's ``dataset``."""
        errors, item_error = _error_collector(on_item_error)
        spec = dataset_pb2.GallerySpec(name=name, model=model, layer=layer, source=_source(images, dataset, limit),
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
