"""Idle RSS of an in-process server before and after rounds of issue 12's memory load.

Each round, on the default model: activations of every layer for 16 images (refused up front: over the
message limit), activations of the layers that fit for 16 images, SmoothGrad with 1,000 samples
(stopped by --max-job-seconds 3), 8 concurrent Predicts of a 6300x6300 1-bit PNG (39.7 M pixels, a few
KB each), and 4 SmoothGrad calls cancelled after 0.3 s. After each round the server idles 2 s and RSS is
read. ``--no-trim`` turns off malloc_trim after large requests, to compare.

    .venv/bin/python benchmarks/memory_load.py [--rounds 3] [--no-trim]
"""

from __future__ import annotations

import argparse
import io
import sys
import threading
import time

import numpy as np
from PIL import Image

from common import start_server

MODEL = "efficientnet_lite0"


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def peak_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def one_bit_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def run_round(client, images, layers, fitting, big_png) -> dict:
    from convscope import ConvscopeError

    outcome: dict[str, str] = {}

    def attempt(name, call):
        try:
            call()
            outcome[name] = "OK"
        except ConvscopeError as error:
            outcome[name] = type(error).__name__

    attempt("activations, all layers", lambda: client.activations(MODEL, images, layers))
    attempt("activations, layers that fit", lambda: client.activations(MODEL, images, fitting))
    attempt("smoothgrad 1000", lambda: client.saliency(MODEL, images[0], method="smoothgrad", samples=1000))
    threads = [threading.Thread(target=attempt, args=(f"1-bit png {i}", lambda: client.predict(MODEL, big_png, top=1)))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        def cancelled():
            def progress(step, total, stage):
                if time.monotonic() - begun > 0.3:
                    raise KeyboardInterrupt  # the client cancels the call
            try:
                client.saliency(MODEL, images[0], method="smoothgrad", samples=1000, progress=progress)
            except KeyboardInterrupt:
                pass
        begun = time.monotonic()
        attempt(f"cancelled {i}", cancelled)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-trim", action="store_true", help="do not call malloc_trim after large requests")
    args = parser.parse_args()

    from convscope import Client
    from convscope_server import memory

    if args.no_trim:
        memory.release = lambda estimate: None
        for module in ("model_service", "inspect_service", "attribution_service", "synthesis_service",
                       "dataset_service"):
            setattr(sys.modules.get(f"convscope_server.api.{module}") or __import__(
                f"convscope_server.api.{module}", fromlist=["x"]), "release", memory.release)
    server = start_server(max_job_seconds=3.0, gradient_warmup=False)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(16)]
    big_png = one_bit_png(6300)
    try:
        with Client(server.address, timeout=300) as client:
            layers = [layer.name for layer in client.describe(MODEL).layers]
            fitting, total = [], 0
            for layer in client.describe(MODEL).layers:
                size = 16 * 4 * int(np.prod([max(1, d) for d in layer.shape[1:]]))
                if total + size < 48 << 20:
                    fitting.append(layer.name)
                    total += size
            client.saliency(MODEL, images[0])  # converts the model and warms up
            time.sleep(2)
            print(f"malloc_trim after large requests: {'off' if args.no_trim else 'on'}  "
                  f"(glibc: {memory._TRIM is not None})")
            print(f"idle RSS before load: {rss_mib():7.0f} MiB")
            for number in range(1, args.rounds + 1):
                begun = time.monotonic()
                outcome = run_round(client, images, layers, fitting, big_png)
                took = time.monotonic() - begun
                time.sleep(2)
                counts: dict[str, int] = {}
                for value in outcome.values():
                    counts[value] = counts.get(value, 0) + 1
                print(f"round {number}: {took:5.1f} s, idle RSS after: {rss_mib():7.0f} MiB, peak so far "
                      f"{peak_mib():7.0f} MiB; outcomes {counts}")
            print("outcomes of the last round:", outcome)
    finally:
        server.stop(0)


if __name__ == "__main__":
    main()
