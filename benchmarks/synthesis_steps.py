"""Optimisation steps per second over gRPC vs the same loop on the native torch model (goal >= 0.8x).

Class visualisation of efficientnet_lite0 class 130 (normalised gradient ascent with jitter) and feature
inversion at a middle layer (Adam), each written out plainly in torch on the native model built from the
same weights, against the server's jobs with the same step counts (no previews).

    .venv/bin/python benchmarks/synthesis_steps.py [--steps 60]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import chelsea_input, native_lite0, start_server


def native_class_vis(model, steps: int) -> float:
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 0.2
    start = time.perf_counter()
    for _ in range(steps):
        dy, dx = np.random.randint(-4, 5, 2)
        shifted = torch.roll(x, (int(dy), int(dx)), (2, 3)).requires_grad_(True)
        model(shifted)[0, 130].backward()
        grad = torch.roll(shifted.grad, (-int(dy), -int(dx)), (2, 3))
        with torch.no_grad():
            x = (x + 0.05 * grad / grad.abs().mean()).clamp(-1, 1)
    return steps / (time.perf_counter() - start)


def native_inversion(model, module, target_x, steps: int) -> float:
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("f", o))
    with torch.no_grad():
        model(target_x)
    target = seen["f"].detach()
    x = (torch.randn(1, 3, 224, 224) * 0.2).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        model(x)
        loss = ((seen["f"] - target) ** 2).sum() / (target ** 2).sum()
        dh, dw = x[:, :, 1:, :-1] - x[:, :, :-1, :-1], x[:, :, :-1, 1:] - x[:, :, :-1, :-1]
        (loss + 0.05 * (dh ** 2 + dw ** 2).mean()).backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1, 1)
    handle.remove()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from convscope import Client

    native = native_lite0()
    x = chelsea_input()
    layer = "/_blocks.5/Clip_1_output_0"
    server = start_server()
    try:
        with Client(server.address) as client:
            client.class_visualization("efficientnet_lite0", 130, steps=2)  # convert the model first
            rows = []
            start = time.perf_counter()
            client.class_visualization("efficientnet_lite0", 130, steps=args.steps, jitter=4)
            served = args.steps / (time.perf_counter() - start)
            rows.append(("class visualisation", native_class_vis(native, args.steps), served))
            start = time.perf_counter()
            client.invert("efficientnet_lite0", x, [layer], steps=args.steps)
            served = args.steps / (time.perf_counter() - start)
            rows.append(("feature inversion (Adam)", native_inversion(native, native._blocks[5]._bn1,
                                                                      torch.from_numpy(x[None]), args.steps), served))
    finally:
        server.stop(0)
    print(f"{'job':<28} {'native steps/s':>15} {'served steps/s':>15} {'served/native':>14}")
    for name, native_rate, served_rate in rows:
        print(f"{name:<28} {native_rate:>15.1f} {served_rate:>15.1f} {served_rate / native_rate:>13.2f}x")


if __name__ == "__main__":
    main()
