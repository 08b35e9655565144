"""The convscope client: a thin, typed wrapper over the gRPC API that speaks numpy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from convscope.errors import from_rpc_error
from convscope.images import to_image_message
from convscope.v1 import model_pb2, model_pb2_grpc

DEFAULT_TARGET = os.environ.get("CONVSCOPE_SERVER", "localhost:50051")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class ReceptiveField:
    size: tuple[int, int]      # (height, width) in input pixels
    jump: tuple[int, int]      # input pixels between neighbouring units
    start: tuple[float, float]  # centre of unit (0, 0) in input pixel coordinates


@dataclass(frozen=True)
class Layer:
    name: str
    op_type: str
    shape: tuple[int, ...]
    datatype: str
    spatial: bool
    receptive_field: ReceptiveField | None
    weight_shape: tuple[int, ...] | None
    layout: str
    node_name: str = ""


@dataclass(frozen=True)
class ModelSummary:
    name: str
    ready: bool
    error: str
    execution_provider: str
    num_classes: int


@dataclass(frozen=True)
class ModelDescription:
    name: str
    inputs: list[dict]
    outputs: list[dict]
    logits_output: str
    preprocessing: dict
    layers: list[Layer]
    num_classes: int
    fixed_batch: int
    guessed: list[str]
    execution_provider: str
    opset: int
    producer: str
    _by_name: dict = field(default_factory=dict, repr=False, compare=False)

    def layer(self, name: str) -> Layer:
        if not self._by_name:
            self._by_name.update({layer.name: layer for layer in self.layers})
        return self._by_name[name]


def _tls_credentials(tls) -> grpc.ChannelCredentials:
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, (bytes, bytearray)):
        return grpc.ssl_channel_credentials(root_certificates=bytes(tls))
    if isinstance(tls, (str, os.PathLike)):
        with open(tls, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    raise TypeError("tls must be True, a grpc.ChannelCredentials, PEM root-certificate bytes or a path to them")


class Client:
    """Connects to a convscope server.

    >>> with Client("localhost:50051") as c:
    ...     c.predict("efficientnet_lite0", "cat.png", top=3)

    ``token`` is sent as ``authorization: Bearer <token>``; ``tls`` is True (system roots), PEM bytes, a
    path to a PEM file, or grpc credentials. ``timeout`` is the default deadline of every call in seconds.
    Errors raise :class:`convscope.ConvscopeError` subclasses carrying the status code and message.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls=None,
                 timeout: float | None = 120.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if tls:
            self._channel = grpc.secure_channel(target, _tls_credentials(tls), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._models = model_pb2_grpc.ModelServiceStub(self._channel)

    # -- plumbing -------------------------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (raises grpc.FutureTimeoutError otherwise)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def _call(self, method, request, timeout=None):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    # -- models ---------------------------------------------------------------------------------------
    def models(self) -> list[ModelSummary]:
        response = self._call(self._models.ListModels, model_pb2.ListModelsRequest())
        return [ModelSummary(m.name, m.ready, m.error, m.execution_provider, m.num_classes)
                for m in response.models]

    def describe(self, model: str, layers: Sequence[str] = ()) -> ModelDescription:
        """Inputs, outputs, preprocessing and tensors (all, or only ``layers``) with receptive fields."""
        request = model_pb2.DescribeModelRequest(model=model, layers=list(layers))
        r = self._call(self._models.DescribeModel, request)

        def spec(t):
            return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape), "dim_names": list(t.dim_names)}

        layers = []
        for layer in r.layers:
            rf = None
            if layer.HasField("receptive_field"):
                f = layer.receptive_field
                rf = ReceptiveField((f.size_h, f.size_w), (f.jump_h, f.jump_w), (f.start_h, f.start_w))
            layers.append(Layer(layer.name, layer.op_type, tuple(layer.shape), layer.datatype, layer.spatial,
                                rf, tuple(layer.weight_shape) or None, layer.layout, layer.node_name))
        p = r.preprocessing
        preprocessing = {"height": p.height, "width": p.width, "layout": p.layout, "mean": list(p.mean),
                         "std": list(p.std), "scale": p.scale, "channel_order": p.channel_order,
                         "resize": p.resize, "crop_fraction": p.crop_fraction}
        return ModelDescription(r.name, [spec(t) for t in r.inputs], [spec(t) for t in r.outputs],
                                r.logits_output, preprocessing, layers, r.num_classes, r.fixed_batch,
                                list(r.guessed), r.execution_provider, r.opset, r.producer)

    def predict(self, model: str, images, top: int = 5, *, timeout: float | None = None):
        """Top-``top`` classes. ``images`` is one image (returns a list of ClassScore) or a list/tuple of
        images (returns one such list per image)."""
        single = not isinstance(images, (list, tuple))
        batch: Sequence = [images] if single else images
        request = model_pb2.PredictRequest(model=model, top_k=top,
                                           images=[to_image_message(image) for image in batch])
        response = self._call(self._models.Predict, request, timeout)
        results = [[ClassScore(s.index, s.label, s.probability, s.logit) for s in r.top]
                   for r in response.results]
        return results[0] if single else results
