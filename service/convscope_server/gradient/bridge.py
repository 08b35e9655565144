"""ONNX -> torch bridge: convert a served model with onnx2pytorch, freeze it, and prove it on a probe.

The graph is first simplified with onnxslim (constant folding, so shape arithmetic is not re-run and
differentiated on every pass), and the simplified graph is used only if every tensor name survives;
otherwise the served graph is converted as it is. Either way every tensor keeps the ONNX name the
onnxruntime side uses, and ``capture`` hooks a tensor by that name. At conversion a seeded random input goes through both
onnxruntime and torch; a relative difference above 1e-4 (or any conversion error) marks the model
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


def image_dependent(proto) -> set[str]:
    """Names of the tensors computed from the graph's inputs (not from weights and constants alone)."""
    initializers = {init.name for init in proto.graph.initializer}
    reached = {value.name for value in proto.graph.input if value.name not in initializers}
    for node in proto.graph.node:
        if any(name in reached for name in node.input):
            reached.update(out for out in node.output if out)
    return reached


def prepared_for_torch(proto):
    """A copy of ``proto`` rewritten where onnx2pytorch would fail, every image-dependent tensor kept:

    - BatchNormalization's ``training_mode = 0`` (opset >= 14 exports, e.g. a BN after a Concat) says
      what inference means anyway and is dropped; onnx2pytorch refuses the attribute.
    - Weights fed through Identity nodes (the legacy exporter shares bit-identical initializers that
      way): consumers read the initializer itself, as onnx2pytorch's layers expect parameters to be.
    """
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
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

    batch = model.fixed_batch or 2
    rng = np.random.default_rng(0)
    shape = (batch, *sample_shape(model.config))
    if model.config.input_datatype == "FP32":
        x = rng.normal(size=shape).astype(np.float32)
    else:  # integer pixels for uint8 graphs, values in the type's range for the others
        x = rng.integers(0, 256, size=shape).astype(np.float32)
    (expected,) = model.run(x, [model.config.logits_output])
    with torch.no_grad():
        got = torch_model.as_numpy(torch_model.logits(torch_model.tensor(x)))
    expected = expected.reshape(len(x), -1)
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
        tolerance = PROBE_TOLERANCE[torch_model.precision]
        try:
            with torch_model.scope():
                difference = _probe_difference(model, torch_model)
        except Exception as error:
            return f"the converted module fails on a probe input: {type(error).__name__}: {error}"
        if not difference <= tolerance:
            return (f"the converted module disagrees with onnxruntime on a probe input (relative difference "
                    f"{difference:.2e} > {tolerance:.0e} for precision {torch_model.precision!r})")
        torch_model.probe_difference = difference
        log.info("model %s: torch module ready on %s (probe difference %.1e)", model.name, device, difference)
        return torch_model
