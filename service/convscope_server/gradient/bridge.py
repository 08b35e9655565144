"""ONNX -> torch bridge: convert a served model with onnx2pytorch, freeze it, and prove it on a probe.

The graph is first simplified with onnxslim (constant folding, so shape arithmetic is not re-run and
differentiated on every pass), and the simplified graph is used only if every tensor name survives;
otherwise the served graph is converted as it is. Either way every tensor keeps the ONNX name the
onnxruntime side uses, and ``capture`` hooks a tensor by that name. At conversion a seeded random input goes through both
onnxruntime and torch; a relative difference above 1e-4 (``probe_tolerance``: wider for graphs that
compute in float16 / bfloat16, which the module runs in float32) or any conversion error marks the model
gradient-unavailable with the reason, and forward methods keep working.

Device and precision belong to the converted model, never to a call site: techniques create tensors with
``TorchModel.tensor`` (on the module's device, float32) and read them back with ``as_numpy``. Precision
follows the model's policy: "exact" runs cuDNN convolutions and matmuls in full float32 (torch's default
for cuDNN is TF32, ~1e-3 relative off on an H100), "tf32" allows TF32 and widens the probe tolerance.
torch's TF32 switches are process-wide, so on CUDA jobs of models with different policies take turns
(:class:`PrecisionGate`); on CPU the switches mean nothing and nothing waits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from convscope_server.errors import FailedPrecondition
from convscope_server.onnx.graph import read_names, subgraphs

log = logging.getLogger("convscope_server")

# Largest relative difference of the logits, torch vs onnxruntime, on the probe input at load.
PROBE_TOLERANCE = {"exact": 1e-4, "tf32": 5e-3}


def set_tf32(allowed: bool) -> None:
    """torch's process-wide TF32 switches for cuDNN (convolutions) and CUDA matmuls. Set through the
    ``allow_tf32`` flags: in torch >= 2.9 they keep the newer per-operator ``fp32_precision`` settings
    consistent, while setting only ``cudnn.conv.fp32_precision`` leaves conv and RNN disagreeing, and any
    later reader of ``cudnn.allow_tf32`` (the dynamo ONNX exporter is one) raises."""
    import torch

    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed


def tf32_allowed() -> bool:
    import torch

    return bool(torch.backends.cudnn.allow_tf32)


class PrecisionGate:
    """Holds torch's TF32 switches at one precision while any job of that precision runs; a job of another
    precision waits until they are done. Jobs of the same precision run together."""

    def __init__(self):
        self._changed = threading.Condition()
        self._precision: str | None = None
        self._running = 0

    @contextlib.contextmanager
    def hold(self, precision: str):
        with self._changed:
            while self._running and self._precision != precision:
                self._changed.wait()
            if not self._running and self._precision != precision:
                set_tf32(precision == "tf32")
                self._precision = precision
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                if not self._running:
                    self._changed.notify_all()


class TorchModel:
    """A converted, frozen module plus the ONNX-name -> submodule map, its device and its precision."""

    def __init__(self, module, device, logits_index: int | None, precision: str = "exact",
                 gate: PrecisionGate | None = None):
        self.module = module
        self.device = device
        self.logits_index = logits_index  # which of several graph outputs holds the logits
        self.precision = precision
        self.probe_difference = float("nan")
        self.tolerance = PROBE_TOLERANCE[precision]  # what the load probe accepted (``probe_tolerance``)
        self._gate = gate or PrecisionGate()
        self.plan = ForwardPlan.of(module)

    def scope(self):
        """Hold torch's TF32 switches at this model's precision for a whole job (forward and backward);
        on CPU, where they mean nothing, it does nothing."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return self._gate.hold(self.precision)

    def tensor(self, array):
        """A numpy array (or torch tensor) as a float32 tensor on the module's device. Random numbers are
        drawn on the CPU with a seeded generator and moved here, so a seed gives the same image on every
        device."""
        import torch

        if isinstance(array, torch.Tensor):
            return array.to(self.device, torch.float32)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    @staticmethod
    def as_numpy(tensor) -> np.ndarray:
        return tensor.detach().cpu().numpy()

    def logits(self, x):
        """(N, ...) torch input -> (N, classes) logits."""
        out = self.module(x) if self.plan is None else self.plan.run(self.module, x)
        out = out[self.logits_index] if isinstance(out, (list, tuple)) else out
        return out.reshape(out.shape[0], -1)

    def producer(self, tensor_name: str):
        """(submodule, output index) computing ``tensor_name``, or None. Multi-output ops (Split) hold
        every output's name."""
        if not hasattr(self, "_producers"):
            mapping = self.module.mapping
            self._producers = {out: (mapping[node.output[0]], index)
                               for node in self.module.onnx_model.graph.node if node.output[0] in mapping
                               for index, out in enumerate(node.output) if out}
        found = self._producers.get(tensor_name)
        return None if found is None else (getattr(self.module, found[0]), found[1])

    @contextlib.contextmanager
    def capture(self, names: list[str], keep_grad: bool = False):
        """Within the block, ``store[name]`` holds the latest forward value of each tensor. With
        ``keep_grad``, ``store[name].grad`` is filled by backward; when nothing upstream needs a gradient
        the tensor becomes the start of the graph, so backward stops there instead of reaching the input."""
        store: dict = {}
        handles = []
        owner = threading.get_ident()  # the module is shared: other requests' forward passes run it meanwhile
        for name in names:
            found = self.producer(name)
            if found is None:
                raise FailedPrecondition(f"layer: {name!r} is not a node output the torch module can hook")
            module, index = found

            def hook(mod, inputs, output, name=name, index=index):
                if threading.get_ident() != owner:
                    return None
                several = isinstance(output, (list, tuple))
                value = output[index] if several else output
                if keep_grad:
                    if value.requires_grad:
                        value.retain_grad()
                    else:
                        value = value.detach().requires_grad_(True)
                store[name] = value
                if not several:
                    return value
                return type(output)([value if i == index else v for i, v in enumerate(output)])

            handles.append(module.register_forward_hook(hook))
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()


def _constant_bound(module, graph_inputs: dict, position: int):
    """The value of a Clip bound given as a constant input (or attribute), else None."""
    import torch

    value = graph_inputs.get(position)
    if value is None:
        value = module.min if position == 1 else module.max
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    return None if value is None else float(value)


def _fixed_clip(low: float, high: float):
    """nn.Hardtanh that also accepts (and ignores) the constant bound tensors onnx2pytorch passes."""
    import torch

    class FixedClip(torch.nn.Hardtanh):
        def forward(self, x, *constant_bounds):
            return super().forward(x)

    return FixedClip(low, high)


def _fast_clips(module, proto) -> int:
    """Swap onnx2pytorch's Clip (torch.clamp with tensor bounds) for nn.Hardtanh where both bounds are
    constants: the same forward, a faster kernel, and the gradient native relu6/hardtanh has at the bounds
    (0, where clamp with tensor bounds passes half). Returns how many were swapped."""
    import torch
    from onnx import numpy_helper

    values = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in proto.graph.initializer}
    swapped = 0
    for node in proto.graph.node:
        if node.op_type != "Clip" or node.output[0] not in module.mapping:
            continue
        name = module.mapping[node.output[0]]
        clip = getattr(module, name)
        given = {i: values.get(node.input[i]) for i in (1, 2) if len(node.input) > i and node.input[i]}
        if any(v is None for v in given.values()):
            continue  # a bound computed in the graph
        low, high = _constant_bound(clip, given, 1), _constant_bound(clip, given, 2)
        if low is None or high is None:
            continue
        setattr(module, name, _fixed_clip(low, high))
        swapped += 1
    return swapped


def _fast_layer_norms(module, proto) -> int:
    """Swap onnx2pytorch's LayerNorm (mean, subtraction, square, rsqrt and products as separate ops, each
    with its own backward) for torch's fused layer_norm where only the normalised output is used (Mean and
    InvStdDev outputs unread, as in every inference graph). Same function within float rounding; on
    ConvNeXt at 224 px it was most of the converted module's overhead over the native one. Returns how
    many were swapped."""
    import torch
    from onnx2pytorch.operations.layernorm import LayerNorm

    class FusedLayerNorm(LayerNorm):
        def forward(self, inputs, scale=None, bias=None):
            if inputs.dtype != self.accumulation_dtype:
                return super().forward(inputs, scale, bias)
            axis = self.axis if self.axis >= 0 else inputs.dim() + self.axis
            shape = tuple(inputs.shape[axis:])
            fits = scale is not None and tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape)
            out = torch.nn.functional.layer_norm(inputs, shape, scale if fits else None, bias if fits else None,
                                                 self.eps)
            if not fits:
                out = out if scale is None else out * scale
                out = out if bias is None else out + bias
            return out, None, None

    read = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    swapped = 0
    for node in proto.graph.node:
        if node.op_type != "LayerNormalization" or node.output[0] not in module.mapping:
            continue
        if any(name and name in read for name in node.output[1:]):
            continue  # a graph that reads the statistics keeps onnx2pytorch's op
        name = module.mapping[node.output[0]]
        original = getattr(module, name)
        if type(original) is not LayerNorm:
            continue
        setattr(module, name, FusedLayerNorm(original.eps, original.axis, original.stash_type))
        swapped += 1
    return swapped


def _instance_norm(eps: float, weight, bias, runtime: tuple[int, ...]):
    """InstanceNormalization as ONNX defines it: statistics of each sample's channel, never running
    statistics, then ``scale`` and ``B`` per channel. ``weight`` / ``bias``: the initializer values (None
    when that input arrives at run time); ``runtime``: the input positions (1 scale, 2 B) that do, in order.
    A subclass of onnx2pytorch's wrapper, so that its forward (and ``ForwardPlan``) pass it only the
    activations, as to the layer it replaces."""
    import torch
    from onnx2pytorch.operations import InstanceNormWrapper

    class InstanceNormalization(InstanceNormWrapper):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.eps, self.runtime = eps, runtime
            self.weight = None if weight is None else torch.nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, x, *given):
            values = {1: self.weight, 2: self.bias, **dict(zip(self.runtime, given))}
            scale, shift = values[1], values[2]
            if math.prod(x.shape[2:]) > 1:
                return torch.nn.functional.instance_norm(x, None, None, scale, shift, True, 0.0, self.eps)
            # one element per channel (torch's kernel refuses it): x - mean is 0, as onnxruntime computes
            dims = tuple(range(2, x.dim()))
            out = (x - x.mean(dims, keepdim=True)) / torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + self.eps)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out if scale is None else out * scale.reshape(shape)
            return out if shift is None else out + shift.reshape(shape)

    return InstanceNormalization()


def _instance_norms(module, proto) -> int:
    """Swap onnx2pytorch's InstanceNormWrapper for :func:`_instance_norm`. The wrapper builds a lazy norm
    when scale and B are not initializers (its parameters uninitialised, and tracking running statistics
    that in eval mode replace each sample's own), assigns a lone initializer to the scale whatever its
    position, and writes runtime values into its shared parameters on every call. Returns how many were
    swapped."""
    from onnx2pytorch.convert.operations import get_buffer_name
    from onnx2pytorch.operations import InstanceNormWrapper

    initializers = {init.name for init in proto.graph.initializer}
    swapped = 0
    for node in proto.graph.node:
        if node.op_type != "InstanceNormalization" or node.output[0] not in module.mapping:
            continue
        name = module.mapping[node.output[0]]
        if not isinstance(getattr(module, name), InstanceNormWrapper):
            continue
        inputs = {position: node.input[position] if len(node.input) > position else "" for position in (1, 2)}
        # the converted module holds every initializer as a buffer
        stored = {position: getattr(module, get_buffer_name(tensor)).clone() if tensor in initializers else None
                  for position, tensor in inputs.items()}
        runtime = tuple(position for position, tensor in inputs.items() if tensor and tensor not in initializers)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        setattr(module, name, _instance_norm(eps, stored[1], stored[2], runtime))
        swapped += 1
    return swapped


def _lazy_layers(module) -> list[str]:
    """ONNX node outputs whose onnx2pytorch layer still has uninitialised (lazy) parameters: its
    parameters are computed in the graph, not stored as constants, which the layer cannot take."""
    from torch.nn.parameter import is_lazy

    by_name = {}
    for out, name in module.mapping.items():
        by_name.setdefault(name, out)
    found = []
    for name, sub in module.named_children():
        if any(is_lazy(t) for t in (*sub.parameters(), *sub.buffers())):
            found.append(by_name.get(name, name))
    return found


def image_dependent(proto) -> set[str]:
    """Names of the tensors computed from the graph's inputs (not from weights and constants alone)."""
    initializers = {init.name for init in proto.graph.initializer}
    reached = {value.name for value in proto.graph.input if value.name not in initializers}
    for node in proto.graph.node:
        if any(name in reached for name in node.input):
            reached.update(out for out in node.output if out)
    return reached


# Inputs that onnx2pytorch's converters read from the graph's initializers alone, as the layer's parameters
# (op -> input positions). Fed by a Constant node instead (the TorchScript exporter writes GroupNorm as
# Reshape -> InstanceNormalization with Constant scale and bias), the layer is built lazily (its parameters
# uninitialised, a lazy norm tracking running statistics) or without a bias, and the values arrive as
# runtime inputs in the wrong positions: Conv and Gemm fail to build, InstanceNormalization and
# BatchNormalization take B for the scale.
PARAMETER_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "BatchNormalization": (1, 2, 3, 4),
                    "InstanceNormalization": (1, 2)}


def _float_types(proto) -> set[int]:
    """The ONNX float element types the graph stores or computes in: initializers, Constant values, Cast
    targets, and the declared types of its inputs, outputs and inferred tensors (subgraphs included)."""
    import onnx

    found: set[int] = set()

    def visit(graph):
        found.update(init.data_type for init in graph.initializer)
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                found.add(value.type.tensor_type.elem_type)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    found.add(attribute.t.data_type)
                elif node.op_type == "Cast" and attribute.name == "to":
                    found.add(attribute.i)
            for subgraph in subgraphs(node):
                visit(subgraph)

    visit(proto.graph)
    return found


# Below-float32 types, with the probe tolerance each needs. The torch module always computes in float32
# (``prepared_for_torch`` widens the graph; CPU kernels for half types are few and slow, and a float32
# gradient is what the techniques want), while onnxruntime runs the graph in its own type and rounds its
# tensors to it (at least the graph's half-type outputs; the CPU provider computes some ops in float32).
# The tolerance is 20 units of roundoff of the type (2^-11 for float16, 2^-8 for bfloat16), room for that
# rounding to build up over a few dozen layers; a tiny CNN with float16 weights and I/O measured 2e-4.
LOW_PRECISION_TOLERANCE = {"float16": 20 * 2.0 ** -11, "bfloat16": 20 * 2.0 ** -8}


def graph_precision(proto) -> str:
    """The lowest float precision the served graph computes the image in: "bfloat16", "float16" or
    "float32", from the types of the image-dependent tensors (declared or inferred) and of the casts
    applied to them. Weights merely stored in a half type and cast to float32 compute in float32."""
    import onnx

    graph = proto.graph
    dependent = image_dependent(proto)
    types = {value.type.tensor_type.elem_type for value in (*graph.input, *graph.output, *graph.value_info)
             if value.name in dependent and value.type.HasField("tensor_type")}
    types.update(a.i for node in graph.node if node.op_type == "Cast" and node.input and node.input[0] in dependent
                 for a in node.attribute if a.name == "to")
    if onnx.TensorProto.BFLOAT16 in types:
        return "bfloat16"
    return "float16" if onnx.TensorProto.FLOAT16 in types else "float32"


def probe_tolerance(model) -> float:
    """The largest relative difference of the logits, torch vs onnxruntime, the load probe accepts: the
    policy's (:data:`PROBE_TOLERANCE`), widened for a graph that computes in a half type."""
    return max(PROBE_TOLERANCE[model.precision], LOW_PRECISION_TOLERANCE.get(graph_precision(model.proto), 0.0))


def _widen_to_float32(graph, kinds: set[int]) -> None:
    """Every tensor of an element type in ``kinds`` becomes float32, in ``graph`` and its subgraphs:
    initializers, Constant / ConstantOfShape values, Cast targets, ``dtype`` attributes and declared types."""
    import onnx
    from onnx import numpy_helper

    def widened(tensor):
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)

    for index, init in enumerate(graph.initializer):
        if init.data_type in kinds:
            graph.initializer[index].CopyFrom(widened(init))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in kinds:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in kinds:
                attribute.t.CopyFrom(widened(attribute.t))
            elif (attribute.type == onnx.AttributeProto.INT and attribute.i in kinds
                  and (node.op_type, attribute.name) in (("Cast", "to"), ("EyeLike", "dtype"),
                                                         ("RandomNormal", "dtype"), ("RandomUniform", "dtype"),
                                                         ("RandomNormalLike", "dtype"),
                                                         ("RandomUniformLike", "dtype"))):
                attribute.i = onnx.TensorProto.FLOAT
        for subgraph in subgraphs(node):
            _widen_to_float32(subgraph, kinds)


def _constant_value(node):
    """The value of a Constant node as a numpy array, or None (sparse and string constants)."""
    from onnx import numpy_helper

    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.array(attribute.f, np.float32)
        if attribute.name == "value_floats":
            return np.array(attribute.floats, np.float32)
        if attribute.name == "value_int":
            return np.array(attribute.i, np.int64)
        if attribute.name == "value_ints":
            return np.array(attribute.ints, np.int64)
    return None


def _constant_parameters(graph) -> int:
    """Parameter inputs (:data:`PARAMETER_INPUTS`) computed from constants alone by Constant nodes, or by
    Identity / Cast of a constant, become initializers of their own, and the layer reads those; the
    Constant / Identity / Cast nodes nothing else reads are dropped. Returns how many inputs were
    rewired."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    taken = set(initializers) | {out for node in graph.node for out in node.output} | {v.name for v in graph.input}
    values: dict[str, object] = {}       # constant tensors that are not initializers, computed lazily
    sources: dict[str, int] = {}          # their producing node's index

    def value(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        found = values[name]
        return found() if callable(found) else found

    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and len(node.output) == 1:
            found = _constant_value(node)
            if found is not None:
                values[node.output[0]], sources[node.output[0]] = found, index
        elif node.op_type in ("Identity", "Cast") and node.input and (node.input[0] in values
                                                                     or node.input[0] in initializers):
            source = node.input[0]
            if node.op_type == "Identity":
                values[node.output[0]] = lambda source=source: value(source)
            else:
                to = next(a.i for a in node.attribute if a.name == "to")
                dtype = helper.tensor_dtype_to_np_dtype(to)
                values[node.output[0]] = lambda source=source, dtype=dtype: np.asarray(value(source)).astype(dtype)
            sources[node.output[0]] = index
    made: dict[str, str] = {}
    rewired = 0
    for node in graph.node:
        for position in PARAMETER_INPUTS.get(node.op_type, ()):
            if position >= len(node.input) or node.input[position] not in values:
                continue
            name = node.input[position]
            if name not in made:
                fresh, suffix = f"{name}:parameter", 1
                while fresh in taken:
                    fresh, suffix = f"{name}:parameter{suffix}", suffix + 1
                taken.add(fresh)
                graph.initializer.append(numpy_helper.from_array(np.asarray(value(name)), fresh))
                made[name] = fresh
            node.input[position] = made[name]
            rewired += 1
    chain = set()  # the nodes that computed the rewired inputs, back to their Constant
    for name in made:
        while name in sources and sources[name] not in chain:
            chain.add(sources[name])
            name = graph.node[sources[name]].input[0] if graph.node[sources[name]].input else ""
    outputs = {o.name for o in graph.output}
    for index in sorted(chain, reverse=True):  # the last first: a chain's nodes become unread in turn
        read = read_names(graph)
        if not any(out in read or out in outputs for out in graph.node[index].output):
            del graph.node[index]
    return rewired


def prepared_for_torch(proto):
    """A copy of ``proto`` rewritten where onnx2pytorch would fail, every image-dependent tensor kept:

    - Half-precision graphs (float16 / bfloat16 weights, inputs, outputs or casts) become float32: the
      torch module computes in float32, as the techniques' tensors are (``TorchModel.tensor``), and the
      load probe's tolerance follows the served graph's own precision (:func:`probe_tolerance`).
    - BatchNormalization's ``training_mode = 0`` (opset >= 14 exports, e.g. a BN after a Concat) says
      what inference means anyway and is dropped; onnx2pytorch refuses the attribute.
    - Parameters computed from constants by nodes (:data:`PARAMETER_INPUTS`; GroupNorm as the TorchScript
      exporter writes it) are read from initializers of their own (:func:`_constant_parameters`).
    - Weights fed through Identity nodes (the legacy exporter shares bit-identical initializers that
      way): consumers read the initializer itself, as onnx2pytorch's layers expect parameters to be.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    kinds = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    if _float_types(copy) & kinds:
        _widen_to_float32(graph, kinds)
    constant = {init.name for init in graph.initializer}
    aliases: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in constant | set(aliases):
            aliases[node.output[0]] = aliases.get(node.input[0], node.input[0])
        if node.op_type == "BatchNormalization":
            kept = [a for a in node.attribute if not (a.name == "training_mode" and a.i == 0)]
            del node.attribute[:]
            node.attribute.extend(kept)
    for node in graph.node:
        if node.op_type != "Identity":
            for index, name in enumerate(node.input):
                if name in aliases:
                    node.input[index] = aliases[name]
    _constant_parameters(graph)
    return copy


def simplified(proto):
    """onnxslim's simplification of ``proto`` when it keeps every image-dependent tensor name (those are
    what requests name), else ``proto``."""
    try:
        import onnx
        import onnxslim

        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        slim = onnxslim.slim(copy)
    except Exception:  # onnxslim missing or failing: the served graph converts as it is
        return proto
    wanted = image_dependent(proto)
    kept = {out for node in slim.graph.node for out in node.output} | {i.name for i in slim.graph.initializer}
    return slim if wanted <= kept else proto


def hookable(module) -> int:
    """Make every op of a converted module an nn.Module, so that every tensor name can be hooked:
    onnx2pytorch keeps Concat as ``functools.partial(torch.cat)`` and unknown ops as plain torch
    functions. Returns how many were wrapped."""
    import functools

    import torch

    class Concat(torch.nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.dim = dim

        def forward(self, *tensors):
            return torch.cat(tensors, dim=self.dim)

    class Function(torch.nn.Module):
        def __init__(self, function):
            super().__init__()
            self.function = function

        def forward(self, *args):
            return self.function(*args)

    wrapped = 0
    for name in set(module.mapping.values()):
        op = getattr(module, name)
        if isinstance(op, torch.nn.Module):
            continue
        if isinstance(op, functools.partial) and op.func is torch.cat:
            op = Concat(op.keywords.get("dim", op.keywords.get("axis", 0)))
        else:
            op = Function(op)
        delattr(module, name)
        setattr(module, name, op)
        wrapped += 1
    return wrapped


def _scalars(graph) -> dict[str, float]:
    """One-element constants (initializers and Constant node outputs) by name."""
    from onnx import numpy_helper

    tensors = {init.name: init for init in graph.initializer}
    tensors.update((node.output[0], node.attribute[0].t) for node in graph.node
                   if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value")
    found = {}
    for name, tensor in tensors.items():
        if math.prod(tensor.dims) == 1:
            found[name] = float(numpy_helper.to_array(tensor).reshape(()))
    return found


def erf_gelus(graph) -> list[list[int]]:
    """Node indices of each exact GELU as exporters before opset 20 write it, x * 0.5 * (1 + erf(x / sqrt 2)):
    Div(x, sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5), each intermediate read only by the next node."""
    scalars = _scalars(graph)
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            readers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}

    def only_reader(index):
        out = graph.node[index].output[0]
        found = readers.get(out, [])
        return found[0] if len(found) == 1 and out not in outputs else None

    found = []
    for index, div in enumerate(graph.node):
        if div.op_type != "Div" or len(div.input) != 2 or abs(scalars.get(div.input[1], 0) - math.sqrt(2)) > 1e-4:
            continue
        x = div.input[0]
        steps = (("Erf", None), ("Add", lambda o: scalars.get(o) == 1.0), ("Mul", lambda o: o == x),
                 ("Mul", lambda o: scalars.get(o) == 0.5))
        chain = [index]
        for op, operand_ok in steps:
            following = only_reader(chain[-1])
            if following is None or graph.node[following].op_type != op:
                break
            node, previous = graph.node[following], graph.node[chain[-1]].output[0]
            if operand_ok is not None:
                operands = list(node.input)
                if len(operands) != 2 or previous not in operands:
                    break
                operands.remove(previous)
                if not operand_ok(operands[0]):
                    break
            chain.append(following)
        if len(chain) == 5:
            found.append(chain)
    return found


def decomposed_layer_norms(graph) -> list[tuple[list[int], list[int], float]]:
    """(node indices, axes, eps) of each LayerNorm written out as exporters before opset 17 do:
    ReduceMean(x) -> Sub(x, mean) -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(x - mean, sqrt), each
    intermediate read only inside the chain (the scale and bias after it stay separate ops)."""
    scalars = _scalars(graph)
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in set(node.input):
            readers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}

    def read_by(index) -> list[int]:
        out = graph.node[index].output[0]
        return [] if out in outputs else readers.get(out, [])

    def axes_of(node):
        found = [list(a.ints) for a in node.attribute if a.name == "axes"]
        keep = [a.i for a in node.attribute if a.name == "keepdims"]
        return (found[0] if found else None) if (not keep or keep[0] == 1) and len(node.input) == 1 else None

    found = []
    for first, mean in enumerate(graph.node):
        axes = axes_of(mean) if mean.op_type == "ReduceMean" else None
        if not axes:
            continue
        x = mean.input[0]
        subs = read_by(first)
        if len(subs) != 1 or graph.node[subs[0]].op_type != "Sub" or list(graph.node[subs[0]].input) != [
                x, mean.output[0]]:
            continue
        sub = subs[0]
        users = sorted(read_by(sub), key=lambda i: graph.node[i].op_type)  # Div, Pow
        if [graph.node[i].op_type for i in users] != ["Div", "Pow"]:
            continue
        div, pow_ = users
        if scalars.get(graph.node[pow_].input[1]) != 2.0:
            continue
        chain, current = [first, sub, pow_], pow_
        for op in ("ReduceMean", "Add", "Sqrt"):
            following = read_by(current)
            if len(following) != 1 or graph.node[following[0]].op_type != op:
                break
            chain.append(following[0])
            current = following[0]
        if len(chain) != 6 or axes_of(graph.node[chain[3]]) != axes:
            continue
        add = graph.node[chain[4]]
        eps = scalars.get(add.input[1] if add.input[0] == graph.node[chain[3]].output[0] else add.input[0])
        if eps is None or read_by(chain[5]) != [div] or list(graph.node[div].input) != [
                graph.node[sub].output[0], graph.node[chain[5]].output[0]]:
            continue
        found.append((sorted(chain + [div]), axes, eps))
    return found


class _Fused:
    """The op of one plan step standing for several exported nodes that one torch function computes
    (``function(x)``, or None when it does not apply to this input): that function when none of the ops has
    a hook (nothing asks for the intermediate tensors), else the ops as exported. Equal within float
    rounding."""

    def __init__(self, steps, x: int, out: int, function):
        self.steps, self.x, self.out, self.function = steps, x, out, function

    def hooked(self, module) -> bool:
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(getattr(module, step[0])._forward_hooks or getattr(module, step[0])._forward_pre_hooks
                   for step in self.steps)

    def run(self, module, values, run_step) -> None:
        value = None if self.hooked(module) else self.function(values[self.x])
        if value is None:
            for step in self.steps:
                run_step(step)
        else:
            values[self.out] = value


def _gelu(x):
    import torch

    return torch.nn.functional.gelu(x)


def _layer_norm(axes: list[int], eps: float):
    def normalise(x):
        import torch

        dims = sorted(a % x.dim() for a in axes)
        if dims != list(range(x.dim() - len(dims), x.dim())):
            return None  # not the trailing axes: the ops as exported
        return torch.nn.functional.layer_norm(x, x.shape[dims[0]:], eps=eps)

    return normalise


class ForwardPlan:
    """onnx2pytorch's ``ConvertModel.forward`` walks the ONNX graph in Python on every call: a deep copy of
    its bookkeeping, dict look-ups and type checks per node (about 1.3 ms a call on efficientnet_lite0's 94
    nodes for the deep copy alone), which a GPU step of a few milliseconds cannot hide. The plan makes
    the same calls with those decisions taken once: which inputs each op gets (activations, initializers,
    omitted optionals), where each output goes, and when an activation is last needed. Every op is still
    the module's own submodule, so forward hooks (``capture``, the backprop rules) fire as before.
    ``of`` returns None for graphs with ops the plan does not replay (loops, subgraphs): those keep the
    module's own forward."""

    def __init__(self, steps, inputs: int, outputs: list[int], slots: int):
        self.steps, self.inputs, self.outputs, self.slots = steps, inputs, outputs, slots

    @classmethod
    def of(cls, module) -> ForwardPlan | None:
        try:
            import torch
            from onnx2pytorch.constants import COMPOSITE_LAYERS, MULTIOUTPUT_LAYERS, STANDARD_LAYERS
            from onnx2pytorch.convert.operations import Loop, SubgraphOperator, get_buffer_name

            graph, mapping = module.onnx_model.graph, module.mapping
        except (ImportError, AttributeError):
            return None

        def composite_of(op, kinds):
            return isinstance(op, kinds) or (isinstance(op, COMPOSITE_LAYERS)
                                             and any(isinstance(m, kinds) for m in op.modules()))

        slot = {name: index for index, name in enumerate(module.input_names)}
        steps = []
        for node in graph.node:
            name = mapping[node.output[0]]
            op = getattr(module, name)
            if isinstance(op, (Loop, SubgraphOperator)):
                return None
            standard = composite_of(op, STANDARD_LAYERS)
            sources = []
            for tensor in node.input:
                if tensor in slot:
                    sources.append(("activation", slot[tensor]))
                elif standard:
                    continue  # parameters live in the layer itself
                elif tensor == "":
                    sources.append(("omitted", None))
                else:
                    buffer = get_buffer_name(tensor)
                    if not hasattr(module, buffer):
                        return None
                    sources.append(("initializer", buffer))
            while sources and sources[-1][0] == "omitted":
                sources.pop()
            if isinstance(op, torch.nn.Identity):
                sources = sources[:1]
            multi = composite_of(op, MULTIOUTPUT_LAYERS)
            outs = []
            for index, out in enumerate(node.output if multi else node.output[:1]):
                slot[out or f"unused:{node.output[0]}:{index}"] = len(slot)
                outs.append(slot[out or f"unused:{node.output[0]}:{index}"])
            steps.append([name, sources, outs, multi, []])
        outputs = [slot[name] for name in module.output_names]
        fusions = [(chain, _gelu) for chain in erf_gelus(graph)]
        fusions += [(chain, _layer_norm(axes, eps)) for chain, axes, eps in decomposed_layer_norms(graph)]
        for chain, function in fusions:  # one step per node: node index = step index
            inner = [steps[i] for i in chain]
            fused = _Fused(inner, inner[0][1][0][1], inner[-1][2][0], function)
            sources = [source for step in inner for source in step[1]]
            steps[chain[-1]] = [fused, sources, inner[-1][2], False, []]  # where the result appears
            for i in chain[:-1]:
                steps[i] = None  # what lies between reads none of the chain's intermediates
        steps = [step for step in steps if step is not None]
        last_use: dict[int, int] = {}
        for index, step in enumerate(steps):
            for kind, value in step[1]:
                if kind == "activation":
                    last_use[value] = index
        for value, index in last_use.items():
            if value not in outputs:
                steps[index][4].append(value)  # free it once its last consumer has run
        return cls([tuple(step) for step in steps], len(module.input_names), outputs, len(slot))

    def run(self, module, *inputs):
        values: list = [None] * self.slots
        values[: self.inputs] = inputs

        def run_step(step):
            name, sources, outs, multi, done = step
            args = [values[v] if kind == "activation" else None if kind == "omitted" else getattr(module, v)
                    for kind, v in sources]
            result = getattr(module, name)(*args)
            if multi:
                for out, value in zip(outs, result):
                    values[out] = value
            else:
                values[outs[0]] = result
            for value in done:
                values[value] = None

        for step in self.steps:
            if isinstance(step[0], _Fused):
                step[0].run(module, values, run_step)
                for value in step[4]:
                    values[value] = None
            else:
                run_step(step)
        results = [values[index] for index in self.outputs]
        return results[0] if len(results) == 1 else results


def torch_device(device: str):
    """The torch device for the server's ``--device``: CUDA when allowed and present, else CPU."""
    import torch

    return torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")


def _convert(model, device, gate: PrecisionGate) -> TorchModel:
    from onnx2pytorch import ConvertModel

    graph = simplified(prepared_for_torch(model.proto))
    module = ConvertModel(graph, experimental=True)
    _fast_clips(module, graph)
    _fast_layer_norms(module, graph)
    _instance_norms(module, graph)
    lazy = _lazy_layers(module)
    if lazy:
        raise NotImplementedError(f"the parameters of {', '.join(map(repr, lazy[:3]))} are computed in the graph, "
                                  f"not stored as constants; onnx2pytorch's layer needs them stored")
    hookable(module)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    outputs = [o.name for o in model.proto.graph.output]
    index = outputs.index(model.config.logits_output) if len(outputs) > 1 else None
    return TorchModel(module.to(device), device, index, model.precision, gate)


def _probe_difference(model, torch_model: TorchModel) -> float:
    import torch

    from convscope_server.images import sample_shape
    from convscope_server.onnx.session import INPUT_DATATYPES

    batch = model.fixed_batch or 2
    rng = np.random.default_rng(0)
    shape = (batch, *sample_shape(model.config))
    dtype = INPUT_DATATYPES[model.config.input_datatype]
    if np.issubdtype(dtype, np.floating):  # values the graph's type holds, so both sides see the same input
        x = rng.normal(size=shape).astype(dtype).astype(np.float32)
    else:  # integer pixels for uint8 graphs, values in the type's range for the others
        x = rng.integers(0, 256, size=shape).astype(np.float32)
    (expected,) = model.run(x, [model.config.logits_output])
    with torch.no_grad():
        got = torch_model.as_numpy(torch_model.logits(torch_model.tensor(x))).astype(np.float64)
    expected = np.asarray(expected, np.float64).reshape(len(x), -1)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))


CONVERTING = "converting the model for gradient methods"  # the progress stage while a first call waits


class TorchBridges:
    """Converts each model in the background from start-up (:meth:`warm`) or on its first gradient request,
    and keeps the result (or the reason it failed). Conversions run one at a time; a request for a model
    still waiting in the queue converts it at once instead of waiting behind the others. At most
    ``capacity`` converted modules are kept (each holds a copy of the weights, on the GPU when there is
    one): the least recently used is dropped, and converted again when next asked for."""

    def __init__(self, device: str = "auto", capacity: int = 8):
        self.device = device
        self.capacity = max(1, capacity)
        self.gate = PrecisionGate()
        self._jobs: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convscope-convert")

    def warm(self, models) -> None:
        """Queue the conversion of the first ``capacity`` models, so their first gradient call finds
        the module ready."""
        with self._lock:
            for model in list(models)[: self.capacity]:
                if model.name not in self._jobs:
                    self._jobs[model.name] = self._queue.submit(self._build, model)

    def get(self, model) -> TorchModel:
        with self._lock:
            job = self._jobs.get(model.name)
            if job is None or job.cancel():  # not queued, or queued and not started: convert here
                job = Future()
                self._jobs[model.name] = job
                job.set_running_or_notify_cancel()
                inline = True
            else:
                inline = False
            self._jobs.move_to_end(model.name)
        if inline:
            job.set_result(self._build(model))
            self._evict()
        done = job.result()
        if isinstance(done, str):
            raise FailedPrecondition(f"model: {model.name!r} has no gradient path: {done}")
        return done

    def _evict(self) -> None:
        """Drop the least recently used converted modules beyond ``capacity``. Jobs still running keep
        their module until they finish; failures (a reason string) cost nothing and are kept."""
        with self._lock:
            ready = [name for name, job in self._jobs.items()
                     if job.done() and not job.cancelled() and isinstance(job.result(), TorchModel)]
            for name in ready[: max(0, len(ready) - self.capacity)]:
                del self._jobs[name]
                log.info("model %s: torch module dropped (least recently used of %d)", name, self.capacity)

    def status(self, name: str) -> tuple[str, str, TorchModel | None]:
        """(state, reason, module): state is "not converted", "converting", "ready" or "unavailable"."""
        with self._lock:
            job = self._jobs.get(name)
        if job is None or job.cancelled():
            return "not converted", "", None
        if not job.done():
            return "converting", "", None
        done = job.result()
        return ("unavailable", done, None) if isinstance(done, str) else ("ready", "", done)

    def pending(self, name: str) -> bool:
        """True while a gradient request for ``name`` would wait for its conversion (streamed calls say so
        first: ``CONVERTING``)."""
        return self.status(name)[0] in ("not converted", "converting")

    def forget(self, name: str) -> None:
        """Drop what is known of ``name`` (its file was replaced or removed): the next gradient request
        converts the model as it is now. A conversion already running finishes for nobody."""
        with self._lock:
            job = self._jobs.pop(name, None)
        if job is not None:
            job.cancel()

    def shutdown(self) -> None:
        self._queue.shutdown(wait=False, cancel_futures=True)

    def _build(self, model) -> TorchModel | str:
        try:
            import torch  # noqa: F401
            import onnx2pytorch  # noqa: F401
        except ImportError as error:
            return f"the server has no torch/onnx2pytorch installed ({error}); install convscope[gradient]"
        device = torch_device(self.device)
        try:
            torch_model = _convert(model, device, self.gate)
        except Exception as error:  # onnx2pytorch raises NotImplementedError / KeyError / ... per op
            return f"onnx2pytorch cannot convert the graph: {type(error).__name__}: {error}"
        tolerance = probe_tolerance(model)
        try:
            with torch_model.scope():
                difference = _probe_difference(model, torch_model)
        except Exception as error:
            return f"the converted module fails on a probe input: {type(error).__name__}: {error}"
        if not difference <= tolerance:
            return (f"the converted module disagrees with onnxruntime on a probe input (relative difference "
                    f"{difference:.2e} > {tolerance:.1e} for precision {torch_model.precision!r}, "
                    f"{graph_precision(model.proto)} graph)")
        torch_model.probe_difference, torch_model.tolerance = difference, tolerance
        log.info("model %s: torch module ready on %s (probe difference %.1e)", model.name, device, difference)
        return torch_model
