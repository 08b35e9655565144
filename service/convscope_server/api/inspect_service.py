"""InspectService: filters, activations, dead filters, occlusion, Score-CAM (forward-only, onnxruntime).

Channel axes come from the graph analysis (``LayerInfo.layout``, see onnx/graph.py): an NHWC tensor inside a
channels-last block is read with channels last. Where the channel axis cannot be told, Activations still
returns the values but no per-channel statistics, and grids and dead-filter scans answer INVALID_ARGUMENT
naming the layer.
"""

from __future__ import annotations

import time

import numpy as np

from convscope.v1 import inspect_pb2, inspect_pb2_grpc, tensor_pb2
from convscope_server import render
from convscope_server.api.common import (stream_within, channel_axis, check_finite, check_passes, finite, input_axes,
                                         optional_size, positive, resolve_target, single_input,
                                         spatial_layer, tensor_bytes, unique_layers)
from convscope_server.api.model_service import model_inputs, require_model
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.images import MAX_INPUT_MAGNITUDE
from convscope_server.memory import Budget, release
from convscope_server.forward import activations as acts
from convscope_server.forward import filters as filt
from convscope_server.forward.backend import OrtBackend
from convscope_server.forward.occlusion import forward_passes, gaussian_blur, occlusion
from convscope_server.forward.score_cam import score_cam
from convscope_server.tensors import to_tensor


class InspectService(inspect_pb2_grpc.InspectServiceServicer):
    def __init__(self, repository, limits):
        self.repository = repository
        self.limits = limits

    def _backend(self, model) -> OrtBackend:
        return OrtBackend(model)

    def Filters(self, request, context):
        model = require_model(self.repository, request.model)
        if not request.layer:
            raise InvalidArgument("layer", "required: name a Conv output (see DescribeModel)")
        layer = model.layer(request.layer)
        node = next((n for n in model.proto.graph.node if layer.name in n.output), None)
        if node is None or node.op_type != "Conv":
            raise InvalidArgument("layer", f"{layer.name!r} is made by {layer.op_type}, not Conv; filters exist "
                                  "for Conv outputs")
        weights = model.constants.get(node.input[1])
        if weights is None:
            raise InvalidArgument("layer", f"the weights of {node.name!r} are computed in the graph, not stored")
        source = model.layer(node.input[0])
        sees_pixels = source.spatial is not None and source.spatial.h.size == 1 and source.spatial.w.size == 1
        filters = filt.conv_filters(node, weights, sees_pixels, model.config.channels)
        response = inspect_pb2.FiltersResponse(layer=layer.name, conv_node=filters.conv_node,
                                               weights=to_tensor(weights.astype(np.float32)),
                                               group=filters.group, rgb=filters.rgb, depthwise=filters.depthwise)
        if request.render:
            response.png = render.png(filt.render_filters(
                filters, positive(request.max_filters, 64, "max_filters"),
                positive(request.max_channels, 16, "max_channels"), model.config.channel_order == "BGR"))
        return response

    def Activations(self, request, context):
        model = require_model(self.repository, request.model)
        if not request.layers:
            raise InvalidArgument("layers", "name at least one tensor (see DescribeModel)")
        layers = unique_layers(model, request.layers)
        max_channels = positive(request.max_channels, 64, "max_channels")
        if request.render:  # a grid needs the channel axis; values and stats of other tensors are still given
            for i, layer in enumerate(layers):
                if len(layer.shape) == 4:
                    channel_axis(layer, f"layers[{i}]")
        budget = Budget()
        try:
            return self._activations(request, model, layers, max_channels, budget)
        finally:
            release(budget.total)

    def _activations(self, request, model, layers, max_channels, budget):
        count = len(request.images)
        size = sum(tensor_bytes(layer, count) for layer in layers)
        budget.response(size, "layers", f"the values of {len(layers)} layers for {count} images",
                        self.limits.max_message_bytes)
        batch = model_inputs(model, request.images, self.limits, budget)
        values = self._backend(model).tensors(batch, [layer.name for layer in layers])
        size = sum(value.nbytes for value in values.values())  # the actual shapes, dynamic axes included
        if size > self.limits.max_message_bytes:
            raise ResourceExhausted(f"layers: the values of {len(layers)} layers for {count} images are {size:,} "
                                    f"bytes, over the message limit of {self.limits.max_message_bytes:,} bytes")
        check_finite(list(values.values()), "images", "the activations overflow float32 for these inputs")
        response = inspect_pb2.ActivationsResponse(execution_provider=model.execution_provider)
        for layer in layers:
            value = values[layer.name]
            entry = response.layers.add(layer=layer.name, layout=layer.layout)
            to_tensor(value, out=entry.values)  # in place: activations can be tens of MB
            axis = acts.channel_axis(value.shape, layer.layout, layer.op_type)
            if axis is None:  # per-channel statistics on a guessed axis would mislead: none are given
                continue
            first = acts.channels_first(value, layer.layout, axis)
            stats = acts.channel_stats(first)
            entry.stats.CopyFrom(inspect_pb2.ChannelStats(**{k: v.tolist() for k, v in stats.items()}))
            if request.render and first.ndim == 4:
                top = float(first.max())
                entry.png.extend(render.png(acts.activation_grid(sample, max_channels, top)) for sample in first)
        return response

    def DeadFilters(self, request, context):
        model = require_model(self.repository, request.model)
        tolerance = finite(request.tolerance, "tolerance", 0.0)
        if request.layers:
            layers = unique_layers(model, request.layers)
        else:
            layers = [layer for layer in model.layers if layer.op_type == "Conv"]
        axes = [channel_axis(layer, f"layers[{i}]") for i, layer in enumerate(layers)]
        budget = Budget()
        try:
            return self._dead_filters(request, model, layers, axes, tolerance, budget)
        finally:
            release(budget.total)

    def _dead_filters(self, request, model, layers, axes, tolerance, budget):
        run = min(len(request.images), model.run_batch)
        budget.add(sum(tensor_bytes(layer, run) for layer in layers), "layers",
                   f"the values of {len(layers)} layers for {run} images at a time")
        batch = model_inputs(model, request.images, self.limits, budget)
        scan = acts.DeadFilterScan(tolerance)
        backend = self._backend(model)
        names = [layer.name for layer in layers]
        for begin in range(0, len(batch), model.run_batch):
            values = backend.tensors(batch[begin: begin + model.run_batch], names)
            for layer, axis in zip(layers, axes):
                scan.add(layer.name, acts.channels_first(values[layer.name], layer.layout, axis))
        response = inspect_pb2.DeadFiltersResponse(images=len(batch))
        for name in names:
            report = scan.report(name)
            response.layers.append(inspect_pb2.LayerDeadFilters(layer=name, channels=report.channels,
                                                                dead=report.dead, constant=report.constant))
        return response

    def Occlusion(self, request, context):
        started = time.monotonic()
        model = require_model(self.repository, request.model)
        if request.score not in (inspect_pb2.SCORE_PROBABILITY, inspect_pb2.SCORE_LOGIT):
            raise InvalidArgument("score", f"unknown score {request.score}")
        sample = single_input(model, request, self.limits, Budget())
        channel_axis, (h_axis, w_axis) = input_axes(model)
        height, width = sample.shape[h_axis], sample.shape[w_axis]
        window_h = optional_size(request, "window_h", 16)
        window = (window_h, optional_size(request, "window_w", window_h))
        stride_h = optional_size(request, "stride_h", max(1, window[0] // 2))
        stride = (stride_h, optional_size(request, "stride_w", stride_h))
        for field, size, limit in (("window_h", window[0], height), ("window_w", window[1], width)):
            if size > limit:
                raise InvalidArgument(field, f"window of {size} pixels is larger than the {limit}-pixel input")
        for field, step, size in (("stride_h", stride[0], window[0]), ("stride_w", stride[1], window[1])):
            if step > size:
                raise InvalidArgument(field, f"stride {step} is larger than the window ({size}): pixels would "
                                      "be skipped")
        check_passes(forward_passes(height, width, window, stride) + 1, self.limits, "window and stride")
        if request.baseline == inspect_pb2.BASELINE_CHANNEL_MEAN:
            baseline = np.broadcast_to(sample.mean(axis=(h_axis, w_axis), keepdims=True), sample.shape)
        elif request.baseline == inspect_pb2.BASELINE_BLUR:
            # the blur reflects at the edges: its radius (3 sigma) must stay inside the image
            sigma = finite(request.blur_sigma, "blur_sigma", 0.0, max(1, min(height, width) - 1) / 3, default=8.0,
                           open_low=True)
            baseline = gaussian_blur(sample, sigma, (h_axis, w_axis))
        elif request.baseline == inspect_pb2.BASELINE_CONSTANT:
            constant = finite(request.constant, "constant", -MAX_INPUT_MAGNITUDE, MAX_INPUT_MAGNITUDE)
            baseline = np.full(sample.shape, constant, np.float32)
        else:
            raise InvalidArgument("baseline", f"unknown baseline {request.baseline}")
        backend = self._backend(model)
        target = resolve_target(model, backend, request, sample)
        score = "logit" if request.score == inspect_pb2.SCORE_LOGIT else "probability"

        def work(progress, should_stop):
            return occlusion(backend, sample, target, window, stride, baseline, (h_axis, w_axis), score,
                             model.run_batch, progress, should_stop)

        for kind, value in stream_within(context, work, started, self.limits):
            if kind == "progress":
                yield inspect_pb2.OcclusionEvent(progress=tensor_pb2.Progress(step=value[0], total=value[1],
                                                                               stage="occluding"))
            elif value is not None:
                check_finite([value.probability, value.logit, value.attribution], "image",
                             "the model's scores overflow float32 for this input or baseline")
                result = inspect_pb2.OcclusionResult(
                    target=target, label=model.label(target), base_probability=value.base_probability,
                    base_logit=value.base_logit, probability=to_tensor(value.probability),
                    logit=to_tensor(value.logit), rows=value.rows, cols=value.cols,
                    attribution=to_tensor(value.attribution), forward_passes=value.probability.size + 1)
                if request.render:
                    heat = render.normalize(value.attribution)
                    result.heatmap_png = render.png(render.colormap(heat))
                    result.overlay_png = render.png(render.overlay(render.display_image(sample, model.config), heat))
                yield inspect_pb2.OcclusionEvent(result=result)

    def ScoreCam(self, request, context):
        started = time.monotonic()
        model = require_model(self.repository, request.model)
        sample = single_input(model, request, self.limits, Budget())
        if not request.layer:
            raise InvalidArgument("layer", "required: name a spatial tensor (see DescribeModel)")
        layer = spatial_layer(model, request.layer, "layer", "Score-CAM needs a conv feature map")
        batch_size = positive(request.batch_size, 16, "batch_size")
        if batch_size > self.limits.max_batch:
            raise ResourceExhausted(f"batch_size: {batch_size} is over the limit of {self.limits.max_batch}")
        backend = self._backend(model)
        target = resolve_target(model, backend, request, sample)
        activation = acts.channels_first(backend.tensors(sample[None], [layer.name])[layer.name], layer.layout)[0]
        check_passes(activation.shape[0] + 2, self.limits, "layer")
        channel_axis, spatial_axes = input_axes(model)

        def work(progress, should_stop):
            return score_cam(backend, sample, target, activation, channel_axis, spatial_axes, batch_size,
                             progress, should_stop)

        for kind, value in stream_within(context, work, started, self.limits):
            if kind == "progress":
                yield inspect_pb2.ScoreCamEvent(progress=tensor_pb2.Progress(step=value[0], total=value[1],
                                                                              stage="masking"))
            elif value is not None:
                check_finite([value.cam, value.channel_weights], "image",
                             "the model's scores overflow float32 for this input")
                result = inspect_pb2.ScoreCamResult(target=target, label=model.label(target), layer=layer.name,
                                                    cam=to_tensor(value.cam),
                                                    channel_weights=to_tensor(value.channel_weights),
                                                    forward_passes=value.passes + 2)
                if request.render:
                    result.heatmap_png = render.png(render.colormap(value.cam))
                    result.overlay_png = render.png(render.overlay(render.display_image(sample, model.config),
                                                                   value.cam))
                yield inspect_pb2.ScoreCamEvent(result=result)
