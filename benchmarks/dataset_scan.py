"""Dataset scans: throughput against plain onnxruntime on the same files, peak server memory as N grows,
gallery query latency at 50,000 entries against scikit-learn, and JPEG draft mode against full decodes.

1. Makes N distinct JPEGs (augmented crops of the demo photos, 256 px) under a scratch data root.
2. Throughput: plain = a script that decodes each file with Pillow, preprocesses with numpy and runs the
   prediction session on batches of 16; convscope = TopPatches over the same folder (every channel of
   /Clip_1_output_0, k = 9), the server in its own process with its default decode pool (--decode-workers
   0: one thread per core) unless --decode-workers is given. Each of --rounds rounds runs plain then
   convscope, and the ratio is the median of the rounds' ratios, so load from other processes hits both
   sides of a round alike; the server is timed once its start-up work (probe session, background model
   conversion) is over, and the plain session after one warm-up batch. Also shown: inference alone on
   pre-decoded inputs (the floor both sides share). --photos N repeats the comparison on N JPEGs with a
   longer side of 2560 px, where decoding dominates and scans use JPEG draft mode.
3. Memory: a fresh server process per N scans the first N files; its peak RSS (VmHWM) is read from /proc.
   The same for building a gallery of N codes (streamed to disk as it goes).
4. Query latency: nearest_neighbors on the largest gallery (feature and pixel space in one call) against
   scikit-learn's brute-force NearestNeighbors on the same arrays held in memory.
5. --draft: the default model's input from JPEG draft mode (as scans decode) against the full decode, on
   scikit-image / scikit-learn photos upscaled to 2000, 3000 and 4000 px (quality 90), with and without
   added grain, for draft margins 1-4 (the server uses images.DRAFT_MARGIN): max and mean absolute
   difference in model-input units, top-1 changes, decode CPU time per image.

    .venv/bin/python benchmarks/dataset_scan.py [--sizes 5000 20000 50000] [--throughput 2000] [--rounds 3]
        [--decode-workers N] [--photos N] [--draft] [--keep DIR]

``--sizes`` with no value skips parts 3 and 4; ``--throughput 0`` skips part 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, timed

MODEL = "efficientnet_lite0"
LAYER = "/Clip_1_output_0"


def make_images(folder: Path, count: int, seed: int = 0, side: int = 256) -> None:
    """``count`` distinct augmented crops of the demo photos, longer side ``side``, 17 label folders,
    written once."""
    sys.path.insert(0, str(ROOT / "datasets"))
    from build_demo import SOURCES, augment, source_photo

    existing = sum(1 for _ in folder.rglob("*.jpg")) if folder.exists() else 0
    if existing >= count:
        return
    rng = np.random.default_rng(seed)
    photos = {}
    for label, (kind, name) in SOURCES.items():
        photo = source_photo(kind, name)
        if side <= 360:
            photo.thumbnail((360, 360))  # smaller sources: fast augmentation, same kind of pictures
        photos[label] = photo
        (folder / label).mkdir(parents=True, exist_ok=True)
    labels = list(photos)
    started = time.perf_counter()
    for n in range(count):
        label = labels[n % len(labels)]
        augment(photos[label], rng, side).save(folder / label / f"{n:06d}.jpg", quality=88)
        if n % 5000 == 4999:
            print(f"  made {n + 1} images ({time.perf_counter() - started:.0f} s)", flush=True)


def plain_ort(files: list[Path], batch: int = 16) -> float:
    """Images per second: Pillow decode + numpy preprocessing + the plain session, batch by batch."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(ROOT / "models" / MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    session.run(None, {"input": np.zeros((batch, 3, 224, 224), np.float32)})  # warm, as the server's session is
    started = time.perf_counter()
    for begin in range(0, len(files), batch):
        inputs = []
        for file in files[begin: begin + batch]:
            pixels = np.asarray(Image.open(file).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
            inputs.append(((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1))
        session.run(None, {"input": np.stack(inputs)})
    return len(files) / (time.perf_counter() - started)


def inference_only(batch: int = 16, runs: int = 20) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(ROOT / "models" / MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    xs = np.random.default_rng(0).normal(size=(batch, 3, 224, 224)).astype(np.float32)
    return batch / timed(lambda: session.run(None, {"input": xs}), runs)


def draft_tolerance(margins=(1, 2, 3, 4)) -> None:
    """Draft-mode model inputs against full decodes on upscaled photos (see the module docstring)."""
    import io

    import onnxruntime as ort

    from convscope_server import images
    from convscope_server.repository import ModelConfig

    sys.path.insert(0, str(ROOT / "datasets"))
    from build_demo import source_photo

    photos = [("skimage", n) for n in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "stereo_left")]
    photos += [("sklearn", "china.jpg"), ("sklearn", "flower.jpg")]
    rng = np.random.default_rng(0)
    files = []
    for kind, name in photos:
        photo = source_photo(kind, name)
        for side in (2000, 3000, 4000):
            scale = side / max(photo.size)
            big = np.asarray(photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC))
            for grain in (0, 6):
                pixels = (big + rng.normal(0, grain, big.shape)).clip(0, 255).round().astype(np.uint8) if grain else big
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
                files.append(buffer.getvalue())
    session = ort.InferenceSession(str(ROOT / "models" / MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    configs = {"stretch, mean/std 0.5 (the default model)": ModelConfig(
        "input", 224, 224, 3, "NCHW", "RGB", 1.0, (0.5,) * 3, (0.5,) * 3, "stretch", 0.875, "logits", True, None),
        "centre crop 0.875, ImageNet mean/std": ModelConfig(
        "input", 224, 224, 3, "NCHW", "RGB", 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "center_crop", 0.875,
        "logits", True, None)}

    def inputs(config, draft):
        started = time.thread_time()
        xs = np.stack([images.encoded_to_input(data, config, "image", 10**9, draft=draft) for data in files])
        return xs, (time.thread_time() - started) / len(files)

    print(f"\nJPEG draft mode vs full decode: {len(files)} JPEGs ({len(photos)} photos x 2000/3000/4000 px x "
          "with/without grain), model-input units; decode + preprocessing CPU time per image")
    saved = images.DRAFT_MARGIN
    try:
        for label, config in configs.items():
            full, full_cpu = inputs(config, False)
            reference = session.run(None, {"input": full})[0].argmax(axis=1)
            print(f"  {label}: full decode {full_cpu * 1e3:.1f} ms")
            print(f"    {'margin':>6} {'max abs':>8} {'mean abs':>9} {'worst image mean':>17} {'top-1 changed':>14} "
                  f"{'ms/image':>9}")
            for margin in margins:
                images.DRAFT_MARGIN = margin
                drafted, cpu = inputs(config, True)
                difference = np.abs(drafted - full).reshape(len(files), -1)
                changed = int((session.run(None, {"input": drafted})[0].argmax(axis=1) != reference).sum())
                print(f"    {margin:>6} {difference.max():>8.4f} {difference.mean():>9.5f} "
                      f"{difference.mean(axis=1).max():>17.5f} {changed:>8} of {len(files)} {cpu * 1e3:>9.1f}")
    finally:
        images.DRAFT_MARGIN = saved


class ServerProcess:
    """convscope-server in its own process, so its memory can be read from /proc."""

    def __init__(self, data_root: Path, gallery_root: Path, **flags):
        args = [str(ROOT / ".venv" / "bin" / "convscope-server"), "--port", "0", "--repository", str(ROOT / "models"),
                "--data-root", str(data_root), "--gallery-root", str(gallery_root), "--log-level", "WARNING"]
        for name, value in flags.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        self.port = int(re.search(r":(\d+) \(models", line).group(1))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_idle(self, limit: float = 120.0) -> None:
        """Until the server's start-up work (e.g. converting models in the background) is over."""
        deadline = time.monotonic() + limit
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = self.cpu_seconds()
            if now - last < 0.05:
                return
            last = now

    def memory_mib(self) -> tuple[float, float]:
        """(current RSS, peak RSS) in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}
        return values["VmRSS"], values["VmHWM"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def compare(data_root: Path, galleries: Path, dataset: str, files: list[Path], rounds: int, flags: dict):
    """Rounds of the plain loop then TopPatches over the same files: (plain, convscope) images/s lists."""
    from convscope import Client

    for file in files:  # warm the page cache for both sides
        file.read_bytes()
    server = ServerProcess(data_root, galleries, **flags)
    plain, served = [], []
    try:
        with Client(f"localhost:{server.port}") as client:
            client.top_patches(MODEL, LAYER, dataset=dataset, limit=32)  # builds the probe session
            server.wait_idle()
            for _ in range(rounds):
                plain.append(plain_ort(files))
                started = time.perf_counter()
                client.top_patches(MODEL, LAYER, dataset=dataset, limit=len(files))
                served.append(len(files) / (time.perf_counter() - started))
    finally:
        server.stop()
    return plain, served


def print_comparison(title: str, plain: list[float], served: list[float]) -> None:
    ratios = np.array(served) / np.array(plain)
    print(title)
    print(f"  plain: Pillow decode + ORT, batch 16        {np.median(plain):7.1f} images/s (median)   "
          f"runs {' '.join(f'{v:.1f}' for v in plain)}")
    print(f"  convscope TopPatches, all 1280 channels     {np.median(served):7.1f} images/s (median)   "
          f"runs {' '.join(f'{v:.1f}' for v in served)}")
    print(f"  convscope / plain, median of the rounds     {np.median(ratios):7.2f}x   "
          f"rounds {' '.join(f'{v:.2f}' for v in ratios)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[5000, 20000, 50000],
                        help="images per memory row (none: skip memory and query latency)")
    parser.add_argument("--throughput", type=int, default=2000, help="images in the throughput comparison (0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating plain / convscope runs (medians)")
    parser.add_argument("--decode-workers", type=int, default=None,
                        help="the server's --decode-workers (default: the server's own, one per core)")
    parser.add_argument("--photos", type=int, default=0,
                        help="also compare throughput on this many 2560 px JPEGs (draft mode's case)")
    parser.add_argument("--draft", action="store_true", help="measure JPEG draft mode against full decodes")
    parser.add_argument("--keep", type=Path, default=None, help="reuse / keep the images and galleries here")
    args = parser.parse_args()

    from convscope import Client
    from convscope_server.config import ServerConfig

    if args.draft:
        draft_tolerance()
    if not args.throughput and not args.sizes and not args.photos:
        return
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="convscope-bench-"))
    data_root, galleries = scratch / "data", scratch / "galleries"
    largest = max(args.sizes + [args.throughput])
    print(f"images under {data_root / 'many'} ({largest})", flush=True)
    make_images(data_root / "many", largest)
    files = sorted((data_root / "many").rglob("*.jpg"))
    flags = {} if args.decode_workers is None else {"decode_workers": args.decode_workers}
    try:
        # -- throughput --------------------------------------------------------------------------------------
        workers = args.decode_workers if args.decode_workers is not None else ServerConfig().decode_workers
        setting = f"server --decode-workers {workers} ({workers or os.cpu_count()} threads)"
        if args.throughput:
            plain, served = compare(data_root, galleries, "many", files[: args.throughput], args.rounds, flags)
            print(f"\nthroughput on {args.throughput} files ({os.cpu_count()} cores), {args.rounds} rounds of plain "
                  f"then convscope; {setting}")
            print(f"  inference alone (pre-decoded, batch 16)     {inference_only():7.1f} images/s")
            print_comparison("  256 px JPEGs:", plain, served)
        if args.photos:
            make_images(data_root / "photos", args.photos, seed=1, side=2560)
            photos = sorted((data_root / "photos").rglob("*.jpg"))[: args.photos]
            plain, served = compare(data_root, galleries, "photos", photos, args.rounds, flags)
            print_comparison(f"\nthroughput on {len(photos)} photo-sized JPEGs (longer side 2560 px; the server "
                             f"decodes them in draft mode), {args.rounds} rounds; {setting}", plain, served)
        if not args.sizes:
            return

        # -- memory ----------------------------------------------------------------------------------------
        print(f"\npeak server RSS (VmHWM), fresh server per row; scan = TopPatches {LAYER} all channels, k=9")
        print(f"{'images':>8} {'idle RSS':>10} {'scan peak':>10} {'gallery build peak':>19} {'scan s':>8}")
        for size in args.sizes:
            server = ServerProcess(data_root, galleries, **flags)
            try:
                with Client(f"localhost:{server.port}") as client:
                    server.wait_idle()
                    idle = server.memory_mib()[0]
                    started = time.perf_counter()
                    scan = client.top_patches(MODEL, LAYER, dataset="many", limit=size)
                    seconds = time.perf_counter() - started
                    scan_peak = server.memory_mib()[1]
                    assert scan.images == size
                    info = client.build_gallery(f"many-{size}", MODEL, dataset="many", limit=size, overwrite=True)
                    build_peak = server.memory_mib()[1]
                    assert info.size == size
            finally:
                server.stop()
            print(f"{size:>8} {idle:>8.0f} MB {scan_peak:>7.0f} MB {build_peak:>16.0f} MB {seconds:>8.0f}", flush=True)

        # -- query latency ----------------------------------------------------------------------------------
        size = max(args.sizes)
        query = files[-1].read_bytes()
        server = ServerProcess(data_root, galleries)
        try:
            with Client(f"localhost:{server.port}") as client:
                client.nearest_neighbors(f"many-{size}", query, k=10)  # first query computes the row norms
                rows = []
                for metric in ("l2", "cosine"):
                    latency = timed(lambda: client.nearest_neighbors(f"many-{size}", query, k=10, metric=metric), 7)
                    rows.append((metric, latency))
                rss = server.memory_mib()
        finally:
            server.stop()
        from convscope_server.galleries import read_gallery
        from sklearn.neighbors import NearestNeighbors

        gallery = read_gallery(galleries / f"many-{size}.gallery", "g")
        codes = np.asarray(gallery.codes)
        pixels = np.asarray(gallery.thumbnails).reshape(size, -1).astype(np.float32)
        code_query, pixel_query = codes[-1:], pixels[-1:]
        print(f"\nquery latency, gallery of {size} ({codes.shape[1]}-d codes, {pixels.shape[1]}-d pixels), k=10; "
              f"server RSS after queries {rss[0]:.0f} MB")
        for metric, latency in rows:
            sk = "euclidean" if metric == "l2" else "cosine"
            feature = NearestNeighbors(n_neighbors=10, algorithm="brute", metric=sk).fit(codes)
            pixel = NearestNeighbors(n_neighbors=10, algorithm="brute", metric=sk).fit(pixels)
            reference = timed(lambda: (feature.kneighbors(code_query), pixel.kneighbors(pixel_query)), 7)
            print(f"  {metric:<7} convscope (gRPC, both spaces) {latency * 1e3:7.1f} ms   scikit-learn in memory "
                  f"{reference * 1e3:7.1f} ms   ratio {reference / latency:.2f}x")
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
