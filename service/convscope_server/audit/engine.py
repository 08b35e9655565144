"""The audit, stage by stage, as one function: model card -> one scan of the dataset -> classes, units and
dataset sections -> attribution faithfulness on a sample -> robustness on a sample. The result is the
dict audit.json holds. Every number comes from the existing techniques (onnxruntime for the forward
ones, the converted torch module for gradients); a model without a gradient path gets every forward
section and the reason in place of the gradient ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from convscope_server.audit import card, robustness, sections
from convscope_server.audit.faithfulness import faithfulness
from convscope_server.audit.scan import class_mapping, scan
from convscope_server.datasets import no_readable_images
from convscope_server.errors import NotFound
from convscope_server.forward import activations as acts
from convscope_server.forward.backend import OrtBackend
from convscope_server.forward.occlusion import occlusion
from convscope_server.onnx.graph import classifier_input

ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Elu", "Selu", "Gelu", "Mul"}
GRADIENT_METHODS = ("vanilla", "integrated_gradients", "gradcam")


@dataclass(frozen=True)
class AuditBudget:
    unit_layers: int = 4             # spatial activation layers with per-channel statistics, spread over depth
    attribution_images: int = 8      # images the faithfulness curves run on
    curve_steps: int = 16            # deletion / insertion steps
    robustness_images: int = 64      # images the corruptions (and FGSM) run on
    epsilons: tuple = (0.0, 1 / 255, 2 / 255, 4 / 255)   # FGSM, in [0, 1] pixel units
    methods: tuple = ("vanilla", "integrated_gradients", "gradcam", "occlusion")
    randomized_layers: int = 3       # the model-randomisation check: weighted layers re-initialised from the top
    map_points: int = 2000           # images on the t-SNE map of the codes (a seeded random subset beyond)
    unit_channels: int = 8           # channels per unit layer with a page: top patches, mean per label
    unit_patches: int = 6            # top images per such channel
    feature_steps: int = 64          # gradient-ascent steps of each such channel's feature visualisation (0: none)
    worst_images: int = 12           # worst-classified images shown with Grad-CAM (0: none)
    neighbours: int = 5              # per such channel, the channels that fire on the same images


def unit_layers(model, count: int) -> list:
    """Up to ``count`` spatial activation tensors (known layout, more than one position), spread evenly
    from the first to the last."""
    candidates = [layer for layer in model.layers if layer.op_type in ACTIVATIONS and layer.layout
                  and len(layer.shape) == 4 and all(layer.shape[a] > 1 for a in layer.axes)
                  and acts.channel_axis(layer.shape, layer.layout, layer.op_type) is not None]
    if len(candidates) <= count:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[i] for i in dict.fromkeys(picks.tolist())]


def _ceilings(model, layers) -> dict[str, float]:
    """The upper bound of each Clip among ``layers`` (ReLU6: 6), where the graph holds it as a constant."""
    bounds = {}
    nodes = {node.output[0]: node for node in model.proto.graph.node}
    for layer in layers:
        node = nodes.get(layer.name)
        if node is not None and node.op_type == "Clip" and len(node.input) > 2 and node.input[2] in model.constants:
            bounds[layer.name] = float(np.asarray(model.constants[node.input[2]]).reshape(()))
    return bounds


def _timing(model) -> dict:
    """Median latency of one image and throughput at the model's run batch, on this server."""
    config = model.config
    shape = (config.channels, config.height, config.width) if config.layout == "NCHW" else (
        config.height, config.width, config.channels)
    one = np.zeros((1, *shape), np.float32)
    batch = np.zeros((max(1, model.fixed_batch or model.run_batch), *shape), np.float32)
    output = [config.logits_output]
    model.run(one, output)  # warm-up

    def median(x, repeat):
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            model.run(x, output)
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    latency = median(one, 5)
    batch_time = median(batch, 3)
    return {"latency_ms": latency * 1e3, "throughput_images_per_s": len(batch) / batch_time,
            "batch": len(batch), "provider": model.execution_provider}


def _input_axes(config) -> tuple[int, tuple[int, int]]:
    return (0, (1, 2)) if config.layout == "NCHW" else (2, (0, 1))


def _maps(method: str, model, torch_model, samples, targets, cam_layer) -> list[np.ndarray]:
    """(H, W) importance maps of ``method`` for each sample and target."""
    from convscope_server.gradient import attribution, cam

    channel_axis, (h_axis, w_axis) = _input_axes(model.config)
    height, width = samples.shape[1 + h_axis], samples.shape[1 + w_axis]
    out = []
    for sample, target in zip(samples, targets):
        if method == "vanilla":
            with torch_model.scope():
                grads = attribution.vanilla(torch_model, sample, target)
            out.append(attribution.saliency_map(grads, channel_axis))
        elif method == "integrated_gradients":
            with torch_model.scope():
                chunk = 1 if model.fixed_batch == 1 else 16  # a graph fixed at batch 1 takes one image a pass
                grads = attribution.integrated_gradients(torch_model, sample, target, np.zeros_like(sample), 16,
                                                         chunk)
            out.append(attribution.saliency_map(grads, channel_axis))
        elif method == "gradcam":
            with torch_model.scope():
                activation, grads = cam.layer_and_gradient(torch_model, sample, target, cam_layer.name)
            if cam_layer.layout == "NHWC":
                activation, grads = activation.transpose(2, 0, 1), grads.transpose(2, 0, 1)
            out.append(cam.grad_cam(activation, grads, "gradcam", height, width))
        elif method == "occlusion":
            window = max(2, min(height, width) // 7)
            maps = occlusion(OrtBackend(model), sample, target, (window, window), (window // 2, window // 2),
                             np.zeros_like(sample), (h_axis, w_axis), chunk=model.run_batch)
            out.append(maps.attribution)
    return out


class _StageClock:
    """Wall seconds per stage, for the report (and the benchmark's split across stages)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stage, self._started = None, time.perf_counter()

    def enter(self, stage: str | None) -> None:
        now = time.perf_counter()
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._started
        self._stage, self._started = stage, now


def run_audit(model, items: Iterator, torch_model, budget: AuditBudget = AuditBudget(), label_map: dict | None = None,
              progress: Callable | None = None, should_stop: Callable[[], bool] = lambda: False,
              workers: int = 0, remote: Callable | None = None) -> dict | None:
    """The audit of ``model`` over ``items`` (``datasets.Item``s). ``torch_model`` is the converted module,
    or the reason there is none (a string). ``progress(stage, step, total)``. ``remote``: the scan stage
    runs elsewhere (``distributed.audit_scan``: a Ray cluster), with the same result. None when stopped."""
    report_progress = progress or (lambda stage, step, total: None)
    clock = _StageClock()
    report: dict = {"model": {"name": model.name, "producer": model.proto.producer_name,
                              "opset": max((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")),
                                           default=0),
                              "classes": model.num_classes, "input": {
                                  "height": model.config.height, "width": model.config.width,
                                  "layout": model.config.layout, "mean": list(model.config.mean),
                                  "std": list(model.config.std), "scale": model.config.scale,
                                  "resize": model.config.resize, "guessed": list(model.config.guessed)}}}
    clock.enter("model card")
    report_progress("model card", 0, 1)
    report["model"].update(card.summary(model.proto, model.layers))
    report["model"]["timing"] = _timing(model)

    clock.enter("scanning")
    layers = unit_layers(model, budget.unit_layers)
    keep = max(budget.attribution_images, budget.robustness_images)
    track = {}
    for layer in layers:
        channels = layer.shape[acts.channel_axis(layer.shape, layer.layout, layer.op_type)]
        if channels > 0 and budget.unit_channels > 0:
            count = min(channels, budget.unit_channels)
            track[layer.name] = np.unique(np.linspace(0, channels - 1, count).round().astype(np.int64)).tolist()
    mapping_cache: dict = {}

    def accepted(label: str):
        if label not in mapping_cache:
            found, _ = class_mapping([label], model.labels, label_map, model.num_classes)
            mapping_cache[label] = found.get(label)
        return mapping_cache[label]

    result = scan(model, items, classifier_input(model.proto, model.config.logits_output), layers, model.run_batch,
                  should_stop, lambda done: report_progress("scanning", done, 0), workers, _ceilings(model, layers),
                  keep=keep, track=track, k=budget.unit_patches, accepted=accepted, worst=budget.worst_images,
                  remote=remote)
    if should_stop():
        return None
    if not result.ids:
        raise no_readable_images(result.failures)
    report["dataset"] = {"images": len(result.ids), "skipped": [{"id": f.id, "reason": f.reason}
                                                                for f in result.failures]}
    clock.enter("sections")
    mapping, unmapped = class_mapping(result.labels, model.labels, label_map, model.num_classes)
    report["classes"] = sections.classes(result, mapping, unmapped, model.label, worst=max(12, budget.worst_images))
    report["units"] = sections.units(result)
    for name, cards in sections.unit_channels(result, model).items():
        report["units"][name]["pages"] = cards
        _add_neighbours(cards, result.units[name], budget.neighbours)
        filters = first_layer_filters(model, name)
        for channel_card in cards if filters is not None else ():
            channel_card["filter_png"] = _filter_png(filters, channel_card["channel"], model.config)
    report["dataset"].update(sections.dataset(result))
    _dataset_pictures(report["dataset"], result, model)

    samples = result.kept
    predicted = result.logits[: len(samples)].argmax(axis=1).tolist()
    accepted = [mapping.get(label) for label in result.labels[: len(samples)]]
    labelled = [i for i, a in enumerate(accepted) if a]
    gradient_reason = torch_model if isinstance(torch_model, str) else ""
    cam_layer = layers[-1] if layers else None

    clock.enter("worst images")
    _worst_pictures(report["classes"], result, model, torch_model, gradient_reason, cam_layer, mapping,
                    budget.worst_images, should_stop, lambda step, total: report_progress("worst images", step, total))

    clock.enter("feature visualisation")
    if gradient_reason:
        report["feature_visualisation"] = {"unavailable": gradient_reason}
    elif budget.feature_steps > 0 and track:
        found = _feature_visualisations(model, torch_model, track, budget.feature_steps, should_stop,
                                        lambda step, total: report_progress("feature visualisation", step, total))
        if found is None:
            return None
        for name, cards in report["units"].items():
            for channel_card in cards.get("pages") or ():
                channel_card["feature_png"], channel_card["feature_of"] = found[name][channel_card["channel"]]
        report["feature_visualisation"] = {"steps": budget.feature_steps, **FEATURE_SETTINGS}
    else:
        report["feature_visualisation"] = {"unavailable": "no channel tracked or no steps in the budget"}

    clock.enter("map")
    report["dataset"]["map"] = _code_map(result, mapping, budget.map_points, should_stop,
                                         lambda step, total: report_progress("map", step, total))

    clock.enter("faithfulness")
    report_progress("faithfulness", 0, len(budget.methods))
    chosen = samples[: budget.attribution_images]
    targets = predicted[: len(chosen)]
    maps, unavailable = {}, {}
    for step, method in enumerate(budget.methods):
        if should_stop():
            return None
        if method in GRADIENT_METHODS and gradient_reason:
            unavailable[method] = gradient_reason
        elif method == "gradcam" and cam_layer is None:
            unavailable[method] = "the model has no spatial activation layer to take Grad-CAM at"
        elif len(chosen):
            maps[method] = _maps(method, model, torch_model, chosen, targets, cam_layer)
        report_progress("faithfulness", step + 1, len(budget.methods))
    _, spatial_axes = _input_axes(model.config)
    report["faithfulness"] = {"images": len(chosen), "unavailable": unavailable, "steps": budget.curve_steps,
                              "gradcam_layer": cam_layer.name if cam_layer else "",
                              "methods": faithfulness(OrtBackend(model).logits, chosen, targets, maps,
                                                      np.zeros_like(chosen[0]), spatial_axes, budget.curve_steps,
                                                      model.run_batch, should_stop, model.config.softmax)
                              if len(chosen) else {}}
    if report["faithfulness"]["methods"] is None:
        return None
    for method, numbers in report["faithfulness"]["methods"].items():  # what `audits diff` compares per image
        for row, image in enumerate(numbers["per_image"]):
            image.update(id=result.ids[row], label=result.labels[row], predicted=targets[row])
            if method in maps:
                image["map"] = coarse_map(maps[method][row]).tolist()

    clock.enter("randomisation")
    report["randomisation"] = _randomisation(model, torch_model, gradient_reason, chosen[:1], targets[:1],
                                             [m for m in budget.methods if m in GRADIENT_METHODS], cam_layer,
                                             budget.randomized_layers, should_stop)

    clock.enter("robustness")
    report_progress("robustness", 0, 1)
    rows = labelled[: budget.robustness_images] or list(range(min(len(samples), budget.robustness_images)))
    truth = [accepted[i] for i in rows] if labelled else [(predicted[i],) for i in rows]
    section = {"images": len(rows), "against": "labels" if labelled else "the model's clean predictions"}
    if rows:
        levels = sum(len(strengths) for strengths in robustness.CORRUPTIONS.values())
        attacks = 0 if gradient_reason else 2 * len(budget.epsilons)  # FGSM, then the iterative attack
        section["corruptions"] = robustness.corruption_accuracy(
            OrtBackend(model).logits, samples[rows], truth, model.config, should_stop=should_stop,
            progress=lambda done, total, what: report_progress("robustness", done, levels + attacks))
        if gradient_reason:
            section["fgsm"] = {"unavailable": gradient_reason}
        else:
            section["fgsm"] = _fgsm(model, torch_model, samples[rows], [t[0] for t in truth], budget.epsilons,
                                    should_stop, lambda done: report_progress("robustness", levels + done,
                                                                              levels + attacks))
    report["robustness"] = section
    clock.enter(None)
    report["stage_seconds"] = clock.seconds
    return None if should_stop() else report


COARSE = 14


def coarse_map(attribution_map: np.ndarray, size: int = COARSE) -> np.ndarray:
    """An (H, W) map as ``size`` x ``size`` block means (rounded to 5 decimals): small enough for audit.json,
    fine enough to compare where two model versions look (``audits diff``)."""
    from convscope_server import render

    values = np.nan_to_num(np.asarray(attribution_map, np.float64))
    return np.round(render.resize(values, size, size), 5)


def _add_neighbours(cards: list[dict], statistics, count: int) -> None:
    """Each channel card's ``neighbours``: the channels of its layer whose per-image mean activation
    correlates most with its own over the dataset."""
    if count <= 0 or not cards:
        return
    correlation = statistics.correlation()
    for channel_card in cards:
        channel_card["neighbours"] = [{"channel": c, "correlation": rho}
                                      for c, rho in statistics.neighbours(channel_card["channel"], count, correlation)]


PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "BatchNormalization", "Identity", "HardSigmoid", "HardSwish", "Elu",
                "Selu", "Sigmoid", "PRelu", "Add", "Sub", "Mul", "Div"}


def first_layer_filters(model, layer_name: str):
    """The (C, in, kh, kw) weights of the Conv that reads the image and makes ``layer_name`` channel for
    channel (through activations, batch norm and constant arithmetic only), or None: then a channel of
    this layer has no single filter to show."""
    producers = {output: node for node in model.proto.graph.node for output in node.output}
    name = layer_name
    for _ in range(16):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Conv":
            weights = model.constants.get(node.input[1])
            try:
                source = model.layer(node.input[0])
            except NotFound:
                source = None
            group = next((a.i for a in node.attribute if a.name == "group"), 1) or 1
            sees_pixels = (source is not None and source.spatial is not None and source.spatial.h.size == 1
                           and source.spatial.w.size == 1)
            return weights if weights is not None and weights.ndim == 4 and sees_pixels and group == 1 else None
        if node.op_type not in PASS_THROUGH:
            return None
        data = list(dict.fromkeys(i for i in node.input if i and i not in model.constants))
        if len(data) == 2 and node.op_type == "Mul":  # x * sigmoid(x) (SiLU / Swish written as two nodes)
            gate = [i for i in data if producers.get(i) is not None and producers[i].op_type in (
                "Sigmoid", "HardSigmoid") and producers[i].input[0] in data]
            data = [i for i in data if i not in gate] if len(gate) == 1 else data
        if len(data) != 1:
            return None  # two computed inputs (e.g. a residual sum): no single filter
        name = data[0]
    return None


def _filter_png(weights: np.ndarray, channel: int, config) -> str:
    """One first-layer filter as a base64 PNG: RGB when it reads three colour channels, else grayscale."""
    import base64

    from convscope_server import render

    kernel = weights[channel]
    if kernel.shape[0] == 3:
        tile = (render.normalize(kernel) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        tile = tile[..., ::-1] if config.channel_order == "BGR" else tile
    else:
        tile = render.grid([(render.normalize(k) * 255).round().astype(np.uint8) for k in kernel], pad=1)
    scale = max(1, 96 // max(tile.shape[:2]))
    return base64.b64encode(render.png(render.upscale(tile, scale))).decode()


FEATURE_SETTINGS = {"learning_rate": 0.1, "decay": 0.001, "blur_every": 4, "blur_sigma": 0.5, "jitter": 4, "seed": 0}


def optimised_tensor(model, layer) -> tuple[str, int]:
    """(tensor, channel axis) a channel's feature visualisation maximises: the input of ``layer`` when it
    is an activation of a same-shaped tensor (a rectified unit that is zero on the random start would give
    no gradient), else the layer itself."""
    axis = acts.channel_axis(layer.shape, layer.layout, layer.op_type)
    node = next((n for n in model.proto.graph.node if layer.name in n.output), None)
    if node is not None and node.op_type in ACTIVATIONS and node.input and node.input[0] not in model.constants:
        try:
            source = model.layer(node.input[0])
        except NotFound:  # an input the analysis does not list: optimise the layer itself
            source = None
        if source is not None and tuple(source.shape) == tuple(layer.shape) and source.layout == layer.layout:
            return source.name, axis
    return layer.name, axis


def centre_unit(model, layer):
    """The (row, column) of ``layer``'s centre neuron and its receptive box when that field is small (at most
    an eighth of the input's shorter side), else None: maximising a small-field channel's mean over the
    whole image only paints it one colour, while its centre neuron shows the pattern it detects."""
    from convscope_server.forward import patches

    if layer.spatial is None:
        return None
    height, width = model.config.height, model.config.width
    if max(layer.spatial.h.size, layer.spatial.w.size) > min(height, width) // 8:
        return None
    rows, columns = layer.shape[layer.axes[0]], layer.shape[layer.axes[1]]
    position = (rows // 2, columns // 2)
    box = patches.receptive_box(layer.spatial, position[0] * columns + position[1], columns, height, width)
    return position, box


def _feature_visualisations(model, torch_model, track: dict, steps: int, should_stop, progress) -> dict | None:
    """{layer: {channel: (base64 PNG, kind)}}: each tracked channel's feature visualisation (Yosinski et al.
    2015: regularised gradient ascent from a random image, jittered and blurred) of the channel's mean, or,
    for a layer whose receptive field is small, of its centre neuron, shown cropped to that neuron's
    receptive field. Many units per batch (``optimize.ascend`` normalises each image's step on its own).
    None when stopped."""
    import base64

    import torch

    from convscope_server import render
    from convscope_server.forward import patches
    from convscope_server.gradient.synthesis import optimize
    from convscope_server.gradient.synthesis.common import ChannelsObjective, InputSpace

    space = InputSpace.of(model.config, torch_model.device)
    settings = FEATURE_SETTINGS
    reg = optimize.Regularizers(decay=settings["decay"], blur_every=settings["blur_every"],
                                blur_sigma=settings["blur_sigma"], jitter=settings["jitter"])
    units = []
    for name, channels in track.items():
        layer = model.layer(name)
        tensor, axis = optimised_tensor(model, layer)
        centre = centre_unit(model, layer)
        units += [(name, tensor, axis, channel, centre) for channel in channels]
    chunk = model.fixed_batch or 8
    found: dict = {name: {} for name in track}
    chunks = (len(units) + chunk - 1) // chunk
    with torch_model.scope():
        for number, begin in enumerate(range(0, len(units), chunk)):
            part = units[begin: begin + chunk]
            start = torch.cat([space.random(model.config.height, model.config.width, settings["seed"])] * len(part))
            objective = ChannelsObjective([(t, a, c, centre and centre[0]) for _, t, a, c, centre in part])
            done = optimize.ascend(torch_model, space, objective, start, steps, settings["learning_rate"], reg,
                                   settings["seed"],
                                   lambda step, loss, x, number=number: progress(number * steps + step, chunks * steps),
                                   should_stop)
            if done is None:
                return None
            for row, (name, _, _, channel, centre) in enumerate(part):
                pixels = space.pixels(done[0][row: row + 1])
                if centre is not None:
                    pixels = patches.crop(pixels, centre[1])
                    pixels = render.upscale(pixels, max(1, 96 // max(pixels.shape[:2])))
                found[name][channel] = (base64.b64encode(render.png(pixels)).decode(),
                                        "channel" if centre is None else "centre unit")
    return found


def _dataset_pictures(section: dict, result, model, side: int = 96) -> None:
    """Thumbnails (base64 PNG) of the near-duplicate pairs and the outliers, for images whose loader the
    scan still has (a dataset folder's files; streamed images are gone after the pass)."""
    import base64

    from convscope_server import render
    from convscope_server.forward.neighbors import thumbnail

    def picture(index: int) -> str | None:
        load = result.sources.get(index) or (result.loaders.get(index) or (None, None))[1]
        if load is None:
            return None
        pixels = thumbnail(render.display_image(load(), model.config), side)
        return base64.b64encode(render.png(pixels)).decode()

    missing = 0
    for pair in section.get("near_duplicates", []):
        first, second = picture(pair["first_index"]), picture(pair["second_index"])
        if first and second:
            pair["first_png"], pair["second_png"] = first, second
        else:
            missing += 1
    for outlier in section.get("outliers", []):
        found = picture(outlier["index"])
        if found:
            outlier["png"] = found
        else:
            missing += 1
    if missing:
        section["pictures"] = (f"{missing} of the pairs and outliers are images streamed to the server and not kept "
                               "after the scan (only those another table holds are): ids only")


def _worst_pictures(section: dict, result, model, torch_model, reason: str, cam_layer, mapping, count: int,
                    should_stop, progress) -> None:
    """The ``count`` worst-classified images (kept by the scan) as PNGs with, beside each, Grad-CAM at ``cam_layer``
    for the predicted class and for the label's class (Selvaraju et al. 2017): where the model looked
    for its wrong answer, and where it would look for the right one. Without a gradient path, occlusion
    (forward-only) for the predicted class, and the reason."""
    import base64

    from convscope_server import render

    rows = [w for w in section.get("worst", [])[:count] if w["index"] in result.loaders]
    if not rows:
        return
    method = "gradcam" if not reason and cam_layer is not None else "occlusion"
    section["worst_method"] = method if method == "gradcam" else f"occlusion ({reason or 'no Grad-CAM layer'})"
    section["worst_layer"] = cam_layer.name if method == "gradcam" else ""
    for step, row in enumerate(rows):
        if should_stop():
            return
        sample = result.loaders[row["index"]][1]()
        pixels = render.display_image(sample, model.config)
        row["png"] = base64.b64encode(render.png(pixels)).decode()
        label_class = mapping[row["label"]][0]
        targets = {"predicted": row["predicted"]} | ({"label": label_class} if method == "gradcam" else {})
        for role, target in targets.items():
            heat = _maps(method, model, torch_model, sample[None], [target], cam_layer)[0]
            row[f"cam_{role}_png"] = base64.b64encode(
                render.png(render.overlay(pixels, render.normalize(np.nan_to_num(heat))))).decode()
        progress(step + 1, len(rows))


def _code_map(result, mapping, points: int, should_stop, progress) -> dict:
    """t-SNE of the penultimate codes (up to ``points`` images, a seeded random subset beyond), each point
    with its id, label, predicted class and whether that is right (None where the label maps to nothing)."""
    from convscope_server.forward.embedding import Stopped, tsne
    from convscope_server.scores import predicted_classes

    codes = result.codes
    if codes is None or len(codes) < 10 or points <= 0:
        return {"points": [], "reason": "fewer than 10 images with codes"}
    rows = np.arange(len(codes))
    if len(rows) > points:
        rows = np.sort(np.random.default_rng(0).choice(rows, points, replace=False))
    perplexity = float(min(30.0, (len(rows) - 1) / 3.0))
    try:
        coordinates, kl = tsne(codes[rows], perplexity, 500, 0, lambda step, total, _: progress(step, total),
                               should_stop)
    except Stopped:
        return {"points": [], "reason": "stopped"}
    predicted = result.logits[rows].argmax(axis=1).tolist()
    decided = predicted_classes(result.logits[rows], result.softmax).tolist()  # a single output: p > 0.5
    out = []
    for (x, y), row, guess, decision in zip(coordinates.tolist(), rows.tolist(), predicted, decided):
        label = result.labels[row]
        accepted = mapping.get(label)
        out.append({"id": result.ids[row], "label": label, "predicted": guess, "x": x, "y": y,
                    "correct": None if not accepted else decision in accepted})
    return {"method": "t-SNE", "perplexity": perplexity, "kl_divergence": float(kl), "points": out}


def _randomisation(model, torch_model, reason, samples, targets, methods, cam_layer, layers, should_stop) -> dict:
    """Adebayo et al.'s model-parameter randomisation (``gradient.sanity``) on the first sampled image: per
    gradient method, the Spearman correlation of its map with the trained model's after each cumulative
    re-initialisation from the top. A method whose map stays alike (|rho| >= 0.5 at the end) is not
    explaining this model ("insensitive")."""
    if reason:
        return {"unavailable": reason}
    if not len(samples) or not methods or layers <= 0:
        return {"unavailable": "no image or no gradient method in the budget"}
    from convscope_server.gradient import sanity

    makers = {method: (lambda tm, method=method: _maps(method, model, tm, samples, targets, cam_layer)[0])
              for method in methods if method != "gradcam" or cam_layer is not None}
    with torch_model.scope():
        found = sanity.cascading_randomization(torch_model, model.proto, makers, layers, seed=0,
                                               should_stop=should_stop)
    if found is None:
        return {"unavailable": "stopped"}
    return {"layers": found.layers, "correlations": found.correlations,
            "insensitive": {m: bool(abs(values[-1]) >= 0.5) for m, values in found.correlations.items() if values}}


def _fgsm(model, torch_model, samples, labels, epsilons, should_stop, progress=lambda done: None) -> dict:
    """Accuracy under FGSM and under the basic iterative method at each epsilon; ``progress(attacks done)``."""
    import torch

    from convscope_server.gradient import adversarial
    from convscope_server.gradient.synthesis.common import InputSpace
    from convscope_server.scores import predicted_classes_torch

    space = InputSpace.of(model.config, torch_model.device)
    softmax = model.config.softmax
    with torch_model.scope():
        xs = torch.cat([space.from_sample(sample) for sample in samples])
        ys = torch.from_numpy(np.asarray(labels, np.int64)).to(torch_model.device)
        accuracy = adversarial.robustness_curve(
            torch_model, space, xs, ys, list(epsilons), model.fixed_batch or 8, should_stop=should_stop,
            progress=lambda done, total, what: progress(done * len(epsilons) // max(1, total)), softmax=softmax)
        iterative = []
        chunk = model.fixed_batch or 8
        for epsilon in epsilons:  # the basic iterative method, 10 steps, on the same images
            if should_stop():
                break
            correct = 0
            for begin in range(0, len(xs), chunk):
                x, y = xs[begin: begin + chunk], ys[begin: begin + chunk]
                attacked = (adversarial.iterative(torch_model, space, x, y, epsilon, softmax=softmax)
                            if epsilon > 0 else x)
                with torch.no_grad():
                    logits = torch_model.logits(space.model_input(attacked))
                    correct += int((predicted_classes_torch(logits, softmax) == y).sum())
            iterative.append(correct / len(xs))
            progress(len(epsilons) + len(iterative))
    return {"epsilons": list(epsilons), "accuracy": [] if accuracy is None else accuracy.tolist(),
            "iterative_accuracy": iterative}
