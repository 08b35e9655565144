"""The convscope command line: a thin shell over :class:`convscope.Client`.

    convscope models
    convscope describe efficientnet_lite0 [--op Conv] [--spatial]
    convscope predict efficientnet_lite0 cat.jpg dog.png --top 5
    convscope filters efficientnet_lite0 /_conv_stem/Conv_output_0 --out out/
    convscope activations efficientnet_lite0 cat.jpg --layer /_blocks.1/Clip_output_0 --out out/
    convscope occlusion efficientnet_lite0 cat.jpg --window 32 --stride 16 --out out/
    convscope scorecam efficientnet_lite0 cat.jpg --layer /Clip_1_output_0 --out out/
    convscope saliency efficientnet_lite0 cat.jpg --method smoothgrad --out out/
    convscope guided efficientnet_lite0 cat.jpg [--layer L --channel C] --out out/
    convscope deconvnet efficientnet_lite0 cat.jpg --out out/
    convscope cam efficientnet_lite0 cat.jpg --layer /Clip_1_output_0 --method gradcam++ --out out/
    convscope sanity efficientnet_lite0 cat.jpg --method vanilla --method gradcam --out out/
    convscope classvis efficientnet_lite0 --target 130 --out out/          (or --layer L --channel C)
    convscope invert efficientnet_lite0 cat.jpg --layer L1 --layer L2 --out out/
    convscope deepdream efficientnet_lite0 cat.jpg --layer /_blocks.5/Clip_1_output_0 --out out/
    convscope style efficientnet_lite0 --style starry.jpg --content cat.jpg --style-layer L ... --out out/
    convscope adversarial efficientnet_lite0 cat.jpg [--target 967] --out out/
    convscope datasets | patches | gallery | neighbors | embed ...   (see convscope.dataset_cli)
    convscope audit efficientnet_lite0 --dataset demo --out report/ --fail-if 'accuracy < 0.7'
    convscope audits list | show NAME | delete NAME                   (see convscope.audit_cli)

Commands with --out write figures (PNG), animations (GIF), an index.html that explains them and page.json;
long jobs show a progress bar. Figures need matplotlib: pip install convscope[cli].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from convscope import figures
from convscope.cli_common import (EXIT_CODES_HELP, CliError, HelpFormatter, load_photo, report, safe_name, status,
                                  table, with_progress)
from convscope.client import DEFAULT_TARGET, Client
from convscope.errors import ConvscopeError
from convscope.audit_cli import add_commands as add_audit_commands
from convscope.dataset_cli import add_commands
from convscope.pages import Page


def _shape(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def cmd_models(client: Client, args) -> int:
    rows = [[m.name, "ready" if m.ready else "FAILED", m.num_classes or ("none" if m.no_classes else ""),
             m.execution_provider or "", m.error] for m in client.models()]
    print(table(["model", "status", "classes", "provider", "error"], rows, right={2}))
    return 0


def cmd_describe(client: Client, args) -> int:
    d = client.describe(args.model)
    if args.json:
        print(json.dumps({"name": d.name, "inputs": d.inputs, "outputs": d.outputs,
                          "preprocessing": d.preprocessing, "guessed": d.guessed,
                          "layers": [{"name": l.name, "op": l.op_type, "shape": list(l.shape),
                                      "receptive_field": None if l.receptive_field is None else {
                                          "size": l.receptive_field.size, "jump": l.receptive_field.jump,
                                          "start": l.receptive_field.start},
                                      "weight_shape": l.weight_shape} for l in d.layers]}, indent=2))
        return 0
    p = d.preprocessing
    print(f"model       {d.name}   (opset {d.opset}, {d.producer or 'unknown producer'}, {d.execution_provider})")
    for spec in d.inputs:
        print(f"input       {spec['name']} {spec['datatype']} {_shape(spec['shape'])}")
    for spec in d.outputs:
        marker = "  <- logits" if spec["name"] == d.logits_output else ""
        print(f"output      {spec['name']} {spec['datatype']} {_shape(spec['shape'])}{marker}")
    classes = d.num_classes if not d.no_classes else f"none ({d.no_classes})"
    print(f"classes     {classes}   batch {'dynamic' if not d.fixed_batch else f'fixed at {d.fixed_batch}'}")
    print(f"preprocess  {p['resize']} to {p['height']}x{p['width']} {p['layout']} {p['channel_order']}, "
          f"pixels in [0, {p['scale']:g}], mean {[round(m, 4) for m in p['mean']]}, "
          f"std {[round(s, 4) for s in p['std']]}")
    if d.guessed:
        print(f"guessed     {', '.join(d.guessed)} (no config.toml value; inferred from the graph)")
    layers = [l for l in d.layers if (not args.op or l.op_type in args.op) and (not args.spatial or l.spatial)]
    rows = []
    for l in layers:
        rf = l.receptive_field
        rows.append([l.name, l.op_type, _shape(l.shape), _shape(l.weight_shape) if l.weight_shape else "",
                     f"{rf.size[0]}x{rf.size[1]}" if rf else "", f"{rf.jump[0]}x{rf.jump[1]}" if rf else "",
                     f"{rf.start[0]:g},{rf.start[1]:g}" if rf else ""])
    print()
    print(table(["tensor", "op", "shape", "weights", "rf size", "rf jump", "rf start"], rows))
    print(f"\n{len(layers)} of {len(d.layers)} tensors")
    return 0


def cmd_predict(client: Client, args) -> int:
    for path in args.images:
        load_photo(path)  # a missing, folder or undecodable file is reported by name before any call
    results = client.predict(args.model, list(args.images), top=args.top)
    if args.json:
        print(json.dumps([{"image": path, "top": [vars(s) for s in scores]}
                          for path, scores in zip(args.images, results)], indent=2))
        return 0
    for path, scores in zip(args.images, results):
        print(f"{path}")
        print(table(["rank", "class", "label", "probability", "logit"],
                    [[i + 1, s.index, s.label, f"{s.probability:.4f}", f"{s.logit:.3f}"]
                     for i, s in enumerate(scores)], right={0, 1, 3, 4}))
        print()
    return 0


# -- shared by the picture commands --------------------------------------------------------------------------
def photos(args) -> dict[str, np.ndarray]:
    """Every image argument decoded here first: a bad file stops the command before any server work. The
    copies are for display (at most 1200 px on the long side); the server gets the files themselves."""
    return {path: figures.for_display(load_photo(path)) for path in args.images}


def preprocessing(client: Client, model: str, gradient: bool = False) -> dict:
    """The model's preprocessing (to show maps in the photo's geometry); for gradient methods, a status line
    when the server still has to convert the model (the first call waits for it)."""
    d = client.describe(model)
    if gradient and d.gradient.get("state") not in ("ready", "unavailable", ""):
        status(f"{model}: the server is converting the model for gradient methods ({d.gradient['state']}); "
               "the first call waits for it (once per server)")
    return d.preprocessing


def rendering(what: str = "figures") -> None:
    status(f"rendering {what} ...")


def _target_words(target: int, label: str) -> str:
    return f"class {target} {label}".rstrip()


def cmd_filters(client: Client, args) -> int:
    f = client.filters(args.model, args.layer, max_filters=args.max_filters, max_channels=args.max_channels)
    kind = "RGB first-layer filters" if f.rgb else "depthwise filters" if f.depthwise else "filters x input channels"
    print(f"{f.layer}: weights {list(f.weights.shape)} ({kind}, group {f.group}); "
          f"min {f.weights.min():.4f} max {f.weights.max():.4f}")
    rendering()
    page = Page(args.out, f"Filters of {f.layer}", args.model,
                "Each tile is one learned convolution kernel; weights are shown on one scale, grey or white = 0.")
    page.figure(f"filters_{safe_name(f.layer)}.png",
                figures.filters(f.weights, f.layer, kind, f.rgb, args.max_filters, args.max_channels),
                f"{f.layer}: weights {list(f.weights.shape)} ({kind})",
                "first-layer filters look like oriented edges, colour blobs and gratings; noisy or all-grey "
                "tiles are filters that learned little", wide=True)
    page.write()
    return 0


def cmd_activations(client: Client, args) -> int:
    shown = photos(args)
    result = client.activations(args.model, list(args.images), args.layer, max_channels=args.max_channels)
    page = Page(args.out, "Activations", args.model,
                "Each tile is one channel of the layer's output for the image: where in the image the channel fires.")
    rendering()
    for name, a in result.items():
        stats = a.stats
        print(f"{name}: {list(a.values.shape)} {a.layout}  mean {a.values.mean():.4f}  max {a.values.max():.4f}  "
              f"channels never positive: {int((stats['max'] <= 0).sum())}/{len(stats['max'])}")
        if a.values.ndim != 4:
            print(f"  {name} is not spatial: no picture (see the numbers above)")
            continue
        for i, path in enumerate(shown):
            page.figure(f"act_{safe_name(name)}_{safe_name(Path(path).stem)}.png",
                        figures.activations(a.values[i], a.layout, name, Path(path).name, args.max_channels),
                        f"{name} on {path}",
                        "bright tiles: channels that respond to something in this image; the position of the bright "
                        "area is where; all-dark tiles are channels this image does not excite", wide=True)
    page.write()
    return 0


def cmd_occlusion(client: Client, args) -> int:
    shown = photos(args)
    prep = preprocessing(client, args.model)
    page = Page(args.out, "Occlusion sensitivity", args.model,
                f"A grey window ({args.window} px, stride {args.stride or args.window // 2}, baseline {args.baseline}) "
                "slides over the image; each pixel shows how much covering it lowers the class score.")
    for path, photo in shown.items():
        r = with_progress(Path(path).name, lambda bar: client.occlusion(
            args.model, path, args.target, window=args.window, stride=args.stride, baseline=args.baseline,
            score=args.score, progress=bar))
        worst = np.unravel_index(np.argmin(r.probability), r.probability.shape)
        print(f"{path}: class {r.target} {r.label} p={r.base_probability:.4f}; lowest p={r.probability.min():.4f} "
              f"with the window at row {r.rows[worst[0]]}, col {r.cols[worst[1]]} ({r.forward_passes} passes)")
        rendering()
        unit = f"drop in target {args.score}"
        page.figure(f"occlusion_{safe_name(Path(path).stem)}.png", figures.heatmap(
            photo, r.attribution, prep, f"Occlusion: {_target_words(r.target, r.label)} on {Path(path).name} "
            f"(p = {r.base_probability:.2f} unoccluded)", unit),
            f"{path}: {unit} of {_target_words(r.target, r.label)} when that region is covered",
            "red: covering it lowers the score (evidence the network uses); blue: covering it raises the score",
            wide=True)
    page.write()
    return 0


def cmd_scorecam(client: Client, args) -> int:
    shown = photos(args)
    prep = preprocessing(client, args.model)
    page = Page(args.out, f"Score-CAM at {args.layer}", args.model,
                "Each channel of the layer masks the input; channels whose masked input keeps the class score "
                "high get more weight; the map is their weighted sum, scaled to 0..1.")
    for path, photo in shown.items():
        r = with_progress(Path(path).name, lambda bar: client.score_cam(
            args.model, path, args.layer, args.target, progress=bar))
        print(f"{path}: class {r.target} {r.label}; {len(r.channel_weights)} channels, {r.forward_passes} passes")
        if not r.cam.any():
            print("  the map is zero everywhere: the weighted channel sum is negative at every position (common on "
                  "a conv's raw output); try the activation after it (the ReLU/Clip output)")
        rendering()
        page.figure(f"scorecam_{safe_name(Path(path).stem)}.png", figures.heatmap(
            photo, r.cam, prep, f"Score-CAM: {_target_words(r.target, r.label)} on {Path(path).name}",
            "relative importance (0..1)"),
            f"{path}: where {args.layer} sees {_target_words(r.target, r.label)}",
            "the bright region should cover the object of the class; a map on the background means the network "
            "uses context", wide=True)
    page.write()
    return 0


def _attribution_pages(client, args, title: str, intro: str, call, unit: str, what=None, picture=False,
                       look_for: str = "") -> int:
    shown = photos(args)
    prep = preprocessing(client, args.model, gradient=True)
    page = Page(args.out, title, args.model, intro)
    for path, photo in shown.items():
        status(f"{title} of {path} ...")
        r = with_progress(Path(path).name, lambda bar: call(path, bar))
        subject = what or _target_words(r.target, r.label)
        print(f"{path}: {subject}; {r.backward_passes} backward pass(es)")
        if r.note:
            print(f"  note: {r.note}")
        rendering()
        stem, name = safe_name(Path(path).stem), Path(path).name
        page.figure(f"{args.command}_{stem}_map.png", figures.heatmap(
            photo, r.map, prep, f"{title}: {subject} on {name}", unit), f"{path}: {unit} for {subject}",
            look_for, wide=True)
        if picture:
            page.figure(f"{args.command}_{stem}_gradient.png", figures.gradient(
                photo, r.attribution, prep, f"{title}: {subject} on {name}"),
                f"{path}: the signed gradient as an image",
                "edges and textures the explained unit responds to; colour shows which colour channel would raise "
                "the score (grey = no effect)", wide=True)
        if r.mask is not None:
            page.figure(f"{args.command}_{stem}_segment.png", figures.heatmap(
                photo, r.mask.astype(np.float64), prep, f"GrabCut seeded by the map: {r.mask.mean():.0%} kept",
                "foreground (1) or background (0)"), f"{path}: GrabCut segmentation seeded by the map",
                "the kept region should be the object; it shows how far the map alone locates it", wide=True)
    page.write()
    return 0


def cmd_saliency(client: Client, args) -> int:
    names = {"vanilla": "Vanilla gradient", "smoothgrad": "SmoothGrad", "integrated_gradients": "Integrated Gradients"}
    return _attribution_pages(
        client, args, f"{names[args.method]} saliency", "How much each input pixel changes the class score: the "
        "gradient of the score with respect to the input (largest |value| over the colour channels).",
        lambda path, bar: client.saliency(args.model, path, args.target, method=args.method, samples=args.samples,
                                          noise=args.noise, steps=args.steps, segment=args.segment, progress=bar),
        "|gradient| magnitude (max over colour channels)" if args.method != "integrated_gradients"
        else "|attribution| (max over colour channels)",
        look_for="bright pixels on the object's outline and texture; vanilla maps are noisy, SmoothGrad and "
        "Integrated Gradients less so")


def cmd_backprop(client: Client, args) -> int:
    guided = args.command == "guided"
    method = client.guided_backprop if guided else client.deconvnet
    what = f"channel {args.channel} of {args.layer}" if args.layer else None
    intro = ("Guided backpropagation: the gradient passed back only where both the activation and the gradient are "
             "positive, which keeps sharp image detail." if guided else
             "DeconvNet (Zeiler & Fergus): the signal passed back through rectified gradients only; it shows patterns "
             "the unit likes, and less about where they are.")
    return _attribution_pages(
        client, args, "Guided backpropagation" if guided else "DeconvNet", intro,
        lambda path, bar: method(args.model, path, args.target, layer=args.layer or "", channel=args.channel),
        "|gradient| magnitude (max over colour channels)", what, picture=True,
        look_for="the parts of the image that drive the unit; checkerboard texture is the strided convolutions' "
        "artefact, not the image")


def cmd_cam(client: Client, args) -> int:
    names = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "cam": "CAM", "guided_gradcam": "Guided Grad-CAM"}
    guided = args.method == "guided_gradcam"
    return _attribution_pages(
        client, args, f"{names[args.method]}" + (f" at {args.layer}" if args.layer else ""),
        "The layer's channels weighted by how much they raise the class score, summed and rectified: a coarse map "
        "of where the class is." + (" Guided Grad-CAM multiplies it with guided backpropagation." if guided else ""),
        lambda path, bar: client.cam(args.model, path, args.target, layer=args.layer or "", method=args.method),
        "|attribution| (max over colour channels)" if guided else "relative importance (0..1)", picture=guided,
        look_for="the warm region should sit on the object of the class; its coarseness is the layer's resolution")


def cmd_sanity(client: Client, args) -> int:
    shown = photos(args)
    prep = preprocessing(client, args.model, gradient=True)
    page = Page(args.out, "Sanity check: cascading randomisation", args.model,
                "Adebayo et al. 2018: the model's weights are re-initialised layer by layer from the top; a method "
                "that explains the model should change its map as the model is destroyed.")
    for path, photo in shown.items():
        r = with_progress(Path(path).name, lambda bar: client.sanity_check(
            args.model, path, args.target, methods=args.method or (), cam_layer=args.cam_layer or "",
            layers=args.layers, seed=args.seed, return_maps=True, progress=bar))
        for method, values in r.spearman.items():
            print(f"{path} {method}: Spearman with the trained map {values[0]:.2f} (top layer) -> "
                  f"{values[-1]:.2f} (all {len(values)} layers)")
        rendering()
        page.figure(f"sanity_{safe_name(Path(path).stem)}.png", figures.sanity(
            photo, prep, r.original_maps, r.randomized_maps, r.layers, r.spearman,
            f"Sanity check: {_target_words(r.target, r.label)} on {Path(path).name}"),
            f"{path}: rows are methods, columns the maps as more layers are randomised (rho: rank correlation with "
            "the trained model's map)", "a trustworthy method's map falls apart (rho near 0) as layers are "
            "randomised; a map that stays the same shows the image's edges, not the model", wide=True)
    page.write()
    return 0


# -- synthesis ------------------------------------------------------------------------------------------------
class Frames:
    """Collects preview frames per stage of a streamed job (one GIF per inverted layer) and feeds a bar."""

    def __init__(self, bar):
        self.bar, self.stage, self.by_stage = bar, "", {}

    def progress(self, step, total, stage=""):
        self.stage = stage
        self.bar(step, total, stage)

    def preview(self, step, loss, png):
        if png:
            self.by_stage.setdefault(self.stage, []).append(png)

    def all(self) -> list[bytes]:
        return [frame for frames in self.by_stage.values() for frame in frames]


def _run_job(label: str, call, steps: int, parts: int = 0):
    """``call(progress, preview, preview_every)`` with a bar; returns (result, Frames)."""
    every = max(1, steps // 20)

    def go(bar):
        frames = Frames(bar)
        return call(frames.progress, frames.preview, every), frames
    return with_progress(label, go, parts=parts)


def class_label(client: Client, model: str, index: int) -> str:
    """The class name of ``index`` (the model's label file), or "" when the server cannot say."""
    try:
        names = client.labels(model)
        return names[index] if 0 <= index < len(names) else ""
    except (ConvscopeError, AttributeError):
        return ""


def target_value(text: str):
    """--target: a class index, or a class name the library resolves (e.g. "Egyptian cat")."""
    return int(text) if text.lstrip("-").isdigit() else text


def _gif(page: Page, name: str, frames: list[bytes], caption: str) -> None:
    if len(frames) > 1:
        page.image(name, figures.gif(frames), caption, "how the image changes as the optimisation runs")


def cmd_classvis(client: Client, args) -> int:
    if args.layer is None and args.target is None:
        raise CliError("classvis: give --target CLASS or --layer LAYER (with --channel)", 2)
    r, frames = _run_job("classvis", lambda progress, preview, every: client.class_visualization(
        args.model, args.target, layer=args.layer or "", channel=args.channel, jitter=args.jitter,
        blur_every=args.blur_every, decay=args.decay, l2=args.l2, steps=args.steps, learning_rate=args.lr,
        seed=args.seed, preview_every=every, progress=progress, preview=preview), args.steps or 200)
    prep = client.describe(args.model).preprocessing
    if args.layer:
        what = f"channel {args.channel} of {args.layer}"
    else:
        index = args.target if isinstance(args.target, int) else client.target_index(args.model, args.target)
        what = f"class {index} {class_label(client, args.model, index)}".rstrip()
    print(f"{what}: objective {r.losses[0]:.4g} -> {r.losses[-1]:.4g} in {len(r.losses)} steps")
    rendering()
    page = Page(args.out, f"What maximises {what}", args.model,
                "An image made from noise by gradient ascent on the objective, with regularisers (jitter, blur, decay) "
                "that keep it natural-looking.")
    page.figure("classvis.png", figures.side_by_side([(figures.input_pixels(r.image, prep), what)],
                f"What maximises {what}", losses=r.losses),
                f"{what}: the synthesised image and the objective per step",
                "repeated parts of the class (eyes, legs, textures) rather than one whole object", wide=True)
    _gif(page, "classvis.gif", frames.all(), "the optimisation, step by step")
    page.write()
    return 0


def cmd_invert(client: Client, args) -> int:
    photo = figures.for_display(load_photo(args.image))
    prep = client.describe(args.model).preprocessing
    results, frames = _run_job("invert", lambda progress, preview, every: client.invert(
        args.model, args.image, args.layer, tv_weight=args.tv_weight, steps=args.steps, learning_rate=args.lr,
        seed=args.seed, preview_every=every, progress=progress, preview=preview),
        args.steps or 200, parts=len(args.layer))
    rendering()
    page = Page(args.out, f"{Path(args.image).name} reconstructed from its codes", args.model,
                "For each layer, an image whose code at that layer matches the original's: what the layer keeps of the "
                "image.")
    aspect = figures.display_aspect(prep, photo.shape)
    panels = [(figures.model_view(photo, prep), "original (as the model sees it)")]
    panels += [(figures.input_pixels(r.image, prep), f"from {r.layer}") for r in results]
    page.figure("invert.png", figures.side_by_side(panels, f"{Path(args.image).name}: original | reconstructions",
                                                   aspect), "original, then one reconstruction per layer",
                "shallow layers keep colour and detail; deeper layers keep the layout of parts but not their look",
                wide=True)
    for r in results:
        print(f"from {r.layer}: objective {r.losses[0]:.4g} -> {r.losses[-1]:.4g} in {len(r.losses)} steps")
        own = [f for stage, f in frames.by_stage.items()
               if stage == f"inverting {r.layer}" or stage.startswith(f"inverting {r.layer} (")]
        _gif(page, f"invert_{safe_name(r.layer)}.gif", own[0] if own else [], f"reconstruction from {r.layer}, "
             "step by step")
    page.write()
    return 0


def cmd_deepdream(client: Client, args) -> int:
    photo = figures.for_display(load_photo(args.image))
    prep = client.describe(args.model).preprocessing
    r, frames = _run_job("deepdream", lambda progress, preview, every: client.deepdream(
        args.model, args.image, args.layer, octaves=args.octaves, steps=args.steps, learning_rate=args.lr,
        seed=args.seed, preview_every=every, progress=progress, preview=preview),
        (args.steps or 10) * (args.octaves or 3))
    print(f"{args.layer}: objective {r.losses[0]:.4g} -> {r.losses[-1]:.4g} in {len(r.losses)} steps")
    rendering()
    page = Page(args.out, f"DeepDream at {args.layer}", args.model,
                "The image changed by gradient ascent to make the layer's activations larger, over several scales "
                "(octaves): what the layer sees, amplified.")
    dream = figures.decode(r.png)
    page.figure("deepdream.png", figures.side_by_side(
        [(figures.model_view(photo, prep), "original"), (dream, f"dreamed at {args.layer}")],
        f"DeepDream of {Path(args.image).name}", figures.display_aspect(prep, photo.shape)),
        f"{args.image}: original | DeepDream at {args.layer}",
        "patterns the layer detects (shallow: textures; deeper: eyes, fur, object parts) grown out of the image",
        wide=True)
    _gif(page, "deepdream.gif", frames.all(), "the dream, step by step over the octaves (frames scaled to one size)")
    page.write()
    return 0


def cmd_style(client: Client, args) -> int:
    style = figures.for_display(load_photo(args.style))
    content = figures.for_display(load_photo(args.content)) if args.content else None
    r, frames = _run_job("style", lambda progress, preview, every: client.style_transfer(
        args.model, args.style, args.content, style_layers=args.style_layer, content_layer=args.content_layer or "",
        optimizer=args.optimizer, height=args.height, width=args.width, steps=args.steps, learning_rate=args.lr,
        seed=args.seed, preview_every=every, progress=progress, preview=preview), args.steps or 300)
    what = f"{Path(args.content).name} in the style of {Path(args.style).name}" if args.content else \
        f"texture from {Path(args.style).name}"
    print(f"{what}: objective {r.losses[0]:.4g} -> {r.losses[-1]:.4g} in {len(r.losses)} steps")
    rendering()
    result = figures.decode(r.png)
    shape = content.shape if content is not None else None   # a texture has no photo to follow
    prep = client.describe(args.model).preprocessing
    aspect = 1.0 if args.height or args.width else figures.display_aspect(prep, shape)
    panels = ([(content, "content", 1.0)] if content is not None else []) + [(style, "style", 1.0),
                                                                             (result, "result", aspect)]
    page = Page(args.out, what, args.model,
                "Gatys et al.: an image whose Gram matrices (feature correlations) at the style layers match the style "
                "image's" + (" and whose code at the content layer matches the content image's." if content is not None
                             else "."))
    page.figure("style.png", figures.side_by_side(panels, what, losses=r.losses, loss_label="loss"),
                " | ".join(p[1] for p in panels), "the style's colours and brush texture, the content's layout",
                wide=True)
    _gif(page, "style.gif", frames.all(), "the optimisation, step by step")
    page.write()
    return 0


def cmd_adversarial(client: Client, args) -> int:
    shown = photos(args)
    prep = client.describe(args.model).preprocessing
    targeted = args.target is not None
    if targeted:
        index = args.target if isinstance(args.target, int) else client.target_index(args.model, args.target)
        towards = f" towards class {index} {class_label(client, args.model, index)}".rstrip()
    page = Page(args.out, "Adversarial examples" + (towards if targeted else " (FGSM)"),
                args.model, "A small change to every pixel, made along the gradient, that changes the served model's "
                "answer; the middle panel shows the change multiplied so it can be seen.")
    for path, photo in shown.items():
        r, frames = _run_job(Path(path).name, lambda progress, preview, every: client.adversarial(
            args.model, path, "targeted" if targeted else "fgsm", target=args.target, epsilon=args.epsilon,
            steps=args.steps, preview_every=1 if targeted else 0, progress=progress, preview=preview),
            args.steps or 100)
        stem = safe_name(Path(path).stem)
        before, after = r.before[0], r.after[0]
        verdict = (f"{path}: {before.label} ({before.probability:.2f}) -> {after.label} ({after.probability:.2f}), "
                   f"largest pixel change {r.linf_pixels * 255:.1f}/255")
        print(verdict)
        rendering()
        change, factor = figures.amplified(figures.pixel_change(r.perturbation, prep))
        panels = [(figures.model_view(photo, prep), f"original: {before.label} ({before.probability:.2f})"),
                  (change, f"perturbation x {factor:g}"),
                  (figures.input_pixels(r.image, prep), f"adversarial: {after.label} ({after.probability:.2f})")]
        page.figure(f"adversarial_{stem}.png", figures.side_by_side(
            panels, f"{Path(path).name}: largest change {r.linf_pixels * 255:.1f}/255 per pixel",
            figures.display_aspect(prep, photo.shape)), verdict,
            "the two images look the same to us, yet the model's answer changes; the perturbation looks like noise",
            wide=True)
        page.figures[-1]["info"]["factor"] = factor
        _gif(page, f"adversarial_{stem}.gif", frames.all(), f"{r.steps_taken} steps towards the target")
    page.write()
    return 0


# -- the parser -----------------------------------------------------------------------------------------------
OUT_HELP = "output folder (default: convscope-out/COMMAND)"


def _parser(commands, name: str, help: str, run, description: str = ""):
    sub = commands.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)
    sub.set_defaults(run=run)
    return sub


def image_command(commands, name: str, help: str, run, target: bool = True,
                  target_help: str = "class to explain: index or name, e.g. 285 or 'Egyptian cat' (default: the "
                                     "predicted class)"):
    """A picture-making subcommand over MODEL IMAGE...: with --target (when it has one) and --out."""
    sub = _parser(commands, name, help, run)
    sub.add_argument("model", help="model name (see `convscope models`)")
    sub.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    if target:
        sub.add_argument("--target", type=target_value, default=None, help=target_help)
    sub.add_argument("--out", type=Path, default=None, help=OUT_HELP)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convscope", description="Inspect convolutional networks served by a "
                                     "convscope server.", epilog=EXIT_CODES_HELP, formatter_class=HelpFormatter)
    parser.add_argument("--server", default=DEFAULT_TARGET,
                        help=f"server address HOST:PORT (env CONVSCOPE_SERVER; default: {DEFAULT_TARGET})")
    parser.add_argument("--token", default=os.environ.get("CONVSCOPE_TOKEN"),
                        help="bearer token, when the server wants one (env CONVSCOPE_TOKEN; given here it is "
                        "visible in `ps`: prefer the variable or --token-file)")
    parser.add_argument("--token-file", type=Path, default=os.environ.get("CONVSCOPE_TOKEN_FILE"),
                        help="read the bearer token from this file's first line (env CONVSCOPE_TOKEN_FILE)")
    parser.add_argument("--tls", metavar="PEM", default=os.environ.get("CONVSCOPE_TLS"),
                        help="use TLS; PEM is a root-certificate file, or 'system' for the system roots "
                        "(env CONVSCOPE_TLS; default: plaintext)")
    parser.add_argument("--tls-cert", metavar="PEM", default=os.environ.get("CONVSCOPE_TLS_CERT"),
                        help="client certificate for servers that require one (mutual TLS); needs --tls-key "
                        "(env CONVSCOPE_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", default=os.environ.get("CONVSCOPE_TLS_KEY"),
                        help="private key of --tls-cert (env CONVSCOPE_TLS_KEY)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per call in seconds")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _parser(commands, "models", "list the models in the repository", cmd_models)

    describe = _parser(commands, "describe", "inputs, outputs, preprocessing and every tensor", cmd_describe)
    describe.add_argument("model", help="model name (see `convscope models`)")
    describe.add_argument("--op", action="append", help="only tensors made by this op, e.g. Conv (repeatable; "
                          "default: all)")
    describe.add_argument("--spatial", action="store_true", help="only spatial tensors (with a receptive field)")
    describe.add_argument("--json", action="store_true", help="print JSON instead of a table")

    predict = _parser(commands, "predict", "top-k classes for images", cmd_predict)
    predict.add_argument("model", help="model name (see `convscope models`)")
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top", type=int, default=0,
                         help="classes to list per image (default: 5, or every class of a model with fewer)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of tables")

    filters = _parser(commands, "filters", "weights of a Conv layer as a picture", cmd_filters)
    filters.add_argument("model", help="model name (see `convscope models`)")
    filters.add_argument("layer", help="a Conv output tensor or Conv node name (see `convscope describe MODEL "
                         "--op Conv`)")
    filters.add_argument("--max-filters", type=int, default=64, help="filters (output channels) to show")
    filters.add_argument("--max-channels", type=int, default=16, help="input channels per filter (deeper layers)")
    filters.add_argument("--out", type=Path, default=None, help=OUT_HELP)

    activations = image_command(commands, "activations", "channel grids of tensors for images", cmd_activations,
                                target=False)
    activations.add_argument("--layer", action="append", required=True, help="tensor name (repeatable; required)")
    activations.add_argument("--max-channels", type=int, default=64, help="channels shown per picture")

    occlusion = image_command(commands, "occlusion", "occlusion sensitivity maps", cmd_occlusion)
    occlusion.add_argument("--window", type=int, default=32, help="side of the occluding square, in model-input "
                           "pixels")
    occlusion.add_argument("--stride", type=int, default=None, help="pixels between windows (default: half the "
                           "window)")
    occlusion.add_argument("--baseline", default="constant", choices=["constant", "mean", "blur"],
                           help="what fills the window: the normalisation mean (grey), the image's mean colour, or "
                           "a blurred copy")
    occlusion.add_argument("--score", default="probability", choices=["probability", "logit"],
                           help="the class score whose drop is mapped")

    scorecam = image_command(commands, "scorecam", "Score-CAM class activation maps", cmd_scorecam)
    scorecam.add_argument("--layer", required=True, help="a spatial tensor, e.g. the last conv block's activation "
                          "(required)")

    saliency = image_command(commands, "saliency", "gradient saliency: vanilla, SmoothGrad, Integrated Gradients",
                             cmd_saliency)
    saliency.add_argument("--method", default="vanilla", choices=["vanilla", "smoothgrad", "integrated_gradients"],
                          help="saliency method")
    saliency.add_argument("--samples", type=int, default=0, help="SmoothGrad samples (default: 0 = the server's 25)")
    saliency.add_argument("--noise", type=float, default=0.0, help="SmoothGrad noise as a fraction of the input "
                          "range (default: 0 = the server's 0.15)")
    saliency.add_argument("--steps", type=int, default=0, help="Integrated Gradients steps (default: 0 = the "
                          "server's 50)")
    saliency.add_argument("--segment", action="store_true", help="also a GrabCut segmentation seeded by the map")

    for name, text in (("guided", "guided backpropagation"), ("deconvnet", "DeconvNet reconstruction")):
        sub = image_command(commands, name, f"{text} of a class score or one channel", cmd_backprop)
        sub.add_argument("--layer", default=None, help="explain this layer's channel instead of a class "
                         "(default: the class score)")
        sub.add_argument("--channel", type=int, default=0, help="the channel of --layer to explain")

    cam = image_command(commands, "cam", "class activation maps: Grad-CAM, Grad-CAM++, CAM, Guided Grad-CAM",
                        cmd_cam)
    cam.add_argument("--layer", default=None, help="a spatial tensor, e.g. the last activation (CAM: may be left "
                     "out; default: the server's choice)")
    cam.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "cam", "guided_gradcam"],
                     help="CAM variant")

    sanity = image_command(commands, "sanity", "sanity check of saliency methods (cascading randomisation)",
                           cmd_sanity)
    sanity.add_argument("--method", action="append", choices=["vanilla", "integrated_gradients", "guided_backprop",
                                                              "gradcam"],
                        help="methods to check (repeatable; default: all four)")
    sanity.add_argument("--cam-layer", default=None, help="Grad-CAM's layer (default: the last spatial one)")
    sanity.add_argument("--layers", type=int, default=0, help="randomise at most this many layers (0: all)")
    sanity.add_argument("--seed", type=int, default=0, help="random seed of the re-initialisation")

    def synthesis_command(name, help, run, image=True, steps=200):
        sub = _parser(commands, name, help, run)
        sub.add_argument("model", help="model name (see `convscope models`)")
        if image:
            sub.add_argument("image", help="the image file to start from")
        sub.add_argument("--steps", type=int, default=0, help=f"optimisation steps (default: 0 = the server's {steps})")
        sub.add_argument("--lr", type=float, default=0.0, help="learning rate (default: 0 = the server's per "
                         "technique)")
        sub.add_argument("--seed", type=int, default=0, help="random seed (same seed, same picture)")
        sub.add_argument("--out", type=Path, default=None, help=OUT_HELP)
        return sub

    classvis = synthesis_command("classvis", "class or feature visualisation by gradient ascent", cmd_classvis,
                                 image=False)
    classvis.add_argument("--target", type=target_value, default=None, help="a class to visualise: index or name "
                          "(or --layer)")
    classvis.add_argument("--layer", default=None, help="or a layer whose --channel to visualise")
    classvis.add_argument("--channel", type=int, default=0, help="channel of --layer")
    classvis.add_argument("--jitter", type=int, default=4, help="random shift in pixels before each step")
    classvis.add_argument("--blur-every", type=int, default=4, help="blur the image every N steps (0: never)")
    classvis.add_argument("--decay", type=float, default=0.001, help="weight decay: shrink the image each step")
    classvis.add_argument("--l2", type=float, default=0.0, help="L2 penalty on the image")

    invert = synthesis_command("invert", "reconstruct an image from its code at layers", cmd_invert)
    invert.add_argument("--layer", action="append", required=True, help="repeatable: one reconstruction per layer "
                        "(required)")
    invert.add_argument("--tv-weight", type=float, default=0.0, help="total-variation weight (default: 0 = the "
                        "server's)")

    deepdream = synthesis_command("deepdream", "amplify what a layer sees", cmd_deepdream, steps=10)
    deepdream.add_argument("--layer", required=True, help="the layer whose activations to amplify (required)")
    deepdream.add_argument("--octaves", type=int, default=0, help="image scales, smallest first (default: 0 = the "
                           "server's 3)")

    style = synthesis_command("style", "style transfer or texture synthesis (Gatys et al.)", cmd_style, image=False,
                              steps=300)
    style.add_argument("--style", required=True, help="the style (or texture) image (required)")
    style.add_argument("--content", default=None, help="the content image (default: none, texture synthesis)")
    style.add_argument("--style-layer", action="append", required=True, help="layer whose Gram matrix to match "
                       "(repeatable; required)")
    style.add_argument("--content-layer", default=None, help="layer whose code to match (default: the server's)")
    style.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"], help="optimiser")
    style.add_argument("--height", type=int, default=0, help="result height (default: 0 = the model's)")
    style.add_argument("--width", type=int, default=0, help="result width (default: 0 = the model's)")

    adv = image_command(commands, "adversarial", "FGSM, or targeted fooling with --target", cmd_adversarial,
                        target_help="fool the model towards this class (default: FGSM away from the predicted class)")
    adv.add_argument("--epsilon", type=float, default=0.0, help="largest change per pixel in [0, 1] units "
                     "(default: 0 = the server's)")
    adv.add_argument("--steps", type=int, default=0, help="targeted: most steps (default: 0 = the server's 100)")

    add_commands(commands, _parser)
    add_audit_commands(commands, _parser)
    return parser


def _token(args) -> str | None:
    """--token, or the first line of --token-file; both at once is an error."""
    if args.token_file is None:
        return args.token
    if args.token:
        raise CliError("--token-file: a token is also given by --token or CONVSCOPE_TOKEN; use one", 2)
    lines = Path(args.token_file).read_text().splitlines()
    if not lines or not lines[0].strip():
        raise CliError(f"--token-file: {str(args.token_file)!r} is empty", 2)
    return lines[0].strip()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "out") and args.out is None:
        args.out = Path("convscope-out") / args.command
    try:
        if hasattr(args, "out"):
            figures.require()  # before any server work
        tls = True if args.tls == "system" else args.tls
        client = Client(args.server, token=_token(args), tls=tls, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        timeout=args.timeout)
    except ImportError as error:
        print(f"convscope: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, CliError) as error:  # connection flags: inconsistent or unreadable
        code = report(error, args.server)
        return 2 if code == 4 else code
    try:
        with client:
            return args.run(client, args)
    except KeyboardInterrupt:
        print("convscope: interrupted (the server stops the job)", file=sys.stderr)
        return 130
    except (CliError, ConvscopeError, OSError, ValueError, TypeError, ImportError) as error:
        return report(error, args.server)  # in CLI terms, with its exit code


if __name__ == "__main__":
    sys.exit(main())
