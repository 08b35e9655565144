"""Wall time of a model audit and how it splits across stages, for datasets of N images.

For each N: a scratch data root holding N labelled JPEGs (augmented crops of the demo photos, 256 px,
datasets/build_demo.py), a server in this process, and one `run_audit` of the default model over the
folder with the default budget (4 unit layers, 8 images for the faithfulness curves of four methods, 64
for robustness), labels mapped to ImageNet classes where the demo has a matching class. Prints the total,
the seconds per stage the report records (model card, scanning, sections, worst images, feature
visualisation, map, faithfulness, randomisation, robustness) and
the scan's images per second, and the process's peak RSS.

    .venv/bin/python benchmarks/audit_time.py [--sizes 1000 10000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, start_server

LABELS = {"cat": [281, 282, 283, 284, 285], "coffee": 967, "flower": 985, "rocket": [657, 744, 812],
          "motorcycle": 670, "astronaut": [834, 817]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "datasets"))
    from build_demo import SOURCES, build

    from convscope import Client

    print(f"{'images':>7} {'total (s)':>10} {'scan img/s':>11}  stages (s)")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            per_class = -(-size // len(SOURCES))
            build(data / "set", per_class=per_class)
            server = start_server(data_root=data, audit_root=Path(tmp) / "audits", gradient_warmup=False,
                                  max_scan_images=max(200_000, size), max_job_seconds=24 * 3600,
                                  device="cpu" if args.device == "cpu" else "auto")
            server.bridges.get(server.repository.get("efficientnet_lite0"))  # converted once per server, not timed
            try:
                with Client(server.address, timeout=24 * 3600) as client:
                    started = time.perf_counter()
                    client.run_audit("bench", "efficientnet_lite0", dataset="set", limit=size, label_map=LABELS)
                    total = time.perf_counter() - started
                    report = client.audit("bench")
            finally:
                server.stop(0)
        stages = report["stage_seconds"]
        images = report["dataset"]["images"]
        print(f"{images:>7} {total:>10.1f} {images / stages['scanning']:>11.0f}  "
              + ", ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items()), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (server and client): {peak:,.0f} MiB")


if __name__ == "__main__":
    main()
