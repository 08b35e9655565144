from convscope.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SaliencyMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SALIENCY_VANILLA: _ClassVar[SaliencyMethod]
    SALIENCY_SMOOTHGRAD: _ClassVar[SaliencyMethod]
    SALIENCY_INTEGRATED_GRADIENTS: _ClassVar[SaliencyMethod]

class BackpropRule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BACKPROP_GUIDED: _ClassVar[BackpropRule]
    BACKPROP_DECONVNET: _ClassVar[BackpropRule]

class CamMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAM_GRADCAM: _ClassVar[CamMethod]
    CAM_GRADCAM_PLUS_PLUS: _ClassVar[CamMethod]
    CAM_CLASS_ACTIVATION: _ClassVar[CamMethod]
    CAM_GUIDED_GRADCAM: _ClassVar[CamMethod]
SALIENCY_VANILLA: SaliencyMethod
SALIENCY_SMOOTHGRAD: SaliencyMethod
SALIENCY_INTEGRATED_GRADIENTS: SaliencyMethod
BACKPROP_GUIDED: BackpropRule
BACKPROP_DECONVNET: BackpropRule
CAM_GRADCAM: CamMethod
CAM_GRADCAM_PLUS_PLUS: CamMethod
CAM_CLASS_ACTIVATION: CamMethod
CAM_GUIDED_GRADCAM: CamMethod

class SaliencyRequest(_message.Message):
    __slots__ = ("model", "image", "target", "method", "samples", "noise", "seed", "steps", "baseline", "batch_size", "render", "segment")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    target: int
    method: SaliencyMethod
    samples: int
    noise: float
    seed: int
    steps: int
    baseline: float
    batch_size: int
    render: bool
    segment: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., target: _Optional[int] = ..., method: _Optional[_Union[SaliencyMethod, str]] = ..., samples: _Optional[int] = ..., noise: _Optional[float] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., baseline: _Optional[float] = ..., batch_size: _Optional[int] = ..., render: _Optional[bool] = ..., segment: _Optional[bool] = ...) -> None: ...

class GuidedBackpropRequest(_message.Message):
    __slots__ = ("model", "image", "target", "layer", "channel", "rule", "render", "row", "col")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    target: int
    layer: str
    channel: int
    rule: BackpropRule
    render: bool
    row: int
    col: int
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., target: _Optional[int] = ..., layer: _Optional[str] = ..., channel: _Optional[int] = ..., rule: _Optional[_Union[BackpropRule, str]] = ..., render: _Optional[bool] = ..., row: _Optional[int] = ..., col: _Optional[int] = ...) -> None: ...

class GradCamRequest(_message.Message):
    __slots__ = ("model", "image", "target", "layer", "method", "render")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    target: int
    layer: str
    method: CamMethod
    render: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., target: _Optional[int] = ..., layer: _Optional[str] = ..., method: _Optional[_Union[CamMethod, str]] = ..., render: _Optional[bool] = ...) -> None: ...

class AttributionResult(_message.Message):
    __slots__ = ("target", "label", "attribution", "map", "backward_passes", "heatmap_png", "overlay_png", "mask", "mask_png", "layer", "note")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    target: int
    label: str
    attribution: _tensor_pb2.Tensor
    map: _tensor_pb2.Tensor
    backward_passes: int
    heatmap_png: bytes
    overlay_png: bytes
    mask: _tensor_pb2.Tensor
    mask_png: bytes
    layer: str
    note: str
    def __init__(self, target: _Optional[int] = ..., label: _Optional[str] = ..., attribution: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., map: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., backward_passes: _Optional[int] = ..., heatmap_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ..., mask: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mask_png: _Optional[bytes] = ..., layer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class AttributionEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: AttributionResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[AttributionResult, _Mapping]] = ...) -> None: ...

class SanityCheckRequest(_message.Message):
    __slots__ = ("model", "image", "target", "methods", "cam_layer", "layers", "seed", "steps", "return_maps", "render")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    CAM_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RETURN_MAPS_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    target: int
    methods: _containers.RepeatedScalarFieldContainer[str]
    cam_layer: str
    layers: int
    seed: int
    steps: int
    return_maps: bool
    render: bool
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., target: _Optional[int] = ..., methods: _Optional[_Iterable[str]] = ..., cam_layer: _Optional[str] = ..., layers: _Optional[int] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., return_maps: _Optional[bool] = ..., render: _Optional[bool] = ...) -> None: ...

class MethodCorrelations(_message.Message):
    __slots__ = ("method", "spearman", "original_map", "randomized_maps")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SPEARMAN_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_MAP_FIELD_NUMBER: _ClassVar[int]
    RANDOMIZED_MAPS_FIELD_NUMBER: _ClassVar[int]
    method: str
    spearman: _containers.RepeatedScalarFieldContainer[float]
    original_map: _tensor_pb2.Tensor
    randomized_maps: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    def __init__(self, method: _Optional[str] = ..., spearman: _Optional[_Iterable[float]] = ..., original_map: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., randomized_maps: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ...) -> None: ...

class SanityCheckResult(_message.Message):
    __slots__ = ("target", "label", "layers", "methods", "png")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    target: int
    label: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedCompositeFieldContainer[MethodCorrelations]
    png: bytes
    def __init__(self, target: _Optional[int] = ..., label: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[MethodCorrelations, _Mapping]]] = ..., png: _Optional[bytes] = ...) -> None: ...

class SanityCheckEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: SanityCheckResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[SanityCheckResult, _Mapping]] = ...) -> None: ...
