"""The model repository: ``<root>/<name>/model.onnx`` plus an optional ``config.toml`` (Triton style).

Every model folder is loaded at start-up, and each fails alone: whatever goes wrong while loading one
(a parse error, a mistyped or out-of-range config value, a non-regular file, an exception nobody
anticipated) leaves that model listed as failed with a one-line reason, requests for it answer
FAILED_PRECONDITION, and the rest keep serving. Nothing is read from outside the repository: model files,
external data, labels and config must resolve inside the model's own folder and be regular files (a FIFO
or device is refused from its stat, never opened). Each model runs once on zero images at load, so one
whose first run fails or gives non-finite logits is failed then, not at its first request.
``ModelRepository.reload()`` rescans the root without a restart.

config.toml (every key optional; what is missing is inferred from the graph and reported as guessed)::

    [input]
    name = "input"            # graph input that takes the image
    height = 224              # positive integers up to MAX_SIDE
    width = 224
    layout = "NCHW"           # or "NHWC"
    channel_order = "RGB"     # or "BGR"
    scale = 1.0               # pixels are scaled to [0, scale] before mean/std; finite, > 0
    mean = [0.5, 0.5, 0.5]    # one finite number per channel
    std = [0.5, 0.5, 0.5]     # one finite number > 0 per channel
    resize = "stretch"        # or "center_crop"
    crop_fraction = 0.875     # center_crop: crop side / resized shorter side

    [output]
    logits = "logits"         # graph output holding class scores
    softmax = true            # false when that output already holds probabilities (TOML booleans only;
                              # guessed false when a Softmax or Sigmoid node makes it)
    labels = "labels.txt"     # one class name per line
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from convscope_server.errors import FailedPrecondition, NotFound
from convscope_server.onnx.graph import LayerInfo, constants, describe_graph, shape_only, tensor_types, unresolved
from convscope_server.onnx.loading import ModelLoadError, inside, load_model, read_regular
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
    no_classes: str = ""            # why the logits output holds no class scores ("" when it does)
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
                zeros = zero_input(self.config, self.fixed_batch)
                value = self.probes.session([name]).run([name], {self.config.input_name: zeros})[0]
            self._shape_values[name] = value
        return self._shape_values[name]

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else f"class {index}"

    def require_classes(self, field_name: str = "model") -> None:
        """FAILED_PRECONDITION for a method that needs class scores on a model whose output holds none (a
        segmentation map, a feature extractor): the layer methods still serve it."""
        if self.no_classes:
            raise FailedPrecondition(f"{field_name}: model {self.name!r} has no class scores: {self.no_classes}")


class ConfigError(ModelLoadError):
    pass


MAX_SIDE = 8192                 # [input] height / width: a load-time run feeds an image of this size
CONFIG_LIMIT = 1 << 20          # bytes of config.toml
LABELS_LIMIT = 16 << 20         # bytes of the labels file


def _read_config(folder: Path) -> dict:
    path = folder / "config.toml"
    if not os.path.lexists(path):
        return {}
    text = read_regular(path, folder, "config.toml", CONFIG_LIMIT)
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("config.toml is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config.toml: {error}") from None
    except RecursionError:
        raise ConfigError("config.toml is nested too deeply to parse") from None
    unknown_sections = set(data) - {"input", "output", "runtime"}
    if unknown_sections:
        raise ConfigError(f"config.toml: unknown sections {sorted(unknown_sections)}")
    for section, keys in (("input", _INPUT_KEYS), ("output", _OUTPUT_KEYS), ("runtime", _RUNTIME_KEYS)):
        if not isinstance(data.get(section, {}), dict):
            raise ConfigError(f"config.toml: {section} must be a table ([{section}]), got {_show(data[section])}")
        unknown = set(data.get(section, {})) - keys
        if unknown:
            raise ConfigError(f"config.toml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(keys)}")
    return data


def _show(value) -> str:
    """A config value for a reason: scalars as written, arrays and tables by kind (they may be huge)."""
    if isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
    if isinstance(value, list):
        return f"an array of {len(value)}"
    return "a table" if isinstance(value, dict) else f"a {type(value).__name__}"


def _bad(key: str, reason: str, value) -> ConfigError:
    section, _, name = key.partition(".")
    return ConfigError(f"config.toml [{section}] {name}: {reason}, got {_show(value)}")


def _string(key: str, value, choices=()) -> str:
    if not isinstance(value, str):
        raise _bad(key, "must be a string" + (f" ({' or '.join(choices)})" if choices else ""), value)
    if choices and value not in choices:
        raise _bad(key, f"must be {' or '.join(repr(c) for c in choices)}", value)
    return value


def _number(key: str, value, positive: bool = False) -> float:
    """A finite TOML int or float (never a boolean); ``positive``: > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, "must be a number", value)
    if not math.isfinite(value):
        raise _bad(key, "must be finite", value)
    if positive and value <= 0:
        raise _bad(key, "must be > 0", value)
    return float(value)


def _numbers(key: str, value, count: int, positive: bool = False) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != count:
        raise _bad(key, f"must be an array of {count} numbers (one per channel)", value)
    return tuple(_number(f"{key}[{i}]", v, positive) for i, v in enumerate(value))


def _side(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIDE:
        raise _bad(key, f"must be a positive integer up to {MAX_SIDE}", value)
    return value


def _flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise _bad(key, "must be true or false (a TOML boolean)", value)
    return value


def build_config(proto: onnx.ModelProto, raw: dict) -> ModelConfig:
    """Merge config.toml with what the graph says; record every field that had to be guessed. Every value
    from the file is checked for type and range; the reason names the key."""
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

    input_name = _string("input.name", pick(inp, "name", graph_inputs[0] if graph_inputs else "", "input.name"))
    if input_name not in graph_inputs:
        raise ConfigError(f"config.toml [input] name {input_name!r} is not a graph input {graph_inputs}")
    datatype, shape = types[input_name][0], types[input_name][1]
    if datatype not in INPUT_DATATYPES:
        raise ConfigError(f"input {input_name!r} has type {datatype}; an image input needs one of "
                          f"{sorted(INPUT_DATATYPES)}")
    if len(shape) != 4:
        raise ConfigError(f"input {input_name!r} has shape {list(shape)}; an image input needs 4 axes")
    inferred_layout = "NHWC" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "NCHW"
    layout = _string("input.layout", pick(inp, "layout", inferred_layout, "input.layout"), ("NCHW", "NHWC"))
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "NCHW" else (1, 2, 3)
    channels = shape[c_axis] if shape[c_axis] > 0 else 3
    height = _side("input.height", pick(inp, "height", shape[h_axis] if shape[h_axis] > 0 else 224, "input.height"))
    width = _side("input.width", pick(inp, "width", shape[w_axis] if shape[w_axis] > 0 else 224, "input.width"))
    for key, value, axis in (("height", height, h_axis), ("width", width, w_axis)):
        if shape[axis] > 0 and shape[axis] != value:
            raise ConfigError(f"config.toml [input] {key} = {value} but the graph input has {shape[axis]}")
    channel_order = _string("input.channel_order", pick(inp, "channel_order", "RGB", "input.channel_order"),
                            ("RGB", "BGR"))
    integer = np.issubdtype(INPUT_DATATYPES[datatype], np.integer)
    # An integer input (uint8 in TF/TFLite exports) takes pixels as they are: the graph normalises them.
    scale = _number("input.scale", pick(inp, "scale", 255.0 if integer else 1.0, "input.scale"), positive=True)
    default_mean = (0.0,) * channels if integer else IMAGENET_MEAN if channels == 3 else (0.5,) * channels
    default_std = (1.0,) * channels if integer else IMAGENET_STD if channels == 3 else (0.5,) * channels
    mean = _numbers("input.mean", pick(inp, "mean", list(default_mean), "input.mean"), channels)
    std = _numbers("input.std", pick(inp, "std", list(default_std), "input.std"), channels, positive=True)
    resize = _string("input.resize", pick(inp, "resize", "stretch", "input.resize"), ("stretch", "center_crop"))
    crop_fraction = _number("input.crop_fraction", inp.get("crop_fraction", 0.875))
    if not 0 < crop_fraction <= 1:
        raise _bad("input.crop_fraction", "must be in (0, 1]", crop_fraction)

    outputs = [v.name for v in proto.graph.output]
    logits = _string("output.logits", pick(out, "logits", outputs[0], "output.logits"))
    if logits not in outputs:
        raise ConfigError(f"config.toml [output] logits {logits!r} is not a graph output {outputs}")
    softmax = _flag("output.softmax", pick(out, "softmax", not _ends_in_probabilities(proto, logits),
                                           "output.softmax"))
    labels = out.get("labels")
    if labels is not None and (not _string("output.labels", labels) or os.path.isabs(labels)):
        raise _bad("output.labels", "must be a file name inside the model folder", labels)
    precision = raw.get("runtime", {}).get("precision", "")
    if precision not in ("", *PRECISIONS):
        raise ConfigError(f"config.toml [runtime] precision must be one of {list(PRECISIONS)}, not {_show(precision)}")
    return ModelConfig(input_name, height, width, channels, layout, channel_order, scale, mean, std, resize,
                       crop_fraction, logits, softmax, labels, guessed, precision, datatype)


_PROBABILITY_OPS = {"Softmax", "Sigmoid"}
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}


def _ends_in_probabilities(proto: onnx.ModelProto, output: str) -> bool:
    """Whether ``output`` is made by a Softmax or Sigmoid (through reshapes): it already holds probabilities,
    and a softmax over it would flatten them (the default of ``[output] softmax`` follows this)."""
    producers = {name: node for node in proto.graph.node for name in node.output}
    node = producers.get(output)
    while node is not None and node.op_type in _PASS_THROUGH and node.input:
        node = producers.get(node.input[0])
    return node is not None and node.op_type in _PROBABILITY_OPS


def _read_labels(folder: Path, config: ModelConfig) -> list[str]:
    name = config.labels_file
    if name is None:
        if not os.path.lexists(folder / "labels.txt"):
            return []
        name = "labels.txt"
    path = folder / name
    if not inside(path, folder):
        raise ConfigError(f"labels file {name!r} resolves outside the model folder: refused")
    if not os.path.lexists(path):
        raise ConfigError(f"labels file {name!r} is missing")
    data = read_regular(path, folder, f"labels file {name!r}", LABELS_LIMIT)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"labels file {name!r} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def zero_input(config: ModelConfig, fixed_batch: int) -> np.ndarray:
    """A batch of zero images in the graph input's type and layout: one image, or the graph's fixed batch.
    What every load-time run feeds."""
    shape = (config.channels, config.height, config.width)
    if config.layout == "NHWC":
        shape = (config.height, config.width, config.channels)
    return np.zeros((max(fixed_batch, 1), *shape), INPUT_DATATYPES[config.input_datatype])


def runtime_shapes(name: str, proto: onnx.ModelProto, config: ModelConfig, threads: int = 0) -> dict:
    """Shapes that shape inference left open, measured by one run on a zero image (batch 1, or the batch
    the graph fixes) so that the graph analysis can follow run-time Reshapes; {} when inference resolved
    every shape, or when the run fails (the analysis then stops where the shapes end)."""
    names = unresolved(proto)
    if not names:
        return {}
    sample = zero_input(config, tensor_types(proto)[config.input_name][1][0])
    try:
        shapes = measure_shapes(proto, names, config.input_name, sample, threads)
    except Exception as error:  # onnxruntime raises its own types
        log.warning("model %s: the shape probe run failed (%s); receptive fields stop where static shapes do",
                    name, error)
        return {}
    shapes[config.input_name] = sample.shape
    return shapes


def first_run(model: LoadedModel) -> tuple[int, ...]:
    """Run the prediction session once on zero images, as a request would; a model that cannot answer it
    fails at load instead of at its first request. Returns the shape of one image's logits output."""
    output = model.config.logits_output
    try:
        (logits,) = model.run(zero_input(model.config, model.fixed_batch), [output])
    except Exception as error:  # onnxruntime raises its own types; an absurd allocation raises here
        raise ModelLoadError(f"the first run on a zero image failed: {error}") from None
    logits = np.asarray(logits)
    if logits.dtype.kind not in "fiu" or logits.ndim == 0 or logits.size == 0:
        raise ModelLoadError(f"logits output {output!r} holds no class scores on a zero image "
                             f"(shape {list(logits.shape)}, type {logits.dtype})")
    if not np.isfinite(logits).all():
        raise ModelLoadError(f"logits output {output!r} is not finite (NaN or inf) on a zero image")
    return tuple(int(d) for d in logits.shape[1:])


def class_count(per_image: tuple[int, ...], output: str, outputs: list[str]) -> tuple[int, str]:
    """(number of classes, "") when one image's logits are one score per class: (K,), or K with axes of
    size 1 around it as a 1x1 convolution head leaves them (K, 1, 1) / (1, 1, K); else (0, why not)."""
    sized = [d for d in per_image if d != 1]
    if len(sized) <= 1:
        return int(np.prod(per_image, dtype=np.int64)), ""
    return 0, (f"its output {output!r} has shape {list(per_image)} per image, not one score per class (a "
               f"segmentation map or feature output?); config.toml [output] logits names the class-score output "
               f"(graph outputs: {outputs}). The layer methods (filters, activations, patches, galleries, "
               f"inversion, DeepDream, style transfer, channel visualisation) work on it")


def load_folder(name: str, folder: Path, defaults: SessionSettings = SessionSettings(), batch: int = 0) -> LoadedModel:
    """Load one model folder. ``defaults`` are the server's session settings (the model's config.toml may
    override the precision); ``batch`` samples per run, 0 for the device's default. Raises
    :class:`ModelLoadError` with the reason; other exceptions mean a bug or a file nothing anticipated."""
    proto = load_model(folder / "model.onnx", folder)
    config = build_config(proto, _read_config(folder))
    labels = _read_labels(folder, config)
    types = tensor_types(proto)
    batch_dim = types[config.input_name][1][0]
    settings = SessionSettings(defaults.device, defaults.threads, config.precision or defaults.precision)
    try:
        session = create_session(proto.SerializeToString(), settings)
    except Exception as error:  # onnxruntime raises its own types for unsupported ops and bad graphs
        raise ModelLoadError(f"onnxruntime cannot load the model: {error}") from None
    provider = session.get_providers()[0]
    model = LoadedModel(name, folder, proto, config, labels, [], max(batch_dim, 0), 0, session, provider,
                        ProbeCache(proto, settings), batch or default_batch(provider), settings.precision)
    model.num_classes, model.no_classes = class_count(first_run(model), config.logits_output,
                                                      [v.name for v in proto.graph.output])
    if model.no_classes:
        log.warning("model %s has no class scores: %s", name, model.no_classes)
    # a model with no class scores may still carry a labels file (a segmentation map's channel names)
    if labels and not model.no_classes and len(labels) != model.num_classes:
        raise ConfigError(f"labels file has {len(labels)} names but {config.logits_output!r} has "
                          f"{model.num_classes} classes")
    model.layers = describe_graph(proto, config.input_name, config.layout,
                                  runtime_shapes(name, proto, config, defaults.threads))
    return model


MAX_REASON = 500  # characters of a failed model's reason


def _reason(error: Exception) -> str:
    """One line saying why a model failed: the message of a ModelLoadError, else the exception's type too."""
    if isinstance(error, RecursionError):
        text = f"nesting too deep to load ({error})"
    elif isinstance(error, ModelLoadError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def _signature(folder: Path) -> tuple:
    """What a reload compares: (name, inode, size, mtime, ctime) of every entry directly in the folder
    (model.onnx, config.toml, labels, external data), symlinks followed; nothing is opened."""
    entries = []
    try:
        names = sorted(os.listdir(folder))
    except OSError as error:
        return (("", error.errno),)
    for entry in names:
        try:
            info = os.stat(folder / entry)
            entries.append((entry, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
        except OSError as error:
            entries.append((entry, error.errno))
    return tuple(entries)


@dataclass
class ReloadReport:
    """What :meth:`ModelRepository.reload` did, by model name (loaded or failed alike)."""
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


class ModelRepository:
    """Loads every model folder under ``root`` and hands out loaded models by name. Each folder fails
    alone: whatever goes wrong while loading it makes that model failed with a one-line reason."""

    def __init__(self, root: Path, settings: SessionSettings = SessionSettings(), batch: int = 0):
        self.root = Path(root)
        self.settings = settings
        self.batch = batch
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._signatures: dict[str, tuple] = {}
        self._lock = threading.Lock()           # the maps above
        self._loading = threading.Lock()        # one load_all / reload at a time

    def _scan(self) -> list[str]:
        """Model folders: visible subfolders holding an entry named model.onnx, whatever kind of file it
        is (loading says what is wrong with it). Folders this process cannot list are skipped."""
        names = []
        for folder in sorted(self.root.iterdir()):
            try:
                if not folder.name.startswith(".") and folder.is_dir() and os.path.lexists(folder / "model.onnx"):
                    names.append(folder.name)
            except OSError:
                continue
        return names

    def load_all(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a folder")
        with self._loading:
            for name in self._scan():
                self.load(name)

    def reload(self) -> ReloadReport:
        """Rescan the root: load new folders, reload changed ones (any entry of the folder with another
        inode, size or time), drop removed ones, keep the rest as they are. Requests already running on a
        replaced model finish on it."""
        report = ReloadReport()
        with self._loading:
            found = self._scan()
            for name in sorted(set(self.names()) - set(found)):
                self._drop(name)
                report.removed.append(name)
            for name in found:
                known = name in self._signatures
                if known and _signature(self.root / name) == self._signatures[name]:
                    report.unchanged.append(name)
                    continue
                self.load(name)
                (report.changed if known else report.added).append(name)
        log.info("models reloaded: %s", report)
        return report

    def load(self, name: str) -> None:
        """(Re)load one folder; the model is then either loaded or failed with a reason, never absent."""
        folder = self.root / name
        signature = _signature(folder)
        try:
            if not inside(folder, self.root):
                raise ModelLoadError("the model folder resolves outside the repository: refused")
            model = load_folder(name, folder, self.settings, self.batch)
        except Exception as error:  # one folder fails alone, whatever it holds
            reason = _reason(error)
            log.warning("model %s not loaded: %s", name, reason,  # a traceback for what nothing anticipated
                        exc_info=not isinstance(error, (ModelLoadError, RecursionError)))
            self._replace(name, None, reason, signature)
            return
        self._replace(name, model, "", signature)
        log.info("model %s loaded (%d tensors, %s)", name, len(model.layers), model.execution_provider)

    def _replace(self, name: str, model: LoadedModel | None, error: str, signature: tuple) -> None:
        with self._lock:
            old = self._models.pop(name, None)
            self._errors.pop(name, None)
            if model is not None:
                self._models[name] = model
            else:
                self._errors[name] = error
            self._signatures[name] = signature
        if old is not None and old is not model:
            old.probes.clear()

    def _drop(self, name: str) -> None:
        with self._lock:
            old = self._models.pop(name, None)
            self._errors.pop(name, None)
            self._signatures.pop(name, None)
        if old is not None:
            old.probes.clear()

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
