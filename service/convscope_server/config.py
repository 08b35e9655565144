"""Server settings: command-line flags, each with a CONVSCOPE_* environment variable as its default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from convscope_server.onnx.session import PRECISIONS


@dataclass
class ServerConfig:
    host: str = "[::]"
    port: int = 50051                      # 0 picks a free port (reported at start-up)
    repository: Path = Path("models")      # the model repository: <repository>/<name>/model.onnx
    data_root: Path = Path("datasets")     # dataset folders scans may read: <data_root>/<name>/...
    gallery_root: Path = Path("galleries")  # where galleries of codes are stored (created when missing)
    workers: int = 8                       # request threads
    max_message_bytes: int = 64 * 1024 * 1024
    token: str | None = None               # when set, every call but health checks needs "Bearer <token>"
    max_batch: int = 64                    # images per request
    max_image_pixels: int = 40_000_000     # per decoded image (guards against decompression bombs)
    max_forward_passes: int = 20_000       # per request (occlusion windows, Score-CAM channels, ...)
    max_steps: int = 2_000                 # per optimisation job
    max_job_seconds: float = 600.0         # wall time of one streamed job before it is stopped
    max_synthesis_pixels: int = 1_048_576  # size of a synthesised image (style transfer takes any size)
    ort_batch: int = 0                     # images per onnxruntime run on dynamic-batch models; 0: chosen
                                           # for the device (16 on CPU, 128 on CUDA)
    ort_threads: int = 0                   # intra-op threads per session; 0 lets onnxruntime choose
    device: str = "auto"                   # "auto" (CUDA when onnxruntime has it) or "cpu"
    precision: str = "exact"               # "exact" (float32, TF32 off) or "tf32"; config.toml may override
    decode_workers: int = 0                # threads decoding images in dataset scans; 0: one per core
    gradient_warmup: bool = True           # convert every model to torch in the background at start-up
    max_gradient_models: int = 8           # converted torch modules kept (least recently used dropped)
    max_probe_sessions: int = 16           # onnxruntime sessions exposing inner tensors, all models together
    max_scan_images: int = 200_000         # images in one dataset scan (patches, gallery)
    max_top_k: int = 100                   # images kept per channel by a patch scan; neighbours per query
    max_embed_points: int = 20_000         # points in one PCA / t-SNE embedding
    grace_seconds: float = 10.0            # in-flight calls get this long to finish on SIGTERM


def boolean(text: str) -> bool:
    """"true"/"false" (also 1/0, yes/no, on/off) for flags and environment variables."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _kind(default):
    if isinstance(default, bool):
        return boolean
    return Path if isinstance(default, Path) else (str if default is None else type(default))


def _env(name: str, default):
    value = os.environ.get(f"CONVSCOPE_{name.upper()}")
    return default if value is None else _kind(default)(value)


def add_arguments(parser) -> None:
    defaults = ServerConfig()
    helps = {
        "host": "address to bind", "port": "port to bind (0 picks a free one)",
        "repository": "model repository folder", "workers": "request threads",
        "data_root": "folder whose sub-folders are the datasets scans may read",
        "gallery_root": "folder where galleries are stored",
        "max_scan_images": "most images in one dataset scan", "max_top_k": "largest k (patches per channel, "
        "neighbours per query)", "max_embed_points": "most points in one embedding",
        "max_message_bytes": "largest gRPC message sent or received",
        "token": "require 'authorization: Bearer TOKEN' on every call but health checks",
        "max_batch": "most images in one request",
        "max_forward_passes": "most forward passes one request may cost",
        "max_steps": "most optimisation steps per synthesis job",
        "max_job_seconds": "wall time one streamed job may take",
        "max_synthesis_pixels": "largest synthesised image (height x width)", "max_image_pixels": "most pixels in one decoded image",
        "ort_batch": "images per onnxruntime run (0: 16 on CPU, 128 on CUDA)",
        "precision": "exact (float32 everywhere, TF32 off) or tf32 (faster on NVIDIA GPUs, ~1e-3 relative)",
        "decode_workers": "threads decoding images in dataset scans (0: one per core)",
        "gradient_warmup": "convert each model for gradient methods in the background at start-up, so the "
        "first gradient call does not wait (true/false)",
        "max_gradient_models": "converted torch modules kept in memory; the least recently used is dropped "
        "and converted again on its next gradient request",
        "max_probe_sessions": "onnxruntime sessions that expose inner tensors kept for all models together "
        "(each holds a copy of its model)", "ort_threads": "intra-op threads per session (0: auto)",
        "device": "auto (CUDA when available) or cpu", "grace_seconds": "grace period on SIGTERM",
    }
    for name, default in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        choices = PRECISIONS if name == "precision" else None
        parser.add_argument(flag, type=_kind(default), default=_env(name, default), choices=choices,
                            help=f"{helps[name]} (env CONVSCOPE_{name.upper()}, default {default})")


def from_arguments(args) -> ServerConfig:
    return ServerConfig(**{name: getattr(args, name) for name in vars(ServerConfig())})
