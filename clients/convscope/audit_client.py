"""Client methods for model audits: run one over a dataset, list the stored ones, fetch a report, delete.

Images come from a dataset folder on the server (``dataset="demo"``) or from the caller, as for dataset
scans: paths, arrays, ``(id, image)`` or ``(id, image, label)`` tuples, streamed lazily. Labels (folder
names on the server, the third tuple element here) are mapped to the model's classes by name, by number,
or by ``label_map``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from convscope.dataset_client import SCAN_TIMEOUT, _requests, _source
from convscope.v1 import audit_pb2


@dataclass(frozen=True)
class AuditInfo:
    """A stored audit.

    Attributes:
        name: the audit's name on the server.
        model: the audited model.
        images: images scanned.
        labelled: images whose label maps to the model's classes.
        accuracy: top-1 accuracy over the labelled images (0 when none).
        created: when the audit ran (ISO 8601, UTC).
        file_bytes: size of the stored audit.json.
    """

    name: str
    model: str
    images: int
    labelled: int
    accuracy: float
    created: str
    file_bytes: int


def _info(message) -> AuditInfo:
    return AuditInfo(message.name, message.model, message.images, message.labelled, message.accuracy,
                     message.created, message.file_bytes)


class AuditMethods:
    """Mixed into :class:`convscope.Client`."""

    def run_audit(self, name: str, model: str, images=None, *, dataset: str = "", limit: int = 0,
                  label_map: Mapping[str, int | list[int]] | None = None, overwrite: bool = False,
                  unit_layers: int = 0, attribution_images: int = 0, curve_steps: int = 0,
                  robustness_images: int = 0, epsilons=(), methods=(), feature_steps: int = 0,
                  worst_images: int = 0, placement: str = "default", progress=None,
                  timeout: float | None = SCAN_TIMEOUT) -> AuditInfo:
        """Audit ``model`` over ``images`` (streamed) or the server's ``dataset`` and store the report as
        ``name``: model card, classes and calibration, units, attribution faithfulness, robustness, dataset
        checks. ``label_map`` maps dataset labels to class indices (one, or a list any of which counts as
        right). Budget fields left at 0 / empty take the server's defaults (4 unit layers, 8 attribution
        images, 16 curve steps, 64 robustness images, epsilons 0-4/255, every attribution method, 64 feature
        visualisation steps, 12 worst images); -1 turns off feature visualisation or the worst images.
        ``placement`` ("default", "server" or "cluster") says where the scan stage runs, as for dataset
        scans: "cluster" needs a server started with --ray and a ``dataset``. ``progress(step, total,
        stage)`` is called per stage."""
        labels = {str(label): audit_pb2.LabelClasses(classes=[classes] if isinstance(classes, int) else
                                                     list(classes)) for label, classes in (label_map or {}).items()}
        spec = audit_pb2.AuditSpec(
            name=name, model=model, source=_source(images, dataset, limit, placement), overwrite=overwrite, label_map=labels,
            budget=audit_pb2.AuditBudget(unit_layers=unit_layers, attribution_images=attribution_images,
                                         curve_steps=curve_steps, robustness_images=robustness_images,
                                         epsilons=list(epsilons), methods=list(methods),
                                         feature_steps=feature_steps, worst_images=worst_images))
        result = self._stream(self._audit.RunAudit, _requests(audit_pb2.AuditRequest, spec, images), progress,
                              timeout)
        return _info(result)

    def audits(self) -> list[AuditInfo]:
        """The audits stored on the server."""
        return [_info(a) for a in self._call(self._audit.ListAudits, audit_pb2.ListAuditsRequest()).audits]

    def audit(self, name: str) -> dict:
        """The stored report ``name``: audit.json as a dict (model, dataset, classes, units, faithfulness,
        robustness)."""
        return json.loads(self._call(self._audit.GetAudit, audit_pb2.GetAuditRequest(name=name)).json)

    def delete_audit(self, name: str) -> None:
        self._call(self._audit.DeleteAudit, audit_pb2.DeleteAuditRequest(name=name))
