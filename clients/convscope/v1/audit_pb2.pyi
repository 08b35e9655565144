from convscope.v1 import dataset_pb2 as _dataset_pb2
from convscope.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuditBudget(_message.Message):
    __slots__ = ("unit_layers", "attribution_images", "curve_steps", "robustness_images", "epsilons", "methods", "feature_steps", "worst_images")
    UNIT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CURVE_STEPS_FIELD_NUMBER: _ClassVar[int]
    ROBUSTNESS_IMAGES_FIELD_NUMBER: _ClassVar[int]
    EPSILONS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_STEPS_FIELD_NUMBER: _ClassVar[int]
    WORST_IMAGES_FIELD_NUMBER: _ClassVar[int]
    unit_layers: int
    attribution_images: int
    curve_steps: int
    robustness_images: int
    epsilons: _containers.RepeatedScalarFieldContainer[float]
    methods: _containers.RepeatedScalarFieldContainer[str]
    feature_steps: int
    worst_images: int
    def __init__(self, unit_layers: _Optional[int] = ..., attribution_images: _Optional[int] = ..., curve_steps: _Optional[int] = ..., robustness_images: _Optional[int] = ..., epsilons: _Optional[_Iterable[float]] = ..., methods: _Optional[_Iterable[str]] = ..., feature_steps: _Optional[int] = ..., worst_images: _Optional[int] = ...) -> None: ...

class LabelClasses(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, classes: _Optional[_Iterable[int]] = ...) -> None: ...

class AuditSpec(_message.Message):
    __slots__ = ("name", "model", "source", "overwrite", "budget", "label_map")
    class LabelMapEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: LabelClasses
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[LabelClasses, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_MAP_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    source: _dataset_pb2.ImageSource
    overwrite: bool
    budget: AuditBudget
    label_map: _containers.MessageMap[str, LabelClasses]
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., source: _Optional[_Union[_dataset_pb2.ImageSource, _Mapping]] = ..., overwrite: _Optional[bool] = ..., budget: _Optional[_Union[AuditBudget, _Mapping]] = ..., label_map: _Optional[_Mapping[str, LabelClasses]] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("spec", "item")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    spec: AuditSpec
    item: _dataset_pb2.DatasetItem
    def __init__(self, spec: _Optional[_Union[AuditSpec, _Mapping]] = ..., item: _Optional[_Union[_dataset_pb2.DatasetItem, _Mapping]] = ...) -> None: ...

class AuditInfo(_message.Message):
    __slots__ = ("name", "model", "images", "labelled", "accuracy", "created", "file_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    images: int
    labelled: int
    accuracy: float
    created: str
    file_bytes: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., images: _Optional[int] = ..., labelled: _Optional[int] = ..., accuracy: _Optional[float] = ..., created: _Optional[str] = ..., file_bytes: _Optional[int] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: _tensor_pb2.Progress
    result: AuditInfo
    def __init__(self, progress: _Optional[_Union[_tensor_pb2.Progress, _Mapping]] = ..., result: _Optional[_Union[AuditInfo, _Mapping]] = ...) -> None: ...

class ListAuditsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAuditsResponse(_message.Message):
    __slots__ = ("audits",)
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    audits: _containers.RepeatedCompositeFieldContainer[AuditInfo]
    def __init__(self, audits: _Optional[_Iterable[_Union[AuditInfo, _Mapping]]] = ...) -> None: ...

class GetAuditRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class AuditReport(_message.Message):
    __slots__ = ("info", "json")
    INFO_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    info: AuditInfo
    json: str
    def __init__(self, info: _Optional[_Union[AuditInfo, _Mapping]] = ..., json: _Optional[str] = ...) -> None: ...

class DeleteAuditRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteAuditResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
