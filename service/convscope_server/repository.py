"""The model repository: ``<root>/<name>/model.onnx`` plus an optional ``config.toml`` (Triton style).

Every model folder is loaded at start-up. A model that fails to load stays listed with the reason, and
requests for it answer FAILED_PRECONDITION; the rest keep serving. Nothing is read from outside the
repository: model files, external data, labels and config must resolve inside the model's own folder.

config.toml (every key optional; what is missing is inferred from the graph and reported as guessed)::

    [input]
    name = "input"            # graph input that takes the image
    height = 224
    width = 224
    layout = "NCHW"           # or "NHWC"
    channel_order = "RGB"     # or "BGR"
    scale = 1.0               # pixels are scaled to [0, scale] before mean/std
    mean = [0.5, 0.5, 0.5]
    std = [0.5, 0.5, 0.5]
    resize = "stretch"        # or "center_crop"
    crop_fraction = 0.875     # center_crop: crop side / resized shorter side

    [output]
    logits = "logits"         # graph output holding class scores
    softmax = true            # false when that output already holds probabilities
    labels = "labels.txt"     # one class name per line
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from convscope_server.errors import FailedPrecondition, NotFound
from convscope_server.onnx.graph import LayerInfo, constants, describe_graph, shape_only, tensor_types, unresolved
from convscope_server.onnx.loading import ModelLoadError, inside, load_model
from convscope_server.onnx.probes import ProbeCache, measure_shapes
from convscope_server.onnx.session import (INPUT_DATATYPES, PRECISIONS, SessionSettings, create_session, default_batch,
                                           graph_input, run_batched)

log = logging.getLogger("convscope_server")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INPUT_KEYS = {"name", "height", "width", "layout", "channel_order", "scale", "mean", "std", "resize",
               "crop_fraction"}
_OUTPUT_KEYS = {"logits", "softmax", "labels"}
_RUNTIME_KEYS = {"precision"}


@dataclass
class ModelConfig:
    input_name: str
    height: int
    width: int
    channels: int
    layout: str
    channel_order: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str
    crop_fraction: float
    logits_output: str
    softmax: bool
    labels_file: str | None
    guessed: list[str] = field(default_factory=list)
    precision: str = ""             # [runtime] precision; "" follows the server's --precision
    input_datatype: str = "FP32"    # the graph input's type; integer inputs get pixel values (0..255)


@dataclass
class LoadedModel:
    name: str
    folder: Path
    proto: onnx.ModelProto          # shape-inferred
    config: ModelConfig
    labels: list[str]
    layers: list[LayerInfo]
    fixed_batch: int                # 0: dynamic batch axis
    num_classes: int
    session: object                 # onnxruntime.InferenceSession with every optimisation on
    execution_provider: str
    probes: ProbeCache              # sessions that expose inner tensors, cached by tensor set
    run_batch: int = 16             # samples per onnxruntime run on a dynamic-batch graph
    precision: str = "exact"        # "exact" (float32) or "tf32", for onnxruntime and the torch module
    _layer_index: dict[str, LayerInfo] = field(default_factory=dict, repr=False)
    _shape_values: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    @property
    def stable_shapes(self) -> bool:
        """Pad runs to a few fixed batch sizes: CUDA searches convolution algorithms per input shape."""
        return self.execution_provider == "CUDAExecutionProvider"

    def run(self, batch, outputs: list[str], session=None) -> list:
        """Run model inputs (N, ...) through the prediction session (or ``session``, a probe) in batches."""
        return run_batched(session or self.session, self.config.input_name,
                           graph_input(batch, INPUT_DATATYPES[self.config.input_datatype]), outputs,
                           self.fixed_batch, self.run_batch, self.stable_shapes)

    def layer(self, name: str, field_name: str = "layer") -> LayerInfo:
        """Resolve a tensor name, or a node name (to its first output). Raises NotFound with close matches."""
        if not self._layer_index:
            self._layer_index.update({layer.name: layer for layer in self.layers})
            for layer in self.layers:
                if layer.node_name:
                    self._layer_index.setdefault(layer.node_name, layer)
        try:
            return self._layer_index[name]
        except KeyError:
            raise NotFound(field_name, "layer", name, [layer.name for layer in self.layers]) from None

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the served graph: galleries record it, to notice a model file replaced under them."""
        return hashlib.sha256(self.proto.SerializeToString(deterministic=True)).hexdigest()

    @functools.cached_property
    def constants(self) -> dict:
        """Initializers and Constant outputs as arrays, computed once (weights for filters, CAM heads)."""
        return constants(self.proto)

    def shape_value(self, name: str) -> np.ndarray | None:
        """The value ``name`` takes for a single image (a graph fixed to batch B: for B) when it depends on the
        image only through its shape (``graph.shape_only``), by one probe run on a zero image; None for any
        other tensor. Cached."""
        if name not in self._shape_values:
            value = None
            if shape_only(self.proto, name, self.config.input_name):
                shape = (self.config.channels, self.config.height, self.config.width)
                if self.config.layout == "NHWC":
                    shape = (self.config.height, self.config.width, self.config.channels)
                zeros = np.zeros((max(self.fixed_batch, 1), *shape), INPUT_DATATYPES[self.config.input_datatype])
                value = self.probes.session([name]).run([name], {self.config.input_name: zeros})[0]
            self._shape_values[name] = value
        return self._shape_values[name]

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"class {index}"


class ConfigError(ModelLoadError):
    pass


def _read_config(folder: Path) -> dict:
    path = folder / "config.toml"
    if not path.exists():
        return {}
    if not inside(path, folder):
        raise ConfigError("config.toml resolves outside the model folder: refused")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"config.toml: {error}") from None
    for section, keys in (("input", _INPUT_KEYS), ("output", _OUTPUT_KEYS), ("runtime", _RUNTIME_KEYS)):
        unknown = set(data.get(section, {})) - keys
        if unknown:
            raise ConfigError(f"config.toml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(keys)}")
    unknown_sections = set(data) - {"input", "output", "runtime"}
    if unknown_sections:
        raise ConfigError(f"config.toml: unknown sections {sorted(unknown_sections)}")
    return data


def build_config(proto: onnx.ModelProto, raw: dict) -> ModelConfig:
    """Merge config.toml with what the graph says; record every field that had to be guessed."""
    guessed: list[str] = []
    inp, out = raw.get("input", {}), raw.get("output", {})
    initializers = {init.name for init in proto.graph.initializer}
    graph_inputs = [v.name for v in proto.graph.input if v.name not in initializers]
    types = tensor_types(proto)

    def pick(section: dict, key: str, default, label: str):
        if key in section:
            return section[key]
        guessed.append(label)
        return default

    input_name = pick(inp, "name", graph_inputs[0] if graph_inputs else "", "input.name")
    if input_name not in graph_inputs:
        raise ConfigError(f"config.toml [input] name {input_name!r} is not a graph input {graph_inputs}")
    datatype, shape = types[input_name][0], types[input_name][1]
    if datatype not in INPUT_DATATYPES:
        raise ConfigError(f"input {input_name!r} has type {datatype}; an image input needs one of "
                          f"{sorted(INPUT_DATATYPES)}")
    if len(shape) != 4:
        raise ConfigError(f"input {input_name!r} has shape {list(shape)}; an image input needs 4 axes")
    inferred_layout = "NHWC" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "NCHW"
    layout = pick(inp, "layout", inferred_layout, "input.layout")
    if layout not in ("NCHW", "NHWC"):
        raise ConfigError(f"config.toml [input] layout must be NCHW or NHWC, not {layout!r}")
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "NCHW" else (1, 2, 3)
    channels = shape[c_axis] if shape[c_axis] > 0 else 3
    height = pick(inp, "height", shape[h_axis] if shape[h_axis] > 0 else 224, "input.height")
    width = pick(inp, "width", shape[w_axis] if shape[w_axis] > 0 else 224, "input.width")
    for key, value, axis in (("height", height, h_axis), ("width", width, w_axis)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"config.toml [input] {key} must be a positive integer")
        if shape[axis] > 0 and shape[axis] != value:
            raise ConfigError(f"config.toml [input] {key} = {value} but the graph input has {shape[axis]}")
    channel_order = pick(inp, "channel_order", "RGB", "input.channel_order")
    if channel_order not in ("RGB", "BGR"):
        raise ConfigError("config.toml [input] channel_order must be RGB or BGR")
    integer = np.issubdtype(INPUT_DATATYPES[datatype], np.integer)
    # An integer input (uint8 in TF/TFLite exports) takes pixels as they are: the graph normalises them.
    scale = float(pick(inp, "scale", 255.0 if integer else 1.0, "input.scale"))
    default_mean = (0.0,) * channels if integer else IMAGENET_MEAN if channels == 3 else (0.5,) * channels
    default_std = (1.0,) * channels if integer else IMAGENET_STD if channels == 3 else (0.5,) * channels
    mean = tuple(float(v) for v in pick(inp, "mean", default_mean, "input.mean"))
    std = tuple(float(v) for v in pick(inp, "std", default_std, "input.std"))
    if len(mean) != channels or len(std) != channels or any(s == 0 for s in std):
        raise ConfigError(f"config.toml [input] mean and std need {channels} values, std non-zero")
    resize = pick(inp, "resize", "stretch", "input.resize")
    if resize not in ("stretch", "center_crop"):
        raise ConfigError("config.toml [input] resize must be stretch or center_crop")
    crop_fraction = float(inp.get("crop_fraction", 0.875))
    if not 0 < crop_fraction <= 1:
        raise ConfigError("config.toml [input] crop_fraction must be in (0, 1]")

    outputs = [v.name for v in proto.graph.output]
    logits = pick(out, "logits", outputs[0], "output.logits")
    if logits not in outputs:
        raise ConfigError(f"config.toml [output] logits {logits!r} is not a graph output {outputs}")
    softmax = bool(pick(out, "softmax", True, "output.softmax"))
    labels = out.get("labels")
    precision = raw.get("runtime", {}).get("precision", "")
    if precision not in ("", *PRECISIONS):
        raise ConfigError(f"config.toml [runtime] precision must be one of {list(PRECISIONS)}, not {precision!r}")
    return ModelConfig(input_name, height, width, channels, layout, channel_order, scale, mean, std, resize,
                       crop_fraction, logits, softmax, labels, guessed, precision, datatype)


def _read_labels(folder: Path, config: ModelConfig) -> list[str]:
    name = config.labels_file
    if name is None:
        default = folder / "labels.txt"
        if not default.exists():
            return []
        name = "labels.txt"
    path = folder / name
    if not inside(path, folder):
        raise ConfigError(f"labels file {name!r} resolves outside the model folder: refused")
    if not path.is_file():
        raise ConfigError(f"labels file {name!r} is missing")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def runtime_shapes(name: str, proto: onnx.ModelProto, config: ModelConfig, threads: int = 0) -> dict:
    """Shapes that shape inference left open, measured by one run on a zero image (batch 1, or the batch
    the graph fixes) so that the graph analysis can follow run-time Reshapes; {} when inference resolved
    every shape, or when the run fails (the analysis then stops where the shapes end)."""
    names = unresolved(proto)
    if not names:
        return {}
    value = next(v for v in proto.graph.input if v.name == config.input_name)
    fixed = tensor_types(proto)[config.input_name][1][0]
    shape = (max(fixed, 1), config.channels, config.height, config.width)
    if config.layout == "NHWC":
        shape = (shape[0], config.height, config.width, config.channels)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    try:
        shapes = measure_shapes(proto, names, config.input_name, np.zeros(shape, dtype), threads)
    except Exception as error:  # onnxruntime raises its own types
        log.warning("model %s: the shape probe run failed (%s); receptive fields stop where static shapes do",
                    name, error)
        return {}
    shapes[config.input_name] = shape
    return shapes


def load_folder(name: str, folder: Path, defaults: SessionSettings = SessionSettings(), batch: int = 0) -> LoadedModel:
    """Load one model folder. ``defaults`` are the server's session settings (the model's config.toml may
    override the precision); ``batch`` samples per run, 0 for the device's default."""
    proto = load_model(folder / "model.onnx", folder)
    config = build_config(proto, _read_config(folder))
    labels = _read_labels(folder, config)
    layers = describe_graph(proto, config.input_name, config.layout,
                            runtime_shapes(name, proto, config, defaults.threads))
    types = tensor_types(proto)
    batch_dim = types[config.input_name][1][0]
    logits_shape = types.get(config.logits_output, ("", (), ()))[1]
    num_classes = logits_shape[-1] if logits_shape and logits_shape[-1] > 0 else 0
    if labels and num_classes and len(labels) != num_classes:
        raise ConfigError(f"labels file has {len(labels)} names but {config.logits_output!r} has "
                          f"{num_classes} classes")
    settings = SessionSettings(defaults.device, defaults.threads, config.precision or defaults.precision)
    try:
        session = create_session(proto.SerializeToString(), settings)
    except Exception as error:  # onnxruntime raises its own types for unsupported ops and bad graphs
        raise ModelLoadError(f"onnxruntime cannot load the model: {error}") from None
    provider = session.get_providers()[0]
    return LoadedModel(name, folder, proto, config, labels, layers, max(batch_dim, 0), num_classes, session,
                       provider, ProbeCache(proto, settings), batch or default_batch(provider), settings.precision)


class ModelRepository:
    """Loads every model folder under ``root`` and hands out loaded models by name."""

    def __init__(self, root: Path, settings: SessionSettings = SessionSettings(), batch: int = 0):
        self.root = Path(root)
        self.settings = settings
        self.batch = batch
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a folder")
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (folder / "model.onnx").exists() and not (folder / "model.onnx").is_symlink():
                continue
            self.load(folder.name)

    def load(self, name: str) -> None:
        folder = self.root / name
        try:
            if not inside(folder, self.root):
                raise ModelLoadError("the model folder resolves outside the repository: refused")
            model = load_folder(name, folder, self.settings, self.batch)
        except ModelLoadError as error:
            log.warning("model %s not loaded: %s", name, error)
            with self._lock:
                self._models.pop(name, None)
                self._errors[name] = str(error)
            return
        with self._lock:
            self._models[name] = model
            self._errors.pop(name, None)
        log.info("model %s loaded (%d tensors, %s)", name, len(model.layers), model.execution_provider)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self._models) | set(self._errors))

    def status(self, name: str) -> tuple[LoadedModel | None, str]:
        with self._lock:
            return self._models.get(name), self._errors.get(name, "")

    def get(self, name: str, field_name: str = "model") -> LoadedModel:
        with self._lock:
            model = self._models.get(name)
            error = self._errors.get(name)
        if model is not None:
            return model
        if error is not None:
            raise FailedPrecondition(f"{field_name}: model {name!r} is not available: {error}")
        raise NotFound(field_name, "model", name, self.names())
