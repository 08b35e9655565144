from convscope.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Baseline(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BASELINE_CONSTANT: _ClassVar[Baseline]
    BASELINE_CHANNEL_MEAN: _ClassVar[Baseline]
    BASELINE_BLUR: _ClassVar[Baseline]

class Score(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_PROBABILITY: _ClassVar[Score]
    SCORE_LOGIT: _ClassVar[Score]
BASELINE_CONSTANT: Baseline
BASELINE_CHANNEL_MEAN: Baseline
BASELINE_BLUR: Baseline
SCORE_PROBABILITY: Score
SCORE_LOGIT: Score

class FiltersRequest(_message.Message):
    __slots__ = ("model", "layer", "render", "max_filters", "max_channels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    MAX_FILTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layer: str
    render: bool
    max_filters: int
    max_channels: int
    def __init__(self, model: _Optional[str] = ..., layer: _Optional[str] = ..., render: _Optional[bool] = ..., max_filters: _Optional[int] = ..., max_channels: _Optional[int] = ...) -> None: ...

class FiltersResponse(_message.Message):
    __slots__ = ("layer", "conv_node", "weights", "group", "rgb", "depthwise", "png")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CONV_NODE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    RGB_FIELD_NUMBER: _ClassVar[int]
    DEPTHWISE_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    layer: str
    conv_node: str
    weights: _tensor_pb2.Tensor
    group: int
    rgb: bool
    depthwise: bool
    png: bytes
    def __init__(self, layer: _Optional[str] = ..., conv_node: _Optional[str] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., group: _Optional[int] = ..., rgb: _Optional[bool] = ..., depthwise: _Optional[bool] = ..., png: _Optional[bytes] = ...) -> None: ...

class ActivationsRequest(_message.Message):
    __slots__ = ("model", "images", "layers", "render", "max_channels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    layers: _containers.RepeatedScalarFieldContainer[str]
    render: bool
    max_channels: int
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., layers: _Optional[_Iterable[str]] = ..., render: _Optional[bool] = ..., max_channels: _Optional[int] = ...) -> None: ...

class ChannelStats(_message.Message):
    __slots__ = ("mean", "min", "max", "zero_fraction")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    ZERO_FRACTION_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    min: _containers.RepeatedScalarFieldContainer[float]
    max: _containers.RepeatedScalarFieldContainer[float]
    zero_fraction: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., min: _Optional[_Iterable[float]] = ..., max: _Optional[_Iterable[float]] = ..., zero_fraction: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerActivations(_message.Message):
    __slots__ = ("layer", "values", "layout", "stats", "png")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    layer: str
    values: _tensor_pb2.Tensor
    layout: str
    stats: ChannelStats
    png: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, layer: _Optional[str] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., layout: _Optional[str] = ..., stats: _Optional[_Union[ChannelStats, _Mapping]] = ..., png: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ActivationsResponse(_message.Message):
    __slots__ = ("layers", "execution_provider")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerActivations]
    execution_provider: str
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerActivations, _Mapping]]] = ..., execution_provider: _Optional[str] = ...) -> None: ...

class DeadFiltersRequest(_message.Message):
    __slots__ = ("model", "images", "layers", "tolerance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    layers: _containers.RepeatedScalarFieldContainer[str]
    tolerance: float
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., layers: _Optional[_Iterable[str]] = ..., tolerance: _Optional[float] = ...) -> None: ...

class LayerDeadFilters(_message.Message):
    __slots__ = ("layer", "channels", "dead", "constant")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    layer: str
    channels: int
    dead: _containers.RepeatedScalarFieldContainer[int]
    constant: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[str] = ..., channels: _Optional[int] = ..., dead: _Optional[_Iterable[int]] = ..., constant: _Optional[_Iterable[int]] = ...) -> None: ...

class DeadFiltersResponse(_message.Message):
    __slots__ = ("layers", "images")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerDeadFilters]
    images: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerDeadFilters, _Mapping]]] = ..., images: _Optional[int] = ...) -> None: ...

class OcclusionRequest(_message.Message):
    __slots__ = ("model", "image", "target", "window_h", "window_w", "stride_h", "stride_w", "baseline", "constant", "blur_sigma", "score", "render")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_H_FIELD_NUMBER: _ClassVar[int]
    WINDOW_W_FIELD_NUMBER: _ClassVar[int]
    STRIDE_H_FIELD_NUMBER: _ClassVar[int]
    STRIDE_W_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    BLUR_SIGMA_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    target: int
    window_h: int
    window_w: int
    stride_h: int
    stride_w: int
    baseline: Baseline
    constant: float
    blur_sigma: float
    score: Score
    render: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., target: _Optional[int] = ..., window_h: _Optional[int] = ..., window_w: _Optional[int] = ..., stride_h: _Optional[int] = ..., stride_w: _Optional[int] = ..., baseline: _Optional[_Union[Baseline, str]] = ..., constant: _Optional[float] = ..., blur_sigma: _Optional[float] = ..., score: _Optional[_Union[Score, str]] = ..., render: _Optional[bool] = ...) -> None: ...

class OcclusionResult(_message.Message):
    __slots__ = ("target", "label", "base_probability", "base_logit", "probability", "logit", "rows", "cols", "attribution", "forward_passes", "heatmap_png", "overlay_png")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BASE_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    BASE_LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    target: int
    label: str
    base_probability: float
    base_logit: float
    probability: _tensor_pb2.Tensor
    logit: _tensor_pb2.Tensor
    rows: _containers.RepeatedScalarFieldContainer[int]
    cols: _containers.RepeatedScalarFieldContainer[int]
    attribution: _tensor_pb2.Tensor
    forward_passes: int
    heatmap_png: bytes
    overlay_png: bytes
    def __init__(self, target: _Optional[int] = ..., label: _Optional[str] = ..., base_probability: _Optional[float] = ..., base_logit: _Optional[float] = ..., probability: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logit: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., rows: _Optional[_Iterable[int]] = ..., cols: _Optional[_Iterable[int]] = ..., attribution: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., forward_passes: _Optional[int] = ..., heatmap_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ...) -> None: ...

class OcclusionEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: OcclusionResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[OcclusionResult, _Mapping]] = ...) -> None: ...

class ScoreCamRequest(_message.Message):
    __slots__ = ("model", "image", "target", "layer", "batch_size", "render")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    target: int
    layer: str
    batch_size: int
    render: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., target: _Optional[int] = ..., layer: _Optional[str] = ..., batch_size: _Optional[int] = ..., render: _Optional[bool] = ...) -> None: ...

class ScoreCamResult(_message.Message):
    __slots__ = ("target", "label", "layer", "cam", "channel_weights", "forward_passes", "heatmap_png", "overlay_png")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CAM_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    target: int
    label: str
    layer: str
    cam: _tensor_pb2.Tensor
    channel_weights: _tensor_pb2.Tensor
    forward_passes: int
    heatmap_png: bytes
    overlay_png: bytes
    def __init__(self, target: _Optional[int] = ..., label: _Optional[str] = ..., layer: _Optional[str] = ..., cam: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., channel_weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., forward_passes: _Optional[int] = ..., heatmap_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ...) -> None: ...

class ScoreCamEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: ScoreCamResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[ScoreCamResult, _Mapping]] = ...) -> None: ...
