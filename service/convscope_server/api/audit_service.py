"""AuditService: runs ``audit.engine.run_audit`` over a dataset folder or streamed images and keeps the
report under a name (``audit.store``)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from convscope.v1 import audit_pb2, audit_pb2_grpc, tensor_pb2
from convscope_server.api.common import finite, positive, seconds_left, stream_within
from convscope_server.api.scans import ScanSource, first_spec, on_cluster
from convscope_server.api.model_service import require_model
from convscope_server.audit.engine import AuditBudget
from convscope_server.audit.store import AuditStore, check_name
from convscope_server.datasets import DataRoot
from convscope_server.errors import FailedPrecondition, InvalidArgument

METHODS = ("vanilla", "integrated_gradients", "gradcam", "occlusion")


def budget_of(spec) -> AuditBudget:
    """The spec's budget with defaults filled in, every field checked."""
    given, default = spec.budget, AuditBudget()
    epsilons = tuple(finite(e, f"spec.budget.epsilons[{i}]", 0.0, 1.0) for i, e in enumerate(given.epsilons))
    if len(epsilons) > 16:
        raise InvalidArgument("spec.budget.epsilons", f"{len(epsilons)} values; give at most 16")
    methods = tuple(dict.fromkeys(given.methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidArgument("spec.budget.methods", f"unknown {unknown}; choose from {list(METHODS)}")
    return AuditBudget(
        unit_layers=positive(given.unit_layers, default.unit_layers, "spec.budget.unit_layers", 64),
        attribution_images=positive(given.attribution_images, default.attribution_images,
                                    "spec.budget.attribution_images", 256),
        curve_steps=positive(given.curve_steps, default.curve_steps, "spec.budget.curve_steps", 256),
        robustness_images=positive(given.robustness_images, default.robustness_images,
                                   "spec.budget.robustness_images", 4096),
        epsilons=epsilons or default.epsilons, methods=methods or default.methods,
        feature_steps=_or_none(given.feature_steps, default.feature_steps, "spec.budget.feature_steps", 1000),
        worst_images=_or_none(given.worst_images, default.worst_images, "spec.budget.worst_images", 256))


def _or_none(value: int, default: int, field: str, most: int) -> int:
    """A budget count where 0 takes the default and -1 turns the part off."""
    return 0 if value == -1 else positive(value, default, field, most)


def info_of(name: str, report: dict, file_bytes: int = 0) -> audit_pb2.AuditInfo:
    classes = report.get("classes", {})
    return audit_pb2.AuditInfo(name=name, model=report.get("model", {}).get("name", ""),
                               images=report.get("dataset", {}).get("images", 0),
                               labelled=classes.get("labelled", 0), accuracy=classes.get("accuracy", 0.0),
                               created=report.get("created", ""), file_bytes=file_bytes)


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, repository, bridges, data_root: DataRoot, store: AuditStore, limits, cluster=None):
        self.repository, self.bridges, self.data_root, self.store, self.limits = (
            repository, bridges, data_root, store, limits)
        self.cluster = cluster      # distributed.Cluster when the server runs with --ray: the scan stage runs there

    def RunAudit(self, requests, context):
        from convscope_server.audit.engine import run_audit

        started = time.monotonic()
        spec = first_spec(requests, "RunAudit")
        check_name(spec.name, "spec.name")
        model = require_model(self.repository, spec.model, "spec.model")
        model.require_classes("spec.model")   # accuracy, calibration, attributions and attacks are per class
        budget = budget_of(spec)
        label_map = {label: list(classes.classes) for label, classes in spec.label_map.items()}
        for label, classes in label_map.items():
            if not classes or any(not 0 <= c < model.num_classes for c in classes):
                raise InvalidArgument(f"spec.label_map[{label!r}]", f"classes {classes} are not all in the model's "
                                      f"0..{model.num_classes - 1}")
        cluster_scan = on_cluster(spec.source, self.cluster)
        source = ScanSource(spec.source, requests, model, self.data_root, self.limits)
        if self.bridges.pending(model.name):
            yield audit_pb2.AuditEvent(progress=tensor_pb2.Progress(stage="converting the model for gradient "
                                                                          "methods"))
        try:
            torch_model = self.bridges.get(model)
        except FailedPrecondition as error:  # no gradient path: the forward sections still run
            torch_model = str(error)
        seconds_left(started, self.limits)
        self.store.begin(spec.name, spec.overwrite)
        ran = []
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")

        def work(progress, should_stop):
            ran.append(True)
            remote = None
            if cluster_scan:
                from convscope_server import distributed

                remote = distributed.audit_scan(self.cluster, model, self.data_root.root,
                                                self.limits.max_image_pixels, progress)
            try:
                report = run_audit(model, source.items, torch_model, budget, label_map,
                                   lambda stage, step, total: progress(step, total or source.total, stage),
                                   should_stop, self.limits.decode_workers, remote)
                if report is None:
                    return None
                report["created"] = created
                report["dataset"]["source"] = source.name
                progress(1, 1, "writing")
                return self.store.publish(spec.name, report)
            finally:
                self.store.release(spec.name)

        try:
            for kind, value in stream_within(context, work, started, self.limits):
                if kind == "progress":
                    step, total, stage = value[:3]
                    yield audit_pb2.AuditEvent(progress=tensor_pb2.Progress(step=step, total=max(total, step),
                                                                            stage=stage))
                elif value is not None:
                    yield audit_pb2.AuditEvent(result=info_of(value.name, value.report, value.file_bytes))
        finally:
            if not ran:  # refused before the job started: free the name
                self.store.release(spec.name)

    def ListAudits(self, request, context):
        audits = []
        for name in self.store.names():
            try:
                stored = self.store.get(name)
            except FailedPrecondition:
                continue
            audits.append(info_of(name, stored.report, stored.file_bytes))
        return audit_pb2.ListAuditsResponse(audits=audits)

    def GetAudit(self, request, context):
        stored = self.store.get(request.name)
        return audit_pb2.AuditReport(info=info_of(stored.name, stored.report, stored.file_bytes),
                                     json=json.dumps(stored.report, allow_nan=False))

    def DeleteAudit(self, request, context):
        self.store.delete(request.name)
        return audit_pb2.DeleteAuditResponse()
