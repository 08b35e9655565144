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


def pick_device(name: str | None) -> str:
    """"cuda" when asked for, or by default when torch sees a GPU; else "cpu". References run in exact
    float32 (TF32 off), as the server does by default."""
    import torch

    from convscope_server.gradient.bridge import set_tf32

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    set_tf32(False)
    return device


def ort_providers(device: str) -> list:
    """The providers (and CUDA options: exact float32, heuristic algorithm search) the server would use,
    for the bare onnxruntime side of a comparison."""
    from convscope_server.onnx.session import SessionSettings, providers_for

    return providers_for(SessionSettings(device=device))


def synchronized(fn, device: str):
    """``fn`` followed by a CUDA synchronise, so GPU work is inside the timing."""
    import torch

    def call():
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return result
    return call


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
