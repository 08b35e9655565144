"""Occlusion over gRPC (onnxruntime) vs Captum's Occlusion on the native torch model, same map.

The default model, scikit-image's chelsea, target 285, zero baseline, probability score. Captum runs with
the best of several perturbations_per_eval; convscope with its configured onnxruntime batch. Prints both
times, the ratio (Captum / convscope, >1 = convscope faster) and the largest relative map difference.

    .venv/bin/python benchmarks/occlusion_vs_captum.py [--cases 32:16 16:8] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import chelsea_input, native_lite0, report, start_server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["32:16", "16:8"], help="window:stride")
    parser.add_argument("--per-eval", type=int, nargs="+", default=[1, 2, 4, 16], help="Captum perturbations_per_eval")
    parser.add_argument("--ort-batch", type=int, default=8)
    args = parser.parse_args()

    from captum.attr import Occlusion

    from convscope import Client

    native = native_lite0()
    x = chelsea_input()
    forward = lambda t: torch.softmax(native(t), dim=1)  # noqa: E731
    server = start_server(ort_batch=args.ort_batch)
    rows = []
    try:
        with Client(server.address) as client:
            for case in args.cases:
                window, stride = (int(v) for v in case.split(":"))
                start = time.perf_counter()
                ours = client.occlusion("efficientnet_lite0", x, 285, window=window, stride=stride)
                our_time = time.perf_counter() - start
                best, reference = float("inf"), None
                for per_eval in args.per_eval:
                    start = time.perf_counter()
                    with torch.no_grad():
                        reference = Occlusion(forward).attribute(
                            torch.from_numpy(x[None]), sliding_window_shapes=(3, window, window),
                            strides=(3, stride, stride), target=285, baselines=0.0,
                            perturbations_per_eval=per_eval)[0, 0].numpy()
                    elapsed = time.perf_counter() - start
                    print(f"  captum window {window} stride {stride} perturbations_per_eval {per_eval}: {elapsed:.2f} s")
                    best = min(best, elapsed)
                diff = np.abs(ours.attribution - reference).max() / np.abs(reference).max()
                rows.append((f"window {window} stride {stride} ({ours.forward_passes} passes)", best, our_time))
                print(f"  max |map difference| / max |map| = {diff:.2e}")
    finally:
        server.stop(0)
    report(rows, "convscope", "Captum")


if __name__ == "__main__":
    main()
