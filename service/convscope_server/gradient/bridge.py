"""ONNX -> torch bridge: convert a served model with onnx2pytorch, freeze it, and prove it on a probe.

The graph is first simplified with onnxslim (constant folding, so shape arithmetic is not re-run and
differentiated on every pass), and the simplified graph is used only if every tensor name survives;
otherwise the served graph is converted as it is. Either way every tensor keeps the ONNX name the
onnxruntime side uses, and ``capture`` hooks a tensor by that name. At conversion a seeded random input goes through both
onnxruntime and torch; a relative difference above 1e-4 (or any conversion error) marks the model
gradient-unavailable with the reason, and forward methods keep working.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from convscope_server.errors import FailedPrecondition

PROBE_TOLERANCE = 1e-4


class TorchModel:
    """A converted, frozen module plus the ONNX-name -> submodule map."""

    def __init__(self, module, device, logits_index: int | None):
        self.module = module
        self.device = device
        self.logits_index = logits_index  # which of several graph outputs holds the logits

    def logits(self, x):
        """(N, ...) torch input -> (N, classes) logits."""
        out = self.module(x)
        out = out[self.logits_index] if isinstance(out, (list, tuple)) else out
        return out.reshape(out.shape[0], -1)

    def submodule(self, tensor_name: str):
        name = self.module.mapping.get(tensor_name)
        return None if name is None else getattr(self.module, name)

    @contextlib.contextmanager
    def capture(self, names: list[str], keep_grad: bool = False):
        """Within the block, ``store[name]`` holds the latest forward value of each tensor. With
        ``keep_grad``, ``store[name].grad`` is filled by backward; when nothing upstream needs a gradient
        the tensor becomes the start of the graph, so backward stops there instead of reaching the input."""
        store: dict = {}
        handles = []
        for name in names:
            module = self.submodule(name)
            if module is None:
                raise FailedPrecondition(f"layer: {name!r} is not a node output the torch module can hook")

            def hook(mod, inputs, output, name=name):
                if keep_grad:
                    if output.requires_grad:
                        output.retain_grad()
                    else:
                        output = output.detach().requires_grad_(True)
                store[name] = output
                return output

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


def simplified(proto):
    """onnxslim's simplification of ``proto`` when it keeps every node-output name, else ``proto``."""
    try:
        import onnx
        import onnxslim

        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        slim = onnxslim.slim(copy)
    except Exception:  # onnxslim missing or failing: the served graph converts as it is
        return proto
    wanted = {out for node in proto.graph.node if node.op_type != "Constant" for out in node.output if out}
    kept = {out for node in slim.graph.node for out in node.output} | {i.name for i in slim.graph.initializer}
    return slim if wanted <= kept else proto


def _convert(model, device: str) -> TorchModel:
    import torch
    from onnx2pytorch import ConvertModel

    graph = simplified(model.proto)
    module = ConvertModel(graph, experimental=True)
    _fast_clips(module, graph)
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    target = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    outputs = [o.name for o in model.proto.graph.output]
    index = outputs.index(model.config.logits_output) if len(outputs) > 1 else None
    return TorchModel(module.to(target), target, index)


def _probe_difference(model, torch_model: TorchModel) -> float:
    import torch

    from convscope_server.images import sample_shape

    batch = model.fixed_batch or 2
    x = np.random.default_rng(0).normal(size=(batch, *sample_shape(model.config))).astype(np.float32)
    (expected,) = model.session.run([model.config.logits_output], {model.config.input_name: x})
    with torch.no_grad():
        got = torch_model.logits(torch.from_numpy(x).to(torch_model.device)).cpu().numpy()
    expected = expected.reshape(len(x), -1)
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))


class TorchBridges:
    """Converts each model on first use, keeps the result (or the reason it failed)."""

    def __init__(self, device: str = "auto"):
        self.device = device
        self._done: dict[str, TorchModel | str] = {}
        self._lock = threading.Lock()

    def get(self, model) -> TorchModel:
        with self._lock:
            done = self._done.get(model.name)
            if done is None:
                done = self._build(model)
                self._done[model.name] = done
        if isinstance(done, str):
            raise FailedPrecondition(f"model: {model.name!r} has no gradient path: {done}")
        return done

    def status(self, name: str) -> str | None:
        """None when not converted yet, "" when ready, else the reason it is unavailable."""
        done = self._done.get(name)
        return None if done is None else "" if isinstance(done, TorchModel) else done

    def _build(self, model) -> TorchModel | str:
        try:
            import torch  # noqa: F401
            import onnx2pytorch  # noqa: F401
        except ImportError as error:
            return f"the server has no torch/onnx2pytorch installed ({error}); install convscope[gradient]"
        try:
            torch_model = _convert(model, self.device)
        except Exception as error:  # onnx2pytorch raises NotImplementedError / KeyError / ... per op
            return f"onnx2pytorch cannot convert the graph: {type(error).__name__}: {error}"
        try:
            difference = _probe_difference(model, torch_model)
        except Exception as error:
            return f"the converted module fails on a probe input: {type(error).__name__}: {error}"
        if not difference <= PROBE_TOLERANCE:
            return (f"the converted module disagrees with onnxruntime on a probe input (relative difference "
                    f"{difference:.2e} > {PROBE_TOLERANCE:.0e})")
        return torch_model
