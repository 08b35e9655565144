from convscope.v1 import model_pb2 as _model_pb2
from convscope.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdversarialMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVERSARIAL_FGSM: _ClassVar[AdversarialMethod]
    ADVERSARIAL_TARGETED: _ClassVar[AdversarialMethod]
ADVERSARIAL_FGSM: AdversarialMethod
ADVERSARIAL_TARGETED: AdversarialMethod

class Optimization(_message.Message):
    __slots__ = ("steps", "learning_rate", "seed", "preview_every", "frames")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    steps: int
    learning_rate: float
    seed: int
    preview_every: int
    frames: bool
    def __init__(self, steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ..., preview_every: _Optional[int] = ..., frames: _Optional[bool] = ...) -> None: ...

class VisualizeRequest(_message.Message):
    __slots__ = ("model", "target", "layer", "channel", "row", "col", "zero_start", "optimization", "l2", "decay", "blur_every", "blur_sigma", "jitter", "clip_norm_percentile", "clip_contribution_percentile")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    ZERO_START_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    L2_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    BLUR_EVERY_FIELD_NUMBER: _ClassVar[int]
    BLUR_SIGMA_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    CLIP_CONTRIBUTION_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    model: str
    target: int
    layer: str
    channel: int
    row: int
    col: int
    zero_start: bool
    optimization: Optimization
    l2: float
    decay: float
    blur_every: int
    blur_sigma: float
    jitter: int
    clip_norm_percentile: float
    clip_contribution_percentile: float
    def __init__(self, model: _Optional[str] = ..., target: _Optional[int] = ..., layer: _Optional[str] = ..., channel: _Optional[int] = ..., row: _Optional[int] = ..., col: _Optional[int] = ..., zero_start: _Optional[bool] = ..., optimization: _Optional[_Union[Optimization, _Mapping]] = ..., l2: _Optional[float] = ..., decay: _Optional[float] = ..., blur_every: _Optional[int] = ..., blur_sigma: _Optional[float] = ..., jitter: _Optional[int] = ..., clip_norm_percentile: _Optional[float] = ..., clip_contribution_percentile: _Optional[float] = ...) -> None: ...

class InvertRequest(_message.Message):
    __slots__ = ("model", "image", "layers", "tv_weight", "optimization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    layers: _containers.RepeatedScalarFieldContainer[str]
    tv_weight: float
    optimization: Optimization
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., tv_weight: _Optional[float] = ..., optimization: _Optional[_Union[Optimization, _Mapping]] = ...) -> None: ...

class DeepDreamRequest(_message.Message):
    __slots__ = ("model", "image", "layer", "octaves", "octave_scale", "jitter", "optimization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OCTAVES_FIELD_NUMBER: _ClassVar[int]
    OCTAVE_SCALE_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    layer: str
    octaves: int
    octave_scale: float
    jitter: int
    optimization: Optimization
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., layer: _Optional[str] = ..., octaves: _Optional[int] = ..., octave_scale: _Optional[float] = ..., jitter: _Optional[int] = ..., optimization: _Optional[_Union[Optimization, _Mapping]] = ...) -> None: ...

class StyleRequest(_message.Message):
    __slots__ = ("model", "style", "content", "style_layers", "content_layer", "style_weight", "content_weight", "tv_weight", "optimizer", "height", "width", "optimization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STYLE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_LAYER_FIELD_NUMBER: _ClassVar[int]
    STYLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    style: _tensor_pb2.Image
    content: _tensor_pb2.Image
    style_layers: _containers.RepeatedScalarFieldContainer[str]
    content_layer: str
    style_weight: float
    content_weight: float
    tv_weight: float
    optimizer: str
    height: int
    width: int
    optimization: Optimization
    def __init__(self, model: _Optional[str] = ..., style: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., content: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., style_layers: _Optional[_Iterable[str]] = ..., content_layer: _Optional[str] = ..., style_weight: _Optional[float] = ..., content_weight: _Optional[float] = ..., tv_weight: _Optional[float] = ..., optimizer: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., optimization: _Optional[_Union[Optimization, _Mapping]] = ...) -> None: ...

class AdversarialRequest(_message.Message):
    __slots__ = ("model", "image", "method", "label", "target", "epsilon", "step_size", "stop_probability", "optimization")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    STOP_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: _tensor_pb2.Image
    method: AdversarialMethod
    label: int
    target: int
    epsilon: float
    step_size: float
    stop_probability: float
    optimization: Optimization
    def __init__(self, model: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Image, _Mapping]] = ..., method: _Optional[_Union[AdversarialMethod, str]] = ..., label: _Optional[int] = ..., target: _Optional[int] = ..., epsilon: _Optional[float] = ..., step_size: _Optional[float] = ..., stop_probability: _Optional[float] = ..., optimization: _Optional[_Union[Optimization, _Mapping]] = ...) -> None: ...

class SynthesisImage(_message.Message):
    __slots__ = ("layer", "image", "png", "losses", "frames")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    layer: str
    image: _tensor_pb2.Tensor
    png: bytes
    losses: _containers.RepeatedScalarFieldContainer[float]
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, layer: _Optional[str] = ..., image: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., png: _Optional[bytes] = ..., losses: _Optional[_Iterable[float]] = ..., frames: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SynthesisResult(_message.Message):
    __slots__ = ("images", "before", "after", "perturbation", "perturbation_png", "linf_pixels", "steps_taken")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_PNG_FIELD_NUMBER: _ClassVar[int]
    LINF_PIXELS_FIELD_NUMBER: _ClassVar[int]
    STEPS_TAKEN_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[SynthesisImage]
    before: _containers.RepeatedCompositeFieldContainer[_model_pb2.ClassScore]
    after: _containers.RepeatedCompositeFieldContainer[_model_pb2.ClassScore]
    perturbation: _tensor_pb2.Tensor
    perturbation_png: bytes
    linf_pixels: float
    steps_taken: int
    def __init__(self, images: _Optional[_Iterable[_Union[SynthesisImage, _Mapping]]] = ..., before: _Optional[_Iterable[_Union[_model_pb2.ClassScore, _Mapping]]] = ..., after: _Optional[_Iterable[_Union[_model_pb2.ClassScore, _Mapping]]] = ..., perturbation: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., perturbation_png: _Optional[bytes] = ..., linf_pixels: _Optional[float] = ..., steps_taken: _Optional[int] = ...) -> None: ...

class SynthesisEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: SynthesisResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[SynthesisResult, _Mapping]] = ...) -> None: ...

class RobustnessRequest(_message.Message):
    __slots__ = ("model", "images", "labels", "epsilons", "batch_size", "render")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EPSILONS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Image]
    labels: _containers.RepeatedScalarFieldContainer[int]
    epsilons: _containers.RepeatedScalarFieldContainer[float]
    batch_size: int
    render: bool
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_tensor_pb2.Image, _Mapping]]] = ..., labels: _Optional[_Iterable[int]] = ..., epsilons: _Optional[_Iterable[float]] = ..., batch_size: _Optional[int] = ..., render: _Optional[bool] = ...) -> None: ...

class RobustnessResult(_message.Message):
    __slots__ = ("epsilons", "accuracy", "png")
    EPSILONS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    epsilons: _containers.RepeatedScalarFieldContainer[float]
    accuracy: _containers.RepeatedScalarFieldContainer[float]
    png: bytes
    def __init__(self, epsilons: _Optional[_Iterable[float]] = ..., accuracy: _Optional[_Iterable[float]] = ..., png: _Optional[bytes] = ...) -> None: ...

class RobustnessEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: RobustnessResult
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[RobustnessResult, _Mapping]] = ...) -> None: ...
