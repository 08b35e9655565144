"""Occlusion over gRPC (onnxruntime) vs Captum's Occlusion on the native torch model, same map.

The default model, scikit-image's chelsea, target 285, zero baseline, probability score. Captum runs on
the same device with the best of several perturbations_per_eval; convscope with its onnxruntime batch (the
device's default unless --ort-batch). Each side is timed as the median of --repeat calls after one
warm-up call (the first call on a GPU includes cuDNN's algorithm choice on both sides). Prints both times,
the ratio (Captum / convscope, >1 = convscope faster) and the largest relative map difference.

    .venv/bin/python benchmarks/occlusion_vs_captum.py [--cases 32:16 16:8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from common import chelsea_input, native_lite0, pick_device, report, start_server, synchronized, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", nargs="+", default=["32:16", "16:8", "8:4"], help="window:stride")
    parser.add_argument("--per-eval", type=int, nargs="+", help="Captum perturbations_per_eval "
                        "(default 1 2 4 16 on CPU, 16 64 256 on CUDA)")
    parser.add_argument("--ort-batch", type=int, default=0, help="0: the server's default for the device")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = pick_device(args.device)
    per_evals = args.per_eval or ([16, 64, 256] if device == "cuda" else [1, 2, 4, 16])

    from captum.attr import Occlusion

    from convscope import Client

    native = native_lite0().to(device)
    x = chelsea_input()
    t = torch.from_numpy(x[None]).to(device)
    forward = lambda batch: torch.softmax(native(batch), dim=1)  # noqa: E731
    server = start_server(ort_batch=args.ort_batch, device="cpu" if device == "cpu" else "auto",
                          gradient_warmup=False)
    print(f"device {device}; onnxruntime provider "
          f"{server.repository.get('efficientnet_lite0').execution_provider}, batch "
          f"{server.repository.get('efficientnet_lite0').run_batch}")
    rows = []
    try:
        with Client(server.address) as client:
            for case in args.cases:
                window, stride = (int(v) for v in case.split(":"))
                call = lambda: client.occlusion("efficientnet_lite0", x, 285, window=window, stride=stride)  # noqa: E731
                ours = call()
                our_time = timed(call, args.repeat, warmup=0)
                best, best_eval = float("inf"), 0
                for per_eval in per_evals:
                    def captum():
                        with torch.no_grad():
                            return Occlusion(forward).attribute(
                                t, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                target=285, baselines=0.0, perturbations_per_eval=per_eval)
                    elapsed = timed(synchronized(captum, device), args.repeat)
                    print(f"  captum window {window} stride {stride} perturbations_per_eval {per_eval}: {elapsed:.3f} s")
                    if elapsed < best:
                        best, best_eval = elapsed, per_eval
                reference = captum()[0, 0].cpu().numpy()
                diff = np.abs(ours.attribution - reference).max() / np.abs(reference).max()
                rows.append((f"{window}/{stride} ({ours.forward_passes} passes, Captum {best_eval})", best, our_time))
                print(f"  convscope {our_time:.3f} s; max |map difference| / max |map| = {diff:.2e}")
    finally:
        server.stop(0)
    report(rows, "convscope", "Captum")


if __name__ == "__main__":
    main()
