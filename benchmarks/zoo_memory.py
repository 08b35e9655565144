"""Memory of one server holding the whole test zoo (29 exports of 12 architecture families, tests/zoo.py):
peak and current RSS of the server process after start-up, after every model has answered an Activations
call (probe sessions, bounded by --max-probe-sessions for all models together) and after every model has
answered a vanilla saliency (converted torch modules, bounded by --max-gradient-models), against the
same server with bounds high enough to keep everything.

    .venv/bin/python benchmarks/zoo_memory.py [--root DIR] [--probes 16] [--modules 8]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import ROOT

sys.path.insert(0, str(ROOT / "tests"))


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of ``pid`` in MB, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    value = {key: int(re.search(rf"{key}:\s+(\d+)", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}
    return value["VmRSS"], value["VmHWM"]


def measure(root: Path, entries, probes: int, modules: int) -> list[tuple[str, float, float]]:
    from convscope import Client

    server = subprocess.Popen([str(Path(sys.executable).parent / "convscope-server"), "--port", "0", "--host",
                               "127.0.0.1", "--repository", str(root), "--log-level", "WARNING",
                               "--gradient-warmup", "false", "--max-probe-sessions", str(probes),
                               "--max-gradient-models", str(modules)], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        address = "127.0.0.1:" + line.split("listening on ")[1].split()[0].rsplit(":", 1)[1]
        rows = [("loaded", *rss_mb(server.pid))]
        with Client(address, timeout=600) as client:
            for entry in entries:
                x = np.zeros(client.describe(entry.name).inputs[0]["shape"][1:], np.float32 if entry.input_dtype == "float32" else np.uint8)
                client.activations(entry.name, x, [entry.tensors["last_block"]])
            rows.append(("after Activations on every model", *rss_mb(server.pid)))
            for entry in entries:
                x = np.zeros(client.describe(entry.name).inputs[0]["shape"][1:], np.float32 if entry.input_dtype == "float32" else np.uint8)
                client.saliency(entry.name, x, target=0)
            rows.append(("after a saliency on every model", *rss_mb(server.pid)))
        return rows
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, help="zoo repository to build or reuse (default: temporary)")
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--modules", type=int, default=8)
    args = parser.parse_args()
    import zoo

    with tempfile.TemporaryDirectory() as scratch:
        root = args.root or Path(scratch) / "zoo"
        entries = zoo.build_zoo(root, reuse=args.root is not None)
        print(f"{len(entries)} models in {root}")
        bounded = measure(root, entries, args.probes, args.modules)
        unbounded = measure(root, entries, 10_000, 10_000)
    print(f"{'stage':<36} {'bounded RSS / peak (MB)':>26} {'unbounded RSS / peak (MB)':>28} {'ratio':>7}")
    for (stage, rss, peak), (_, rss_all, peak_all) in zip(bounded, unbounded):
        print(f"{stage:<36} {rss:>12.0f} / {peak:>8.0f}   {rss_all:>14.0f} / {peak_all:>8.0f}   "
              f"{rss / rss_all:>6.2f}")
    print(f"bounds: --max-probe-sessions {args.probes}, --max-gradient-models {args.modules}")


if __name__ == "__main__":
    main()
