"""The convscope client: a thin, typed wrapper over the gRPC API that speaks numpy."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import grpc
import numpy as np

from convscope.audit_client import AuditMethods
from convscope.dataset_client import DatasetMethods
from convscope.errors import from_rpc_error
from convscope.images import to_image_message
from convscope.tensors import from_tensor as _from_tensor
from convscope.v1 import (attribution_pb2, attribution_pb2_grpc, audit_pb2_grpc, dataset_pb2_grpc, inspect_pb2, inspect_pb2_grpc,
                          model_pb2, model_pb2_grpc, synthesis_pb2, synthesis_pb2_grpc)

DEFAULT_TARGET = os.environ.get("CONVSCOPE_SERVER", "localhost:50051")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def from_tensor(tensor) -> np.ndarray:
    return _from_tensor(tensor).copy()  # writable, owned by the caller


@dataclass(frozen=True)
class ClassScore:
    """One class of a prediction (``Client.predict``); pass it as ``target=`` to explain that class.

    Attributes:
        index: the class index (the logits' position).
        label: the class name from the model's label file, or "class <index>".
        probability: softmax of the logits.
        logit: the raw score before the softmax.
    """
    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class ReceptiveField:
    """The input pixels a unit of a layer sees.

    Attributes:
        size: (height, width) of the window in input pixels.
        jump: input pixels between neighbouring units.
        start: centre of unit (0, 0) in input pixel coordinates.
    """
    size: tuple[int, int]
    jump: tuple[int, int]
    start: tuple[float, float]


@dataclass(frozen=True)
class Layer:
    """One tensor of the graph, as DescribeModel lists it.

    Attributes:
        name: the ONNX tensor name; every call takes it as ``layer``.
        op_type: the op that produces it ("Input" for the graph input).
        shape: its shape, -1 for dynamic or unknown dimensions.
        datatype: "FP32", "INT64", ...
        spatial: True when its height and width axes are known.
        receptive_field: where its units look in the input, when local; else None.
        weight_shape: the weights of the producing Conv / Gemm, else None.
        layout: "NCHW" or "NHWC" for a 4-D tensor with known image axes, else "".
        node_name: the name of the producing node (requests accept it too).
    """
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
    """A model of the server's repository (``Client.models``).

    Attributes:
        name: the model's folder name; every call takes it as ``model``.
        ready: False when the model failed to load.
        error: why it failed to load.
        execution_provider: onnxruntime's provider in use, e.g. "CPUExecutionProvider".
        num_classes: the logits' length (0 when the output holds no class scores).
        no_classes: why the model's output holds no class scores (a segmentation map, a feature output):
            class-based methods refuse it, layer methods serve it. Empty for a classifier.
    """
    name: str
    ready: bool
    error: str
    execution_provider: str
    num_classes: int
    no_classes: str = ""


_FLOATS = ("FP16", "FP32", "FP64")


@dataclass(frozen=True)
class ModelDescription:
    """What the server knows of a model (``Client.describe``).

    Attributes:
        name: the model's name.
        inputs: graph inputs: dicts of name, datatype, shape, dim_names.
        outputs: graph outputs, the same way.
        logits_output: the output holding class scores.
        preprocessing: how images become model inputs: height, width, layout, mean, std, scale,
            channel_order, resize ("stretch" or "center_crop"), crop_fraction (see ``convscope.geometry``).
        layers: every tensor in graph order (or those asked for).
        num_classes: the logits' length.
        fixed_batch: 0 when the batch axis is dynamic, else the batch the graph is fixed to.
        guessed: configuration fields inferred from the graph rather than config.toml.
        execution_provider: onnxruntime's provider in use.
        opset: the ONNX opset.
        producer: the exporter recorded in the file.
        precision: how both backends compute float32: "exact" (TF32 off) or "tf32".
        run_batch: samples per onnxruntime run on the server's device.
        gradient: the torch module of gradient methods: state ("ready", "converting", "not converted",
            "unavailable"), reason, device, probe_difference, tolerance.
        no_classes: why the logits output holds no class scores; empty for a classifier.
    """
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
    precision: str = "exact"
    run_batch: int = 0
    gradient: dict = field(default_factory=dict)
    no_classes: str = ""
    _by_name: dict = field(default_factory=dict, repr=False, compare=False)

    def layer(self, name: str) -> Layer:
        if not self._by_name:
            self._by_name.update({layer.name: layer for layer in self.layers})
        return self._by_name[name]

    def _before_logits(self) -> list[Layer]:
        names = [layer.name for layer in self.layers]
        return self.layers[: names.index(self.logits_output)] if self.logits_output in names else self.layers

    def last_spatial_layer(self) -> str | None:
        """The default layer of ``Client.cam``, by the server's rule: the last tensor before the logits that is
        4-D float with a known layout and a height or width other than 1 (the last conv block's
        activation, before global pooling). Needs the full description (``describe`` without ``layers``)."""
        found = None
        for layer in self._before_logits():
            axes = {"NCHW": (2, 3), "NHWC": (1, 2)}.get(layer.layout)
            if (layer.op_type != "Input" and axes and layer.datatype in _FLOATS
                    and any(layer.shape[axis] != 1 for axis in axes)):
                found = layer.name
        return found

    def penultimate_layer(self) -> str | None:
        """The tensor the logits are computed from (what galleries store by default): the input of the node
        writing the logits, read from graph order (Identity and Constant outputs skipped)."""
        names = [layer.name for layer in self.layers]
        if self.logits_output not in names:
            return None
        end = names.index(self.logits_output)
        while end > 0 and self.layers[end].op_type == "Identity":
            end -= 1
        before = [layer for layer in self.layers[:end]
                  if layer.op_type not in ("Identity", "Constant") and layer.datatype in _FLOATS]
        return before[-1].name if before else None


@dataclass(frozen=True)
class Filters:
    """The weights of a Conv layer (``Client.filters``).

    Attributes:
        layer: the Conv's output tensor.
        conv_node: the Conv node's name.
        weights: (out, in / group, kh, kw).
        group: the Conv's group count.
        rgb: True for a first layer drawn in colour.
        depthwise: True when group equals the input channels.
        png: the tile grid, when rendered.
    """
    layer: str
    conv_node: str
    weights: np.ndarray
    group: int
    rgb: bool
    depthwise: bool
    png: bytes


@dataclass(frozen=True)
class Activation:
    """A layer's values (``Client.activations``).

    Attributes:
        values: (N, ...) in the tensor's own layout, one row per image.
        layout: "NCHW", "NHWC" or "".
        stats: per channel: "mean", "min", "max", "zero_fraction" (numpy arrays).
        png: one channel grid per image, when rendered.
    """
    values: np.ndarray
    layout: str
    stats: dict
    png: list[bytes]


@dataclass(frozen=True)
class DeadFilters:
    """Channels that never respond (``Client.dead_filters``).

    Attributes:
        channels: how many channels the layer has.
        dead: channels zero for every image.
        constant: channels constant (but not zero) for every image.
    """
    channels: int
    dead: list[int]
    constant: list[int]


@dataclass(frozen=True)
class OcclusionResult:
    """Occlusion sensitivity (``Client.occlusion``); maps in model-input space (``convscope.geometry``
    brings them to the photo's geometry).

    Attributes:
        target: the class explained.
        label: its name.
        base_probability: its probability on the unoccluded image.
        base_logit: its logit on the unoccluded image.
        probability: (rows, cols): the class probability with the window at each position.
        logit: (rows, cols): the same for the logit.
        rows: the window's top edge of each row, in model-input pixels.
        cols: the window's left edge of each column.
        attribution: (H, W), Captum-Occlusion style: the mean score drop of the windows covering each pixel.
        forward_passes: how many images were run.
        heatmap_png: the attribution coloured (inferno), when rendered.
        overlay_png: the heatmap over the image, when rendered.
    """
    target: int
    label: str
    base_probability: float
    base_logit: float
    probability: np.ndarray
    logit: np.ndarray
    rows: list[int]
    cols: list[int]
    attribution: np.ndarray
    forward_passes: int
    heatmap_png: bytes
    overlay_png: bytes


@dataclass(frozen=True)
class ScoreCamResult:
    """Score-CAM (``Client.score_cam``).

    Attributes:
        target: the class explained.
        label: its name.
        layer: the layer whose channels were weighted.
        cam: (H, W) in [0, 1], model-input space.
        channel_weights: each channel's weight (the softmax score of the image masked by it).
        forward_passes: how many images were run.
        heatmap_png: the map coloured, when rendered.
        overlay_png: the map over the image, when rendered.
    """
    target: int
    label: str
    layer: str
    cam: np.ndarray
    channel_weights: np.ndarray
    forward_passes: int
    heatmap_png: bytes
    overlay_png: bytes


@dataclass(frozen=True)
class Attribution:
    """A gradient attribution: saliency, guided backprop, DeconvNet or a CAM.

    Attributes:
        target: the class explained.
        label: its name.
        attribution: input-shaped (saliency, guided backprop, DeconvNet, Guided Grad-CAM), or the layer's
            channel weights (Grad-CAM, Grad-CAM++, CAM).
        map: (H, W) in model-input space: max |attribution| over channels, or the CAM in [0, 1]
            (``convscope.geometry.to_image`` brings it to the photo's geometry).
        backward_passes: how many backward passes it took.
        heatmap_png: the map coloured, when rendered.
        overlay_png: the map over the image, when rendered.
        mask: GrabCut foreground (H, W), with ``saliency(..., segment=True)``.
        mask_png: the image with the background darkened, with segment and render.
        layer: CAMs: the layer the map was computed on (the default when none was named).
        note: what to know about how it came about (e.g. guided backprop on a model with no ReLU: the
            plain gradient); empty when nothing.
    """
    target: int
    label: str
    attribution: np.ndarray
    map: np.ndarray
    backward_passes: int
    heatmap_png: bytes
    overlay_png: bytes
    mask: np.ndarray | None = None
    mask_png: bytes = b""
    layer: str = ""
    note: str = ""


@dataclass(frozen=True)
class SanityReport:
    """Cascading randomisation (``Client.sanity_check``).

    Attributes:
        target: the class explained.
        label: its name.
        layers: weighted layers re-initialised cumulatively, top first.
        spearman: method -> one rank correlation with the trained model's map per randomised layer.
        original_maps: method -> the trained model's map, with return_maps.
        randomized_maps: method -> one map per randomised layer, with return_maps.
        png: a grid (one row per method), when rendered.
    """
    target: int
    label: str
    layers: list[str]
    spearman: dict[str, list[float]]
    original_maps: dict[str, np.ndarray]
    randomized_maps: dict[str, list[np.ndarray]]
    png: bytes


@dataclass(frozen=True)
class Synthesized:
    """An image made by gradient steps on the input (class visualisation, inversion, DeepDream, style).

    Attributes:
        image: a model-input sample (model layout): feed it back to any call unchanged.
        png: the image as pixels.
        losses: the objective at each step.
        frames: PNG previews during the optimisation, with frames=True (for an animation).
        layer: inversion: the layer inverted.
    """
    image: np.ndarray
    png: bytes
    losses: list[float]
    frames: list[bytes]
    layer: str = ""


@dataclass(frozen=True)
class AdversarialExample:
    """An adversarial image (``Client.adversarial``).

    Attributes:
        image: the adversarial model-input sample.
        png: it as pixels.
        before: the served model's top 5 on the original.
        after: the served model's top 5 on the adversarial image.
        perturbation: adversarial - original, model-input space.
        perturbation_png: the perturbation amplified to the full range, grey = 0.
        linf_pixels: the largest pixel change, in [0, 1] pixel units.
        steps_taken: gradient steps made.
        history: targeted: p(target) per step.
        frames: PNG previews, with frames=True.
    """
    image: np.ndarray
    png: bytes
    before: list[ClassScore]
    after: list[ClassScore]
    perturbation: np.ndarray
    perturbation_png: bytes
    linf_pixels: float
    steps_taken: int
    history: list[float]
    frames: list[bytes]


@dataclass(frozen=True)
class Robustness:
    """Accuracy under FGSM (``Client.robustness``).

    Attributes:
        epsilons: the perturbation sizes, [0, 1] pixel units.
        accuracy: top-1 accuracy at each epsilon.
        png: the curve, when rendered.
    """
    epsilons: list[float]
    accuracy: list[float]
    png: bytes


Target = Union[int, str, ClassScore]  # a class: its index, its label, or a ClassScore from predict


_BASELINES = {"constant": 0, "mean": 1, "blur": 2}
_SALIENCY = {"vanilla": attribution_pb2.SALIENCY_VANILLA, "smoothgrad": attribution_pb2.SALIENCY_SMOOTHGRAD,
             "integrated_gradients": attribution_pb2.SALIENCY_INTEGRATED_GRADIENTS}
_CAMS = {"gradcam": attribution_pb2.CAM_GRADCAM, "gradcam++": attribution_pb2.CAM_GRADCAM_PLUS_PLUS,
         "cam": attribution_pb2.CAM_CLASS_ACTIVATION, "guided_gradcam": attribution_pb2.CAM_GUIDED_GRADCAM}


def _attribution(r) -> Attribution:
    return Attribution(r.target, r.label, from_tensor(r.attribution), from_tensor(r.map), r.backward_passes,
                       r.heatmap_png, r.overlay_png, from_tensor(r.mask).astype(bool) if r.HasField("mask") else None,
                       r.mask_png, r.layer, r.note)


def _many(value) -> bool:
    """A list or tuple: several images or targets, one result each (an array is one image)."""
    return isinstance(value, (list, tuple))


def _names(value) -> list[str]:
    """Layer or method names: one string, or a sequence of them."""
    return [value] if isinstance(value, str) else list(value)


def _pem(value, name: str) -> bytes:
    """PEM bytes, or the contents of the file a str/PathLike names."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            return f.read()
    raise TypeError(f"{name} must be PEM bytes or a path to a PEM file, not {type(value).__name__}")


def _tls_credentials(tls, cert=None, key=None) -> grpc.ChannelCredentials:
    """Channel credentials: ``tls`` is True (system roots), PEM root-certificate bytes, a path to them, or
    ready credentials; ``cert`` and ``key`` (PEM bytes or paths) are the client's certificate chain and
    private key for servers that require client certificates (mutual TLS)."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together: a client certificate needs its private key")
    if isinstance(tls, grpc.ChannelCredentials):
        if cert is not None:
            raise ValueError("tls_cert/tls_key cannot be added to ready grpc credentials; build them in")
        return tls
    if tls is not True and not isinstance(tls, (bytes, bytearray, str, os.PathLike)):
        raise TypeError("tls must be True, a grpc.ChannelCredentials, PEM root-certificate bytes or a path to them")
    roots = None if tls is True else _pem(tls, "tls")
    chain = None if cert is None else _pem(cert, "tls_cert")
    private = None if key is None else _pem(key, "tls_key")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=private, certificate_chain=chain)


class Client(DatasetMethods, AuditMethods):
    """Connects to a convscope server.

    >>> with Client("localhost:50051") as c:
    ...     c.predict("efficientnet_lite0", "cat.png", top=3)

    ``token`` is sent as ``authorization: Bearer <token>``; ``tls`` is True (system roots), PEM bytes, a
    path to a PEM file, or grpc credentials. For servers that require client certificates (mutual TLS)
    ``tls_cert`` and ``tls_key`` are the client's certificate chain and private key (PEM bytes or paths;
    they imply ``tls=True`` when ``tls`` is not given). ``timeout`` is the default deadline of every call
    in seconds. ``load_balancing`` names gRPC's client-side policy for a target that resolves to several
    replicas: "round_robin" spreads calls over every address of ``ipv4:10.0.0.1:50051,10.0.0.2:50051``
    or ``dns:///convscope:50051`` (gRPC's default, "pick_first", sends all to one).
    Errors raise :class:`convscope.ConvscopeError` subclasses carrying the status code and message.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls=None,
                 tls_cert=None, tls_key=None, timeout: float | None = 120.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, load_balancing: str | None = None):
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes)]
        if load_balancing:
            options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
        if tls or tls_cert is not None or tls_key is not None:
            credentials = _tls_credentials(tls or True, tls_cert, tls_key)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._models = model_pb2_grpc.ModelServiceStub(self._channel)
        self._inspect = inspect_pb2_grpc.InspectServiceStub(self._channel)
        self._attribution = attribution_pb2_grpc.AttributionServiceStub(self._channel)
        self._synthesis = synthesis_pb2_grpc.SynthesisServiceStub(self._channel)
        self._dataset = dataset_pb2_grpc.DatasetServiceStub(self._channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self._channel)
        self._labels: dict[str, list[str]] = {}

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

    def _stream(self, method, request, progress=None, timeout=None, preview=None, item_error=None):
        """Consume a job's event stream: progress events go to ``progress(step, total, stage)`` (and, for
        optimisation jobs, ``preview(step, loss, png)``; for dataset scans, unreadable images to
        ``item_error(message)``); returns the result message. ``request`` is a message, or an iterator of
        them for the streaming dataset calls. Interrupting (Ctrl-C) cancels the call, which stops the work
        on the server."""
        call = method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for event in call:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    if progress is not None:
                        progress(event.progress.step, event.progress.total, event.progress.stage)
                    if preview is not None:
                        preview(event.progress.step, event.progress.loss, event.progress.preview_png)
                elif kind == "item_error":
                    if item_error is not None:
                        item_error(event.item_error)
                else:
                    return event.result
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        except BaseException:
            call.cancel()
            raise
        raise from_rpc_error(call) if call.code() != grpc.StatusCode.OK else RuntimeError("stream ended without a result")

    # -- names: labels, targets, default layers ---------------------------------------------------------
    def labels(self, model: str) -> list[str]:
        """The model's class names by index ("class <i>" where it has no label file). Asked once per model
        and client: a prediction on a blank image that lists every class."""
        if model not in self._labels:
            d = self.describe(model)
            p = d.preprocessing
            channels = len(p["mean"]) or 3
            if channels in (1, 3):
                blank = np.zeros((p["height"], p["width"], channels), np.uint8)
            else:
                shape = (channels, p["height"], p["width"]) if p["layout"] == "NCHW" else (p["height"], p["width"], channels)
                blank = np.zeros(shape, np.float32)
            scores = self.predict(model, blank, top=d.num_classes) if d.num_classes else []
            self._labels[model] = [s.label for s in sorted(scores, key=lambda s: s.index)]
        return self._labels[model]

    def target_index(self, model: str, target: Target | None) -> int | None:
        """A class as its index. ``target`` is an int, a :class:`ClassScore` (what ``predict`` returns) or a
        label ("Egyptian cat": exact, else ignoring case); None stays None (the predicted class). An unknown
        or ambiguous label raises ValueError naming close matches."""
        if target is None or isinstance(target, ClassScore):
            return None if target is None else target.index
        if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
            return int(target)
        if not isinstance(target, str):
            raise TypeError(f"target must be a class index, a label or a ClassScore, not {type(target).__name__}")
        labels = self.labels(model)
        for same in (str.__eq__, lambda a, b: a.casefold() == b.casefold()):
            found = [i for i, label in enumerate(labels) if same(label, target)]
            if len(found) == 1:
                return found[0]
            if found:
                raise ValueError(f"label {target!r} names classes {found} of {model!r}; give the index")
        folded = {label.casefold(): label for label in labels}
        close = [folded[c] for c in difflib.get_close_matches(target.casefold(), list(folded), n=5, cutoff=0.6)]
        hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
        raise ValueError(f"unknown label {target!r} for model {model!r}{hint}")

    def _over(self, model: str, images, target, one):
        """``one(image, target_index)`` for an image or a list of images (a list of results) and a target or
        a list of targets (a list of results; with both, one list of targets per image)."""
        targets = [self.target_index(model, t) for t in target] if _many(target) else None
        index = None if targets is not None else self.target_index(model, target)

        def each(image):
            return [one(image, t) for t in targets] if targets is not None else one(image, index)

        return [each(image) for image in images] if _many(images) else each(images)

    def last_spatial_layer(self, model: str) -> str | None:
        """The default layer of :meth:`cam`: the last 4-D activation before global pooling (see
        :meth:`ModelDescription.last_spatial_layer`)."""
        return self.describe(model).last_spatial_layer()

    def penultimate_layer(self, model: str) -> str | None:
        """The tensor the logits are computed from, the default layer of galleries (see
        :meth:`ModelDescription.penultimate_layer`)."""
        return self.describe(model).penultimate_layer()

    # -- models ---------------------------------------------------------------------------------------
    def models(self) -> list[ModelSummary]:
        response = self._call(self._models.ListModels, model_pb2.ListModelsRequest())
        return [ModelSummary(m.name, m.ready, m.error, m.execution_provider, m.num_classes, m.no_classes)
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
                                list(r.guessed), r.execution_provider, r.opset, r.producer, r.precision,
                                r.run_batch, {"state": r.gradient.state, "reason": r.gradient.reason,
                                              "device": r.gradient.device,
                                              "probe_difference": r.gradient.probe_difference,
                                              "tolerance": r.gradient.tolerance}, r.no_classes)

    def predict(self, model: str, images, top: int = 0, *, timeout: float | None = None):
        """Top-``top`` classes (0: five, or every class of a model with fewer). ``images`` is one image
        (returns a list of ClassScore) or a list/tuple of images (returns one such list per image)."""
        single = not isinstance(images, (list, tuple))
        batch: Sequence = [images] if single else images
        request = model_pb2.PredictRequest(model=model, top_k=top,
                                           images=[to_image_message(image) for image in batch])
        response = self._call(self._models.Predict, request, timeout)
        results = [[ClassScore(s.index, s.label, s.probability, s.logit) for s in r.top]
                   for r in response.results]
        return results[0] if single else results

    # -- forward-only inspection (onnxruntime) ---------------------------------------------------------
    def filters(self, model: str, layer: str, *, render: bool = False, max_filters: int = 0,
                max_channels: int = 0) -> Filters:
        """Weights of a Conv layer; ``render`` adds a PNG grid (first layer in colour)."""
        r = self._call(self._inspect.Filters, inspect_pb2.FiltersRequest(
            model=model, layer=layer, render=render, max_filters=max_filters, max_channels=max_channels))
        return Filters(r.layer, r.conv_node, from_tensor(r.weights), r.group, r.rgb, r.depthwise, r.png)

    def activations(self, model: str, images, layers: str | Sequence[str], *, render: bool = False,
                    max_channels: int = 0) -> dict[str, Activation]:
        """Values of ``layers`` (one name or several) for one image or a list of images (rows of each
        ``values``), keyed by tensor name."""
        batch = images if _many(images) else [images]
        r = self._call(self._inspect.Activations, inspect_pb2.ActivationsRequest(
            model=model, images=[to_image_message(i) for i in batch], layers=_names(layers), render=render,
            max_channels=max_channels))
        return {a.layer: Activation(from_tensor(a.values), a.layout,
                                    {k: np.asarray(getattr(a.stats, k)) for k in ("mean", "min", "max", "zero_fraction")},
                                    list(a.png)) for a in r.layers}

    def dead_filters(self, model: str, images, layers: str | Sequence[str] = (), *,
                     tolerance: float = 0.0) -> dict[str, DeadFilters]:
        """Channels zero (or constant) for every image; all Conv outputs unless ``layers`` is given."""
        batch = images if _many(images) else [images]
        r = self._call(self._inspect.DeadFilters, inspect_pb2.DeadFiltersRequest(
            model=model, images=[to_image_message(i) for i in batch], layers=_names(layers), tolerance=tolerance))
        return {d.layer: DeadFilters(d.channels, list(d.dead), list(d.constant)) for d in r.layers}

    def occlusion(self, model: str, image, target: Target | Sequence[Target] | None = None, *,
                  window: int | tuple[int, int] = 16, stride: int | tuple[int, int] | None = None,
                  baseline: str | float = "constant", blur_sigma: float = 0.0, score: str = "probability",
                  render: bool = False, progress=None, timeout: float | None = None) -> OcclusionResult:
        """Occlusion sensitivity. ``baseline``: a number (model-input space), "constant" (0), "mean" or
        "blur"; ``score``: "probability" or "logit". ``target``: a class index, label or ClassScore (None:
        the predicted class). A list of images or of targets gives a list of results (see :meth:`saliency`)."""
        wh, ww = (window, window) if isinstance(window, int) else window
        sh, sw = (None, None) if stride is None else (stride, stride) if isinstance(stride, int) else stride
        constant = 0.0
        if isinstance(baseline, (int, float)):
            baseline, constant = "constant", float(baseline)
        if baseline not in _BASELINES:
            raise ValueError(f"baseline must be a number or one of {list(_BASELINES)}")
        if score not in ("probability", "logit"):
            raise ValueError("score must be 'probability' or 'logit'")

        def one(image, target):
            request = inspect_pb2.OcclusionRequest(
                model=model, image=to_image_message(image), window_h=wh, window_w=ww, baseline=_BASELINES[baseline],
                constant=constant, blur_sigma=blur_sigma,
                score=inspect_pb2.SCORE_LOGIT if score == "logit" else inspect_pb2.SCORE_PROBABILITY, render=render)
            if sh is not None:
                request.stride_h, request.stride_w = sh, sw
            if target is not None:
                request.target = target
            r = self._stream(self._inspect.Occlusion, request, progress, timeout)
            return OcclusionResult(r.target, r.label, r.base_probability, r.base_logit, from_tensor(r.probability),
                                   from_tensor(r.logit), list(r.rows), list(r.cols), from_tensor(r.attribution),
                                   r.forward_passes, r.heatmap_png, r.overlay_png)

        return self._over(model, image, target, one)

    def score_cam(self, model: str, image, layer: str = "", target: Target | Sequence[Target] | None = None, *,
                  batch_size: int = 0, render: bool = False, progress=None,
                  timeout: float | None = None) -> ScoreCamResult:
        """Score-CAM map of ``layer`` (default: :meth:`last_spatial_layer`) for ``target`` (None: the
        predicted class). Lists of images or targets give lists of results (see :meth:`saliency`)."""
        layer = layer or self.last_spatial_layer(model) or ""

        def one(image, target):
            request = inspect_pb2.ScoreCamRequest(model=model, image=to_image_message(image), layer=layer,
                                                  batch_size=batch_size, render=render)
            if target is not None:
                request.target = target
            r = self._stream(self._inspect.ScoreCam, request, progress, timeout)
            return ScoreCamResult(r.target, r.label, r.layer, from_tensor(r.cam), from_tensor(r.channel_weights),
                                  r.forward_passes, r.heatmap_png, r.overlay_png)

        return self._over(model, image, target, one)

    # -- gradient attribution (torch module converted from the ONNX file) -------------------------------
    # Every method takes ``target`` as a class index, a label or a ClassScore (None: the predicted class),
    # and answers a list for a list: ``target=c.predict(model, image, top=3)`` gives one result per class,
    # a list of images one result per image, both a list (per image) of lists (per target).
    def saliency(self, model: str, image, target: Target | Sequence[Target] | None = None, *,
                 method: str = "vanilla", samples: int = 0, noise: float = 0.0, seed: int = 0, steps: int = 0,
                 baseline: float = 0.0, batch_size: int = 0, render: bool = False, segment: bool = False,
                 progress=None, timeout: float | None = None) -> Attribution:
        """``method``: "vanilla", "smoothgrad" (``samples``, ``noise`` as a fraction of the input range,
        ``seed``) or "integrated_gradients" (``steps``, constant ``baseline`` in model-input space).
        ``segment``: also a GrabCut foreground mask seeded by the saliency map. ``target``: a class index,
        label or ClassScore, or a list of them (one result each); ``image`` may be a list (one result each).
        The first gradient call on a model waits for its conversion: ``progress`` hears of it (stage
        "converting the model for gradient methods", total 0)."""
        if method not in _SALIENCY:
            raise ValueError(f"method must be one of {list(_SALIENCY)}")

        def one(image, target):
            request = attribution_pb2.SaliencyRequest(
                model=model, image=to_image_message(image), method=_SALIENCY[method], samples=samples, noise=noise,
                seed=seed, steps=steps, baseline=baseline, batch_size=batch_size, render=render, segment=segment)
            if target is not None:
                request.target = target
            return _attribution(self._stream(self._attribution.Saliency, request, progress, timeout))

        return self._over(model, image, target, one)

    def _backprop(self, rule, model, image, target, layer, channel, render, neuron):
        def one(image, target):
            request = attribution_pb2.GuidedBackpropRequest(model=model, image=to_image_message(image), layer=layer,
                                                            channel=channel, rule=rule, render=render)
            if target is not None:
                request.target = target
            if neuron is not None:
                request.row, request.col = neuron
            return _attribution(self._call(self._attribution.GuidedBackprop, request))

        return self._over(model, image, target, one)

    def guided_backprop(self, model: str, image, target: Target | Sequence[Target] | None = None, *,
                        layer: str = "", channel: int = 0, neuron: tuple[int, int] | None = None,
                        render: bool = False) -> Attribution:
        """Guided backpropagation of a class score, or of ``layer``'s ``channel`` when a layer is given
        (summed, or the single unit at ``neuron`` = (row, col))."""
        return self._backprop(attribution_pb2.BACKPROP_GUIDED, model, image, target, layer, channel, render, neuron)

    def deconvnet(self, model: str, image, target: Target | Sequence[Target] | None = None, *, layer: str = "",
                  channel: int = 0, neuron: tuple[int, int] | None = None, render: bool = False) -> Attribution:
        """DeconvNet reconstruction of a class score, or of ``layer``'s ``channel`` (or one ``neuron``)."""
        return self._backprop(attribution_pb2.BACKPROP_DECONVNET, model, image, target, layer, channel, render,
                              neuron)

    def cam(self, model: str, image, target: Target | Sequence[Target] | None = None, *, layer: str = "",
            method: str = "gradcam", render: bool = False) -> Attribution:
        """Class activation map of ``layer`` for ``target``: "gradcam", "gradcam++", "guided_gradcam"
        (input-shaped), or "cam" (global-average-pool + linear heads). Without ``layer`` the server uses
        the last spatial activation (:meth:`last_spatial_layer`; for "cam" the pooled tensor) and says which
        in ``Attribution.layer``."""
        if method not in _CAMS:
            raise ValueError(f"method must be one of {list(_CAMS)}")

        def one(image, target):
            request = attribution_pb2.GradCamRequest(model=model, image=to_image_message(image), layer=layer,
                                                     method=_CAMS[method], render=render)
            if target is not None:
                request.target = target
            return _attribution(self._call(self._attribution.GradCam, request))

        return self._over(model, image, target, one)

    def sanity_check(self, model: str, image, target: Target | None = None, *, methods: str | Sequence[str] = (),
                     cam_layer: str = "", layers: int = 0, seed: int = 0, steps: int = 0,
                     return_maps: bool = False, render: bool = False, progress=None,
                     timeout: float | None = None) -> SanityReport:
        """Cascading randomisation (Adebayo et al. 2018): Spearman correlation of each method's map with its
        trained-model map as weighted layers are re-initialised from the top. Long (minutes on a real
        model): pass ``progress``."""
        request = attribution_pb2.SanityCheckRequest(
            model=model, image=to_image_message(image), methods=_names(methods), cam_layer=cam_layer,
            layers=layers, seed=seed, steps=steps, return_maps=return_maps, render=render)
        target = self.target_index(model, target)
        if target is not None:
            request.target = target
        r = self._stream(self._attribution.SanityCheck, request, progress, timeout)
        return SanityReport(
            r.target, r.label, list(r.layers), {m.method: list(m.spearman) for m in r.methods},
            {m.method: from_tensor(m.original_map) for m in r.methods if m.HasField("original_map")},
            {m.method: [from_tensor(t) for t in m.randomized_maps] for m in r.methods if m.randomized_maps},
            r.png)

    # -- synthesis: images made by gradient steps on the input ------------------------------------------
    @staticmethod
    def _optimization(steps, learning_rate, seed, preview_every, frames):
        return synthesis_pb2.Optimization(steps=steps, learning_rate=learning_rate, seed=seed,
                                          preview_every=preview_every, frames=frames)

    @staticmethod
    def _synthesized(image) -> Synthesized:
        return Synthesized(from_tensor(image.image), image.png, list(image.losses), list(image.frames), image.layer)

    def class_visualization(self, model: str, target: Target | None = None, *, layer: str = "", channel: int = 0,
                            neuron: tuple[int, int] | None = None, steps: int = 0, learning_rate: float = 0.0,
                            seed: int = 0, zero_start: bool = False, l2: float = 0.0, decay: float = 0.0,
                            blur_every: int = 0, blur_sigma: float = 0.0, jitter: int = 0,
                            clip_norm_percentile: float = 0.0, clip_contribution_percentile: float = 0.0,
                            preview_every: int = 0, frames: bool = False, progress=None, preview=None,
                            timeout: float | None = None) -> Synthesized:
        """What maximises a class score (Simonyan et al.; ``target``: an index, label or ClassScore) or a
        layer's channel/neuron (feature visualisation), with Yosinski et al.'s regularisers."""
        target = self.target_index(model, target)
        request = synthesis_pb2.VisualizeRequest(
            model=model, layer=layer, channel=channel, zero_start=zero_start, l2=l2, decay=decay,
            blur_every=blur_every, blur_sigma=blur_sigma, jitter=jitter, clip_norm_percentile=clip_norm_percentile,
            clip_contribution_percentile=clip_contribution_percentile,
            optimization=self._optimization(steps, learning_rate, seed, preview_every, frames))
        if target is not None:
            request.target = target
        if neuron is not None:
            request.row, request.col = neuron
        r = self._stream(self._synthesis.Visualize, request, progress, timeout, preview)
        return self._synthesized(r.images[0])

    def invert(self, model: str, image, layers: str | Sequence[str], *, tv_weight: float = 0.0, steps: int = 0,
               learning_rate: float = 0.0, seed: int = 0, preview_every: int = 0, frames: bool = False,
               progress=None, preview=None, timeout: float | None = None) -> list[Synthesized]:
        """Feature inversion (Mahendran & Vedaldi) of ``image`` from each of ``layers`` (one name or several):
        one result per layer, each with its own ``frames``."""
        request = synthesis_pb2.InvertRequest(model=model, image=to_image_message(image), layers=_names(layers),
                                              tv_weight=tv_weight, optimization=self._optimization(
                                                  steps, learning_rate, seed, preview_every, frames))
        r = self._stream(self._synthesis.Invert, request, progress, timeout, preview)
        return [self._synthesized(image) for image in r.images]

    def deepdream(self, model: str, image, layer: str, *, octaves: int = 0, octave_scale: float = 0.0,
                  jitter: int = 0, steps: int = 0, learning_rate: float = 0.0, seed: int = 0, preview_every: int = 0,
                  frames: bool = False, progress=None, preview=None, timeout: float | None = None) -> Synthesized:
        """DeepDream: amplify what ``layer`` sees in ``image``; ``steps`` per octave."""
        request = synthesis_pb2.DeepDreamRequest(model=model, image=to_image_message(image), layer=layer,
                                                 octaves=octaves, octave_scale=octave_scale, jitter=jitter,
                                                 optimization=self._optimization(steps, learning_rate, seed,
                                                                                 preview_every, frames))
        return self._synthesized(self._stream(self._synthesis.DeepDream, request, progress, timeout, preview).images[0])

    def style_transfer(self, model: str, style, content=None, *, style_layers: str | Sequence[str], content_layer: str = "",
                       style_weight: float = 0.0, content_weight: float = 0.0, tv_weight: float = 0.0,
                       optimizer: str = "adam", height: int = 0, width: int = 0, steps: int = 0,
                       learning_rate: float = 0.0, seed: int = 0, preview_every: int = 0, frames: bool = False,
                       progress=None, preview=None, timeout: float | None = None) -> Synthesized:
        """Gatys et al.: ``content`` painted in ``style``; without ``content``, texture synthesis."""
        request = synthesis_pb2.StyleRequest(
            model=model, style=to_image_message(style), style_layers=_names(style_layers), content_layer=content_layer,
            style_weight=style_weight, content_weight=content_weight, tv_weight=tv_weight, optimizer=optimizer,
            height=height, width=width,
            optimization=self._optimization(steps, learning_rate, seed, preview_every, frames))
        if content is not None:
            request.content.CopyFrom(to_image_message(content))
        return self._synthesized(self._stream(self._synthesis.Style, request, progress, timeout, preview).images[0])

    def adversarial(self, model: str, image, method: str = "fgsm", *, label: Target | None = None,
                    target: Target | None = None, epsilon: float = 0.0, step_size: float = 0.0,
                    stop_probability: float = 0.0, steps: int = 0, preview_every: int = 0, frames: bool = False,
                    progress=None, preview=None, timeout: float | None = None) -> AdversarialExample:
        """"fgsm": one signed-gradient step of ``epsilon`` ([0, 1] pixel units) away from ``label`` (default:
        the prediction); "targeted": steps towards ``target`` until p >= ``stop_probability``. ``label`` and
        ``target`` are class indices, labels or ClassScores."""
        if method not in ("fgsm", "targeted"):
            raise ValueError("method must be 'fgsm' or 'targeted'")
        if method == "targeted" and target is None:
            raise ValueError("targeted needs target=")
        label, target = self.target_index(model, label), self.target_index(model, target)
        request = synthesis_pb2.AdversarialRequest(
            model=model, image=to_image_message(image), epsilon=epsilon, step_size=step_size,
            stop_probability=stop_probability, target=target or 0,
            method=synthesis_pb2.ADVERSARIAL_TARGETED if method == "targeted" else synthesis_pb2.ADVERSARIAL_FGSM,
            optimization=self._optimization(steps, 0.0, 0, preview_every, frames))
        if label is not None:
            request.label = label
        r = self._stream(self._synthesis.Adversarial, request, progress, timeout, preview)
        image = r.images[0]

        def scores(items):
            return [ClassScore(s.index, s.label, s.probability, s.logit) for s in items]

        return AdversarialExample(from_tensor(image.image), image.png, scores(r.before), scores(r.after),
                                  from_tensor(r.perturbation), r.perturbation_png, r.linf_pixels, r.steps_taken,
                                  list(image.losses), list(image.frames))

    def robustness(self, model: str, images, labels: Sequence[Target] = (), epsilons: Sequence[float] = (), *,
                   batch_size: int = 0, render: bool = False, progress=None,
                   timeout: float | None = None) -> Robustness:
        """Top-1 accuracy under FGSM at each epsilon ([0, 1] pixel units) over ``images``; ``labels``
        (indices, labels or ClassScores; default: the model's predictions)."""
        request = synthesis_pb2.RobustnessRequest(model=model, images=[to_image_message(i) for i in images],
                                                  labels=[self.target_index(model, t) for t in labels], epsilons=list(epsilons),
                                                  batch_size=batch_size, render=render)
        r = self._stream(self._synthesis.Robustness, request, progress, timeout)
        return Robustness(list(r.epsilons), list(r.accuracy), r.png)
