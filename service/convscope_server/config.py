"""Server settings: command-line flags, each with a CONVSCOPE_* environment variable as its default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from convscope_server.onnx.session import PRECISIONS


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"                # loopback unless told otherwise ("0.0.0.0" / "[::]": every interface)
    port: int = 50051                      # 0 picks a free port (reported at start-up)
    repository: Path = Path("models")      # the model repository: <repository>/<name>/model.onnx
    data_root: Path = Path("datasets")     # dataset folders scans may read: <data_root>/<name>/...
    gallery_root: Path = Path("galleries")  # where galleries of codes are stored (created when missing)
    audit_root: Path = Path("audits")      # where audit reports are stored (created when missing)
    workers: int = 8                       # request threads
    max_message_bytes: int = 64 * 1024 * 1024
    token: str | None = None               # when set, every call but health checks needs "Bearer <token>"
    token_file: Path | None = None         # the token read from a file (first line), so it is not in `ps`
    tls_cert: Path | None = None           # PEM server certificate (chain); with tls_key, serve TLS only
    tls_key: Path | None = None            # PEM private key of tls_cert
    tls_client_ca: Path | None = None      # PEM CA(s): require and verify client certificates (mutual TLS)
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
    max_concurrent_jobs: int = 0           # heavy (streamed) jobs running at once; 0: min(workers // 2, cores)
    max_queued_jobs: int = 0               # heavy jobs waiting for a slot; 0: workers // 4
    queue_seconds: float = 5.0             # longest a queued heavy job waits before RESOURCE_EXHAUSTED
    max_request_mib: int = 1024            # memory one request may hold at its peak, estimated before work
    max_request_pixels: int = 48_000_000   # pixels one request may decode, all its images together
    ray: str = ""                          # Ray cluster for dataset scans: "local", "auto" or an address; "" off
    ray_actors: int = 0                    # inference actors per cluster scan; 0: one per GPU (or CPU) of it
    ray_by_default: bool = False           # dataset-folder scans run on the cluster unless a request says not


def boolean(text: str) -> bool:
    """"true"/"false" (also 1/0, yes/no, on/off) for flags and environment variables."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


_PATHS = {"token_file", "tls_cert", "tls_key", "tls_client_ca"}  # optional paths (default None)


def _kind(default):
    if isinstance(default, bool):
        return boolean
    return Path if isinstance(default, Path) else (str if default is None else type(default))


def _type(name: str, default):
    return Path if name in _PATHS else _kind(default)


def _env(name: str, default):
    value = os.environ.get(f"CONVSCOPE_{name.upper()}")
    return default if value is None else _type(name, default)(value)


def add_arguments(parser) -> None:
    defaults = ServerConfig()
    helps = {
        "host": "address to bind", "port": "port to bind (0 picks a free one)",
        "repository": "model repository folder", "workers": "request threads",
        "data_root": "folder whose sub-folders are the datasets scans may read",
        "gallery_root": "folder where galleries are stored", "audit_root": "folder where audit reports are stored",
        "max_scan_images": "most images in one dataset scan", "max_top_k": "largest k (patches per channel, "
        "neighbours per query)", "max_embed_points": "most points in one embedding",
        "max_message_bytes": "largest gRPC message sent or received",
        "token": "require 'authorization: Bearer TOKEN' on every call but health checks; a token given "
        "here is visible to every user in `ps`: prefer --token-file or the environment variable",
        "token_file": "read the bearer token from this file's first line (like --token, not visible in `ps`)",
        "tls_cert": "PEM certificate (chain) to serve TLS with; needs --tls-key. Without it the port is "
        "plaintext", "tls_key": "PEM private key of --tls-cert",
        "tls_client_ca": "PEM CA certificate(s): require client certificates signed by them (mutual TLS); "
        "needs --tls-cert and --tls-key",
        "max_concurrent_jobs": "heavy (streamed) jobs running at once (0: half the workers, at most one per "
        "core); light calls (Predict, DescribeModel, ListModels, health) have threads of their own",
        "max_queued_jobs": "heavy jobs waiting for a running slot (0: workers // 4); more answer "
        "RESOURCE_EXHAUSTED at once",
        "queue_seconds": "longest a queued heavy job waits for a slot before RESOURCE_EXHAUSTED",
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
        "max_request_mib": "memory one request may need at its peak (MiB), estimated from the request before "
        "any work", "max_request_pixels": "pixels one request may decode, all its images together",
        "device": "auto (CUDA when available) or cpu", "grace_seconds": "grace period on SIGTERM",
        "ray": "Ray cluster that runs dataset scans asking for it (the distributed extra): 'local' starts one in "
        "this process, 'auto' joins this machine's cluster, or a cluster address (HEAD:6379, ray://HEAD:10001); "
        "empty: off. The data root must be mounted at the same path on every node",
        "ray_actors": "onnxruntime actors per cluster scan (0: one per GPU of the cluster, or per CPU without GPUs)",
        "ray_by_default": "scans of dataset folders run on the Ray cluster unless the request asks for this "
        "server (source.placement) (true/false)",
    }
    for name, default in vars(defaults).items():
        flag = "--" + name.replace("_", "-")
        choices = PRECISIONS if name == "precision" else None
        parser.add_argument(flag, type=_type(name, default), default=_env(name, default), choices=choices,
                            help=f"{helps[name]} (env CONVSCOPE_{name.upper()}, default {default})")


def from_arguments(args) -> ServerConfig:
    return ServerConfig(**{name: getattr(args, name) for name in vars(ServerConfig())})


def _read(path: Path, flag: str) -> bytes:
    try:
        if not Path(path).is_file():
            raise OSError("not a regular file")
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {str(path)!r}: {error.strerror or error}") from None


def resolve_token(config: ServerConfig) -> str | None:
    """The bearer token from --token (or CONVSCOPE_TOKEN) or from the first line of --token-file; refuses
    both at once and an empty file."""
    if config.token_file is None:
        return config.token or None
    if config.token:
        raise ValueError("--token-file: a token is also given by --token or CONVSCOPE_TOKEN; use one")
    lines = _read(config.token_file, "--token-file").decode("utf-8", "replace").splitlines()
    token = lines[0].strip() if lines else ""
    if not token:
        raise ValueError(f"--token-file: {str(config.token_file)!r} is empty")
    return token


def tls_credentials(config: ServerConfig):
    """grpc server credentials from --tls-cert/--tls-key (and --tls-client-ca for mutual TLS), or None for
    a plaintext port. Refuses half a configuration with the missing flag named."""
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked "
                         "over TLS")
    if (config.tls_cert is None) != (config.tls_key is None):
        given, missing = ("--tls-cert", "--tls-key") if config.tls_key is None else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} needs {missing}: a certificate and its private key go together")
    if config.tls_cert is None:
        return None
    cert, key = _read(config.tls_cert, "--tls-cert"), _read(config.tls_key, "--tls-key")
    for flag, data, marker in (("--tls-cert", cert, b"-----BEGIN CERTIFICATE"),
                               ("--tls-key", key, b"PRIVATE KEY-----")):
        if marker not in data:
            raise ValueError(f"{flag}: {str(getattr(config, flag[2:].replace('-', '_')))!r} is not a PEM "
                             f"{'certificate' if flag == '--tls-cert' else 'private key'}")
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read(config.tls_client_ca, "--tls-client-ca")
        if b"-----BEGIN CERTIFICATE" not in client_ca:
            raise ValueError(f"--tls-client-ca: {str(config.tls_client_ca)!r} is not a PEM certificate")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def job_limits(config: ServerConfig) -> tuple[int, int]:
    """(heavy jobs running at once, heavy jobs queued) from the flags or their defaults. A queued job holds a
    request thread while it waits, so both together must leave --workers a thread for other calls."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for flag, value in (("--max-concurrent-jobs", config.max_concurrent_jobs),
                        ("--max-queued-jobs", config.max_queued_jobs), ("--queue-seconds", config.queue_seconds)):
        if not value >= 0:
            raise ValueError(f"{flag}: must be 0 (the default) or more, not {value}")
    if config.workers < 2:
        raise ValueError(f"--workers: needs at least 2 request threads, not {config.workers}")
    running = config.max_concurrent_jobs or max(1, min(config.workers // 2, cores))
    queued = config.max_queued_jobs or max(1, config.workers // 4)
    if running + queued >= config.workers:
        raise ValueError(f"--max-concurrent-jobs ({running}) + --max-queued-jobs ({queued}) must be less than "
                         f"--workers ({config.workers}): running and waiting jobs each hold a request thread")
    return running, queued
