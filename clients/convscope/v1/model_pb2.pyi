from convscope.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "ready", "error", "execution_provider", "num_classes", "no_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    NO_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    ready: bool
    error: str
    execution_provider: str
    num_classes: int
    no_classes: str
    def __init__(self, name: _Optional[str] = ..., ready: _Optional[bool] = ..., error: _Optional[str] = ..., execution_provider: _Optional[str] = ..., num_classes: _Optional[int] = ..., no_classes: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("model", "layers")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[str]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "datatype", "shape", "dim_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DIM_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dim_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dim_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ReceptiveField(_message.Message):
    __slots__ = ("size_h", "size_w", "jump_h", "jump_w", "start_h", "start_w")
    SIZE_H_FIELD_NUMBER: _ClassVar[int]
    SIZE_W_FIELD_NUMBER: _ClassVar[int]
    JUMP_H_FIELD_NUMBER: _ClassVar[int]
    JUMP_W_FIELD_NUMBER: _ClassVar[int]
    START_H_FIELD_NUMBER: _ClassVar[int]
    START_W_FIELD_NUMBER: _ClassVar[int]
    size_h: int
    size_w: int
    jump_h: int
    jump_w: int
    start_h: float
    start_w: float
    def __init__(self, size_h: _Optional[int] = ..., size_w: _Optional[int] = ..., jump_h: _Optional[int] = ..., jump_w: _Optional[int] = ..., start_h: _Optional[float] = ..., start_w: _Optional[float] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "op_type", "node_name", "datatype", "shape", "spatial", "receptive_field", "weight_shape", "layout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_TYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPATIAL_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    op_type: str
    node_name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    spatial: bool
    receptive_field: ReceptiveField
    weight_shape: _containers.RepeatedScalarFieldContainer[int]
    layout: str
    def __init__(self, name: _Optional[str] = ..., op_type: _Optional[str] = ..., node_name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., spatial: _Optional[bool] = ..., receptive_field: _Optional[_Union[ReceptiveField, _Mapping]] = ..., weight_shape: _Optional[_Iterable[int]] = ..., layout: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("height", "width", "layout", "mean", "std", "scale", "channel_order", "resize", "crop_fraction")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_ORDER_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FRACTION_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    layout: str
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    scale: float
    channel_order: str
    resize: str
    crop_fraction: float
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., layout: _Optional[str] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., scale: _Optional[float] = ..., channel_order: _Optional[str] = ..., resize: _Optional[str] = ..., crop_fraction: _Optional[float] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("name", "inputs", "outputs", "logits_output", "preprocessing", "layers", "num_classes", "has_labels", "fixed_batch", "guessed", "execution_provider", "opset", "producer", "precision", "run_batch", "gradient", "no_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    HAS_LABELS_FIELD_NUMBER: _ClassVar[int]
    FIXED_BATCH_FIELD_NUMBER: _ClassVar[int]
    GUESSED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RUN_BATCH_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    NO_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    logits_output: str
    preprocessing: Preprocessing
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    num_classes: int
    has_labels: bool
    fixed_batch: int
    guessed: _containers.RepeatedScalarFieldContainer[str]
    execution_provider: str
    opset: int
    producer: str
    precision: str
    run_batch: int
    gradient: GradientPath
    no_classes: str
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., logits_output: _Optional[str] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., num_classes: _Optional[int] = ..., has_labels: _Optional[bool] = ..., fixed_batch: _Optional[int] = ..., guessed: _Optional[_Iterable[str]] = ..., execution_provider: _Optional[str] = ..., opset: _Optional[int] = ..., producer: _Optional[str] = ..., precision: _Optional[str] = ..., run_batch: _Optional[int] = ..., gradient: _Optional[_Union[GradientPath, _Mapping]] = ..., no_classes: _Optional[str] = ...) -> None: ...

class GradientPath(_message.Message):
    __slots__ = ("state", "reason", "device", "probe_difference", "tolerance")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROBE_DIFFERENCE_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    state: str
    reason: str
    device: str
    probe_difference: float
    tolerance: float
    def __init__(self, state: _Optional[str] = ..., reason: _Optional[str] = ..., device: _Optional[str] = ..., probe_difference: _Optional[float] = ..., tolerance: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "images", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    top_k: int
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability", "logit")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    logit: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., logit: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("top",)
    TOP_FIELD_NUMBER: _ClassVar[int]
    top: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("results", "execution_provider")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    execution_provider: str
    def __init__(self, results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., execution_provider: _Optional[str] = ...) -> None: ...
