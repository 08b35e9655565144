"""Mixed load: N clients for a bounded time against one server process, each picking Predict, Describe,
saliency, occlusion or a streamed dataset scan at random (seeded). Prints p50/p99 latency per method,
results by status code, and the server's RSS idle before, at peak, and idle after the load.

    .venv/bin/python benchmarks/load_mixed.py [--clients 32] [--seconds 60] [--seed 0]
        [--server-arg=--workers=8 ...]

Light calls (Predict, Describe) run on their own threads on the server, so their latency should stay low
while heavy jobs are admitted up to --max-concurrent-jobs and the rest are refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from common import ROOT

MODEL = "efficientnet_lite0"
SCAN_LAYER = "/_conv_stem/Conv_output_0"
MIX = {"Predict": 40, "Describe": 15, "Saliency": 15, "Occlusion": 15, "TopPatches": 15}


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of ``pid`` in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start(server_args: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([str(Path(sys.executable).parent / "convscope-server"), "--port", "0",
                                "--repository", str(ROOT / "models"), "--log-level", "WARNING", *server_args],
                               stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, "127.0.0.1:" + line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]


def calls(client, image: np.ndarray, crops: list[np.ndarray]):
    return {
        "Predict": lambda: client.predict(MODEL, image, top=5),
        "Describe": lambda: client.describe(MODEL),
        "Saliency": lambda: client.saliency(MODEL, image, target=285),
        "Occlusion": lambda: client.occlusion(MODEL, image, target=285, window=48, stride=24),
        "TopPatches": lambda: client.top_patches(MODEL, SCAN_LAYER, iter(crops), k=4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-arg", action="append", default=[], help="passed to convscope-server "
                        "(repeatable), e.g. --server-arg=--max-concurrent-jobs=2")
    args = parser.parse_args()

    from skimage import data

    from convscope import Client, ConvscopeError

    image = data.chelsea()
    crops = [np.ascontiguousarray(image[y:y + 160, x:x + 160]) for y in (0, 60, 120) for x in (0, 100, 200, 290)]
    process, address = start(args.server_arg)
    try:
        with Client(address, timeout=600) as client:
            deadline = time.monotonic() + 600
            while client.describe(MODEL).gradient.get("state") != "ready" and time.monotonic() < deadline:
                time.sleep(0.5)  # the background conversion for gradient methods
            for call in calls(client, image, crops).values():  # warm every path once
                call()
        time.sleep(2)
        idle_before = rss_mb(process.pid)[0]

        latencies: dict[str, list[float]] = defaultdict(list)
        codes: dict[str, Counter] = defaultdict(Counter)
        lock = threading.Lock()
        stop_at = time.monotonic() + args.seconds

        def client_loop(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            names, weights = list(MIX), list(MIX.values())
            with Client(address, timeout=120) as c:
                table = calls(c, image, crops)
                while time.monotonic() < stop_at:
                    name = rng.choices(names, weights)[0]
                    begun = time.perf_counter()
                    try:
                        table[name]()
                        code = "OK"
                    except ConvscopeError as error:
                        code = error.code.name
                    elapsed = time.perf_counter() - begun
                    with lock:
                        codes[name][code] += 1
                        if code == "OK":
                            latencies[name].append(elapsed)
                    if code == "RESOURCE_EXHAUSTED":
                        time.sleep(0.2)  # a client that is told the server is busy backs off a little

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        peak = 0.0
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, rss_mb(process.pid)[0])
            time.sleep(0.5)
        time.sleep(5)
        idle_after, high_water = rss_mb(process.pid)

        print(f"{args.clients} clients, {args.seconds:g} s, seed {args.seed}, server args {args.server_arg or '-'}")
        print(f"{'method':<12} {'ok':>6} {'p50 (s)':>9} {'p99 (s)':>9}  other codes")
        for name in MIX:
            times = np.array(latencies[name]) if latencies[name] else np.array([np.nan])
            other = ", ".join(f"{code} {n}" for code, n in sorted(codes[name].items()) if code != "OK") or "-"
            print(f"{name:<12} {codes[name]['OK']:>6} {np.percentile(times, 50):>9.3f} "
                  f"{np.percentile(times, 99):>9.3f}  {other}")
        print(f"server RSS: idle before {idle_before:.0f} MB, peak {max(peak, idle_before):.0f} MB "
              f"(VmHWM {high_water:.0f} MB), idle after {idle_after:.0f} MB")
    finally:
        process.terminate()
        process.wait(60)


if __name__ == "__main__":
    main()
