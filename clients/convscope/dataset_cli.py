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
import json
import sys
from pathlib import Path

from convscope.cli import Page, _safe, table, with_progress
from convscope.client import Client

# The extensions the server reads in dataset folders (service/convscope_server/datasets.py).
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def local_images(paths: list[str]) -> list[tuple[str, Path, str]]:
    """(id, path, label) for image files and the images in folders (sorted, recursive)."""
    found = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
                relative = file.relative_to(path)
                found.append((file.as_posix(), file, relative.parts[0] if len(relative.parts) > 1 else ""))
        elif path.is_file():
            found.append((path.as_posix(), path, ""))
        else:
            raise FileNotFoundError(f"no such image file or folder: {given}")
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
        raise SystemExit("convscope: give image files / folders, or --dataset NAME (a folder on the server)")
    if args.dataset:
        return {"dataset": args.dataset}
    return {"images": StreamedFiles(local_images(args.images))}


def _report_skipped(error) -> None:
    print(f"\nskipped {error.id}: {error.reason}", file=sys.stderr)


def cmd_datasets(client: Client, args) -> int:
    rows = [[d.name, d.images, ", ".join(d.labels[:8]) + (" ..." if len(d.labels) > 8 else "")]
            for d in client.datasets()]
    print(table(["dataset", "images", "labels"], rows, right={1}) if rows else "the server has no datasets")
    return 0


def cmd_patches(client: Client, args) -> int:
    result = with_progress("scanning", lambda bar: client.top_patches(
        args.model, args.layer, k=args.k, channels=args.channel or (), limit=args.limit, render=True,
        render_channels=args.rows, tile_size=args.tile, progress=bar, on_item_error=_report_skipped,
        **_source(args)))
    print(f"{result.layer}: {result.images} images scanned, {result.skipped} skipped, "
          f"{len(result.channels)} channels ({result.execution_provider})")
    best = {c: result.channels[c][0] for c in result.grid_channels if result.channels[c]}
    rows = [[c, f"{hit.value:.3f}", hit.id, f"({hit.row}, {hit.col})"] for c, hit in best.items()]
    print(table(["channel", "top value", "top image", "unit"], rows, right={0, 1}))
    page = Page(args.out, f"Top {args.k} patches per channel: {args.model} {result.layer}")
    page.image(f"patches_{_safe(result.layer)}.png", result.grid_png,
               f"one row per channel ({', '.join(map(str, result.grid_channels))}), its {args.k} best images, "
               "each cropped to the winning unit's receptive field")
    hits = {str(c): [{"id": h.id, "index": h.index, "value": h.value, "row": h.row, "col": h.col,
                      "box": list(h.box)} for h in hs] for c, hs in result.channels.items()}
    (page.out / "patches.json").write_text(json.dumps({"layer": result.layer, "images": result.images,
                                                       "skipped": [e.__dict__ for e in result.errors],
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
    if args.action == "delete":
        client.delete_gallery(args.name)
        print(f"deleted {args.name}")
        return 0
    if not args.model:
        raise SystemExit("convscope: gallery build NAME MODEL (images or --dataset)")
    info = with_progress("encoding", lambda bar: client.build_gallery(
        args.name, args.model, layer=args.layer or "", limit=args.limit, thumbnail_size=args.thumbnail,
        overwrite=args.overwrite, progress=bar, on_item_error=_report_skipped, **_source(args)))
    print(f"gallery {info.name}: {info.size} images, codes of {info.layer} ({info.dim} values), "
          f"{info.file_bytes / 2**20:.1f} MiB, {len(info.errors)} skipped")
    return 0


def cmd_neighbors(client: Client, args) -> int:
    page = Page(args.out, f"Nearest neighbours in {args.gallery}")
    for path in args.images:
        found = client.nearest_neighbors(args.gallery, path, k=args.k, metric=args.metric, render=True)
        print(f"{path}: predicted {found.query_predicted} {found.query_predicted_label}")
        rows = [[rank + 1, f.id, f.label, f"{f.distance:.4g}", p.id, p.label, f"{p.distance:.4g}"]
                for rank, (f, p) in enumerate(zip(found.feature, found.pixel))]
        print(table(["#", "feature-space neighbour", "label", args.metric, "pixel-space neighbour", "label",
                     args.metric], rows, right={0, 3, 6}))
        page.image(f"neighbors_{_safe(Path(path).stem)}.png", found.grid_png,
                   f"{path}: top row by the network's codes, bottom row by raw pixels ({args.metric})")
    page.write()
    return 0


def cmd_embed(client: Client, args) -> int:
    result = with_progress(args.method, lambda bar: client.embedding(
        args.gallery, args.method, perplexity=args.perplexity, iterations=args.iterations, seed=args.seed,
        max_points=args.max_points, render=True, grid_size=args.grid, progress=bar))
    extra = (f"explained variance {result.explained_variance_ratio.round(3).tolist()}" if args.method == "pca"
             else f"KL divergence {result.kl_divergence:.3f}")
    print(f"{args.method}: {len(result.indices)} points; {extra}")
    page = Page(args.out, f"{args.method.upper()} of {args.gallery}")
    page.image(f"{args.method}_scatter.png", result.scatter_png, "each image a point, coloured by predicted class")
    page.image(f"{args.method}_grid.png", result.grid_png, "the same layout with each point snapped to its own "
               "cell and drawn as its image")
    with open(page.out / f"{args.method}_coordinates.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "id", "label", "predicted", "x", "y"])
        for i, (x, y) in enumerate(result.coordinates.tolist()):
            writer.writerow([result.indices[i], result.ids[i], result.labels[i], result.predicted[i], x, y])
    page.write(extra)
    return 0


def add_commands(commands) -> None:
    def scan_source(sub):
        sub.add_argument("images", nargs="*", help="local image files or folders (streamed to the server)")
        sub.add_argument("--dataset", default="", help="or a dataset folder under the server's data root")
        sub.add_argument("--limit", type=int, default=0, help="scan at most this many images")

    commands.add_parser("datasets", help="dataset folders under the server's data root").set_defaults(
        run=cmd_datasets)

    patches = commands.add_parser("patches", help="maximally-activating patches of a layer's channels")
    patches.add_argument("model")
    patches.add_argument("layer")
    scan_source(patches)
    patches.add_argument("--k", type=int, default=9, help="images per channel")
    patches.add_argument("--channel", type=int, action="append", help="only these channels (repeatable)")
    patches.add_argument("--rows", type=int, default=16, help="channels shown in the picture")
    patches.add_argument("--tile", type=int, default=64, help="pixels per patch in the picture")
    patches.add_argument("--out", type=Path, default=None, help="output folder (default convscope-out/COMMAND)")
    patches.set_defaults(run=cmd_patches)

    gallery = commands.add_parser("gallery", help="build, list or delete galleries of codes")
    gallery.add_argument("action", choices=["build", "list", "delete"])
    gallery.add_argument("name", nargs="?", default="")
    gallery.add_argument("model", nargs="?", default="")
    scan_source(gallery)
    gallery.add_argument("--layer", default=None, help="default: the penultimate layer")
    gallery.add_argument("--thumbnail", type=int, default=0, help="thumbnail side in pixels (default 64)")
    gallery.add_argument("--overwrite", action="store_true")
    gallery.set_defaults(run=cmd_gallery)

    neighbors = commands.add_parser("neighbors", help="nearest gallery images in feature and pixel space")
    neighbors.add_argument("gallery")
    neighbors.add_argument("images", nargs="+", help="query image files")
    neighbors.add_argument("--k", type=int, default=5)
    neighbors.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    neighbors.add_argument("--out", type=Path, default=None, help="output folder (default convscope-out/COMMAND)")
    neighbors.set_defaults(run=cmd_neighbors)

    embed = commands.add_parser("embed", help="PCA or t-SNE of a gallery: scatter plot and image grid")
    embed.add_argument("gallery")
    embed.add_argument("--method", default="tsne", choices=["tsne", "pca"])
    embed.add_argument("--perplexity", type=float, default=0.0, help="t-SNE (default 30)")
    embed.add_argument("--iterations", type=int, default=0, help="t-SNE (default 750)")
    embed.add_argument("--seed", type=int, default=0)
    embed.add_argument("--max-points", type=int, default=0, help="embed a random subset of this many")
    embed.add_argument("--grid", type=int, default=20, help="image grid cells per side")
    embed.add_argument("--out", type=Path, default=None, help="output folder (default convscope-out/COMMAND)")
    embed.set_defaults(run=cmd_embed)
