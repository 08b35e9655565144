"""Dataset scans on a Ray cluster against the single-machine scan, and the numbers for scaling out.

1. Makes N distinct 256 px JPEGs (dataset_scan.make_images) under a scratch data root.
2. Starts a Ray head on this machine (``ray start --head --block``, 2 CPUs, node on the loopback, a
   throw-away token, its own temporary folder; stopped at the end) and two server processes joining it
   as drivers with ``--ray 127.0.0.1:PORT``: one with ``--ray-actors 1``, one with ``--ray-actors 2``.
3. Each round runs TopPatches over the folder (every channel of /Clip_1_output_0, k = 9) three times:
   on the first server itself (placement "server": the single-machine scan, its default decode pool),
   then on the cluster with 1 actor and with 2; alternating spreads other load on the machine over all
   three. Reported: images/s end to end (the actors live for one scan, so their start-up is included)
   and in the steady state (from the first merged batch to the end), and the driver's CPU time per image
   (the server process's own: listing, Ray Data's iterator, merging; the workers are other processes).
4. Every cluster scan is checked to equal the single-machine scan (hits, values, boxes, order).
5. For the estimate of N GPU nodes: the per-image cost of decoding alone, the merge rate of one driver
   core (TopActivations.merge alone), the bytes per image a patch scan returns from its workers, and the
   driver's whole CPU cost per image (Ray Data's iterator and executor, the in-order merge) with synthetic
   workers returning batches of 16 (a CPU actor's) and 128 (a GPU actor's).

    .venv/bin/python benchmarks/ray_scan.py [--images 1000] [--rounds 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT
from dataset_scan import LAYER, MODEL, ServerProcess, make_images


def start_head(folder: Path) -> tuple[subprocess.Popen, int]:
    """A Ray head with 2 CPUs in its own process group; returns it and its port once it accepts drivers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    head = subprocess.Popen([str(ROOT / ".venv" / "bin" / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", f"--temp-dir={folder}", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2.0)   # the GCS listens before the raylet has registered
                return head, port
        time.sleep(0.5)
    head.kill()
    raise SystemExit("the Ray head did not start")


def scan(client, count: int, placement: str):
    """(result, seconds end to end, steady-state seconds from the first merged batch)."""
    first = []

    def progress(step, total, stage):
        if step and not first and stage.startswith(("scanning", "encoding")):
            first.append((time.perf_counter(), step))

    started = time.perf_counter()
    result = client.top_patches(MODEL, LAYER, dataset="many", limit=count, placement=placement, progress=progress)
    ended = time.perf_counter()
    at, step = first[0] if first else (started, 0)
    return result, ended - started, (ended - at) / max(1, count - step) * count


def same(a, b) -> bool:
    return a.images == b.images and all(
        [(h.index, h.value, h.box) for h in a.channels[c]] == [(h.index, h.value, h.box) for h in b.channels[c]]
        for c in a.channels)


def decode_cost(files: list[Path]) -> float:
    """CPU seconds to decode and preprocess one file the way scans do (draft mode), on one thread."""
    from convscope_server.datasets import load_file
    from convscope_server.repository import ModelRepository
    from convscope_server.onnx.session import SessionSettings

    repository = ModelRepository(ROOT / "models", SessionSettings("cpu"))
    repository.load_all()
    config = repository.get(MODEL).config
    sample = files[:200]
    started = time.process_time()
    for file in sample:
        load_file(file, file.parent.parent.parent, config, 40_000_000)
    return (time.process_time() - started) / len(sample)


def merge_rate(channels: int = 1280, k: int = 9, batch: int = 128, batches: int = 200) -> float:
    """Images/s one driver core merges: TopActivations.merge of per-image maxima, in GPU-sized batches."""
    from convscope_server.forward.patches import TopActivations

    rng = np.random.default_rng(0)
    table = TopActivations(np.arange(channels), k)
    values = [rng.random((batch, channels), dtype=np.float32) for _ in range(8)]
    positions = rng.integers(0, 49, (batch, channels))
    started = time.perf_counter()
    for n in range(batches):
        table.merge(values[n % 8], positions, range(n * batch, (n + 1) * batch))
    return batches * batch / (time.perf_counter() - started)


def _synthetic_rows(batch: dict, channels: int) -> dict:
    """A worker's answer for a patch scan of ``channels`` channels, without decoding or a model."""
    count = len(batch["index"])
    rng = np.random.default_rng(int(batch["index"][0]))
    return {"index": np.asarray(batch["index"], np.int64), "ok": np.ones(count, bool),
            "reason": np.asarray([""] * count, object),
            "provider": np.asarray(["CPUExecutionProvider"] * count, object),
            "values": rng.random((count, channels), dtype=np.float32),
            "positions": rng.integers(0, 49, (count, channels))}


def driver_cost(port: int, batch: int, count: int = 8192, channels: int = 1280) -> float:
    """Driver CPU seconds per image (this process: Ray Data's iterator and executor threads, the in-order
    merge, TopActivations.merge) for a patch scan's rows coming back in batches of ``batch``."""
    import ray

    from convscope_server.distributed import _InOrder
    from convscope_server.forward.patches import TopActivations

    if not ray.is_initialized():
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    table = TopActivations(np.arange(channels), 9)
    merger = _InOrder(count, lambda indices, rows: table.merge(rows["values"], rows["positions"], indices),
                      lambda failure: None, {})
    dataset = ray.data.from_items([{"index": i} for i in range(count)], override_num_blocks=max(1, count // batch))
    dataset.context.execution_options.preserve_order = True
    dataset = dataset.map_batches(_synthetic_rows, batch_size=batch, fn_kwargs={"channels": channels})
    logging.getLogger("ray.data").setLevel(logging.WARNING)   # Ray Data sets its own level on first use
    started = time.process_time()
    for part in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        merger.push(part)
    assert merger.done == count
    return (time.process_time() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--keep", type=Path, default=None, help="reuse / keep the images here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "clients"))
    from convscope import Client

    scratch = args.keep or Path(tempfile.mkdtemp(prefix="convscope-ray-bench-"))
    data_root, galleries = scratch / "data", scratch / "galleries"
    make_images(data_root / "many", args.images)
    files = sorted((data_root / "many").rglob("*.jpg"))[: args.images]
    for file in files:
        file.read_bytes()  # page cache, for every run alike
    # the head's node on the loopback; Ray's token authentication with a token made for this run
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN=secrets.token_hex(16))
    head, port = start_head(scratch / "ray")
    servers = {}
    try:
        for actors in args.actors:
            servers[actors] = ServerProcess(data_root, galleries, gradient_warmup="false", ray=f"127.0.0.1:{port}",
                                            ray_actors=actors)
        clients = {actors: Client(f"localhost:{server.port}", timeout=3600) for actors, server in servers.items()}
        clients[args.actors[0]].top_patches(MODEL, LAYER, dataset="many", limit=32, placement="server")
        for client in clients.values():
            client.top_patches(MODEL, LAYER, dataset="many", limit=32, placement="cluster")
        for server in servers.values():
            server.wait_idle()
        local, ends, steadies, cpu = [], {a: [] for a in servers}, {a: [] for a in servers}, {a: [] for a in servers}
        for _ in range(args.rounds):
            reference, seconds, _ = scan(clients[args.actors[0]], args.images, "server")
            local.append(seconds)
            for actors, client in clients.items():
                before = servers[actors].cpu_seconds()
                result, seconds, steady = scan(client, args.images, "cluster")
                cpu[actors].append((servers[actors].cpu_seconds() - before) / args.images)
                assert result.placement == "cluster" and same(result, reference), "differs from the local scan"
                ends[actors].append(seconds)
                steadies[actors].append(steady)
        for client in clients.values():
            client.close()
        rows = [("single machine (server's decode pool)", args.images / np.median(local), None, None)]
        rows += [(f"Ray, {a} actor{'s' * (a > 1)} (cluster on this machine)", args.images / np.median(ends[a]),
                  args.images / np.median(steadies[a]), np.median(cpu[a])) for a in servers]
        print(f"\nTopPatches {MODEL} {LAYER} (1280 channels, k=9) over {args.images} 256 px JPEGs, "
              f"{os.cpu_count()} cores, median of {args.rounds} alternating rounds; every cluster result equal to "
              "the local one")
        print(f"{'':44} {'images/s':>9} {'vs local':>9} {'steady':>9} {'driver CPU/image':>17}")
        local_rate = rows[0][1]
        for name, rate, steady, driver in rows:
            print(f"{name:44} {rate:9.1f} {rate / local_rate:8.2f}x {'' if steady is None else f'{steady:9.1f}':>9} "
                  f"{'' if driver is None else f'{driver * 1e3:14.2f} ms':>17}")
        channels = 1280
        print("\nfor the estimate of N GPU nodes:")
        print(f"  decode + preprocess one file (one core, draft mode)  {decode_cost(files) * 1e3:7.2f} ms")
        print(f"  driver merge, TopActivations.merge, batches of 128   {merge_rate(channels):7.0f} images/s")
        print(f"  returned per image by the workers (patch scan)       {channels * 12 + 64:7d} bytes "
              f"({channels} float32 maxima + int64 positions)")
        for batch in (16, 128):
            cost = driver_cost(port, batch)
            print(f"  driver CPU per image, synthetic workers, batches of {batch:<3} {cost * 1e3:7.2f} ms "
                  f"({1 / cost:6.0f} images/s per driver core)")
    finally:
        for server in servers.values():
            server.stop()
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()   # this process joined as a driver for the synthetic runs
        head.send_signal(signal.SIGTERM)   # `ray start --block` stops the node's processes with it
        head.wait(60)
        if args.keep is None:
            for _ in range(5):   # the node's last log writes may race the first pass
                shutil.rmtree(scratch, ignore_errors=True)
                if not scratch.exists():
                    break
                time.sleep(1.0)


if __name__ == "__main__":
    main()
