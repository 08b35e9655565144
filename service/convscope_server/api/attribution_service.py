"""AttributionService: saliency (vanilla, SmoothGrad, Integrated Gradients), guided backprop / DeconvNet,
Grad-CAM / Grad-CAM++ on the torch module converted from the model's ONNX file."""

from __future__ import annotations

import time

import numpy as np

from convscope.v1 import attribution_pb2, attribution_pb2_grpc, tensor_pb2
from convscope_server import render
from convscope_server.api.common import (stream_within, channel_axis as common_channel_axis, check_finite, check_passes, finite,
                                         input_axes, neuron_position, positive, resolve_target, sample_bytes,
                                         single_input, spatial_layer)
from convscope_server.api.model_service import require_model
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.forward import activations as acts
from convscope_server.forward.backend import OrtBackend
from convscope_server.forward.class_activation import class_activation_map, find_linear_head
from convscope_server.gradient import attribution, backprop, cam, sanity, segmentation
from convscope_server.gradient.bridge import CONVERTING
from convscope_server.images import MAX_INPUT_MAGNITUDE
from convscope_server.memory import Budget, release
from convscope_server.tensors import to_tensor

MAX_IG_STEPS = 1000  # Integrated Gradients steps: Gauss-Legendre nodes come from an n x n eigenproblem


def last_spatial_layer(model):
    """The default CAM layer: the last tensor in graph order before the logits that is 4-D float with a known
    layout and a height or width other than 1 (the last conv block's activation, before global pooling);
    None when there is none. The client's ``Client.last_spatial_layer`` applies the same rule to Describe."""
    found = None
    for layer in model.layers:
        if layer.name == model.config.logits_output:
            break
        if (layer.op_type != "Input" and layer.layout and layer.datatype in ("FP32", "FP16", "FP64")
                and any(layer.shape[axis] != 1 for axis in layer.axes)):
            found = layer
    return found


def converting_event(bridges, model, event_type):
    """A progress event saying the model's first gradient call waits for its conversion, or None when the
    torch module is ready (or known to be unavailable)."""
    if not bridges.pending(model.name):
        return None
    return event_type(progress=tensor_pb2.Progress(step=0, total=0, stage=CONVERTING))


class AttributionService(attribution_pb2_grpc.AttributionServiceServicer):
    def __init__(self, repository, bridges, limits):
        self.repository = repository
        self.bridges = bridges
        self.limits = limits

    def _prepare(self, request, budget=None, needs_class: bool = True):
        """(model, torch model, sample, target) for a request with model, image and optional target. A request
        that explains a layer's unit, not a class (``needs_class`` False), also serves a model with no class
        scores: its target is then 0 and unused."""
        model = require_model(self.repository, request.model)
        torch_model = self.bridges.get(model)
        sample = single_input(model, request, self.limits, budget or Budget())
        if not needs_class and model.no_classes:
            return model, torch_model, sample, 0
        target = resolve_target(model, OrtBackend(model), request, sample)
        return model, torch_model, sample, target

    def _result(self, model, sample, target, attributed, shown, passes, render_it, heat=None):
        check_finite([attributed, shown], "image", "the gradients overflow float32 for this input")
        result = attribution_pb2.AttributionResult(target=target, label=model.label(target), backward_passes=passes)
        to_tensor(attributed.astype(np.float32), out=result.attribution)
        to_tensor(shown.astype(np.float32), out=result.map)
        if render_it:
            heat = render.normalize_robust(shown) if heat is None else heat
            result.heatmap_png = render.png(render.colormap(heat))
            result.overlay_png = render.png(render.overlay(render.display_image(sample, model.config), heat))
        return result

    def Saliency(self, request, context):
        budget = Budget()
        try:
            yield from self._saliency(request, context, budget)
        finally:
            release(budget.total)

    def _saliency(self, request, context, budget):
        """Everything a request asks for is checked, and its memory estimated, before the image is decoded
        or any noise drawn; SmoothGrad's noise is drawn one chunk at a time inside the job."""
        model = require_model(self.repository, request.model)
        chunk = positive(request.batch_size, 16, "batch_size")
        if model.fixed_batch:
            chunk = model.fixed_batch if model.fixed_batch == 1 else chunk  # the graph cannot take more
        if chunk > self.limits.max_batch:
            raise ResourceExhausted(f"batch_size: {chunk} is over the limit of {self.limits.max_batch}")
        method = request.method
        one = sample_bytes(model)
        if method == attribution_pb2.SALIENCY_VANILLA:
            passes = 1
        elif method == attribution_pb2.SALIENCY_SMOOTHGRAD:
            passes = positive(request.samples, 25, "samples")
            noise_level = finite(request.noise, "noise", 0.0, 10.0, default=0.15, open_low=True)
            check_passes(passes, self.limits, "samples")
            budget.add(4 * min(chunk, passes) * one, "batch_size", f"{min(chunk, passes)} noisy copies at a time")
        elif method == attribution_pb2.SALIENCY_INTEGRATED_GRADIENTS:
            passes = positive(request.steps, 50, "steps")
            if passes > MAX_IG_STEPS:
                raise ResourceExhausted(f"steps: {passes} is over the limit of {MAX_IG_STEPS} Integrated Gradients "
                                        "steps")
            check_passes(passes, self.limits, "steps")
            baseline_value = finite(request.baseline, "baseline", -MAX_INPUT_MAGNITUDE, MAX_INPUT_MAGNITUDE)
            budget.add(2 * passes * one, "steps", f"a path of {passes} images and their gradients")
        else:
            raise InvalidArgument("method", f"unknown saliency method {method}")
        waiting = converting_event(self.bridges, model, attribution_pb2.AttributionEvent)
        if waiting is not None:
            yield waiting
        self.bridges.get(model)  # converting the model (once per server) is not the job's time
        started = time.monotonic()
        model, torch_model, sample, target = self._prepare(request, budget)
        channel_axis, _ = input_axes(model)

        def work(progress, should_stop):
            with torch_model.scope():
                if method == attribution_pb2.SALIENCY_VANILLA:
                    return attribution.vanilla(torch_model, sample, target)
                if method == attribution_pb2.SALIENCY_SMOOTHGRAD:
                    spread = float(sample.max() - sample.min()) or 1.0
                    return attribution.smoothgrad(torch_model, sample, target, passes, noise_level * spread,
                                                  request.seed, chunk, should_stop, progress)
                baseline = np.full_like(sample, baseline_value)
                return attribution.integrated_gradients(torch_model, sample, target, baseline, passes, chunk,
                                                        should_stop, progress)

        for kind, value in stream_within(context, work, started, self.limits):
            if kind == "progress":
                yield attribution_pb2.AttributionEvent(progress=tensor_pb2.Progress(
                    step=value[0], total=value[1], stage="backward"))
            elif value is not None:
                shown = attribution.saliency_map(value, channel_axis)
                result = self._result(model, sample, target, value, shown, passes, request.render)
                if request.segment:
                    image = render.display_image(sample, model.config)
                    mask = segmentation.grabcut(image, shown)
                    to_tensor(mask.astype(np.uint8), out=result.mask)
                    if request.render:
                        result.mask_png = render.png(np.where(mask[..., None], image, image // 4))
                yield attribution_pb2.AttributionEvent(result=result)

    def GuidedBackprop(self, request, context):
        model, torch_model, sample, target = self._prepare(request, needs_class=not request.layer)
        channel_axis, _ = input_axes(model)
        rule = {attribution_pb2.BACKPROP_GUIDED: "guided", attribution_pb2.BACKPROP_DECONVNET: "deconvnet"}.get(
            request.rule)
        if rule is None:
            raise InvalidArgument("rule", f"unknown rule {request.rule}")
        layer, layer_name, channel_of_layer = None, None, 1
        if request.layer:
            layer = model.layer(request.layer)
            channel_of_layer = common_channel_axis(layer, "layer")
            channels = layer.shape[channel_of_layer]
            if request.channel < 0 or (channels > 0 and request.channel >= channels):
                raise InvalidArgument("channel", f"{request.channel} is outside {layer.name!r}'s channels "
                                      f"0..{channels - 1}")
            layer_name = layer.name
        position = neuron_position(request, layer)
        with torch_model.scope():
            grads = backprop.modified_gradient(torch_model, sample, rule, target, layer_name, int(request.channel),
                                               channel_of_layer, position)
        result = self._result(model, sample, target, grads, attribution.saliency_map(grads, channel_axis), 1,
                              request.render)
        if model.no_classes:   # a unit of the layer was explained; there is no class to name
            result.label = ""
        if not backprop.rectifiers(torch_model):
            result.note = backprop.NO_RECTIFIER
        return result

    def GradCam(self, request, context):
        model = require_model(self.repository, request.model)
        method = {attribution_pb2.CAM_GRADCAM: "gradcam", attribution_pb2.CAM_GRADCAM_PLUS_PLUS: "gradcam++",
                  attribution_pb2.CAM_CLASS_ACTIVATION: "cam",
                  attribution_pb2.CAM_GUIDED_GRADCAM: "guided_gradcam"}.get(request.method)
        if method is None:
            raise InvalidArgument("method", f"unknown CAM method {request.method}")
        head = None
        if method == "cam":
            head = find_linear_head(model.proto, model.constants, model.config.logits_output,
                                    lambda name: model.layer(name).layout, model.shape_value)
            if isinstance(head, str):
                raise InvalidArgument("method", f"CAM needs a global-average-pool + linear head, and {head}; "
                                      "use Grad-CAM")
            if request.layer and model.layer(request.layer).name != head.feature_map:
                raise InvalidArgument("layer", f"CAM uses the pooled tensor {head.feature_map!r}; leave layer "
                                      "empty or name that one")
        if head is not None:
            layer = model.layer(head.feature_map)
        elif request.layer:
            layer = spatial_layer(model, request.layer, "layer", "class activation maps need a conv feature map")
        else:
            layer = last_spatial_layer(model)
            if layer is None:
                raise InvalidArgument("layer", "the model has no 4-D tensor of known layout to default to; name a "
                                      "spatial tensor (see DescribeModel)")
        sample = single_input(model, request, self.limits)
        backend = OrtBackend(model)
        target = resolve_target(model, backend, request, sample)
        channel_axis, (h_axis, w_axis) = input_axes(model)
        height, width = sample.shape[h_axis], sample.shape[w_axis]
        if method == "cam":  # the head was found in the graph; its pooled input is 4-D whatever shapes inference knew
            feature_map = acts.channels_first(backend.tensors(sample[None], [layer.name])[layer.name], head.layout)[0]
            heat = cam.finish(class_activation_map(feature_map, head, target), height, width)
            result = self._result(model, sample, target, head.weights[target], heat, 0, request.render, heat=heat)
            result.layer = layer.name
            return result
        torch_model = self.bridges.get(model)
        with torch_model.scope():
            activation, grads = cam.layer_and_gradient(torch_model, sample, target, layer.name)
            guided = (backprop.modified_gradient(torch_model, sample, "guided", target)
                      if method == "guided_gradcam" else None)
        if layer.layout == "NHWC":
            activation, grads = activation.transpose(2, 0, 1), grads.transpose(2, 0, 1)
        if method == "guided_gradcam":
            coarse = cam.nearest_resize(cam.raw_grad_cam(activation, grads), height, width)
            attributed = guided * np.expand_dims(coarse, channel_axis)
            result = self._result(model, sample, target, attributed,
                                  attribution.saliency_map(attributed, channel_axis), 2, request.render)
            if not backprop.rectifiers(torch_model):
                result.note = "guided part: " + backprop.NO_RECTIFIER
        else:
            heat = cam.grad_cam(activation, grads, method, height, width)
            result = self._result(model, sample, target, cam.cam_weights(activation, grads, method), heat, 1,
                                  request.render, heat=heat)
        result.layer = layer.name
        return result

    def SanityCheck(self, request, context):
        budget = Budget()
        try:
            yield from self._sanity_check(request, context, budget)
        finally:
            release(budget.total)

    def _sanity_check(self, request, context, budget):
        model = require_model(self.repository, request.model)
        methods = list(dict.fromkeys(request.methods)) or list(SANITY_METHODS)
        unknown = [m for m in methods if m not in SANITY_METHODS]
        if unknown:
            raise InvalidArgument("methods", f"unknown {unknown}; choose from {list(SANITY_METHODS)}")
        steps = positive(request.steps, 16, "steps")
        if steps > MAX_IG_STEPS:
            raise ResourceExhausted(f"steps: {steps} is over the limit of {MAX_IG_STEPS} Integrated Gradients steps")
        if "integrated_gradients" in methods:
            budget.add(2 * steps * sample_bytes(model), "steps", f"a path of {steps} images and their gradients")
        cam_layer = None
        if "gradcam" in methods:
            name = request.cam_layer
            if not name:
                head = find_linear_head(model.proto, model.constants, model.config.logits_output,
                                        lambda name: model.layer(name).layout, model.shape_value)
                last = last_spatial_layer(model)
                if isinstance(head, str) and last is None:
                    raise InvalidArgument("cam_layer", f"required for gradcam: {head}")
                name = last.name if isinstance(head, str) else head.feature_map
            cam_layer = spatial_layer(model, name, "cam_layer", "Grad-CAM needs a conv feature map")
        if request.layers < 0:
            raise InvalidArgument("layers", f"must be >= 0, got {request.layers}")
        waiting = converting_event(self.bridges, model, attribution_pb2.SanityCheckEvent)
        if waiting is not None:
            yield waiting
        self.bridges.get(model)  # converting the model (once per server) is not the job's time
        started = time.monotonic()
        model, torch_model, sample, target = self._prepare(request, budget)
        channel_axis, (h_axis, w_axis) = input_axes(model)
        height, width = sample.shape[h_axis], sample.shape[w_axis]
        count = len(sanity.weighted_layers(torch_model, model.proto))
        count = min(count, request.layers) if request.layers else count
        per_round = sum(steps if m == "integrated_gradients" else 1 for m in methods)
        check_passes((count + 1) * per_round, self.limits, "layers")
        if request.return_maps or request.render:
            maps = (count + 1) * len(methods) * height * width * 4
            if request.return_maps:
                budget.response(maps, "return_maps", f"{count + 1} maps for each of {len(methods)} methods",
                                self.limits.max_message_bytes)
            else:
                budget.add(maps, "render", f"{count + 1} maps for each of {len(methods)} methods")

        def cam_map(tm):
            activation, grads = cam.layer_and_gradient(tm, sample, target, cam_layer.name)
            if cam_layer.layout == "NHWC":
                activation, grads = activation.transpose(2, 0, 1), grads.transpose(2, 0, 1)
            return cam.grad_cam(activation, grads, "gradcam", height, width)

        makers = {
            "vanilla": lambda tm: attribution.saliency_map(attribution.vanilla(tm, sample, target), channel_axis),
            "integrated_gradients": lambda tm: attribution.saliency_map(attribution.integrated_gradients(
                tm, sample, target, np.zeros_like(sample), steps, 16), channel_axis),
            "guided_backprop": lambda tm: attribution.saliency_map(
                backprop.modified_gradient(tm, sample, "guided", target), channel_axis),
            "gradcam": cam_map,
        }
        maps = {m: makers[m] for m in methods}
        keep = request.return_maps or request.render

        def work(progress, should_stop):
            with torch_model.scope():
                return sanity.cascading_randomization(torch_model, model.proto, maps, request.layers, request.seed,
                                                      progress, should_stop, keep)

        for kind, value in stream_within(context, work, started, self.limits):
            if kind == "progress":
                yield attribution_pb2.SanityCheckEvent(progress=tensor_pb2.Progress(
                    step=value[0], total=value[1], stage="randomising"))
            elif value is not None:
                result = attribution_pb2.SanityCheckResult(target=target, label=model.label(target),
                                                           layers=value.layers)
                for name in methods:
                    entry = result.methods.add(method=name, spearman=value.correlations[name])
                    if request.return_maps:
                        to_tensor(value.original[name].astype(np.float32), out=entry.original_map)
                        for randomized in value.randomized[name]:
                            to_tensor(randomized.astype(np.float32), out=entry.randomized_maps.add())
                if request.render:
                    result.png = render.png(_sanity_grid(value, methods))
                yield attribution_pb2.SanityCheckEvent(result=result)


SANITY_METHODS = ("vanilla", "integrated_gradients", "guided_backprop", "gradcam")


def _sanity_grid(report, methods, columns: int = 6):
    """One row per method: the trained model's map, then maps after a few evenly spaced cascade steps."""
    steps = len(report.layers)
    picks = sorted(set(np.linspace(0, steps - 1, min(columns, steps)).round().astype(int))) if steps else []
    tiles = []
    for name in methods:
        tiles.append(render.colormap(render.normalize(report.original[name])))
        tiles += [render.colormap(render.normalize(report.randomized[name][k])) for k in picks]
    return render.grid(tiles, columns=1 + len(picks), pad=4, background=255)
