"""Dataset-scale commands of the convscope CLI.

    convscope datasets
    convscope patches efficientnet_lite0 /_blocks.5/Clip_1_output_0 --dataset demo --out out/
    convscope patches efficientnet_lite0 /_blocks.5/Clip_1_output_0 my_photos/ more.jpg --out out/
    convscope gallery build demo-lite0 efficientnet_lite0 --dataset demo
    convscope gallery list | convscope gallery delete demo-lite0
    convscope neighbors demo-lite0 cat.jpg --k 8 --out out/
    convscope embed demo-lite0 --method tsne --out out/

Local image files and folders (read recursively; an image's label is its sub-folder) are streamed to the
server one at a time; ``--dataset`` names a folder under the server's data root instead.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from convscope import figures
from convscope.cli_common import EXIT_NOT_FOUND, CliError, load_photo, safe_name, status, table, with_progress
from convscope.client import Client
from convscope.errors import ConvscopeError
from convscope.images import IMAGE_EXTENSIONS, readable_text
from convscope.pages import Page

ACTIVATIONS = {"Clip", "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh"}


def local_images(paths: list[str]) -> list[tuple[str, Path, str]]:
    """(id, path, label) for image files and the images in folders (sorted, recursive)."""
    found = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            # the server's rule for dataset folders: sorted paths, hidden files and folders left out
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                               and not any(part.startswith(".") for part in p.relative_to(path).parts)):
                relative = file.relative_to(path)
                found.append((readable_text(file.as_posix()), file,
                              readable_text(relative.parts[0]) if len(relative.parts) > 1 else ""))
        elif path.is_file():
            found.append((readable_text(path.as_posix()), path, ""))
        else:
            raise CliError(f"{given}: no such image file or folder", EXIT_NOT_FOUND)
    return found


class StreamedFiles:
    """A sized, lazily read sequence of (id, image bytes, label) for a scan."""

    def __init__(self, entries):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        for item_id, path, label in self.entries:
            yield item_id, path.read_bytes(), label


def _source(args) -> dict:
    if bool(args.dataset) == bool(args.images):
        raise CliError("give image files / folders, or --dataset NAME (a folder on the server)", 2)
    placement = getattr(args, "placement", "default")
    if args.dataset:
        return {"dataset": args.dataset, "placement": placement}
    if placement == "cluster":
        raise CliError("--placement cluster: the server's Ray cluster scans dataset folders (--dataset NAME); "
                       "local files are streamed to the server", 2)
    return {"images": StreamedFiles(local_images(args.images)), "placement": placement}


def _report_skipped(error) -> None:
    print(f"\nskipped {error.id}: {error.reason}", file=sys.stderr)


def cmd_datasets(client: Client, args) -> int:
    rows = [[d.name, d.images, ", ".join(d.labels[:8]) + (" ..." if len(d.labels) > 8 else "")]
            for d in client.datasets()]
    print(table(["dataset", "images", "labels"], rows, right={1}) if rows else "the server has no datasets")
    return 0


def tied_channels(result) -> list[int]:
    """Channels whose best hits tie at their maximum (e.g. 6.0 after ReLU6): their order is arbitrary."""
    return [c for c, hits in result.channels.items() if len(hits) > 1 and hits[1].value == hits[0].value]


def pre_activation(client: Client, model: str, layer: str) -> str:
    """The tensor before ``layer``'s activation (the Conv output before a Clip), found with describe; or ""."""
    layers = client.describe(model).layers
    names = [l.name for l in layers]
    if layer not in names or layers[names.index(layer)].op_type not in ACTIVATIONS:
        return ""
    index = names.index(layer)
    for candidate in reversed(layers[:index]):
        if candidate.op_type not in ACTIVATIONS and candidate.shape == layers[index].shape:
            return candidate.name
    return ""


def cmd_patches(client: Client, args) -> int:
    source = _source(args)
    result = with_progress("scanning", lambda bar: client.top_patches(
        args.model, args.layer, k=args.k, channels=args.channel or (), limit=args.limit, render=True,
        render_channels=args.rows, tile_size=args.tile, progress=bar, on_item_error=_report_skipped, **source))
    where = ", on the Ray cluster" if result.placement == "cluster" else ""
    print(f"{result.layer}: {result.images} images scanned, {result.skipped} skipped, "
          f"{len(result.channels)} channels ({result.execution_provider}{where})")
    best = {c: result.channels[c][0] for c in result.grid_channels if result.channels[c]}
    rows = [[c, f"{hit.value:.3f}", hit.id, f"({hit.row}, {hit.col})"] for c, hit in best.items()]
    print(table(["channel", "top value", "top image", "unit"], rows, right={0, 1}))
    tied = tied_channels(result)
    if tied:
        value = result.channels[tied[0]][0].value
        before = pre_activation(client, args.model, result.layer)
        print(f"warning: in {len(tied)} of {len(result.channels)} channels the top hits tie at the channel's maximum "
              f"(e.g. {value:g} in channel {tied[0]}: a saturated activation such as ReLU6), so their order is "
              "arbitrary and rows can look incoherent; scan the pre-activation tensor instead"
              + (f": {before} (the output before the clip)" if before else
                 " (the Conv output before the clip; see `convscope describe MODEL`)"), file=sys.stderr)
    status("rendering figures ...")
    k = max((len(result.channels[c]) for c in result.grid_channels), default=0)
    page = Page(args.out, f"Top {args.k} patches per channel of {result.layer}", args.model,
                f"{result.images} images were scanned; for each channel, the images where it fires most, each cropped "
                "to the receptive field of the strongest unit.")
    if k:
        tiles = figures.grid_tiles(result.grid_png, len(result.grid_channels), k, pad=2)
        picture_rows = [(c, [(tiles[r][i], h.value) for i, h in enumerate(result.channels[c][:k])])
                        for r, c in enumerate(result.grid_channels)]
        page.figure(f"patches_{safe_name(result.layer)}.png", figures.patches(picture_rows, result.layer, args.tile),
                    f"one row per channel ({', '.join(map(str, result.grid_channels))}), its best {k} patches with the "
                    "activation value", "a coherent row (the same texture, part or colour) is a channel with a clear "
                    "meaning; equal values along a row mean saturation (see the warning)", wide=True)
    hits = {str(c): [{"id": h.id, "index": h.index, "value": h.value, "row": h.row, "col": h.col,
                      "box": list(h.box)} for h in hs] for c, hs in result.channels.items()}
    page.file("patches.json", json.dumps({"layer": result.layer, "images": result.images,
                                          "skipped": [e.__dict__ for e in result.errors], "tied_channels": tied,
                                          "channels": hits}))
    page.write(f"{result.images} images, {result.skipped} skipped; every channel's hits are in patches.json")
    return 0


def cmd_gallery(client: Client, args) -> int:
    if args.action == "list":
        rows = [[g.name, "ready" if g.ready else "FAILED", g.model, g.layer, g.size, g.dim, g.source, g.error]
                for g in client.galleries()]
        print(table(["gallery", "status", "model", "layer", "images", "dim", "source", "error"], rows,
                    right={4, 5}) if rows else "no galleries")
        return 0
    if not args.name:
        raise CliError(f"gallery {args.action}: give the gallery NAME", 2)
    if args.action == "delete":
        client.delete_gallery(args.name)
        print(f"deleted {args.name}")
        return 0
    if not args.model:
        raise CliError("gallery build NAME MODEL (images or --dataset)", 2)
    info = with_progress("encoding", lambda bar: client.build_gallery(
        args.name, args.model, layer=args.layer or "", limit=args.limit, thumbnail_size=args.thumbnail,
        overwrite=args.overwrite, progress=bar, on_item_error=_report_skipped, **_source(args)))
    print(f"gallery {info.name}: {info.size} images, codes of {info.layer} ({info.dim} values), "
          f"{info.file_bytes / 2**20:.1f} MiB, {len(info.errors)} skipped")
    return 0


def cmd_neighbors(client: Client, args) -> int:
    for path in args.images:
        load_photo(path)
    page = Page(args.out, f"Nearest neighbours in gallery {args.gallery}", "",
                "The gallery images closest to each query: top row by the network's codes (what it thinks is similar), "
                "bottom row by raw pixels (what merely looks alike).")
    for path in args.images:
        found = client.nearest_neighbors(args.gallery, path, k=args.k, metric=args.metric, render=True)
        print(f"{path}: predicted {found.query_predicted} {found.query_predicted_label}")
        rows = [[rank + 1, f.id, f.label, f"{f.distance:.4g}", p.id, p.label, f"{p.distance:.4g}"]
                for rank, (f, p) in enumerate(zip(found.feature, found.pixel))]
        print(table(["#", "feature-space neighbour", "label", args.metric, "pixel-space neighbour", "label",
                     args.metric], rows, right={0, 3, 6}))
        status("rendering figures ...")
        columns = 1 + max(len(found.feature), len(found.pixel))
        tiles = figures.grid_tiles(found.grid_png, 2, columns, pad=3)
        page.figure(f"neighbors_{safe_name(Path(path).stem)}.png", figures.neighbors(
            tiles[0][0], list(zip(tiles[0][1:], found.feature)), list(zip(tiles[1][1:], found.pixel)), args.metric,
            f"{Path(path).name} (predicted {found.query_predicted} {found.query_predicted_label}): nearest in "
            f"{args.gallery}"), f"{path}: {args.metric} distance by codes (top) and by pixels (bottom)",
            "code neighbours share the object even when colours and poses differ; pixel neighbours share only "
            "brightness and colour", wide=True)
    page.write()
    return 0


def class_names(client: Client, gallery: str) -> list[str]:
    """The class names of the model a gallery was built with ([] when unknown)."""
    try:
        model = next(g.model for g in client.galleries() if g.name == gallery)
        return client.labels(model)
    except (StopIteration, AttributeError, ConvscopeError):
        return []


def cmd_embed(client: Client, args) -> int:
    result = with_progress(args.method, lambda bar: client.embedding(
        args.gallery, args.method, perplexity=args.perplexity, iterations=args.iterations, seed=args.seed,
        max_points=args.max_points, render=True, grid_size=args.grid, progress=bar))
    if args.method == "pca":
        ratio = [float(v) for v in result.explained_variance_ratio[:2]]
        extra = f"explained variance {[round(v, 3) for v in ratio]}"
        axes = (f"PC1 ({ratio[0]:.1%} of the variance)", f"PC2 ({ratio[1]:.1%} of the variance)")
        name = "PCA"
    else:
        extra = f"KL divergence {result.kl_divergence:.3f}"
        axes = ("t-SNE dimension 1", "t-SNE dimension 2")
        name = "t-SNE"
    print(f"{args.method}: {len(result.indices)} points; {extra}")
    status("rendering figures ...")
    labelled = any(result.labels)
    if labelled:
        groups, legend = list(result.labels), "true label"
    else:
        names = class_names(client, args.gallery)
        names = [names[p] if 0 <= p < len(names) else "" for p in result.predicted]
        groups, legend = [f"{p} {n}".strip() for p, n in zip(result.predicted, names)], "predicted class"
    page = Page(args.out, f"{name} of gallery {args.gallery}", "",
                f"Each image of the gallery is one point; images whose codes are close lie close together ({extra}).")
    page.figure(f"{args.method}_scatter.png", figures.scatter(
        result.coordinates, groups, args.method, f"{name} of {args.gallery}: {len(result.indices)} images, coloured "
        f"by {legend}", axes, legend), f"{name}: each image a point, coloured by {legend} (the 20 most frequent; others grey)",
        "clusters of one colour: the codes separate those classes; mixed clusters: the network confuses them",
        wide=True)
    if result.grid_png:
        page.figure(f"{args.method}_grid.png", figures.framed(result.grid_png, f"{name} of {args.gallery} as an image "
                                                              "grid"),
                    "the same layout with each point snapped to its own cell and drawn as its image",
                    "neighbouring cells show similar images: the neighbourhoods the network has learned", wide=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["index", "id", "label", "predicted", "x", "y"])
    for i, (x, y) in enumerate(result.coordinates.tolist()):
        writer.writerow([result.indices[i], result.ids[i], result.labels[i], result.predicted[i], x, y])
    page.file(f"{args.method}_coordinates.csv", buffer.getvalue())
    page.write(extra)
    return 0


def add_commands(commands, parser) -> None:
    """The dataset commands; ``parser(commands, name, help, run)`` makes a subcommand in the CLI's style."""
    out_help = "output folder (default: convscope-out/COMMAND)"

    def scan_source(sub):
        sub.add_argument("images", nargs="*", help="local image files or folders (streamed to the server)")
        sub.add_argument("--dataset", default="", help="or a dataset folder under the server's data root "
                         "(see `convscope datasets`)")
        sub.add_argument("--limit", type=int, default=0, help="scan at most this many images (0: all)")
        sub.add_argument("--placement", default="default", choices=["default", "server", "cluster"],
                         help="where the scan runs: the server's choice, the server, or its Ray cluster (a server "
                         "started with --ray; --dataset scans only)")

    parser(commands, "datasets", "dataset folders under the server's data root", cmd_datasets)

    patches = parser(commands, "patches", "maximally-activating patches of a layer's channels", cmd_patches)
    patches.add_argument("model", help="model name (see `convscope models`)")
    patches.add_argument("layer", help="a spatial tensor (see `convscope describe MODEL --spatial`)")
    scan_source(patches)
    patches.add_argument("--k", type=int, default=9, help="images per channel")
    patches.add_argument("--channel", type=int, action="append", help="only these channels (repeatable; default: "
                         "all)")
    patches.add_argument("--rows", type=int, default=16, help="channels shown in the picture")
    patches.add_argument("--tile", type=int, default=64, help="pixels per patch in the picture")
    patches.add_argument("--out", type=Path, default=None, help=out_help)

    gallery = parser(commands, "gallery", "build, list or delete galleries of codes", cmd_gallery)
    gallery.add_argument("action", choices=["build", "list", "delete"], help="what to do")
    gallery.add_argument("name", nargs="?", default="", help="gallery name (build, delete)")
    gallery.add_argument("model", nargs="?", default="", help="model name (build)")
    scan_source(gallery)
    gallery.add_argument("--layer", default=None, help="layer whose codes to store (default: the penultimate layer)")
    gallery.add_argument("--thumbnail", type=int, default=0, help="thumbnail side in pixels (default: 0 = the "
                         "server's 64)")
    gallery.add_argument("--overwrite", action="store_true", help="replace a gallery of the same name")

    neighbors = parser(commands, "neighbors", "nearest gallery images in feature and pixel space", cmd_neighbors)
    neighbors.add_argument("gallery", help="gallery name (see `convscope gallery list`)")
    neighbors.add_argument("images", nargs="+", help="query image files")
    neighbors.add_argument("--k", type=int, default=5, help="neighbours per query")
    neighbors.add_argument("--metric", default="l2", choices=["l2", "cosine"], help="distance between codes")
    neighbors.add_argument("--out", type=Path, default=None, help=out_help)

    embed = parser(commands, "embed", "PCA or t-SNE of a gallery: scatter plot and image grid", cmd_embed)
    embed.add_argument("gallery", help="gallery name (see `convscope gallery list`)")
    embed.add_argument("--method", default="tsne", choices=["tsne", "pca"], help="embedding")
    embed.add_argument("--perplexity", type=float, default=0.0, help="t-SNE perplexity (default: 0 = the server's "
                       "30)")
    embed.add_argument("--iterations", type=int, default=0, help="t-SNE iterations (default: 0 = the server's 750)")
    embed.add_argument("--seed", type=int, default=0, help="random seed")
    embed.add_argument("--max-points", type=int, default=0, help="embed a random subset of this many (0: all)")
    embed.add_argument("--grid", type=int, default=20, help="image grid cells per side")
    embed.add_argument("--out", type=Path, default=None, help=out_help)
