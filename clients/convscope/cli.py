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
    convscope classvis efficientnet_lite0 --target 130 --out out/          (or --layer L --channel C)
    convscope invert efficientnet_lite0 cat.jpg --layer L1 --layer L2 --out out/
    convscope deepdream efficientnet_lite0 cat.jpg --layer /_blocks.5/Clip_1_output_0 --out out/
    convscope style efficientnet_lite0 --style starry.jpg --content cat.jpg --style-layer L ... --out out/
    convscope adversarial efficientnet_lite0 cat.jpg [--target 967] --out out/
    convscope datasets | patches | gallery | neighbors | embed ...   (see convscope.dataset_cli)

Commands with --out write PNGs and an index.html that shows them; long jobs show a progress bar.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from convscope.client import DEFAULT_TARGET, Client
from convscope.errors import ConvscopeError


def table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    """A plain-text table with a header rule; columns in ``right`` are right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _shape(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def cmd_models(client: Client, args) -> int:
    rows = [[m.name, "ready" if m.ready else "FAILED", m.num_classes or "", m.execution_provider or "",
             m.error] for m in client.models()]
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
    print(f"classes     {d.num_classes}   batch {'dynamic' if not d.fixed_batch else f'fixed at {d.fixed_batch}'}")
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


class ProgressBar:
    """A one-line progress bar on stderr: ``bar(step, total, stage)``."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label = label
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False
        self.live = hasattr(stream, "isatty") and stream.isatty()
        self.stage = None

    def __call__(self, step: int, total: int, stage: str = "") -> None:
        if not self.live and stage == self.stage and step < total:
            return  # piped to a file or another program: one line per stage and the end, not every step
        if not self.live and self.shown:
            self.stream.write("\n")
        self.stage = stage
        width = 30
        done = int(width * step / total) if total else width
        rate = step / max(time.monotonic() - self.started, 1e-9)
        eta = (total - step) / rate if rate > 0 else 0
        self.stream.write(f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {step}/{total} "
                          f"{stage} {eta:4.0f}s left ")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\n")


class Page:
    """Collects pictures and captions into ``out/`` and writes ``out/index.html`` to show them."""

    def __init__(self, out: Path, title: str):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.items: list[tuple[str, str]] = []

    def image(self, name: str, data: bytes, caption: str) -> Path:
        path = self.out / name
        path.write_bytes(data)
        self.items.append((name, caption))
        return path

    def write(self, summary: str = "") -> Path:
        figures = "\n".join(
            f'<figure><img src="{html.escape(name)}" style="image-rendering: pixelated; max-width: 100%">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>" for name, caption in self.items)
        page = (f"<!doctype html><meta charset=utf-8><title>{html.escape(self.title)}</title>"
                "<style>body{font-family:sans-serif;margin:2em;background:#fafafa} figure{display:inline-block;"
                "margin:1em;vertical-align:top} figcaption{max-width:40em;font-size:90%}</style>"
                f"<h1>{html.escape(self.title)}</h1><p>{html.escape(summary)}</p>{figures}")
        path = self.out / "index.html"
        path.write_text(page)
        print(f"wrote {len(self.items)} picture(s) and {path}")
        return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_") or "tensor"


def with_progress(label: str, call):
    """``call(bar)`` with a progress bar that is closed however the call ends."""
    bar = ProgressBar(label)
    try:
        return call(bar)
    finally:
        bar.close()


def cmd_filters(client: Client, args) -> int:
    f = client.filters(args.model, args.layer, render=True, max_filters=args.max_filters,
                       max_channels=args.max_channels)
    kind = "RGB first-layer filters" if f.rgb else "depthwise filters" if f.depthwise else "filters x input channels"
    print(f"{f.layer}: weights {list(f.weights.shape)} ({kind}, group {f.group}); "
          f"min {f.weights.min():.4f} max {f.weights.max():.4f}")
    page = Page(args.out, f"Filters of {args.model} {f.layer}")
    page.image(f"filters_{_safe(f.layer)}.png", f.png, f"{f.layer} — {kind}, weights {list(f.weights.shape)}")
    page.write()
    return 0


def cmd_activations(client: Client, args) -> int:
    result = client.activations(args.model, list(args.images), args.layer, render=True,
                                max_channels=args.max_channels)
    page = Page(args.out, f"Activations of {args.model}")
    for name, a in result.items():
        stats = a.stats
        print(f"{name}: {list(a.values.shape)} {a.layout}  mean {a.values.mean():.4f}  max {a.values.max():.4f}  "
              f"channels never positive: {int((stats['max'] <= 0).sum())}/{len(stats['max'])}")
        for path, picture in zip(args.images, a.png):
            page.image(f"act_{_safe(name)}_{_safe(Path(path).stem)}.png", picture,
                       f"{name} on {path}: first {args.max_channels} channels (0 = black, layer max = white)")
    page.write()
    return 0


def cmd_occlusion(client: Client, args) -> int:
    page = Page(args.out, f"Occlusion on {args.model}")
    for path in args.images:
        r = with_progress(Path(path).name, lambda bar: client.occlusion(
            args.model, path, args.target, window=args.window, stride=args.stride, baseline=args.baseline,
            score=args.score, render=True, progress=bar))
        worst = np.unravel_index(np.argmin(r.probability), r.probability.shape)
        print(f"{path}: class {r.target} {r.label} p={r.base_probability:.4f}; lowest p={r.probability.min():.4f} "
              f"with the window at row {r.rows[worst[0]]}, col {r.cols[worst[1]]} ({r.forward_passes} passes)")
        stem = _safe(Path(path).stem)
        page.image(f"occlusion_{stem}_overlay.png", r.overlay_png,
                   f"{path}: drop in {args.score} of {r.target} {r.label} (brighter = more important)")
        page.image(f"occlusion_{stem}_heatmap.png", r.heatmap_png, "heatmap alone")
    page.write(f"window {args.window}, stride {args.stride or args.window // 2}, baseline {args.baseline}")
    return 0


def cmd_scorecam(client: Client, args) -> int:
    page = Page(args.out, f"Score-CAM on {args.model} {args.layer}")
    for path in args.images:
        r = with_progress(Path(path).name, lambda bar: client.score_cam(
            args.model, path, args.layer, args.target, render=True, progress=bar))
        print(f"{path}: class {r.target} {r.label}; {len(r.channel_weights)} channels, {r.forward_passes} passes")
        if not r.cam.any():
            print("  the map is zero everywhere: the weighted channel sum is negative at every position (common on "
                  "a conv's raw output); try the activation after it (the ReLU/Clip output)")
        stem = _safe(Path(path).stem)
        page.image(f"scorecam_{stem}_overlay.png", r.overlay_png, f"{path}: Score-CAM for {r.target} {r.label}")
        page.image(f"scorecam_{stem}_heatmap.png", r.heatmap_png, "map alone")
    page.write()
    return 0


def gradient_picture(attribution: np.ndarray) -> bytes:
    """An input-shaped gradient as an RGB picture, the usual way guided backprop and DeconvNet are shown:
    standardised, scaled by 0.1 and centred on grey, then clipped."""
    import io

    from PIL import Image

    hwc = attribution if attribution.shape[-1] in (1, 3) else attribution.transpose(1, 2, 0)
    standard = (hwc - hwc.mean()) / (hwc.std() + 1e-5)
    pixels = ((standard * 0.1 + 0.5) * 255).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _attribution_pages(args, title: str, call, describe: str, picture: bool = False) -> int:
    page = Page(args.out, title)
    for path in args.images:
        r = with_progress(Path(path).name, lambda bar: call(path, bar))
        print(f"{path}: class {r.target} {r.label}; {r.backward_passes} backward pass(es)")
        stem = _safe(Path(path).stem)
        page.image(f"{args.command}_{stem}_overlay.png", r.overlay_png, f"{path}: {describe} for {r.target} {r.label}")
        page.image(f"{args.command}_{stem}_map.png", r.heatmap_png, "map alone")
        if picture:
            page.image(f"{args.command}_{stem}_gradient.png", gradient_picture(r.attribution),
                       "the gradient as an image (grey = 0, standardised)")
        if getattr(r, "mask_png", b""):
            page.image(f"{args.command}_{stem}_segment.png", r.mask_png,
                       f"GrabCut seeded by the map: {r.mask.mean():.0%} of the image kept")
    page.write()
    return 0


def cmd_saliency(client: Client, args) -> int:
    return _attribution_pages(args, f"{args.method} saliency on {args.model}", lambda path, bar: client.saliency(
        args.model, path, args.target, method=args.method, samples=args.samples, noise=args.noise,
        steps=args.steps, render=True, segment=args.segment, progress=bar),
        f"{args.method} (max |attribution| over channels)")


def cmd_backprop(client: Client, args) -> int:
    method = client.guided_backprop if args.command == "guided" else client.deconvnet
    what = f"channel {args.channel} of {args.layer}" if args.layer else "class score"
    return _attribution_pages(args, f"{args.command} on {args.model}", lambda path, bar: method(
        args.model, path, args.target, layer=args.layer or "", channel=args.channel, render=True),
        f"{args.command} of the {what}", picture=True)


def cmd_cam(client: Client, args) -> int:
    return _attribution_pages(args, f"{args.method} on {args.model} {args.layer or ''}", lambda path, bar: client.cam(
        args.model, path, args.target, layer=args.layer or "", method=args.method, render=True),
        args.method, picture=args.method == "guided_gradcam")


def gif(frames: list[bytes]) -> bytes:
    """PNG frames -> an animated GIF (the optimisation as it went)."""
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=120, loop=0)
    return buffer.getvalue()


def _synthesis_page(args, title: str, results, caption) -> int:
    page = Page(args.out, title)
    for k, r in enumerate(results):
        name = _safe(r.layer) if getattr(r, "layer", "") else str(k)
        page.image(f"{args.command}_{name}.png", r.png, caption(r))
        if r.frames:
            page.image(f"{args.command}_{name}.gif", gif(r.frames), "the optimisation, step by step")
        print(f"{caption(r)}: objective {r.losses[0]:.4g} -> {r.losses[-1]:.4g} in {len(r.losses)} steps")
    page.write()
    return 0


def _optimization(args) -> dict:
    return {"steps": args.steps, "learning_rate": args.lr, "seed": args.seed, "frames": True}


def cmd_classvis(client: Client, args) -> int:
    if args.layer is None and args.target is None:
        raise SystemExit("convscope classvis: give --target CLASS or --layer LAYER")
    r = with_progress("classvis", lambda bar: client.class_visualization(
        args.model, args.target, layer=args.layer or "", channel=args.channel, jitter=args.jitter,
        blur_every=args.blur_every, decay=args.decay, l2=args.l2, progress=bar, **_optimization(args)))
    what = f"channel {args.channel} of {args.layer}" if args.layer else f"class {args.target}"
    return _synthesis_page(args, f"What maximises {what} in {args.model}", [r], lambda _: what)


def cmd_invert(client: Client, args) -> int:
    results = with_progress("invert", lambda bar: client.invert(
        args.model, args.image, args.layer, tv_weight=args.tv_weight, progress=bar, **_optimization(args)))
    return _synthesis_page(args, f"{args.image} reconstructed from {args.model}'s codes", results,
                           lambda r: f"from {r.layer}")


def cmd_deepdream(client: Client, args) -> int:
    r = with_progress("deepdream", lambda bar: client.deepdream(
        args.model, args.image, args.layer, octaves=args.octaves, progress=bar, **_optimization(args)))
    return _synthesis_page(args, f"DeepDream of {args.image} at {args.layer}", [r], lambda _: args.layer)


def cmd_style(client: Client, args) -> int:
    r = with_progress("style", lambda bar: client.style_transfer(
        args.model, args.style, args.content, style_layers=args.style_layer, content_layer=args.content_layer or "",
        optimizer=args.optimizer, height=args.height, width=args.width, progress=bar, **_optimization(args)))
    what = f"{args.content} in the style of {args.style}" if args.content else f"texture from {args.style}"
    return _synthesis_page(args, what, [r], lambda _: what)


def cmd_adversarial(client: Client, args) -> int:
    page = Page(args.out, f"Adversarial examples for {args.model}")
    for path in args.images:
        r = with_progress(Path(path).name, lambda bar: client.adversarial(
            args.model, path, "targeted" if args.target is not None else "fgsm", target=args.target,
            epsilon=args.epsilon, steps=args.steps, progress=bar, frames=args.target is not None))
        stem = _safe(Path(path).stem)
        verdict = (f"{path}: {r.before[0].label} ({r.before[0].probability:.2f}) -> {r.after[0].label} "
                   f"({r.after[0].probability:.2f}), largest pixel change {r.linf_pixels * 255:.1f}/255")
        print(verdict)
        page.image(f"adversarial_{stem}.png", r.png, verdict)
        page.image(f"adversarial_{stem}_perturbation.png", r.perturbation_png, "the perturbation, amplified")
        if r.frames:
            page.image(f"adversarial_{stem}.gif", gif(r.frames), "step by step")
    page.write()
    return 0


def image_command(commands, name: str, help: str, run, target: bool = True):
    """A picture-making subcommand over MODEL IMAGE...: with --target (when it has one) and --out."""
    sub = commands.add_parser(name, help=help)
    sub.add_argument("model")
    sub.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    if target:
        sub.add_argument("--target", type=int, default=None, help="class (default: the predicted one)")
    sub.add_argument("--out", type=Path, default=None, help="output folder (default convscope-out/COMMAND)")
    sub.set_defaults(run=run)
    return sub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convscope", description="Inspect convolutional networks served by a "
                                     "convscope server.")
    parser.add_argument("--server", default=DEFAULT_TARGET,
                        help=f"server address (env CONVSCOPE_SERVER, default {DEFAULT_TARGET})")
    parser.add_argument("--token", default=os.environ.get("CONVSCOPE_TOKEN"),
                        help="bearer token, when the server wants one (env CONVSCOPE_TOKEN; given here it is "
                        "visible in `ps`: prefer the variable or --token-file)")
    parser.add_argument("--token-file", type=Path, default=os.environ.get("CONVSCOPE_TOKEN_FILE"),
                        help="read the bearer token from this file's first line (env CONVSCOPE_TOKEN_FILE)")
    parser.add_argument("--tls", metavar="PEM", default=os.environ.get("CONVSCOPE_TLS"),
                        help="use TLS; PEM is a root-certificate file, or 'system' for the system roots "
                        "(env CONVSCOPE_TLS)")
    parser.add_argument("--tls-cert", metavar="PEM", default=os.environ.get("CONVSCOPE_TLS_CERT"),
                        help="client certificate for servers that require one (mutual TLS); needs --tls-key "
                        "(env CONVSCOPE_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", default=os.environ.get("CONVSCOPE_TLS_KEY"),
                        help="private key of --tls-cert (env CONVSCOPE_TLS_KEY)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline per call in seconds")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("models", help="list the models in the repository").set_defaults(run=cmd_models)

    describe = commands.add_parser("describe", help="inputs, outputs, preprocessing and every tensor")
    describe.add_argument("model")
    describe.add_argument("--op", action="append", help="only tensors made by this op (repeatable)")
    describe.add_argument("--spatial", action="store_true", help="only spatial tensors (with a receptive field)")
    describe.add_argument("--json", action="store_true", help="print JSON instead of a table")
    describe.set_defaults(run=cmd_describe)

    predict = commands.add_parser("predict", help="top-k classes for images")
    predict.add_argument("model")
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--top", type=int, default=5)
    predict.add_argument("--json", action="store_true", help="print JSON instead of tables")
    predict.set_defaults(run=cmd_predict)

    filters = commands.add_parser("filters", help="weights of a Conv layer as a picture")
    filters.add_argument("model")
    filters.add_argument("layer", help="a Conv output tensor or Conv node name")
    filters.add_argument("--max-filters", type=int, default=64)
    filters.add_argument("--max-channels", type=int, default=16, help="input channels per filter (deeper layers)")
    filters.add_argument("--out", type=Path, default=None, help="output folder (default convscope-out/COMMAND)")
    filters.set_defaults(run=cmd_filters)

    activations = image_command(commands, "activations", "channel grids of tensors for images", cmd_activations,
                                target=False)
    activations.add_argument("--layer", action="append", required=True, help="tensor name (repeatable)")
    activations.add_argument("--max-channels", type=int, default=64)

    occlusion = image_command(commands, "occlusion", "occlusion sensitivity maps", cmd_occlusion)
    occlusion.add_argument("--window", type=int, default=32)
    occlusion.add_argument("--stride", type=int, default=None, help="default: half the window")
    occlusion.add_argument("--baseline", default="constant", choices=["constant", "mean", "blur"])
    occlusion.add_argument("--score", default="probability", choices=["probability", "logit"])

    scorecam = image_command(commands, "scorecam", "Score-CAM class activation maps", cmd_scorecam)
    scorecam.add_argument("--layer", required=True, help="a spatial tensor, e.g. the last conv block's activation")

    saliency = image_command(commands, "saliency", "gradient saliency: vanilla, SmoothGrad, Integrated Gradients",
                             cmd_saliency)
    saliency.add_argument("--method", default="vanilla", choices=["vanilla", "smoothgrad", "integrated_gradients"])
    saliency.add_argument("--samples", type=int, default=0, help="SmoothGrad samples (default 25)")
    saliency.add_argument("--noise", type=float, default=0.0, help="SmoothGrad noise, fraction of the range (0.15)")
    saliency.add_argument("--steps", type=int, default=0, help="Integrated Gradients steps (default 50)")
    saliency.add_argument("--segment", action="store_true", help="also a GrabCut segmentation seeded by the map")

    for name, text in (("guided", "guided backpropagation"), ("deconvnet", "DeconvNet reconstruction")):
        sub = image_command(commands, name, f"{text} of a class score or one channel", cmd_backprop)
        sub.add_argument("--layer", default=None, help="explain this layer's channel instead of a class")
        sub.add_argument("--channel", type=int, default=0)

    cam = image_command(commands, "cam", "class activation maps: Grad-CAM, Grad-CAM++, CAM, Guided Grad-CAM",
                        cmd_cam)
    cam.add_argument("--layer", default=None, help="a spatial tensor (CAM: may be left out)")
    cam.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++", "cam", "guided_gradcam"])

    def synthesis_command(name, help, run, image=True):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("model")
        if image:
            sub.add_argument("image")
        sub.add_argument("--steps", type=int, default=0, help="optimisation steps (default per technique)")
        sub.add_argument("--lr", type=float, default=0.0, help="learning rate (default per technique)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--out", type=Path, default=None, help="output folder (default convscope-out/COMMAND)")
        sub.set_defaults(run=run)
        return sub

    classvis = synthesis_command("classvis", "class or feature visualisation by gradient ascent", cmd_classvis,
                                 image=False)
    classvis.add_argument("--target", type=int, default=None, help="a class to visualise")
    classvis.add_argument("--layer", default=None, help="or a layer's channel")
    classvis.add_argument("--channel", type=int, default=0)
    classvis.add_argument("--jitter", type=int, default=4)
    classvis.add_argument("--blur-every", type=int, default=4)
    classvis.add_argument("--decay", type=float, default=0.001)
    classvis.add_argument("--l2", type=float, default=0.0)

    invert = synthesis_command("invert", "reconstruct an image from its code at layers", cmd_invert)
    invert.add_argument("--layer", action="append", required=True, help="repeatable: one picture per layer")
    invert.add_argument("--tv-weight", type=float, default=0.0)

    deepdream = synthesis_command("deepdream", "amplify what a layer sees", cmd_deepdream)
    deepdream.add_argument("--layer", required=True)
    deepdream.add_argument("--octaves", type=int, default=0)

    style = synthesis_command("style", "style transfer or texture synthesis (Gatys et al.)", cmd_style, image=False)
    style.add_argument("--style", required=True, help="the style (or texture) image")
    style.add_argument("--content", default=None, help="the content image (leave out for a texture)")
    style.add_argument("--style-layer", action="append", required=True, help="repeatable")
    style.add_argument("--content-layer", default=None)
    style.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"])
    style.add_argument("--height", type=int, default=0)
    style.add_argument("--width", type=int, default=0)

    adv = image_command(commands, "adversarial", "FGSM, or targeted fooling with --target", cmd_adversarial)
    adv.add_argument("--epsilon", type=float, default=0.0, help="L-inf size in [0, 1] pixel units")
    adv.add_argument("--steps", type=int, default=0, help="targeted: most steps (default 100)")

    from convscope.dataset_cli import add_commands  # it imports this module's helpers

    add_commands(commands)
    return parser


def _token(args) -> str | None:
    """--token, or the first line of --token-file; both at once is an error."""
    if args.token_file is None:
        return args.token
    if args.token:
        raise ValueError("--token-file: a token is also given by --token or CONVSCOPE_TOKEN; use one")
    lines = Path(args.token_file).read_text().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"--token-file: {str(args.token_file)!r} is empty")
    return lines[0].strip()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "out") and args.out is None:
        args.out = Path("convscope-out") / args.command
    tls = True if args.tls == "system" else args.tls
    try:  # connection flags: inconsistent ones or unreadable files end here, before any call
        client = Client(args.server, token=_token(args), tls=tls, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        timeout=args.timeout)
    except (ValueError, TypeError, OSError) as error:
        print(f"convscope: {error}", file=sys.stderr)
        return 2
    try:
        with client:
            return args.run(client, args)
    except ConvscopeError as error:
        print(f"convscope: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convscope: interrupted (the server stops the job)", file=sys.stderr)
        return 130
    except OSError as error:
        print(f"convscope: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
