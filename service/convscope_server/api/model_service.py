"""ModelService: ListModels, DescribeModel, Predict."""

from __future__ import annotations

import numpy as np

from convscope.v1 import model_pb2, model_pb2_grpc
from convscope_server.errors import InvalidArgument, ResourceExhausted
from convscope_server.scores import class_probabilities
from convscope_server.gradient.bridge import probe_tolerance
from convscope_server.images import to_model_input
from convscope_server.memory import Budget, release
from convscope_server.onnx.graph import tensor_types
from convscope_server.repository import LoadedModel, ModelRepository


def require_model(repository: ModelRepository, name: str, field: str = "model") -> LoadedModel:
    if not name:
        raise InvalidArgument(field, "required: name a model from ListModels")
    return repository.get(name, field)


def model_inputs(model: LoadedModel, images, limits, budget: Budget | None = None) -> np.ndarray:
    """Every Image of a request as one (N, ...) float32 batch for the model; ``budget`` is charged with the
    batch and each decode before it happens."""
    if not images:
        raise InvalidArgument("images", "at least one image is required")
    if len(images) > limits.max_batch:
        raise ResourceExhausted(f"images: {len(images)} images is over the limit of {limits.max_batch} per request")
    budget = budget if budget is not None else Budget()
    config = model.config
    budget.add(2 * len(images) * 4 * config.channels * config.height * config.width, "images",
               f"{len(images)} model inputs")  # the samples and their stacked batch
    return np.stack([to_model_input(image, config, f"images[{i}]", limits.max_image_pixels, budget=budget)
                     for i, image in enumerate(images)])


def _spec(name: str, types: dict) -> model_pb2.TensorSpec:
    dtype, shape, names = types.get(name, ("", (), ()))
    return model_pb2.TensorSpec(name=name, datatype=dtype, shape=shape, dim_names=names)


def _layer(info) -> model_pb2.Layer:
    message = model_pb2.Layer(name=info.name, op_type=info.op_type, node_name=info.node_name,
                              datatype=info.datatype, shape=info.shape, spatial=info.axes is not None,
                              weight_shape=info.weight_shape or (), layout=info.layout)
    if info.spatial is not None:
        s = info.spatial
        message.receptive_field.CopyFrom(model_pb2.ReceptiveField(
            size_h=s.h.size, size_w=s.w.size, jump_h=s.h.jump, jump_w=s.w.jump, start_h=s.h.start,
            start_w=s.w.start))
    return message


def _gradient_path(bridges, model: LoadedModel) -> model_pb2.GradientPath:
    state, reason, torch_model = bridges.status(model.name)
    path = model_pb2.GradientPath(state=state, reason=reason)
    if torch_model is not None:
        path.device, path.probe_difference = str(torch_model.device), torch_model.probe_difference
        path.tolerance = torch_model.tolerance
    else:
        path.tolerance = probe_tolerance(model)   # wider for a graph that computes in float16 / bfloat16
    return path


class ModelService(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository, limits, bridges):
        self.repository = repository
        self.limits = limits
        self.bridges = bridges

    def ListModels(self, request, context):
        summaries = []
        for name in self.repository.names():
            model, error = self.repository.status(name)
            summaries.append(model_pb2.ModelSummary(
                name=name, ready=model is not None, error=error,
                execution_provider=model.execution_provider if model else "",
                num_classes=model.num_classes if model else 0, no_classes=model.no_classes if model else ""))
        return model_pb2.ListModelsResponse(models=summaries)

    def DescribeModel(self, request, context):
        model = require_model(self.repository, request.model)
        config = model.config
        layers = ([model.layer(name, f"layers[{i}]") for i, name in enumerate(request.layers)]
                  if request.layers else model.layers)
        types = tensor_types(model.proto)
        initializers = {init.name for init in model.proto.graph.initializer}
        preprocessing = model_pb2.Preprocessing(
            height=config.height, width=config.width, layout=config.layout, mean=config.mean, std=config.std,
            scale=config.scale, channel_order=config.channel_order, resize=config.resize,
            crop_fraction=config.crop_fraction)
        opset = next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        return model_pb2.DescribeModelResponse(
            name=model.name,
            inputs=[_spec(v.name, types) for v in model.proto.graph.input if v.name not in initializers],
            outputs=[_spec(v.name, types) for v in model.proto.graph.output],
            logits_output=config.logits_output, preprocessing=preprocessing,
            layers=[_layer(layer) for layer in layers], num_classes=model.num_classes,
            has_labels=bool(model.labels), fixed_batch=model.fixed_batch, guessed=config.guessed,
            execution_provider=model.execution_provider, opset=opset,
            producer=f"{model.proto.producer_name} {model.proto.producer_version}".strip(),
            precision=model.precision, run_batch=model.run_batch, gradient=_gradient_path(self.bridges, model),
            no_classes=model.no_classes)

    def Predict(self, request, context):
        model = require_model(self.repository, request.model)
        model.require_classes()
        top_k = request.top_k or min(5, model.num_classes)   # unset: 5, or every class of a smaller model
        if top_k < 0:
            raise InvalidArgument("top_k", f"must be positive, got {top_k}")
        if model.num_classes and top_k > model.num_classes:
            raise InvalidArgument("top_k", f"{top_k} is more than the model's {model.num_classes} classes")
        budget = Budget()
        try:
            batch = model_inputs(model, request.images, self.limits, budget)
            (scores,) = model.run(batch, [model.config.logits_output])
        finally:
            release(budget.total)
        scores = scores.reshape(len(batch), -1).astype(np.float32)
        probabilities = class_probabilities(scores, model.config.softmax)   # convscope_server.scores: the one rule
        if not (np.isfinite(scores).all() and np.isfinite(probabilities).all()):
            raise InvalidArgument("images", "the model's scores are not finite (NaN or infinity) for these inputs")
        results = []
        for logits, probs in zip(scores, probabilities):
            order = np.argsort(-probs, kind="stable")[:top_k]
            results.append(model_pb2.Classification(top=[
                model_pb2.ClassScore(index=int(i), label=model.label(int(i)), probability=float(probs[i]),
                                     logit=float(logits[i])) for i in order]))
        return model_pb2.PredictResponse(results=results, execution_provider=model.execution_provider)
