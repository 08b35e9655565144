"""Start-up: load the repository, build the gRPC server (health, reflection, interceptors), stop gracefully.

Health (grpc.health.v1): the empty service name and each convscope service answer SERVING while the
server runs; each model has its own entry ``model/<name>``, SERVING when loaded and NOT_SERVING when it
failed to load. On SIGTERM every entry turns NOT_SERVING, new calls are refused and in-flight calls get
``grace_seconds`` to finish.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from convscope.v1 import (attribution_pb2, attribution_pb2_grpc, dataset_pb2, dataset_pb2_grpc, inspect_pb2,
                          inspect_pb2_grpc, model_pb2, model_pb2_grpc, synthesis_pb2, synthesis_pb2_grpc)
from convscope_server import config as config_module
from convscope_server.api.attribution_service import AttributionService
from convscope_server.api.dataset_service import DatasetService
from convscope_server.api.inspect_service import InspectService
from convscope_server.api.synthesis_service import SynthesisService
from convscope_server.api.model_service import ModelService
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
SERVICES = (MODEL_SERVICE, INSPECT_SERVICE, ATTRIBUTION_SERVICE, SYNTHESIS_SERVICE, DATASET_SERVICE)


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

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Mark everything NOT_SERVING, refuse new calls, let in-flight calls finish, then stop."""
        self.health.enter_graceful_shutdown()
        self.bridges.shutdown()
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()


def create_server(config: ServerConfig, repository: ModelRepository | None = None) -> RunningServer:
    """Load the repository (unless given) and start serving on ``config.host:config.port``."""
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {config.precision!r}")
    probes.SESSIONS.capacity = config.max_probe_sessions
    if repository is None:
        repository = ModelRepository(config.repository, SessionSettings(config.device, config.ort_threads,
                                                                        config.precision), config.ort_batch)
        repository.load_all()
    interceptors = [ErrorInterceptor()]
    if config.token:
        interceptors.insert(0, TokenInterceptor(config.token))
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
    datasets = DatasetService(repository, DataRoot(config.data_root), galleries, config)
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(datasets, server)

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
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    server.start()
    return RunningServer(server, port, repository, health_servicer, config, bridges)


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
    print(f"convscope-server listening on {config.host}:{running.port} (models: {models})", flush=True)

    stopping = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %s: stopping (grace %.0f s)", signal.Signals(signum).name, config.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        pass
    running.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
