"""The convscope command line: a thin shell over :class:`convscope.Client`.

    convscope models
    convscope describe efficientnet_lite0 [--op Conv] [--spatial]
    convscope predict efficientnet_lite0 cat.jpg dog.png --top 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convscope", description="Inspect convolutional networks served by a "
                                     "convscope server.")
    parser.add_argument("--server", default=DEFAULT_TARGET,
                        help=f"server address (env CONVSCOPE_SERVER, default {DEFAULT_TARGET})")
    parser.add_argument("--token", default=os.environ.get("CONVSCOPE_TOKEN"),
                        help="bearer token, when the server wants one (env CONVSCOPE_TOKEN)")
    parser.add_argument("--tls", metavar="PEM", default=None,
                        help="use TLS; PEM is a root-certificate file, or 'system' for the system roots")
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tls = True if args.tls == "system" else args.tls
    try:
        with Client(args.server, token=args.token, tls=tls, timeout=args.timeout) as client:
            return args.run(client, args)
    except ConvscopeError as error:
        print(f"convscope: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"convscope: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
