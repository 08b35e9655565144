"""SynthesisService: class/feature visualisation, inversion, DeepDream, style, adversarial examples."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from convscope.v1 import model_pb2, synthesis_pb2, synthesis_pb2_grpc, tensor_pb2
from convscope_server import render
from convscope_server.api.common import (stream_within, finite, neuron_position, non_negative, positive, single_input,
                                         spatial_layer)
from convscope_server.api.model_service import model_inputs, require_model
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.forward.backend import OrtBackend
from convscope_server.gradient import adversarial
from convscope_server.gradient.bridge import CONVERTING
from convscope_server.gradient.synthesis import deepdream, inversion, optimize, style
from convscope_server.gradient.synthesis.common import InputSpace, Objective
from convscope_server.images import to_model_input
from convscope_server.memory import Budget
from convscope_server.scores import class_probabilities
from convscope_server.tensors import to_tensor

DEFAULT_EPSILONS = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
MAX_LEARNING_RATE = 1e3
MAX_WEIGHT = 1e12          # loss weights and penalties (style, content, TV, L2)
MAX_JITTER = 1024          # pixels


def blur_limit(height: int, width: int) -> float:
    """The largest blur sigma for an image of this size: the blur reflects at the edges, so its radius
    (3 sigma) must stay inside the image."""
    return max(1, min(height, width) - 1) / 3


class SynthesisService(synthesis_pb2_grpc.SynthesisServiceServicer):
    def __init__(self, repository, bridges, limits):
        self.repository = repository
        self.bridges = bridges
        self.limits = limits

    # -- shared ---------------------------------------------------------------------------------------
    def _setup(self, request, event=synthesis_pb2.SynthesisEvent):
        """(model, torch model, input space), used as ``yield from``: while the model's first gradient call
        waits for its conversion, the client first gets a progress event saying so."""
        model = require_model(self.repository, request.model)
        if self.bridges.pending(model.name):
            yield event(progress=tensor_pb2.Progress(step=0, total=0, stage=CONVERTING))
        torch_model = self.bridges.get(model)
        return model, torch_model, InputSpace.of(model.config, torch_model.device)

    def _options(self, options, steps: int, lr: float):
        steps = positive(options.steps, steps, "optimization.steps")
        if steps > self.limits.max_steps:
            raise ResourceExhausted(f"optimization.steps: {steps} is over the limit of {self.limits.max_steps}")
        lr = finite(options.learning_rate, "optimization.learning_rate", 0.0, MAX_LEARNING_RATE, default=lr,
                    open_low=True) if lr else 0.0
        non_negative(options.preview_every, "optimization.preview_every")
        return steps, lr, options.seed

    def _size(self, height: int, width: int, field: str) -> None:
        if height * width > self.limits.max_synthesis_pixels:
            raise ResourceExhausted(f"{field}: {height}x{width} is over the limit of "
                                    f"{self.limits.max_synthesis_pixels} pixels")

    def _stream(self, context, torch_model, work, space, options, started):
        """Run ``work(reporter_factory, should_stop)`` in ``torch_model``'s scope and yield SynthesisEvents.
        With ``options.frames`` each reporter (one per result image: an inverted layer, a whole job) keeps
        its own frames: the first step, every ``every`` steps and, added at the end, the final image."""
        frames: list[list[bytes]] = []

        def run(progress, should_stop):
            def reporter(total, stage):
                every = options.preview_every or (max(1, total // 20) if options.frames else 0)
                kept: list[bytes] = []
                frames.append(kept)

                def report(step, loss, x):
                    due = bool(every) and (step % every == 0 or step == total)
                    image = render.png(space.pixels(x)) if due or (options.frames and step == 1) else b""
                    if image and options.frames:
                        kept.append(image)
                    progress(step, total, stage, loss, image if options.preview_every and due else b"")
                return report
            with torch_model.scope():
                return work(reporter, should_stop)

        for kind, value in stream_within(context, run, started, self.limits):
            if kind == "progress":
                step, total, stage, loss, image = value
                yield synthesis_pb2.SynthesisEvent(progress=tensor_pb2.Progress(
                    step=step, total=total, stage=stage, loss=loss, preview_png=image))
            elif value is not None:
                if options.frames:
                    per_image = (frames if len(frames) == len(value.images)
                                 else [[f for kept in frames for f in kept]] * len(value.images))
                    for image, kept in zip(value.images, per_image):
                        image.frames.extend(kept if kept and kept[-1] == image.png else [*kept, image.png])
                yield synthesis_pb2.SynthesisEvent(result=value)

    @staticmethod
    def _image(space, x, losses, layer: str = "") -> synthesis_pb2.SynthesisImage:
        sample = space.to_sample(x)
        if not (np.isfinite(sample).all() and np.isfinite(np.asarray(losses, np.float64)).all()):
            raise InvalidArgument("optimization.learning_rate", "the optimisation diverged (NaN or infinite values); "
                                  "lower the learning rate or the loss weights")
        image = synthesis_pb2.SynthesisImage(layer=layer, png=render.png(space.pixels(x)), losses=losses)
        to_tensor(sample, out=image.image)
        return image

    # -- techniques -----------------------------------------------------------------------------------
    def Visualize(self, request, context):
        model, torch_model, space = yield from self._setup(request)
        started = time.monotonic()  # after the model's conversion (once per server)
        steps, lr, seed = self._options(request.optimization, 200, 0.05)
        objective = Objective()
        if request.layer:
            layer = spatial_layer(model, request.layer, "layer")
            channel_axis = 3 if layer.layout == "NHWC" else 1
            channels = layer.shape[channel_axis]
            if request.channel < 0 or (channels > 0 and request.channel >= channels):
                raise InvalidArgument("channel", f"{request.channel} is outside {layer.name!r}'s channels "
                                      f"0..{channels - 1}")
            position = neuron_position(request, layer)
            objective = Objective(layer=layer.name, channel=int(request.channel), position=position,
                                  channel_axis=channel_axis)
        else:
            if not request.HasField("target"):
                raise InvalidArgument("target", "required: a class to visualise (or name a layer)")
            model.require_classes("target")
            if not 0 <= request.target < model.num_classes:
                raise InvalidArgument("target", f"{request.target} is outside the model's classes "
                                      f"0..{model.num_classes - 1}")
            objective = Objective(target=int(request.target))
        percentiles = [finite(getattr(request, field), field, 0.0, 99.99)
                       for field in ("clip_norm_percentile", "clip_contribution_percentile")]
        height, width = model.config.height, model.config.width
        reg = optimize.Regularizers(
            l2=finite(request.l2, "l2", 0.0, MAX_WEIGHT), decay=finite(request.decay, "decay", 0.0, 1.0),
            blur_every=non_negative(request.blur_every, "blur_every"),
            blur_sigma=finite(request.blur_sigma, "blur_sigma", 0.0, blur_limit(height, width), default=0.5,
                              open_low=True),
            jitter=positive(request.jitter, 0, "jitter", MAX_JITTER), clip_norm_percentile=percentiles[0],
            clip_contribution_percentile=percentiles[1])

        def work(reporter, should_stop):
            import torch

            start = (space.from_pixels01(torch.full((1, model.config.channels, height, width), 0.5,
                                                    device=torch_model.device))
                     if request.zero_start else space.random(height, width, seed))
            done = optimize.ascend(torch_model, space, objective, start, steps, lr, reg, seed,
                                   reporter(steps, "ascending"), should_stop)
            return None if done is None else synthesis_pb2.SynthesisResult(images=[self._image(space, *done)])

        yield from self._stream(context, torch_model, work, space, request.optimization, started)

    def Invert(self, request, context):
        model, torch_model, space = yield from self._setup(request)
        started = time.monotonic()  # after the model's conversion (once per server)
        steps, lr, seed = self._options(request.optimization, 200, 0.05)
        if not request.layers:
            raise InvalidArgument("layers", "name at least one layer to invert")
        layers = [model.layer(name, f"layers[{i}]") for i, name in enumerate(request.layers)]
        tv = finite(request.tv_weight, "tv_weight", 0.0, MAX_WEIGHT, default=0.05)
        x0 = space.from_sample(single_input(model, request, self.limits, Budget()))

        def work(reporter, should_stop):
            images = []
            for number, layer in enumerate(layers, 1):
                stage = f"inverting {layer.name}" + (f" (layer {number}/{len(layers)})" if len(layers) > 1 else "")
                done = inversion.invert(torch_model, space, x0, layer.name, steps, lr, tv, seed,
                                        reporter(steps, stage), should_stop)
                if done is None:
                    return None
                images.append(self._image(space, *done, layer=layer.name))
            return synthesis_pb2.SynthesisResult(images=images)

        yield from self._stream(context, torch_model, work, space, request.optimization, started)

    def DeepDream(self, request, context):
        model, torch_model, space = yield from self._setup(request)
        started = time.monotonic()  # after the model's conversion (once per server)
        steps, lr, seed = self._options(request.optimization, 10, 0.02)
        layer = spatial_layer(model, request.layer, "layer") if request.layer else None
        if layer is None:
            raise InvalidArgument("layer", "required: the layer whose activations to amplify")
        octaves = positive(request.octaves, 3, "octaves")
        if octaves > 8:
            raise InvalidArgument("octaves", f"{octaves} is more than 8")
        scale = finite(request.octave_scale, "octave_scale", 1.0, 4.0, default=1.4, open_low=True)
        if steps * octaves > self.limits.max_steps:
            raise ResourceExhausted(f"optimization.steps: {steps} x {octaves} octaves is over the limit of "
                                    f"{self.limits.max_steps}")
        jitter = positive(request.jitter, 8, "jitter", MAX_JITTER)
        x0 = space.from_sample(single_input(model, request, self.limits, Budget()))
        smallest = [max(8, round(side / scale ** (octaves - 1))) for side in (model.config.height, model.config.width)]

        def work(reporter, should_stop):
            try:
                done = deepdream.deepdream(torch_model, space, x0, layer.name, octaves, scale, steps, lr, jitter,
                                           seed, reporter(steps * octaves, "dreaming"), should_stop)
            except RuntimeError as error:
                raise InvalidArgument("octaves", f"the model cannot run at the smallest octave's size "
                                      f"{smallest[0]}x{smallest[1]} ({octaves} octaves, scale {scale:g}): {error}; "
                                      "use fewer octaves or a smaller octave_scale") from None
            return None if done is None else synthesis_pb2.SynthesisResult(images=[self._image(space, *done)])

        yield from self._stream(context, torch_model, work, space, request.optimization, started)

    def Style(self, request, context):
        model, torch_model, space = yield from self._setup(request)
        started = time.monotonic()  # after the model's conversion (once per server)
        adam = request.optimizer in ("", "adam")
        if not adam and request.optimizer != "lbfgs":
            raise InvalidArgument("optimizer", f"must be 'adam' or 'lbfgs', got {request.optimizer!r}")
        steps, lr, seed = self._options(request.optimization, 300 if adam else 100, 0.05 if adam else 1.0)
        if not request.HasField("style"):
            raise InvalidArgument("style", "required")
        style_layers = [spatial_layer(model, n, f"style_layers[{i}]").name for i, n in enumerate(request.style_layers)]
        if not style_layers:
            raise InvalidArgument("style_layers", "name at least one layer (early to middle activations work best)")
        content_layer = None
        if request.HasField("content"):
            if not request.content_layer:
                raise InvalidArgument("content_layer", "required with a content image")
            content_layer = spatial_layer(model, request.content_layer, "content_layer").name
        if request.height < 0 or request.width < 0:
            raise InvalidArgument("height" if request.height < 0 else "width", "must be positive")
        height = request.height or model.config.height
        width = request.width or model.config.width
        self._size(height, width, "height")
        config = dataclasses.replace(model.config, height=height, width=width)
        style_weight = finite(request.style_weight, "style_weight", 0.0, MAX_WEIGHT, default=1e6)
        content_weight = finite(request.content_weight, "content_weight", 0.0, MAX_WEIGHT, default=1.0)
        tv_weight = finite(request.tv_weight, "tv_weight", 0.0, MAX_WEIGHT, default=1e-3)
        pixels, budget = self.limits.max_image_pixels, Budget()
        style_x = space.from_sample(to_model_input(request.style, config, "style", pixels, budget=budget))
        content_x = (space.from_sample(to_model_input(request.content, config, "content", pixels, budget=budget))
                     if request.HasField("content") else None)

        def work(reporter, should_stop):
            start = content_x if content_x is not None else space.random(height, width, seed, 0.2)
            try:
                done = style.stylize(torch_model, space, style_x, content_x, style_layers, content_layer, steps, lr,
                                     style_weight, content_weight, tv_weight, "adam" if adam else "lbfgs", start,
                                     reporter(steps, "styling"), should_stop)
            except RuntimeError as error:
                raise InvalidArgument("height", f"the model cannot run at {height}x{width}: {error}") from None
            return None if done is None else synthesis_pb2.SynthesisResult(images=[self._image(space, *done)])

        yield from self._stream(context, torch_model, work, space, request.optimization, started)

    def Adversarial(self, request, context):
        import torch

        model, torch_model, space = yield from self._setup(request)
        started = time.monotonic()  # after the model's conversion (once per server)
        sample = single_input(model, request, self.limits, Budget())
        backend = OrtBackend(model)
        x = space.from_sample(sample)
        before = backend.logits(sample[None])[0]
        targeted = request.method == synthesis_pb2.ADVERSARIAL_TARGETED
        if request.method not in (synthesis_pb2.ADVERSARIAL_FGSM, synthesis_pb2.ADVERSARIAL_TARGETED):
            raise InvalidArgument("method", f"unknown method {request.method}")
        epsilon = finite(request.epsilon, "epsilon", 0.0, 1.0, default=16 / 255 if targeted else 2 / 255,
                         open_low=True)
        model.require_classes("target" if targeted else "label")
        field, cls = ("target", request.target) if targeted else ("label", request.label if request.HasField(
            "label") else int(np.argmax(before)))
        if not 0 <= cls < model.num_classes:
            raise InvalidArgument(field, f"{cls} is outside the model's classes 0..{model.num_classes - 1}")
        steps, _, _ = self._options(request.optimization, 100, 0.0)
        step_size = finite(request.step_size, "step_size", 0.0, 1.0, default=1 / 255, open_low=True)
        stop = finite(request.stop_probability, "stop_probability", 0.0, 1.0, default=0.9, open_low=True)

        def scores(logits):
            probabilities = class_probabilities(logits[None], model.config.softmax)[0]
            return [model_pb2.ClassScore(index=int(i), label=model.label(int(i)), probability=float(probabilities[i]),
                                         logit=float(logits[i])) for i in np.argsort(-probabilities)[:5]]

        def work(reporter, should_stop):
            if targeted:
                done = adversarial.targeted(torch_model, space, x, int(cls), step_size, epsilon, steps, stop,
                                            reporter(steps, f"towards {model.label(int(cls))}"), should_stop,
                                            softmax=model.config.softmax)
                if done is None:
                    return None
                result_x, history = done
            else:
                label = torch.tensor([int(cls)], device=torch_model.device)
                result_x, history = adversarial.fgsm(torch_model, space, x, label, epsilon,
                                                     softmax=model.config.softmax), []
            adversarial_sample = space.to_sample(result_x)
            after = backend.logits(adversarial_sample[None])[0]  # what the served onnxruntime model says
            result = synthesis_pb2.SynthesisResult(images=[self._image(space, result_x, history)],
                                                   before=scores(before), after=scores(after),
                                                   steps_taken=max(0, len(history) - 1) if targeted else 1)
            delta = (result_x - x)
            pixels = (delta / space.per_pixel_unit()).detach()
            result.linf_pixels = float(pixels.abs().max())
            to_tensor(space.to_sample(delta), out=result.perturbation)
            shown = torch_model.as_numpy(pixels)[0].transpose(1, 2, 0)
            top = float(np.abs(shown).max()) or 1.0
            result.perturbation_png = render.png(((shown / (2 * top) + 0.5) * 255).clip(0, 255).astype(np.uint8)
                                                 if shown.shape[2] == 3 else
                                                 ((shown[..., 0] / (2 * top) + 0.5) * 255).astype(np.uint8))
            return result

        yield from self._stream(context, torch_model, work, space, request.optimization, started)

    def Robustness(self, request, context):
        import torch

        model, torch_model, space = yield from self._setup(request, synthesis_pb2.RobustnessEvent)
        started = time.monotonic()  # after the model's conversion (once per server)
        epsilons = ([finite(e, f"epsilons[{i}]", 0.0, 1.0) for i, e in enumerate(request.epsilons)]
                    or list(DEFAULT_EPSILONS))
        if len(epsilons) > 64:
            raise InvalidArgument("epsilons", f"{len(epsilons)} values; give at most 64")
        model.require_classes("labels")
        batch = model_inputs(model, request.images, self.limits)
        if request.labels and len(request.labels) != len(batch):
            raise InvalidArgument("labels", f"{len(request.labels)} labels for {len(batch)} images")
        labels = (np.asarray(request.labels) if request.labels else
                  OrtBackend(model).logits(batch).argmax(axis=1))
        if ((labels < 0) | (labels >= model.num_classes)).any():
            raise InvalidArgument("labels", f"outside the model's classes 0..{model.num_classes - 1}")
        chunk = positive(request.batch_size, 8, "batch_size")
        if chunk > self.limits.max_batch:
            raise ResourceExhausted(f"batch_size: {chunk} is over the limit of {self.limits.max_batch}")
        if model.fixed_batch:
            chunk = model.fixed_batch
        xs = torch.cat([space.from_sample(sample) for sample in batch])
        ys = torch.from_numpy(labels.astype(np.int64)).to(torch_model.device)

        def work(progress, should_stop):
            with torch_model.scope():
                return adversarial.robustness_curve(torch_model, space, xs, ys, epsilons, chunk, progress,
                                                    should_stop, softmax=model.config.softmax)

        for kind, value in stream_within(context, work, started, self.limits):
            if kind == "progress":
                yield synthesis_pb2.RobustnessEvent(progress=tensor_pb2.Progress(
                    step=value[0], total=value[1], stage=value[2]))
            elif value is not None:
                result = synthesis_pb2.RobustnessResult(epsilons=epsilons, accuracy=value.tolist())
                if request.render:
                    result.png = render.png(render.line_plot(epsilons, value.tolist(), "epsilon (x 1/255)",
                                                             "top-1 accuracy under FGSM"))
                yield synthesis_pb2.RobustnessEvent(result=result)
