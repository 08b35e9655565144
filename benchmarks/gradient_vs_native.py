"""Gradient methods on the module converted from ONNX (onnx2pytorch) vs the native torch model.

Module overhead: the same Captum calls (Saliency, IntegratedGradients, LayerGradCam) on the bridge's
converted efficientnet_lite0 and on the native torch model built from the same weights; ratio =
converted / native (goal <= 1.2). End to end: the same methods through the server and client against
Captum on the native model in process. Everything on one device (CUDA when torch sees a GPU, exact
float32 on both sides); times are medians after a warm-up call, GPU work synchronised.

    .venv/bin/python benchmarks/gradient_vs_native.py [--steps 32] [--repeat 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import chelsea_input, native_lite0, pick_device, start_server, synchronized, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when torch sees a GPU")
    args = parser.parse_args()
    device = pick_device(args.device)

    from captum.attr import IntegratedGradients, LayerGradCam, Saliency

    from convscope import Client

    native = native_lite0().to(device)
    x = chelsea_input()
    t = torch.from_numpy(x[None]).to(device)
    server = start_server(device="cpu" if device == "cpu" else "auto", gradient_warmup=False)
    try:
        started = time.perf_counter()
        torch_model = server.bridges.get(server.repository.get("efficientnet_lite0"))
        print(f"conversion + probe: {time.perf_counter() - started:.2f} s on {torch_model.device}")
        converted = torch_model.module
        head = getattr(converted, converted.mapping["/_conv_head/Conv_output_0"])
        cases = [
            ("vanilla saliency", lambda m: Saliency(m).attribute(t, target=285)),
            (f"integrated gradients ({args.steps} steps)", lambda m: IntegratedGradients(m).attribute(
                t, target=285, n_steps=args.steps, internal_batch_size=16)),
            ("Grad-CAM, conv head", lambda m, h=head: LayerGradCam(m, h if m is converted else m._bn1).attribute(
                t, target=285)),
        ]
        print(f"{'module overhead':<34} {'native (s)':>12} {'converted (s)':>14} {'converted/native':>17}")
        for name, call in cases:
            native_time = timed(synchronized(lambda: call(native), device), args.repeat)
            converted_time = timed(synchronized(lambda: call(converted), device), args.repeat)
            print(f"{name:<34} {native_time:>12.4f} {converted_time:>14.4f} {converted_time / native_time:>16.2f}x")

        with Client(server.address) as client:
            served = [
                ("vanilla saliency", lambda: client.saliency("efficientnet_lite0", x, 285)),
                (f"integrated gradients ({args.steps} steps)", lambda: client.saliency(
                    "efficientnet_lite0", x, 285, method="integrated_gradients", steps=args.steps, batch_size=16)),
                ("Grad-CAM, conv head", lambda: client.cam("efficientnet_lite0", x, 285,
                                                           layer="/_conv_head/Conv_output_0")),
            ]
            print(f"\n{'end to end over gRPC':<34} {'native (s)':>12} {'served (s)':>14} {'served/native':>17}")
            for (name, call), (_, native_call) in zip(served, cases):
                native_time = timed(synchronized(lambda: native_call(native), device), args.repeat)
                served_time = timed(call, args.repeat)
                print(f"{name:<34} {native_time:>12.4f} {served_time:>14.4f} {served_time / native_time:>16.2f}x")
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
