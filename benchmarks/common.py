"""Helpers shared by the benchmarks: a real server on the repository, and a timer."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test networks (tiny_models) are reused by some benchmarks


def start_server(repository: Path | None = None, **settings):
    from convscope_server.app import create_server
    from convscope_server.config import ServerConfig

    return create_server(ServerConfig(host="127.0.0.1", port=0, repository=repository or ROOT / "models",
                                      **settings))


def timed(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(rows: list[tuple[str, float, float]], ours: str, reference: str) -> None:
    """Print one line per case: both times and reference/ours (>1 means convscope is faster)."""
    print(f"{'case':<34} {reference + ' (s)':>16} {ours + ' (s)':>16} {'ratio':>8}")
    for case, ref_time, our_time in rows:
        print(f"{case:<34} {ref_time:>16.4f} {our_time:>16.4f} {ref_time / our_time:>7.2f}x")


def native_lite0(frozen: bool = True):
    """The native torch EfficientNet-Lite0 built from the same weights as the served ONNX file."""
    sys.path.insert(0, str(ROOT / "models"))
    from build_efficientnet_lite0 import load_pretrained

    model = load_pretrained()
    for parameter in model.parameters():
        parameter.requires_grad_(not frozen)
    return model


def chelsea_input():
    """scikit-image's chelsea as the default model's float32 input (3, 224, 224)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    pixels = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR), np.float32)
    return ((pixels / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()
