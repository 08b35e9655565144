from convscope.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_DEFAULT: _ClassVar[Placement]
    PLACEMENT_SERVER: _ClassVar[Placement]
    PLACEMENT_CLUSTER: _ClassVar[Placement]

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_L2: _ClassVar[Metric]
    METRIC_COSINE: _ClassVar[Metric]

class EmbedMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EMBED_TSNE: _ClassVar[EmbedMethod]
    EMBED_PCA: _ClassVar[EmbedMethod]
PLACEMENT_DEFAULT: Placement
PLACEMENT_SERVER: Placement
PLACEMENT_CLUSTER: Placement
METRIC_L2: Metric
METRIC_COSINE: Metric
EMBED_TSNE: EmbedMethod
EMBED_PCA: EmbedMethod

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DatasetSummary(_message.Message):
    __slots__ = ("name", "images", "labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    images: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., images: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("data_root", "datasets")
    DATA_ROOT_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    data_root: str
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetSummary]
    def __init__(self, data_root: _Optional[str] = ..., datasets: _Optional[_Iterable[_Union[DatasetSummary, _Mapping]]] = ...) -> None: ...

class ImageSource(_message.Message):
    __slots__ = ("dataset", "expected", "limit", "placement")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    expected: int
    limit: int
    placement: Placement
    def __init__(self, dataset: _Optional[str] = ..., expected: _Optional[int] = ..., limit: _Optional[int] = ..., placement: _Optional[_Union[Placement, str]] = ...) -> None: ...

class DatasetItem(_message.Message):
    __slots__ = ("id", "image", "label")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: _tensor_pb2.Image
    label: str
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., label: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("index", "id", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    reason: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TopPatchesSpec(_message.Message):
    __slots__ = ("model", "layer", "k", "channels", "source", "patches", "render", "render_channels", "tile_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    RENDER_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: str
    k: int
    channels: _containers.RepeatedScalarFieldContainer[int]
    source: ImageSource
    patches: bool
    render: bool
    render_channels: int
    tile_size: int
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[str] = ..., k: _Optional[int] = ..., channels: _Optional[_Iterable[int]] = ..., source: _Optional[_Union[ImageSource, _Mapping]] = ..., patches: _Optional[bool] = ..., render: _Optional[bool] = ..., render_channels: _Optional[int] = ..., tile_size: _Optional[int] = ...) -> None: ...

class TopPatchesRequest(_message.Message):
    __slots__ = ("spec", "item")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    spec: TopPatchesSpec
    item: DatasetItem
    def __init__(self, spec: _Optional[_Union[TopPatchesSpec, _Mapping]] = ..., item: _Optional[_Union[DatasetItem, _Mapping]] = ...) -> None: ...

class PatchHit(_message.Message):
    __slots__ = ("index", "id", "value", "row", "col", "top", "left", "bottom", "right", "patch")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    PATCH_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    value: float
    row: int
    col: int
    top: int
    left: int
    bottom: int
    right: int
    patch: _tensor_pb2.Tensor
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., value: _Optional[float] = ..., row: _Optional[int] = ..., col: _Optional[int] = ..., top: _Optional[int] = ..., left: _Optional[int] = ..., bottom: _Optional[int] = ..., right: _Optional[int] = ..., patch: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ChannelPatches(_message.Message):
    __slots__ = ("channel", "hits")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    channel: int
    hits: _containers.RepeatedCompositeFieldContainer[PatchHit]
    def __init__(self, channel: _Optional[int] = ..., hits: _Optional[_Iterable[_Union[PatchHit, _Mapping]]] = ...) -> None: ...

class TopPatchesResult(_message.Message):
    __slots__ = ("layer", "images", "skipped", "channels", "grid_png", "grid_channels", "execution_provider", "placement")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    GRID_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    layer: str
    images: int
    skipped: int
    channels: _containers.RepeatedCompositeFieldContainer[ChannelPatches]
    grid_png: bytes
    grid_channels: _containers.RepeatedScalarFieldContainer[int]
    execution_provider: str
    placement: Placement
    def __init__(self, layer: _Optional[str] = ..., images: _Optional[int] = ..., skipped: _Optional[int] = ..., channels: _Optional[_Iterable[_Union[ChannelPatches, _Mapping]]] = ..., grid_png: _Optional[bytes] = ..., grid_channels: _Optional[_Iterable[int]] = ..., execution_provider: _Optional[str] = ..., placement: _Optional[_Union[Placement, str]] = ...) -> None: ...

class TopPatchesEvent(_message.Message):
    __slots__ = ("progress", "item_error", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    item_error: ItemError
    result: TopPatchesResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., item_error: _Optional[_Union[ItemError, _Mapping]] = ..., result: _Optional[_Union[TopPatchesResult, _Mapping]] = ...) -> None: ...

class GallerySpec(_message.Message):
    __slots__ = ("name", "model", "layer", "source", "thumbnail_size", "overwrite")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    layer: str
    source: ImageSource
    thumbnail_size: int
    overwrite: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., layer: _Optional[str] = ..., source: _Optional[_Union[ImageSource, _Mapping]] = ..., thumbnail_size: _Optional[int] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class BuildGalleryRequest(_message.Message):
    __slots__ = ("spec", "item")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    spec: GallerySpec
    item: DatasetItem
    def __init__(self, spec: _Optional[_Union[GallerySpec, _Mapping]] = ..., item: _Optional[_Union[DatasetItem, _Mapping]] = ...) -> None: ...

class GalleryInfo(_message.Message):
    __slots__ = ("name", "ready", "error", "model", "layer", "size", "dim", "thumbnail_size", "source", "created", "file_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
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
    def __init__(self, name: _Optional[str] = ..., ready: _Optional[bool] = ..., error: _Optional[str] = ..., model: _Optional[str] = ..., layer: _Optional[str] = ..., size: _Optional[int] = ..., dim: _Optional[int] = ..., thumbnail_size: _Optional[int] = ..., source: _Optional[str] = ..., created: _Optional[float] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class BuildGalleryEvent(_message.Message):
    __slots__ = ("progress", "item_error", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    item_error: ItemError
    result: GalleryInfo
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., item_error: _Optional[_Union[ItemError, _Mapping]] = ..., result: _Optional[_Union[GalleryInfo, _Mapping]] = ...) -> None: ...

class ListGalleriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGalleriesResponse(_message.Message):
    __slots__ = ("galleries",)
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    galleries: _containers.RepeatedCompositeFieldContainer[GalleryInfo]
    def __init__(self, galleries: _Optional[_Iterable[_Union[GalleryInfo, _Mapping]]] = ...) -> None: ...

class DeleteGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteGalleryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NearestNeighborsRequest(_message.Message):
    __slots__ = ("gallery", "image", "k", "metric", "render")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    image: _tensor_pb2.Image
    k: int
    metric: Metric
    render: bool
    def __init__(self, gallery: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., k: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., render: _Optional[bool] = ...) -> None: ...

class Neighbor(_message.Message):
    __slots__ = ("index", "id", "label", "predicted", "distance")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    label: str
    predicted: int
    distance: float
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., label: _Optional[str] = ..., predicted: _Optional[int] = ..., distance: _Optional[float] = ...) -> None: ...

class NearestNeighborsResponse(_message.Message):
    __slots__ = ("feature", "pixel", "query_predicted", "query_predicted_label", "grid_png")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    PIXEL_FIELD_NUMBER: _ClassVar[int]
    QUERY_PREDICTED_FIELD_NUMBER: _ClassVar[int]
    QUERY_PREDICTED_LABEL_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    feature: _containers.RepeatedCompositeFieldContainer[Neighbor]
    pixel: _containers.RepeatedCompositeFieldContainer[Neighbor]
    query_predicted: int
    query_predicted_label: str
    grid_png: bytes
    def __init__(self, feature: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., pixel: _Optional[_Iterable[_Union[Neighbor, _Mapping]]] = ..., query_predicted: _Optional[int] = ..., query_predicted_label: _Optional[str] = ..., grid_png: _Optional[bytes] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("gallery", "method", "perplexity", "iterations", "seed", "max_points", "render", "grid_size")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    GRID_SIZE_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    method: EmbedMethod
    perplexity: float
    iterations: int
    seed: int
    max_points: int
    render: bool
    grid_size: int
    def __init__(self, gallery: _Optional[str] = ..., method: _Optional[_Union[EmbedMethod, str]] = ..., perplexity: _Optional[float] = ..., iterations: _Optional[int] = ..., seed: _Optional[int] = ..., max_points: _Optional[int] = ..., render: _Optional[bool] = ..., grid_size: _Optional[int] = ...) -> None: ...

class EmbedResult(_message.Message):
    __slots__ = ("coordinates", "indices", "ids", "predicted", "labels", "explained_variance_ratio", "kl_divergence", "scatter_png", "grid_png", "method")
    COORDINATES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_VARIANCE_RATIO_FIELD_NUMBER: _ClassVar[int]
    KL_DIVERGENCE_FIELD_NUMBER: _ClassVar[int]
    SCATTER_PNG_FIELD_NUMBER: _ClassVar[int]
    GRID_PNG_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    coordinates: _tensor_pb2.Tensor
    indices: _containers.RepeatedScalarFieldContainer[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    predicted: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    explained_variance_ratio: _tensor_pb2.Tensor
    kl_divergence: float
    scatter_png: bytes
    grid_png: bytes
    method: str
    def __init__(self, coordinates: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., indices: _Optional[_Iterable[int]] = ..., ids: _Optional[_Iterable[str]] = ..., predicted: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., explained_variance_ratio: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., kl_divergence: _Optional[float] = ..., scatter_png: _Optional[bytes] = ..., grid_png: _Optional[bytes] = ..., method: _Optional[str] = ...) -> None: ...

class EmbedEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: EmbedResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[EmbedResult, _Mapping]] = ...) -> None: ...
