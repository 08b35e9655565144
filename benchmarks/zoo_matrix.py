"""Every technique on every model of the test zoo (tests/zoo.py): a model x technique matrix.

Builds the zoo (torchvision architectures with random weights and scattered batch-norms, exported by the
TorchScript exporter at opsets 17 and 11 and by the dynamo exporter at opset 20, plus NHWC and uint8
models shaped like TensorFlow exports), starts the real server on it and, per model, through the client:

    describe   spatial tensors with a receptive field / all spatial tensors, and their layouts
    predict    top-1 equal to the native torch module's (near-ties allowed), top-5 logits within 1e-4
    bridge     the gradient module's state after a gradient call (probe difference, or the reason)
    saliency   vanilla saliency vs Captum's Saliency on the native module (relative max difference)
    sal@file   the same against the native architecture holding the file's weights (tests/zoo.py
               file_weights: folded batch-norms fused, the file's conv weights), which computes exactly
               the exported function; the references below all use it
    gc@last    Grad-CAM at the last block vs pytorch-grad-cam's GradCAM
    gc@concat  the same at the last Concat (n/a where the network has none)
    guided     guided backprop; vs Captum's GuidedBackprop where the native network's ReLUs are all
               nn.ReLU modules (Captum rewrites only those), else "ran"
    scorecam   Score-CAM at the last block (served only; seconds)
    cam        CAM (global-average-pool + linear heads) vs tests/zoo.py cam_reference: pytorch-grad-cam's
               Grad-CAM at the pooled tensor, which CAM equals for such heads; for ConvNeXt's pool ->
               LayerNorm -> linear head, the exact decomposition forward/class_activation.py documents;
               "n/a (refused)" where the head is not one (MobileNet v3's MLP, SqueezeNet's conv classifier)
    chlast     Activations of a channels-last tensor: layout NHWC, per-channel stats over the last axis

A cell is "ok" (with the number where there is one), "FAIL <short reason>" or "n/a"; the full messages
follow the matrix. Comparisons use 1e-3 relative (maps: 1e-3 absolute on [0, 1]). Against the native
module itself a converted graph agrees only up to float rounding (the exporter folds batch-norms into
convs), and a ReLU or max-pool within float noise of a threshold or a tie routes the gradient elsewhere:
that is what a "saliency" FAIL with "sal@file" ok means. Then the timings of vanilla saliency, served
(a gRPC round trip) vs Captum on the native module (frozen, as the server's is) in the same process,
measured alternately, medians after a warm-up; other work on the machine shows in them.

    .venv/bin/python benchmarks/zoo_matrix.py [--root DIR] [--families resnet18,densenet] [--repeat 5]
    .venv/bin/python benchmarks/zoo_matrix.py --size 224 --timings-only    # the timings at deployed size
    .venv/bin/python benchmarks/zoo_matrix.py | tee /tmp/zoo_matrix.txt
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from common import start_server, timed

TOLERANCE = 1e-3
COLUMNS = ["describe", "predict", "bridge", "saliency", "sal@file", "gc@last", "gc@concat", "guided", "scorecam",
           "cam", "chlast"]
CAPTUM_GUIDED = {"resnet18", "densenet", "squeezenet1_1", "shufflenet_v2_x0_5", "regnet_x_400mf", "uint8_nhwc"}


class Failed(Exception):
    """A check that ran and disagreed; the message is the cell's short reason."""


def short(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if isinstance(error, Failed):
        return str(error)
    if code is not None and hasattr(code, "name"):
        return code.name
    return type(error).__name__


def difference_cell(value: float, tolerance: float = TOLERANCE) -> str:
    if not value <= tolerance:
        raise Failed(f"diff {value:.1e}")
    return f"ok {value:.0e}"


def run_model(client, entry, pixels, notes) -> dict[str, str]:
    import zoo
    from convscope import InvalidArgument
    from zoo import (cam_reference, captum_saliency, grad_cam_reference, native_batch, native_logits,
                     relative_difference)

    cells: dict[str, str] = {}
    x = entry.sample(pixels)
    logits = native_logits(entry, x)
    target = int(np.argmax(logits))

    def check(column, fn):
        try:
            cells[column] = fn()
        except Exception as error:  # every failure is a cell, never the end of the run
            cells[column] = f"FAIL {short(error)}"
            known = isinstance(error, Failed) or hasattr(error, "code")
            message = str(error) if known else traceback.format_exc(limit=3)
            notes.append(f"{entry.name} / {column}: {message.strip()}")

    def describe():
        d = client.describe(entry.name)
        spatial = [layer for layer in d.layers if layer.spatial]
        with_field = sum(layer.receptive_field is not None for layer in spatial)
        layouts = collections.Counter(layer.layout or "?" for layer in spatial)
        notes.append(f"{entry.name} / describe: layouts {dict(layouts)}")
        return f"rf {with_field}/{len(spatial)}"

    def predict():
        top = client.predict(entry.name, x, top=5)
        scale = np.abs(logits).max()
        tied = set(np.flatnonzero(logits >= logits.max() - 1e-4 * scale))
        if top[0].index not in tied:
            raise Failed(f"top-1 {top[0].index} != native {target}")
        worst = max(abs(s.logit - logits[s.index]) for s in top) / scale
        return difference_cell(worst, 1e-4)

    def bridge():
        try:
            client.saliency(entry.name, x, target=target)  # converts the module, or records why not
        except Exception:  # noqa: BLE001 - the state below says what happened
            pass
        state = client.describe(entry.name).gradient
        if state["state"] != "ready":
            raise Failed(f"{state['state']}: {state['reason']}")
        return f"ok {state['probe_difference']:.0e}"

    served = {}

    def saliency():
        served["saliency"] = client.saliency(entry.name, x, target=target).attribution
        expected = captum_saliency(entry, x, target, entry.native)
        return difference_cell(relative_difference(served["saliency"], expected))

    def saliency_file_weights():
        if "saliency" not in served:
            return "n/a"
        return difference_cell(relative_difference(served["saliency"], captum_saliency(entry, x, target)))

    def grad_cam(role):
        def run():
            if role not in entry.tensors or role not in entry.native_layers:
                return "n/a"
            got = client.cam(entry.name, x, target=target, layer=entry.tensors[role], method="gradcam")
            expected = grad_cam_reference(entry, x, target, role)
            return difference_cell(float(np.abs(got.map - expected).max()))
        return run

    def guided():
        got = client.guided_backprop(entry.name, x, target=target)
        if not np.isfinite(got.attribution).all() or not np.abs(got.attribution).max() > 0:
            raise Failed("empty or non-finite map")
        if entry.family not in CAPTUM_GUIDED:
            return "ran"
        from captum.attr import GuidedBackprop

        batch = native_batch(entry, x).requires_grad_(True)
        expected = GuidedBackprop(entry.reference).attribute(batch, target=target)[0].detach().numpy()
        return difference_cell(relative_difference(got.attribution, expected))

    def score_cam():
        if "last_block" not in entry.tensors:
            return "n/a"
        started = time.perf_counter()
        got = client.score_cam(entry.name, x, entry.tensors["last_block"], target=target)
        if not np.isfinite(got.cam).all():
            raise Failed("non-finite map")
        return f"ok {time.perf_counter() - started:.1f}s"

    def cam():
        if not zoo.FAMILIES[entry.family].cam_head:
            try:
                client.cam(entry.name, x, target=target, method="cam")
            except InvalidArgument as error:
                notes.append(f"{entry.name} / cam: no linear head, refused: {error}")
                return "n/a (refused)"
            raise Failed("CAM on a head that is not pool + linear")
        got = client.cam(entry.name, x, target=target, method="cam")
        return difference_cell(float(np.abs(got.map - cam_reference(entry, x, target)).max()))

    def channels_last():
        if "channels_last" not in entry.tensors:
            return "n/a"
        name = entry.tensors["channels_last"]
        got = client.activations(entry.name, x, [name])[name]
        if got.layout != "NHWC":
            raise Failed(f"layout {got.layout or '(none)'}")
        expected = got.values.reshape(-1, got.values.shape[-1]).mean(axis=0)
        if got.stats["mean"].shape != expected.shape or not np.allclose(got.stats["mean"], expected, atol=1e-5):
            raise Failed(f"stats over the wrong axis ({got.stats['mean'].shape[0]} channels)")
        return "ok"

    models = {m.name: m for m in client.models()}
    if not models[entry.name].ready:
        notes.append(f"{entry.name} / load: {models[entry.name].error}")
        return {column: "FAIL not loaded" for column in COLUMNS}
    checks = [describe, predict, bridge, saliency, saliency_file_weights, grad_cam("last_block"),
              grad_cam("concat"), guided, score_cam, cam, channels_last]
    for column, fn in zip(COLUMNS, checks):
        check(column, fn)
    return cells


def timings(client, entries, pixels, repeat: int) -> list[tuple[str, float, float]]:
    from captum.attr import Saliency

    from zoo import native_batch, native_logits

    rows = []
    for entry in entries:
        x = entry.sample(pixels)
        target = int(np.argmax(native_logits(entry, x)))
        batch = native_batch(entry, x).requires_grad_(True)
        reference = Saliency(entry.native)
        calls = {"native": lambda: reference.attribute(batch, target=target, abs=False),
                 "served": lambda: client.saliency(entry.name, x, target=target)}
        try:
            times = {name: [] for name in calls}
            for _ in range(repeat):  # alternately, so load from elsewhere hits both sides alike
                for name, call in calls.items():
                    times[name].append(timed(call, repeat=1, warmup=0 if times[name] else 1))
        except Exception as error:  # noqa: BLE001 - reported, the next model goes on
            print(f"  {entry.name}: served saliency failed: {short(error)}")
            continue
        rows.append((entry.name, statistics.median(times["native"]), statistics.median(times["served"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, help="zoo repository to build or reuse (default: a temporary folder)")
    parser.add_argument("--families", help="comma-separated families (default: all)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--size", type=int, help="export every model at this input size (default: each family's "
                        "64-112 px test size; 224 times them as deployed)")
    parser.add_argument("--timings-only", action="store_true", help="skip the matrix, print only the timings")
    args = parser.parse_args()

    import torch
    from skimage import data

    import zoo
    from convscope import Client

    torch.set_num_threads(2)
    families = args.families.split(",") if args.families else None
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "zoo"
        started = time.perf_counter()
        entries = zoo.build_zoo(root, families, reuse=args.root is not None, size=args.size)
        print(f"zoo: {len(entries)} models in {time.perf_counter() - started:.0f} s ({root})")
        for entry in entries:
            print(f"  {entry.name:<30} {entry.exporter:<6} opset {entry.opset:<3} {entry.size:>3} px "
                  f"{entry.layout} {entry.input_dtype:<7} export {entry.export_seconds:5.1f} s  "
                  f"roles {sorted(entry.tensors)}")
        pixels = data.chelsea()
        started = time.perf_counter()
        server = start_server(root, gradient_warmup=False, workers=4, max_gradient_models=len(entries))
        print(f"server up in {time.perf_counter() - started:.1f} s\n")
        notes: list[str] = []
        try:
            with Client(server.address, timeout=600) as client:
                rows = []
                for entry in [] if args.timings_only else entries:
                    started = time.perf_counter()
                    rows.append((entry.name, run_model(client, entry, pixels, notes)))
                    print(f"  {entry.name}: {time.perf_counter() - started:.1f} s", flush=True)
                width = max(len(entry.name) for entry in entries)
                if rows:
                    print(f"\n{'model':<{width}} " + " ".join(f"{c:<22}" for c in COLUMNS))
                    for name, cells in rows:
                        print(f"{name:<{width}} " + " ".join(f"{cells.get(c, '')[:22]:<22}" for c in COLUMNS))
                    print("\nnotes:")
                    for note in notes:
                        print(f"  {note}")
                print(f"\nvanilla saliency, median of {args.repeat} after a warm-up (s)")
                print(f"{'model':<{width}} {'Captum native':>14} {'served':>10} {'served/native':>14}")
                for name, native, served in timings(client, entries, pixels, args.repeat):
                    print(f"{name:<{width}} {native:>14.4f} {served:>10.4f} {served / native:>13.2f}x")
        finally:
            server.stop(0)


if __name__ == "__main__":
    main()
