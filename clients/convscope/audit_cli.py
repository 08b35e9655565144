"""The audit commands of the convscope CLI: run an audit and write its report as a static site, list,
show or delete stored audits, and a verdict for CI.

    convscope audit efficientnet_lite0 --dataset demo --name lite0-demo --out report/
    convscope audit efficientnet_lite0 my_photos/ --label-map labels.json --fail-if 'accuracy < 0.7'
    convscope audits list | convscope audits show lite0-demo --out report/ | convscope audits delete lite0-demo
    convscope audits diff lite0-v1 lite0-v2        (metrics, verdicts per method, units that died)

The site (index.html, its PNGs, audit.json) needs no server to read. ``--fail-if 'METRIC OP NUMBER'``
(repeatable) exits 6 when any condition holds; the metrics are listed by ``convscope audits show NAME``.
"""

from __future__ import annotations

import json
import operator
import re
import sys
from pathlib import Path

from convscope import figures
from convscope.cli_common import CliError, safe_name, table, with_progress
from convscope.client import Client
from convscope.dataset_cli import _source
from convscope.pages import Page

EXIT_VERDICT = 6
OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
             "!=": operator.ne}
CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*$")


def metrics(report: dict) -> dict[str, float]:
    """The numbers --fail-if can test, from audit.json."""
    classes, units = report.get("classes", {}), report.get("units", {})
    found = {"images": report.get("dataset", {}).get("images", 0),
             "skipped": len(report.get("dataset", {}).get("skipped", [])),
             "labelled": classes.get("labelled", 0),
             "dead_units": sum(len(u["dead"]) for u in units.values()),
             "saturating_units": sum(len(u["saturating"]) for u in units.values()),
             "latency_ms": report.get("model", {}).get("timing", {}).get("latency_ms", 0.0)}
    if "accuracy" in classes:
        found.update(accuracy=classes["accuracy"], top5_accuracy=classes.get("top5_accuracy", 0.0),
                     ece=classes["calibration"]["ece"])
    methods = report.get("faithfulness", {}).get("methods", {})
    found["faithful_methods"] = sum(1 for m in methods.values() if m.get("faithful"))
    insensitive = report.get("randomisation", {}).get("insensitive", {})
    found["insensitive_methods"] = sum(1 for flag in insensitive.values() if flag)
    corruptions = report.get("robustness", {}).get("corruptions") or {}
    accuracies = [row["accuracy"] for kind, rows in corruptions.items() if kind != "clean" for row in rows]
    if accuracies:
        found["worst_corruption_accuracy"] = min(accuracies)
    fgsm = report.get("robustness", {}).get("fgsm", {})
    if fgsm.get("accuracy"):
        found["fgsm_accuracy"] = fgsm["accuracy"][-1]  # at the largest epsilon
    if fgsm.get("iterative_accuracy"):
        found["iterative_attack_accuracy"] = fgsm["iterative_accuracy"][-1]
    return found


def verdict(report: dict, conditions: list[str]) -> list[str]:
    """The conditions that hold (each 'METRIC OP NUMBER'); an unknown metric or malformed condition is an
    error naming the metrics there are."""
    values, failed = metrics(report), []
    for condition in conditions:
        match = CONDITION.match(condition)
        if not match:
            raise CliError(f"--fail-if: {condition!r} is not 'METRIC OP NUMBER' (e.g. 'accuracy < 0.7')", 2)
        name, op, number = match.groups()
        if name not in values:
            raise CliError(f"--fail-if: no metric {name!r} in this audit; there are {sorted(values)}", 2)
        if OPERATORS[op](values[name], float(number)):
            failed.append(f"{condition} (it is {values[name]:.4g})")
    return failed


# -- the site -------------------------------------------------------------------------------------------

@figures._styled
def _reliability(calibration: dict) -> figures.Picture:
    fig = figures._new(6, 5)
    ax = fig.add_subplot()
    bins = calibration["bins"]
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    width = bins[0]["high"] - bins[0]["low"]
    accuracy = [b["accuracy"] if b["accuracy"] is not None else 0 for b in bins]
    ax.bar(centres, accuracy, width=width * 0.9, color="#4c72b0", label="accuracy of the predictions in the bin")
    ax.plot([0, 1], [0, 1], "--", color="#c44e52", label="perfect calibration")
    for centre, b in zip(centres, bins):
        if b["images"]:
            ax.text(centre, 0.02, str(b["images"]), ha="center", fontsize=8, color="white")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"Reliability (ECE {calibration['ece']:.3f}; numbers: images per bin)")
    ax.legend(loc="upper left")
    return figures._save(fig, {"ece": calibration["ece"]})


@figures._styled
def _curves(methods: dict) -> figures.Picture:
    fig = figures._new(11, 4.5)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for name, numbers in methods.items():
            curves = [row[kind] for row in numbers["per_image"]]
            steps = len(curves[0])
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
            style = ":" if name == "random" else "-"
            ax.plot([i / (steps - 1) for i in range(steps)], mean, style,
                    label=f"{name} (AUC {numbers[kind + '_auc']:.3f})")
        ax.set(xlabel=f"fraction of pixels {'removed' if kind == 'deletion' else 'restored'}, most important first",
               ylabel="target probability (mean over images)", title=kind.capitalize() + " (RISE)",
               ylim=(0, None))
        ax.legend(fontsize=9)
    return figures._save(fig)


@figures._styled
def _robustness(section: dict) -> figures.Picture:
    fig = figures._new(11, 4.5)
    axes = fig.subplots(1, 2)
    corruptions = section.get("corruptions") or {}
    for kind, rows in corruptions.items():
        if kind == "clean":
            continue
        strengths = ", ".join(f"{row['strength']:g}" for row in rows)
        axes[0].plot(range(len(rows) + 1), [corruptions["clean"]] + [r["accuracy"] for r in rows], "o-",
                     label=f"{kind} ({strengths})")
    axes[0].set(xlabel="strength (0: clean, then the levels in the legend)", ylabel="accuracy", ylim=(0, 1.02),
                title="Common corruptions")
    axes[0].legend(fontsize=9)
    fgsm = section.get("fgsm", {})
    if fgsm.get("accuracy"):
        axes[1].plot([e * 255 for e in fgsm["epsilons"]], fgsm["accuracy"], "o-", color="#c44e52", label="FGSM")
        if fgsm.get("iterative_accuracy"):
            axes[1].plot([e * 255 for e in fgsm["epsilons"]][: len(fgsm["iterative_accuracy"])],
                         fgsm["iterative_accuracy"], "s--", color="#55a868", label="iterative (10 steps)")
        axes[1].set(xlabel="epsilon (pixel levels of 255)", ylabel="accuracy", ylim=(0, 1.02),
                    title="Adversarial perturbations")
        axes[1].legend(fontsize=9)
    else:
        axes[1].text(0.5, 0.5, "FGSM: " + fgsm.get("unavailable", "not run"), ha="center", va="center", wrap=True)
        figures._blank(axes[1])
    return figures._save(fig)


@figures._styled
def _units(units: dict) -> figures.Picture:
    fig = figures._new(11, 2.6 * max(1, len(units)))
    axes = fig.subplots(max(1, len(units)), 1, squeeze=False)[:, 0]
    for ax, (name, numbers) in zip(axes, units.items()):
        means = numbers["mean"]
        order = sorted(range(len(means)), key=lambda c: -means[c])
        dead = set(numbers["dead"])
        ax.bar(range(len(order)), [means[c] for c in order],
               color=["#c44e52" if c in dead else "#4c72b0" for c in order], width=1.0)
        ax.set(title=f"{name}: {len(dead)} dead (red), {len(numbers['saturating'])} saturating of "
                     f"{numbers['channels']} channels", xlabel="channels, by mean activation", ylabel="mean")
    return figures._save(fig)


@figures._styled
def _code_map(section: dict, class_name) -> figures.Picture:
    fig = figures._new(9, 7.5)
    ax = fig.add_subplot()
    points = section["points"]
    labelled = any(p["label"] for p in points)
    groups = [p["label"] if labelled else class_name(p["predicted"]) for p in points]
    common = [g for g, _ in sorted(((g, groups.count(g)) for g in set(groups)), key=lambda t: -t[1])[:12]]
    colours = {g: f"C{i % 10}" for i, g in enumerate(common)}
    for group in common + ["other"]:
        chosen = [p for p, g in zip(points, groups) if (g if g in colours else "other") == group]
        if chosen:
            ax.scatter([p["x"] for p in chosen], [p["y"] for p in chosen], s=14, alpha=0.8,
                       color=colours.get(group, "#bbbbbb"), label=group)
    wrong = [p for p in points if p["correct"] is False]
    if wrong:
        ax.scatter([p["x"] for p in wrong], [p["y"] for p in wrong], s=60, marker="x", color="black",
                   label=f"misclassified ({len(wrong)})")
    ax.set(xlabel="t-SNE 1", ylabel="t-SNE 2", title=f"The dataset as the network codes it ({len(points)} images, "
                                                        f"{'true labels' if labelled else 'predicted classes'})")
    ax.legend(fontsize=8, loc="best", markerscale=1.2)
    return figures._save(fig, {"points": len(points), "misclassified": len(wrong)})


def _pixels(png_b64: str):
    """A base64 PNG from audit.json as uint8 RGB pixels."""
    import base64

    return figures.decode(base64.b64decode(png_b64))


@figures._styled
def _feature_overview(layer: str, cards: list[dict], dead: set) -> figures.Picture:
    """A layer's sampled channels side by side: each one's feature visualisation (or its strongest dataset
    patch when there is none), titled with the channel."""
    columns = min(4, max(1, len(cards)))
    rows = (len(cards) + columns - 1) // columns
    fig = figures._new(2.6 * columns, 2.8 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, card in zip(axes, cards):
        source = card.get("feature_png") or (card["hits"][0]["png"] if card["hits"] else "")
        if source:
            ax.imshow(_pixels(source), interpolation="nearest")
        ax.set_title(f"channel {card['channel']}" + (" (dead)" if card["channel"] in dead else ""), fontsize=10)
        figures._blank(ax)
    for ax in axes[len(cards):]:
        ax.axis("off")
    return figures._save(fig, {"channels": [card["channel"] for card in cards]})


@figures._styled
def _worst_figure(worst: list[dict], layer: str) -> figures.Picture:
    """The worst-classified images, each beside its map for the predicted class and for its label's class."""
    shown = [w for w in worst if w.get("png")]
    roles = [role for role in ("predicted", "label") if any(f"cam_{role}_png" in w for w in shown)]
    per_row = 2
    rows = (len(shown) + per_row - 1) // per_row
    fig = figures._new(3.6 * per_row * (1 + len(roles)) / 2, 2.4 * rows)
    axes = fig.subplots(rows, per_row * (1 + len(roles)), squeeze=False)
    for n, w in enumerate(shown):
        row, first = divmod(n, per_row)
        panels = [("png", f"{Path(w['id']).name[:22]}\n{w['label'][:18]}: p {w['true_probability']:.2f}")]
        panels += [(f"cam_{role}_png", f"why {w['predicted_name'][:16]}" if role == "predicted"
                    else f"evidence for {w['label'][:14]}") for role in roles]
        for column, (key, title) in enumerate(panels):
            ax = axes[row, first * len(panels) + column]
            if key in w:
                ax.imshow(_pixels(w[key]))
            ax.set_title(title, fontsize=8)
            figures._blank(ax)
    for ax in axes.ravel()[len(shown) * (1 + len(roles)):]:
        ax.axis("off")
    return figures._save(fig, {"images": len(shown), "layer": layer})


@figures._styled
def _pairs_figure(pairs: list[dict]) -> figures.Picture:
    """Near-duplicate pairs side by side, two pairs per row, titled with their code distance."""
    shown = [pair for pair in pairs if pair.get("first_png")]
    rows = (len(shown) + 1) // 2
    fig = figures._new(9, 2.4 * rows)
    axes = fig.subplots(rows, 4, squeeze=False)
    for n, pair in enumerate(shown):
        row, half = divmod(n, 2)
        for column, key in enumerate(("first", "second")):
            ax = axes[row, 2 * half + column]
            ax.imshow(_pixels(pair[f"{key}_png"]))
            ax.set_title(Path(pair[key]).name[:20] + (f"\ndistance {pair['distance']:.3g}" if column == 0 else "\n"),
                         fontsize=8)
            figures._blank(ax)
    for ax in axes.ravel()[2 * len(shown):]:
        ax.axis("off")
    return figures._save(fig, {"pairs": len(shown)})


@figures._styled
def _outliers_figure(outliers: list[dict]) -> figures.Picture:
    shown = [o for o in outliers if o.get("png")]
    columns = min(6, max(1, len(shown)))
    rows = (len(shown) + columns - 1) // columns
    fig = figures._new(1.6 * columns, 1.9 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, outlier in zip(axes.ravel(), shown):
        ax.imshow(_pixels(outlier["png"]))
        ax.set_title(f"{Path(outlier['id']).name[:14]}\n{outlier['mean_distance']:.3g}", fontsize=8)
        figures._blank(ax)
    for ax in axes.ravel()[len(shown):]:
        ax.axis("off")
    return figures._save(fig, {"outliers": len(shown)})


@figures._styled
def _channel_card(layer: str, card: dict) -> figures.Picture:
    """One channel: its top images' receptive-field crops with their values, and its mean per label."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    hits, means = card["hits"], card["class_means"]
    fig = figures._new(11, 2.6)
    grid = fig.add_gridspec(1, max(1, len(hits)) + 3)
    for column, hit in enumerate(hits):
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(np.asarray(Image.open(io.BytesIO(base64.b64decode(hit["png"])))))
        ax.set_title(f"{hit['value']:.3g}", fontsize=9)
        ax.set_xlabel(Path(hit["id"]).name[:18], fontsize=7)
        figures._blank(ax)
    ax = fig.add_subplot(grid[0, len(hits):])
    shown = sorted(means.items(), key=lambda item: -item[1])[:10]
    ax.barh([label[:16] for label, _ in shown][::-1], [value for _, value in shown][::-1], color="#4c72b0")
    ax.set_xlabel("mean activation", fontsize=9)
    ax.tick_params(labelsize=8)
    fig.suptitle(f"{layer} channel {card['channel']}: top images (number: the strongest unit's activation) and "
                 "the mean per label", fontsize=11)
    return figures._save(fig, {"hits": len(hits), "labels": len(means)})


def _channel_folder(channel: int) -> str:
    return f"channel_{channel}"


def _layer_folder(layer: str) -> str:
    return safe_name(layer.strip("/")) or "layer"


def _unit_pages(report: dict, out: Path) -> list[tuple[str, str]]:
    """Microscope-style navigation, layer -> channel -> neighbours: a page per audited layer (its sampled
    channels' feature visualisations and links) and a page per sampled channel (its filter when it reads
    the image, feature visualisation, top dataset patches, mean per label, and the channels of its layer
    that fire on the same images). Returns (text, href) links to the layer pages."""
    links = []
    layers = [(layer, numbers) for layer, numbers in report["units"].items() if numbers.get("pages")]
    for position, (layer, numbers) in enumerate(layers):
        cards = numbers["pages"]
        folder = _layer_folder(layer)
        dead = set(numbers["dead"])
        page = Page(out / "units" / folder, f"{layer}: {len(cards)} of {numbers['channels']} channels",
                    report["model"]["name"], "Each sampled channel of this layer: what it draws when an image is "
                    "optimised to excite it (feature visualisation) and, on its page, the dataset images that "
                    "excite it most, its mean activation per label and its neighbours.")
        navigation = [("back to the audit", "../../index.html")]
        navigation += [(f"previous layer: {layers[position - 1][0]}",
                        f"../{_layer_folder(layers[position - 1][0])}/index.html")] if position else []
        navigation += ([(f"next layer: {layers[position + 1][0]}",
                         f"../{_layer_folder(layers[position + 1][0])}/index.html")]
                       if position + 1 < len(layers) else [])
        page.links("navigation", navigation)
        page.figure("channels.png", _feature_overview(layer, cards, dead),
                    "feature visualisations of the sampled channels" if any("feature_png" in c for c in cards)
                    else "the strongest dataset patch of each sampled channel (no feature visualisation: "
                    + report.get("feature_visualisation", {}).get("unavailable", "not run") + ")",
                    "early layers draw colours, edges and textures; later ones parts and objects; a noisy grey "
                    "square is a unit the optimisation could not excite", wide=True)
        page.links("channels", [(f"channel {c['channel']}" + (" (dead)" if c["channel"] in dead else "")
                                 + (f": top value {c['hits'][0]['value']:.3g}" if c["hits"] else ""),
                                 f"{_channel_folder(c['channel'])}/index.html") for c in cards])
        page.write()
        for number, card in enumerate(cards):
            _channel_page(report, out / "units" / folder / _channel_folder(card["channel"]), layer, numbers,
                          cards, number)
        links.append((f"{layer}: {len(cards)} channels", f"units/{folder}/index.html"))
    return links


def _channel_page(report: dict, out: Path, layer: str, numbers: dict, cards: list[dict], number: int) -> None:
    import base64

    card = cards[number]
    channel = card["channel"]
    paged = {c["channel"] for c in cards}
    dead = channel in set(numbers["dead"])
    page = Page(out, f"{layer} channel {channel}" + (" (dead)" if dead else ""), report["model"]["name"],
                f"Mean activation {numbers['mean'][channel]:.4g}, largest {numbers['max'][channel]:.4g} over the "
                f"{numbers['images']} audited images.")
    navigation = [("the layer", "../index.html"), ("back to the audit", "../../../index.html")]
    if number:
        navigation.append((f"previous channel: {cards[number - 1]['channel']}",
                           f"../{_channel_folder(cards[number - 1]['channel'])}/index.html"))
    if number + 1 < len(cards):
        navigation.append((f"next channel: {cards[number + 1]['channel']}",
                           f"../{_channel_folder(cards[number + 1]['channel'])}/index.html"))
    page.links("navigation", navigation)
    if card.get("feature_png"):
        settings = report.get("feature_visualisation", {})
        if card.get("feature_of") == "centre unit":
            page.image("feature.png", base64.b64decode(card["feature_png"]),
                       "feature visualisation of its centre unit, cropped to that unit's receptive field",
                       f"an image optimised ({settings.get('steps', '?')} steps of regularised gradient ascent from "
                       "noise) to excite one unit of this channel: the small pattern the channel detects (its field "
                       "is too small for a whole-image picture)")
        else:
            page.image("feature.png", base64.b64decode(card["feature_png"]), "feature visualisation",
                       f"an image optimised ({settings.get('steps', '?')} steps of regularised gradient ascent from "
                       "noise) to excite the channel: the pattern it detects, repeated wherever it fits")
    if card.get("filter_png"):
        page.image("filter.png", base64.b64decode(card["filter_png"]), "its first-layer filter",
                   "the weights it applies to the image's pixels: an oriented edge, a colour blob or a colour "
                   "contrast")
    page.figure("card.png", _channel_card(layer, card), "top dataset patches and the mean activation per label",
                "a coherent row (one texture, part or object) is an interpretable unit; a label far above the others "
                "is what the unit votes for", wide=True)
    neighbours = card.get("neighbours") or []
    page.table("neighbours", ["channel", "correlation"],
               [[n["channel"], f"{n['correlation']:.3f}"] for n in neighbours],
               "the channels of this layer whose mean activation rises and falls with this one's over the dataset's "
               "images (Pearson correlation): units that detect the same thing or co-occurring things")
    linked = [(f"channel {n['channel']} (correlation {n['correlation']:.2f})",
               f"../{_channel_folder(n['channel'])}/index.html") for n in neighbours if n["channel"] in paged]
    if linked:
        page.links("neighbours with a page", linked)
    page.write()


def write_site(report: dict, out: Path, name: str) -> Path:
    """index.html with the report's figures and tables, its PNGs and audit.json, under ``out``."""
    model = report["model"]
    page = Page(out, f"Audit {name}: {model['name']}", model["name"],
                f"{report['dataset']['images']} images from {report['dataset'].get('source', '?')}, "
                f"{len(report['dataset']['skipped'])} skipped; audited {report.get('created', '')}. Every number "
                "below comes from the server's techniques on this model; audit.json holds them all.")
    timing = model.get("timing", {})
    card = [["parameters", f"{model['parameters']:,}"], ["multiply-accumulates per image", f"{model['macs']:,}"],
            ["input", f"{model['input']['height']}x{model['input']['width']} {model['input']['layout']}, "
                      f"mean {model['input']['mean']}, std {model['input']['std']}, {model['input']['resize']}"],
            ["guessed settings", ", ".join(model["input"]["guessed"]) or "none"],
            ["latency (1 image)", f"{timing.get('latency_ms', 0):.1f} ms on {timing.get('provider', '?')}"],
            ["throughput", f"{timing.get('throughput_images_per_s', 0):.0f} images/s at batch {timing.get('batch')}"],
            ["producer / opset", f"{model['producer']} / {model['opset']}"]]
    stages = report.get("stage_seconds", {})
    if stages:
        card.append(["audit time by stage", ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stages.items())])
    page.table("model card", ["", ""], card, "what the graph holds and how fast it runs on this server")
    page.table("costliest layers", ["layer", "op", "multiply-accumulates", "share"],
               [[c["layer"], c["op"], f"{c['macs']:,}", f"{c['share']:.1%}"] for c in model["costliest"]],
               "where the compute goes")
    if model.get("layers"):
        layers_page = Page(out / "layers", f"{model['name']}: every tensor", model["name"],
                           "Each tensor of the graph with its shape, layout and receptive field (input pixels a unit "
                           "sees, and the step between neighbouring units), as the graph analysis found them.")
        layers_page.links("navigation", [("back to the audit", "../index.html")])

        def field(f):
            return "" if f is None else f"{f['size'][0]}x{f['size'][1]} px, step {f['jump'][0]}x{f['jump'][1]}"

        layers_page.table("layers", ["tensor", "op", "shape", "layout", "receptive field", "multiply-accumulates"],
                          [[row["name"], row["op"], "x".join("?" if d < 0 else str(d) for d in row["shape"]),
                            row["layout"], field(row["receptive_field"]), f"{row['macs']:,}" if row["macs"] else ""]
                           for row in model["layers"]])
        layers_page.write()
        page.links("layer table", [(f"all {len(model['layers'])} tensors: shapes, layouts, receptive fields",
                                    "layers/index.html")])
    classes = report["classes"]
    if classes.get("labelled"):
        page.table("classes", ["", ""], [["labelled images", classes["labelled"]],
                                         ["accuracy", f"{classes['accuracy']:.3f}"],
                                         ["top-5 accuracy", f"{classes['top5_accuracy']:.3f}"],
                                         ["expected calibration error", f"{classes['calibration']['ece']:.3f}"],
                                         ["labels not mapped to classes", ", ".join(classes["unmapped_labels"])
                                          or "none"]], "accuracy over the images whose label maps to the model's classes")
        page.figure("reliability.png", _reliability(classes["calibration"]),
                    "reliability diagram: accuracy per confidence bin",
                    "bars below the diagonal: the model is over-confident at that confidence")
        page.table("confusions", ["true", "predicted", "images"],
                   [[f"{c['true']} {c['true_name']}", f"{c['predicted']} {c['predicted_name']}", c["images"]]
                    for c in classes["confusions"]], "the most frequent mistakes")
        page.table("worst-classified images", ["image", "label", "p(label)", "predicted"],
                   [[w["id"], w["label"], f"{w['true_probability']:.3f}", f"{w['predicted']} {w['predicted_name']}"]
                    for w in classes["worst"]], "where the model is most wrong: inspect these first")
        if any(w.get("png") for w in classes["worst"]):
            method = classes.get("worst_method", "gradcam")
            page.figure("worst.png", _worst_figure(classes["worst"], classes.get("worst_layer", "")),
                        "the worst-classified images with " + ("Grad-CAM at " + classes.get("worst_layer", "")
                                                               if method == "gradcam" else method),
                        "where the model looked for its wrong answer, and where the evidence for the true class is: "
                        "background, watermarks or a second object in the wrong-answer map are shortcuts", wide=True)
        if classes.get("per_label"):
            page.table("per label", ["label", "images", "accuracy", "mean p(label)"],
                       [[label, v["images"], f"{v['accuracy']:.3f}", f"{v['mean_probability']:.3f}"]
                        for label, v in sorted(classes["per_label"].items(), key=lambda item: item[1]["accuracy"])],
                       "weakest labels first")
    else:
        page.table("predictions", ["class", "images"], [[f"{p['class']} {p['name']}", p["images"]]
                                                       for p in classes["predicted"][:20]],
                   "no label maps to the model's classes: the distribution of predicted classes")
    links = _unit_pages(report, out)
    if links:
        page.links("unit pages", links, "per layer, each sampled channel's feature visualisation, top dataset "
                   "patches, mean activation per label and neighbours")
    if report["units"]:
        page.figure("units.png", _units(report["units"]), "units: mean activation per channel over the dataset",
                    "dead channels (never active on any image) waste capacity; a long flat tail means few units "
                    "do the work", wide=True)
    faithful = report["faithfulness"]
    if faithful["methods"]:
        page.figure("faithfulness.png", _curves(faithful["methods"]),
                    f"attribution faithfulness on {faithful['images']} images: deletion and insertion curves",
                    "a method to trust makes the probability fall faster than random when its top pixels are removed "
                    "(small deletion AUC) and rise faster when they are restored (large insertion AUC)", wide=True)
        page.table("which attribution methods to trust", ["method", "deletion AUC", "insertion AUC", "verdict"],
                   [[m, f"{v['deletion_auc']:.3f}", f"{v['insertion_auc']:.3f}",
                     "baseline" if m == "random" else "beats random" if v["faithful"] else "no better than random"]
                    for m, v in faithful["methods"].items()]
                   + [[m, "", "", f"not run: {reason}"] for m, reason in faithful["unavailable"].items()],
                   "a method beats random when its insertion AUC minus its deletion AUC is larger than the random "
                   "ordering's: its top pixels carry the evidence")
    randomisation = report.get("randomisation", {})
    if randomisation.get("correlations"):
        page.table("model-randomisation check (Adebayo et al. 2018)",
                   ["method", *[f"rho after {layer}" for layer in randomisation["layers"]], "verdict"],
                   [[m, *[f"{v:.2f}" for v in values],
                     "insensitive to the model" if randomisation["insensitive"].get(m) else "depends on the model"]
                    for m, values in randomisation["correlations"].items()],
                   "Spearman correlation of each method's map with its map on the trained model, as weighted layers "
                   "are re-initialised from the top: a method whose map survives the destruction of the weights "
                   "does not explain this model")
    elif randomisation.get("unavailable"):
        page.table("model-randomisation check", ["", ""], [["not run", randomisation["unavailable"]]])
    if report["robustness"].get("images"):
        page.figure("robustness.png", _robustness(report["robustness"]),
                    f"robustness on {report['robustness']['images']} images (against "
                    f"{report['robustness']['against']})", "how fast accuracy falls with each corruption and "
                    "with adversarial perturbations", wide=True)
    dataset = report["dataset"]
    if dataset.get("map", {}).get("points"):
        names = {c["class"]: c["name"] for c in classes.get("predicted", [])}
        page.figure("map.png", _code_map(dataset["map"], lambda c: f"{c} {names.get(c, '')}".strip()),
                    "t-SNE of the penultimate codes: each point an image, crosses where the prediction is wrong",
                    "mistakes inside another class's cluster are confusions the features make; isolated points are "
                    "outliers; a label split over several clusters may be two concepts", wide=True)
    page.table("near-duplicate pairs", ["image", "image", "code distance"],
               [[p["first"], p["second"], f"{p['distance']:.4g}"] for p in dataset["near_duplicates"]],
               "images the network sees as the same: duplicates can leak between splits")
    if any(p.get("first_png") for p in dataset["near_duplicates"]):
        page.figure("duplicates.png", _pairs_figure(dataset["near_duplicates"]),
                    "near-duplicate pairs: the images the network codes most alike",
                    "the same photo twice (or a crop of it) is a leak between splits or a weight the dataset gives "
                    "one scene twice")
    page.table("outliers", ["image", "mean distance to 5 nearest"],
               [[o["id"], f"{o['mean_distance']:.4g}"] for o in dataset["outliers"]],
               "images unlike the rest: mislabelled, corrupt or out of distribution?")
    if any(o.get("png") for o in dataset["outliers"]):
        page.figure("outliers.png", _outliers_figure(dataset["outliers"]),
                    "outliers: the images farthest from their 5 nearest (number: that mean code distance)",
                    "blank, corrupt or out-of-domain images, and labels no other image shares")
    page.file("audit.json", json.dumps(report, indent=1))
    return page.write()


# -- commands -------------------------------------------------------------------------------------------

def _label_map(path) -> dict | None:
    if path is None:
        return None
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CliError(f"--label-map: {path}: {error}", 4) from None
    if not isinstance(mapping, dict):
        raise CliError(f"--label-map: {path} must hold a JSON object: label -> class index or list of indices", 4)
    return mapping


def _finish(report: dict, name: str, args) -> int:
    failed = verdict(report, args.fail_if or [])  # a malformed condition stops here, before anything is written
    if args.out:
        write_site(report, args.out, name)
    found = metrics(report)
    print(table(["metric", "value"], [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in found.items()],
                right={1}))
    for condition in failed:
        print(f"convscope: audit {name}: failed {condition}", file=sys.stderr)
    return EXIT_VERDICT if failed else 0


def cmd_audit(client: Client, args) -> int:
    name = args.name or f"{args.model}-audit"
    for condition in args.fail_if or []:
        if not CONDITION.match(condition):
            raise CliError(f"--fail-if: {condition!r} is not 'METRIC OP NUMBER' (e.g. 'accuracy < 0.7')", 2)
    source = _source(args)
    info = with_progress("auditing", lambda bar: client.run_audit(
        name, args.model, limit=args.limit, label_map=_label_map(args.label_map), overwrite=args.overwrite,
        unit_layers=args.unit_layers, attribution_images=args.attribution_images, curve_steps=args.curve_steps,
        robustness_images=args.robustness_images, methods=args.method or (), feature_steps=args.feature_steps,
        worst_images=args.worst_images, progress=bar, **source))
    print(f"audit {info.name}: {info.images} images, {info.labelled} labelled"
          + (f", accuracy {info.accuracy:.3f}" if info.labelled else ""))
    return _finish(client.audit(info.name), info.name, args)


def diff(first: dict, second: dict) -> dict:
    """What changed from audit ``first`` to ``second`` (two versions of a model): every metric, the
    faithfulness and randomisation verdicts per method, and per unit layer both had the channels that died
    and those that came alive."""
    a, b = metrics(first), metrics(second)
    changes = {"metrics": {name: {"first": a.get(name), "second": b.get(name),
                                  "change": b[name] - a[name] if name in a and name in b else None}
                           for name in dict.fromkeys([*a, *b])}}
    verdicts = {}
    for method in dict.fromkeys([*first.get("faithfulness", {}).get("methods", {}),
                                 *second.get("faithfulness", {}).get("methods", {})]):
        if method == "random":
            continue
        was = first.get("faithfulness", {}).get("methods", {}).get(method, {}).get("faithful")
        now = second.get("faithfulness", {}).get("methods", {}).get(method, {}).get("faithful")
        verdicts[method] = {"faithful": [was, now],
                            "insensitive": [first.get("randomisation", {}).get("insensitive", {}).get(method),
                                            second.get("randomisation", {}).get("insensitive", {}).get(method)]}
    changes["methods"] = verdicts
    units = {}
    for layer in set(first.get("units", {})) & set(second.get("units", {})):
        dead_a, dead_b = set(first["units"][layer]["dead"]), set(second["units"][layer]["dead"])
        if dead_a != dead_b:
            units[layer] = {"died": sorted(dead_b - dead_a), "revived": sorted(dead_a - dead_b)}
    changes["units"] = units
    labels_a = first.get("classes", {}).get("per_label", {})
    labels_b = second.get("classes", {}).get("per_label", {})
    changes["labels"] = {label: {"accuracy": [labels_a[label]["accuracy"], labels_b[label]["accuracy"]],
                                 "change": labels_b[label]["accuracy"] - labels_a[label]["accuracy"]}
                         for label in sorted(set(labels_a) & set(labels_b))}
    changes["attribution_drift"] = attribution_drift(first, second)
    return changes


def _ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share their mean rank), for Spearman's correlation."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start: end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists; None when either is constant."""
    ra, rb = _ranks(a), _ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    spread = (sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb)) ** 0.5
    return None if spread == 0 else cov / spread


def attribution_drift(first: dict, second: dict) -> dict:
    """Per attribution method and per dataset label (the predicted class where there is none): the mean
    Spearman correlation between the two audits' maps of the same image (same id), from the coarse maps
    audit.json keeps for the faithfulness sample. 1: the versions look at the same places; near 0 or below:
    the explanation drifted."""
    found: dict = {}
    methods_a = first.get("faithfulness", {}).get("methods", {})
    methods_b = second.get("faithfulness", {}).get("methods", {})
    for method in sorted(set(methods_a) & set(methods_b)):
        maps_b = {row["id"]: row for row in methods_b[method].get("per_image", []) if row.get("map")}
        groups: dict = {}
        for row in methods_a[method].get("per_image", []):
            other = maps_b.get(row.get("id"))
            if not row.get("map") or other is None:
                continue
            rho = spearman([v for line in row["map"] for v in line], [v for line in other["map"] for v in line])
            if rho is not None:
                groups.setdefault(row.get("label") or f"predicted {row.get('predicted')}", []).append(rho)
        if groups:
            found[method] = {group: {"images": len(values), "mean_spearman": sum(values) / len(values)}
                             for group, values in sorted(groups.items())}
    return found


def _show_diff(names: tuple[str, str], changes: dict) -> None:
    def shown(value):
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [[name, shown(v["first"]), shown(v["second"]), shown(v["change"])] for name, v in changes["metrics"].items()]
    print(table(["metric", names[0], names[1], "change"], rows, right={1, 2, 3}))
    if changes["methods"]:
        print()
        print(table(["method", "beats random", "insensitive to the model"],
                    [[m, " -> ".join(shown(x) for x in v["faithful"]), " -> ".join(shown(x) for x in v["insensitive"])]
                     for m, v in changes["methods"].items()]))
    drift = changes.get("attribution_drift") or {}
    if drift:
        print()
        print(table(["method", "label", "images", "map correlation (Spearman)"],
                    [[method, group, v["images"], f"{v['mean_spearman']:.3f}"]
                     for method, groups in drift.items() for group, v in groups.items()], right={2, 3}))
    moved = [(label, v) for label, v in (changes.get("labels") or {}).items() if v["change"]]
    if moved:
        print()
        print(table(["label", "accuracy", "change"],
                    [[label, " -> ".join(f"{x:.3f}" for x in v["accuracy"]), f"{v['change']:+.3f}"]
                     for label, v in sorted(moved, key=lambda item: item[1]["change"])], right={2}))
    for layer, change in sorted(changes["units"].items()):
        print(f"{layer}: {len(change['died'])} channels died {change['died'][:20]}, "
              f"{len(change['revived'])} came alive {change['revived'][:20]}")


def cmd_audits(client: Client, args) -> int:
    if args.action == "diff":
        if not (args.name and args.other):
            raise CliError("audits diff: give two audit names, A B", 2)
        changes = diff(client.audit(args.name), client.audit(args.other))
        _show_diff((args.name, args.other), changes)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "diff.json").write_text(json.dumps(changes, indent=1))
            print(f"wrote {args.out / 'diff.json'}")
        return 0
    if args.action == "list":
        rows = [[a.name, a.model, a.images, a.labelled, f"{a.accuracy:.3f}" if a.labelled else "", a.created]
                for a in client.audits()]
        print(table(["name", "model", "images", "labelled", "accuracy", "created"], rows, right={2, 3, 4}))
        return 0
    if not args.name:
        raise CliError(f"audits {args.action}: give the audit NAME", 2)
    if args.action == "delete":
        client.delete_audit(args.name)
        print(f"deleted {args.name}")
        return 0
    return _finish(client.audit(args.name), args.name, args)


def add_commands(commands, parser) -> None:
    """The audit commands; ``parser(commands, name, help, run)`` makes a subcommand in the CLI's style."""
    def verdict_flags(sub):
        sub.add_argument("--fail-if", action="append", metavar="'METRIC OP NUMBER'",
                         help="exit 6 when the condition holds, e.g. 'accuracy < 0.7' or 'ece > 0.1' (repeatable; "
                         "metrics: accuracy, top5_accuracy, ece, dead_units, saturating_units, faithful_methods, "
                         "insensitive_methods, worst_corruption_accuracy, fgsm_accuracy, iterative_attack_accuracy, "
                         "latency_ms, images, labelled, skipped)")
        sub.add_argument("--out", type=Path, default=None, help="folder for the report site (default: "
                         "convscope-out/COMMAND)")

    audit = parser(commands, "audit", "audit a model over a dataset: one job, a report site and a verdict", cmd_audit)
    audit.add_argument("model", help="model name (see `convscope models`)")
    audit.add_argument("images", nargs="*", help="local image files or folders (a folder's sub-folders are labels)")
    audit.add_argument("--dataset", default="", help="or a dataset folder under the server's data root")
    audit.add_argument("--limit", type=int, default=0, help="audit at most this many images (0: all)")
    audit.add_argument("--placement", default="default", choices=["default", "server", "cluster"],
                       help="where the scan stage runs: the server's choice, the server, or its Ray cluster (a "
                       "server started with --ray; --dataset audits only)")
    audit.add_argument("--name", default="", help="name the report is stored under (default: MODEL-audit)")
    audit.add_argument("--overwrite", action="store_true", help="replace a stored audit of the same name")
    audit.add_argument("--label-map", default=None, help="JSON file: dataset label -> class index or list of "
                       "indices (default: labels match class names or numbers)")
    audit.add_argument("--unit-layers", type=int, default=0, help="layers with unit statistics (0: the server's 4)")
    audit.add_argument("--attribution-images", type=int, default=0, help="images for the faithfulness curves "
                       "(0: the server's 8)")
    audit.add_argument("--curve-steps", type=int, default=0, help="steps per deletion / insertion curve (0: 16)")
    audit.add_argument("--robustness-images", type=int, default=0, help="images for robustness (0: the server's 64)")
    audit.add_argument("--feature-steps", type=int, default=0, help="gradient-ascent steps of each unit page's "
                       "feature visualisation (0: the server's 64; -1: none)")
    audit.add_argument("--worst-images", type=int, default=0, help="worst-classified images shown with Grad-CAM "
                       "(0: the server's 12; -1: none)")
    audit.add_argument("--method", action="append", choices=["vanilla", "integrated_gradients", "gradcam",
                                                             "occlusion"],
                       help="attribution methods to check (repeatable; default: all four)")
    verdict_flags(audit)

    audits = parser(commands, "audits", "list, show (site and verdict), diff or delete stored audits", cmd_audits)
    audits.add_argument("action", choices=["list", "show", "diff", "delete"], help="what to do")
    audits.add_argument("name", nargs="?", default="", help="audit name (show, delete; the first one for diff)")
    audits.add_argument("other", nargs="?", default="", help="diff: the second audit (e.g. the new model version)")
    verdict_flags(audits)
