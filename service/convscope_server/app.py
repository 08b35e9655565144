"""Start-up: load the repository, build the gRPC server (health, reflection, interceptors), stop gracefully.

Health (grpc.health.v1): the empty service name and each convscope service answer SERVING while the
server runs; each model has its own entry ``model/<name>``, SERVING when loaded and NOT_SERVING when it
failed to load. On SIGTERM every entry turns NOT_SERVING, new calls are refused, streamed jobs stop at
their next step and in-flight calls get ``grace_seconds`` to finish; then the process exits 0. SIGHUP
rescans the model repository (``RunningServer.reload``) without a restart.

Security: loopback by default; TLS (and mutual TLS) from --tls-cert/--tls-key/--tls-client-ca; a bearer
token from --token-file or CONVSCOPE_TOKEN, checked before anything else runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from convscope.v1 import (attribution_pb2, attribution_pb2_grpc, audit_pb2, audit_pb2_grpc, dataset_pb2,
                          dataset_pb2_grpc, inspect_pb2, inspect_pb2_grpc, model_pb2, model_pb2_grpc, synthesis_pb2,
                          synthesis_pb2_grpc)
from convscope_server import config as config_module
from convscope_server import memory
from convscope_server.api import streaming
from convscope_server.api.attribution_service import AttributionService
from convscope_server.api.audit_service import AuditService
from convscope_server.api.dataset_service import DatasetService
from convscope_server.api.inspect_service import InspectService
from convscope_server.api.synthesis_service import SynthesisService
from convscope_server.api.model_service import ModelService
from convscope_server.audit.store import AuditStore
from convscope_server.config import ServerConfig
from convscope_server.datasets import DataRoot
from convscope_server.galleries import GalleryStore
from convscope_server.errors import ErrorInterceptor, TokenInterceptor
from convscope_server.gradient.bridge import TorchBridges
from convscope_server.onnx import probes
from convscope_server.onnx.session import PRECISIONS, SessionSettings
from convscope_server.repository import ModelRepository

log = logging.getLogger("convscope_server")

MODEL_SERVICE = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
INSPECT_SERVICE = inspect_pb2.DESCRIPTOR.services_by_name["InspectService"].full_name
ATTRIBUTION_SERVICE = attribution_pb2.DESCRIPTOR.services_by_name["AttributionService"].full_name
SYNTHESIS_SERVICE = synthesis_pb2.DESCRIPTOR.services_by_name["SynthesisService"].full_name
DATASET_SERVICE = dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name
SERVICES = (MODEL_SERVICE, INSPECT_SERVICE, ATTRIBUTION_SERVICE, SYNTHESIS_SERVICE, DATASET_SERVICE, AUDIT_SERVICE)


# Cheap calls that run on a pool of their own, so they never wait behind heavy jobs.
LIGHT_METHODS = frozenset({f"/{MODEL_SERVICE}/{name}" for name in ("ListModels", "DescribeModel", "Predict")}
                          | {"/grpc.health.v1.Health/Check"})


def model_health_name(name: str) -> str:
    return f"model/{name}"


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    repository: ModelRepository
    health: health.HealthServicer
    config: ServerConfig
    bridges: TorchBridges
    tls: str = "off"               # "off", "on" or "mutual"
    cluster: object = None         # distributed.Cluster with --ray

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self, grace: float | None = None) -> bool:
        """Mark everything NOT_SERVING, refuse new calls, let in-flight calls finish for ``grace`` seconds,
        then cancel them. Every wait is bounded; True when gRPC reported the server stopped in time."""
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self.bridges.shutdown()
        stopped = self.server.stop(grace).wait(grace + 2.0)
        if self.cluster is not None:
            self.cluster.shutdown()
        return stopped

    def reload(self):
        """Rescan the model repository (SIGHUP): new folders load, changed ones reload, removed ones go;
        their torch modules are dropped and converted again when next needed, health entries follow."""
        report = self.repository.reload()
        for name in report.changed + report.removed:
            self.bridges.forget(name)
        for name in report.removed:
            self.health.set(model_health_name(name), health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        fresh = []
        for name in report.added + report.changed:
            loaded, _ = self.repository.status(name)
            self.health.set(model_health_name(name), health_pb2.HealthCheckResponse.SERVING if loaded
                            else health_pb2.HealthCheckResponse.NOT_SERVING)
            if loaded:
                fresh.append(loaded)
        if self.config.gradient_warmup:
            self.bridges.warm(fresh)
        return report

    def shutdown(self) -> bool:
        """Stop for good (the process is exiting): streamed jobs everywhere in the process stop at their next
        step, calls get the grace period, then job threads are awaited up to the same deadline. True when
        every job thread returned and the gRPC server stopped."""
        grace = self.config.grace_seconds
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        self.bridges.shutdown()
        streaming.begin_shutdown()
        stopped = self.server.stop(grace)
        jobs_done = streaming.wait_for_jobs(deadline - time.monotonic())
        server_done = stopped.wait(max(0.0, deadline - time.monotonic()) + 2.0)
        if not jobs_done:
            log.warning("%d job(s) still running after the %.0f s grace period", streaming.running_jobs(), grace)
        if not server_done:
            log.warning("the gRPC server did not report stopping within the grace period")
        if self.cluster is not None:
            self.cluster.shutdown()
        return jobs_done and server_done


def create_server(config: ServerConfig, repository: ModelRepository | None = None) -> RunningServer:
    """Load the repository (unless given) and start serving on ``config.host:config.port``."""
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {config.precision!r}")
    token = config_module.resolve_token(config)        # flags are checked before the (slow) model loading
    credentials = config_module.tls_credentials(config)
    running_jobs, queued_jobs = config_module.job_limits(config)
    probes.SESSIONS.capacity = config.max_probe_sessions
    for flag, value in (("--max-request-mib", config.max_request_mib), ("--max-request-pixels",
                                                                         config.max_request_pixels)):
        if value <= 0:
            raise ValueError(f"{flag}: must be a positive number, not {value}")
    memory.configure(config.max_request_mib << 20, config.max_request_pixels)
    cluster = None
    if config.ray:
        from convscope_server.distributed import Cluster

        cluster = Cluster(config.ray, config.ray_actors, config.ray_by_default, config.device)
        cluster.check()     # the flags and the extra now; joining the cluster once the repository is loaded
    elif config.ray_by_default:
        raise ValueError("--ray-by-default: needs a cluster (--ray auto|ADDRESS|local)")
    if repository is None:
        repository = ModelRepository(config.repository, SessionSettings(config.device, config.ort_threads,
                                                                        config.precision), config.ort_batch)
        repository.load_all()
    if cluster is not None:
        # before any thread of ours starts (gradient warm-up, gRPC pools): a local cluster forks Ray's GCS and
        # raylet from this process, and Python code run between fork and exec can hang on a lock another
        # thread held at the fork
        cluster.connect()
    gate = streaming.JobGate(running_jobs, queued_jobs, config.queue_seconds)
    light_pool = futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="convscope-light")
    interceptors = [ErrorInterceptor(light_pool, LIGHT_METHODS, lambda: streaming.use_gate(gate))]
    if token:
        interceptors.insert(0, TokenInterceptor(token))  # first: nothing runs or is logged before it
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="convscope"),
        interceptors=interceptors,
        options=[("grpc.max_send_message_length", config.max_message_bytes),
                 ("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.so_reuseport", 0)],
    )
    bridges = TorchBridges(config.device, config.max_gradient_models)
    if config.gradient_warmup:
        bridges.warm(model for name in repository.names() if (model := repository.status(name)[0]))
    model_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(repository, config, bridges), server)
    inspect_pb2_grpc.add_InspectServiceServicer_to_server(InspectService(repository, config), server)
    attribution_pb2_grpc.add_AttributionServiceServicer_to_server(AttributionService(repository, bridges, config),
                                                                  server)
    synthesis_pb2_grpc.add_SynthesisServiceServicer_to_server(SynthesisService(repository, bridges, config), server)
    galleries = GalleryStore(config.gallery_root)
    galleries.load_all()
    datasets = DatasetService(repository, DataRoot(config.data_root), galleries, config, cluster)
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(datasets, server)
    audit_pb2_grpc.add_AuditServiceServicer_to_server(
        AuditService(repository, bridges, DataRoot(config.data_root), AuditStore(config.audit_root), config, cluster),
        server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", *SERVICES):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    for name in repository.names():
        loaded, _ = repository.status(name)
        health_servicer.set(model_health_name(name), health_pb2.HealthCheckResponse.SERVING if loaded
                            else health_pb2.HealthCheckResponse.NOT_SERVING)

    reflection.enable_server_reflection(
        (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as error:
        port, reason = 0, str(error)
    else:
        reason = "address in use or not available"
    if port == 0:
        if cluster is not None:
            cluster.shutdown()
        raise OSError(f"--host/--port: cannot bind {address}: {reason}")
    server.start()
    tls = "off" if credentials is None else "mutual" if config.tls_client_ca else "on"
    return RunningServer(server, port, repository, health_servicer, config, bridges, tls, cluster)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="convscope-server", description="Serve the convscope gRPC API "
                                     "over a model repository.")
    config_module.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_module.from_arguments(args)
    try:
        running = create_server(config)
    except (OSError, ValueError) as error:
        log.error("%s", error)
        return 1
    models = ", ".join(f"{n}{'' if running.repository.status(n)[0] else ' (failed)'}"
                       for n in running.repository.names()) or "none"
    # Scripts and tests read this line to learn the port (with --port 0).
    auth = "token" if config.token or config.token_file else "none"
    ray = f"; ray: {config.ray}" if running.cluster is not None else ""
    print(f"convscope-server listening on {config.host}:{running.port} (models: {models}; tls: {running.tls}; "
          f"auth: {auth}{ray})", flush=True)
    if running.tls == "off" and not _loopback(config.host):
        log.warning("serving plaintext on %s, reachable from other machines: use --tls-cert/--tls-key "
                    "(and a token) unless a proxy terminates TLS", config.host)

    stopping, reloading = threading.Event(), threading.Event()

    def on_signal(signum, frame):
        log.info("signal %s: stopping (grace %.0f s)", signal.Signals(signum).name, config.grace_seconds)
        stopping.set()

    def on_hangup(signum, frame):
        reloading.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hangup)
    while not stopping.wait(0.5):
        if reloading.is_set():
            reloading.clear()
            report = running.reload()
            print(f"convscope-server reloaded models: added {report.added}, changed {report.changed}, "
                  f"removed {report.removed}", flush=True)
    clean = running.shutdown()
    log.info("stopped%s", "" if clean else " (grace period over)")
    # Exit without interpreter finalisation: threads may still be inside torch or onnxruntime (a job past
    # its grace period, the background model conversion, the scan reader), and finalising around them
    # aborts ("terminate called without an active exception"); joining them could wait for minutes.
    # Nothing is left to do at exit: galleries are written atomically and every call has ended.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _loopback(host: str) -> bool:
    return host.strip("[]") in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


if __name__ == "__main__":
    sys.exit(main())
