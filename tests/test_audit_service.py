"""AuditService through the real server: a run over streamed labelled images, the stored report, listing,
deletion, bad specs (raw gRPC stubs, to send what the client would not), a model without a gradient path,
and the same through the Python client over a server dataset folder."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from convscope.tensors import to_tensor
from convscope.v1 import audit_pb2, audit_pb2_grpc, dataset_pb2, tensor_pb2
from conftest import png_bytes, start

BUDGET = audit_pb2.AuditBudget(unit_layers=1, attribution_images=2, curve_steps=2, robustness_images=4,
                               epsilons=[0.0, 0.02])


@pytest.fixture(scope="module")
def audit_stub(repository, data_root, tmp_path_factory):
    running = start(repository, data_root=data_root, audit_root=tmp_path_factory.mktemp("audits"))
    with grpc.insecure_channel(running.address) as channel:
        yield audit_pb2_grpc.AuditServiceStub(channel)
    running.stop(0)


def items(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for n in range(count):
        image = tensor_pb2.Image(array=to_tensor(rng.normal(0, 1, (3, 32, 32)).astype(np.float32)))
        yield audit_pb2.AuditRequest(item=dataset_pb2.DatasetItem(id=f"img{n}", image=image,
                                                                  label=["thing 1", "2", "other"][n % 3]))


def run(stub, spec, count=6):
    events = list(stub.RunAudit(iter([audit_pb2.AuditRequest(spec=spec), *items(count)]), timeout=120))
    return events[:-1], events[-1].result


def test_an_audit_runs_is_stored_listed_and_deleted(audit_stub):
    spec = audit_pb2.AuditSpec(name="tiny-1", model="tiny", budget=BUDGET,
                               source=dataset_pb2.ImageSource(expected=6))
    progress, info = run(audit_stub, spec)
    stages = [e.progress.stage for e in progress]
    assert {"model card", "scanning", "faithfulness", "robustness", "writing"} <= set(stages)
    assert info.name == "tiny-1" and info.model == "tiny" and info.images == 6 and info.labelled == 4
    report = json.loads(audit_stub.GetAudit(audit_pb2.GetAuditRequest(name="tiny-1")).json)
    assert report["classes"]["labelled"] == 4 and report["classes"]["unmapped_labels"] == ["other"]
    assert report["classes"]["accuracy"] == pytest.approx(info.accuracy)
    assert report["dataset"]["source"] == "stream" and report["created"] == info.created
    assert "vanilla" in report["faithfulness"]["methods"]
    assert {"worst images", "feature visualisation"} <= set(stages)
    assert report["feature_visualisation"]["steps"] == 64  # the default
    # streamed images are kept only while a table holds them (here the channels' top images hold all six)
    missing = sum("png" not in o for o in report["dataset"]["outliers"]) + sum(
        "first_png" not in p for p in report["dataset"]["near_duplicates"])
    assert (missing == 0) == ("pictures" not in report["dataset"])
    assert all(w.get("cam_predicted_png") for w in report["classes"]["worst"])
    assert [a.name for a in audit_stub.ListAudits(audit_pb2.ListAuditsRequest()).audits] == ["tiny-1"]
    with pytest.raises(grpc.RpcError) as error:
        run(audit_stub, spec)
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    audit_stub.DeleteAudit(audit_pb2.DeleteAuditRequest(name="tiny-1"))
    with pytest.raises(grpc.RpcError) as error:
        audit_stub.GetAudit(audit_pb2.GetAuditRequest(name="tiny-1"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("model", ["tiny_nhwc", "tiny_fixed_batch"])
def test_channels_last_and_fixed_batch_models_get_every_section(audit_stub, model):
    """A channels-last graph and one fixed at batch 1: gradient sections (Integrated Gradients in chunks the
    graph takes), batched feature visualisation and Grad-CAM of the worst images all run."""
    budget = audit_pb2.AuditBudget()
    budget.CopyFrom(BUDGET)
    budget.methods[:] = ["integrated_gradients", "gradcam"]
    budget.feature_steps = 3
    rng = np.random.default_rng(5)
    encoded = [audit_pb2.AuditRequest(item=dataset_pb2.DatasetItem(
        id=f"png{n}", label=["thing 1", "2"][n % 2], image=tensor_pb2.Image(encoded=png_bytes(
            rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))))) for n in range(6)]
    events = list(audit_stub.RunAudit(iter([audit_pb2.AuditRequest(spec=audit_pb2.AuditSpec(
        name=f"any-{model}", model=model, budget=budget)), *encoded]), timeout=120))
    assert events[-1].result.images == 6
    report = json.loads(audit_stub.GetAudit(audit_pb2.GetAuditRequest(name=f"any-{model}")).json)
    assert set(report["faithfulness"]["methods"]) == {"integrated_gradients", "gradcam", "random"}
    assert all("feature_png" in card for layer in report["units"].values() for card in layer.get("pages", []))
    assert report["classes"]["worst"] and all("cam_predicted_png" in w for w in report["classes"]["worst"])
    assert report["robustness"]["fgsm"]["accuracy"]
    audit_stub.DeleteAudit(audit_pb2.DeleteAuditRequest(name=f"any-{model}"))


def test_minus_one_turns_off_feature_visualisation_and_the_worst_images(audit_stub):
    budget = audit_pb2.AuditBudget()
    budget.CopyFrom(BUDGET)
    budget.feature_steps, budget.worst_images = -1, -1
    run(audit_stub, audit_pb2.AuditSpec(name="off", model="tiny", budget=budget))
    report = json.loads(audit_stub.GetAudit(audit_pb2.GetAuditRequest(name="off")).json)
    assert "unavailable" in report["feature_visualisation"]
    assert not any("feature_png" in card for layer in report["units"].values() for card in layer.get("pages", []))
    assert report["classes"]["worst"] and not any("png" in w for w in report["classes"]["worst"])
    audit_stub.DeleteAudit(audit_pb2.DeleteAuditRequest(name="off"))


def test_a_model_without_a_gradient_path_gets_the_forward_sections(audit_stub):
    spec = audit_pb2.AuditSpec(name="contrib", model="tiny_contrib_op", budget=BUDGET)
    _, info = run(audit_stub, spec)
    report = json.loads(audit_stub.GetAudit(audit_pb2.GetAuditRequest(name="contrib")).json)
    assert set(report["faithfulness"]["unavailable"]) == {"vanilla", "integrated_gradients", "gradcam"}
    assert "QuickGelu" in report["faithfulness"]["unavailable"]["vanilla"]
    assert "occlusion" in report["faithfulness"]["methods"]
    assert "unavailable" in report["robustness"]["fgsm"]


@pytest.mark.parametrize("spec, field", [
    (audit_pb2.AuditSpec(name="../x", model="tiny"), "spec.name"),
    (audit_pb2.AuditSpec(name="ok", model="nope"), "spec.model"),
    (audit_pb2.AuditSpec(name="ok", model="tiny", budget=audit_pb2.AuditBudget(methods=["magic"])),
     "spec.budget.methods"),
    (audit_pb2.AuditSpec(name="ok", model="tiny", budget=audit_pb2.AuditBudget(epsilons=[float("nan")])),
     "spec.budget.epsilons[0]"),
    (audit_pb2.AuditSpec(name="ok", model="tiny", budget=audit_pb2.AuditBudget(feature_steps=-2)),
     "spec.budget.feature_steps"),
    (audit_pb2.AuditSpec(name="ok", model="tiny", budget=audit_pb2.AuditBudget(worst_images=100000)),
     "spec.budget.worst_images"),
    (audit_pb2.AuditSpec(name="ok", model="tiny", label_map={"cat": audit_pb2.LabelClasses(classes=[99])}),
     "spec.label_map"),
])
def test_bad_specs_name_the_field(audit_stub, spec, field):
    with pytest.raises(grpc.RpcError) as error:
        run(audit_stub, spec, count=1)
    assert error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert field in error.value.details()


def test_the_client_runs_fetches_and_deletes_an_audit(repository, data_root, tmp_path):
    from convscope import AuditInfo, Client, NotFound

    running = start(repository, data_root=data_root, audit_root=tmp_path / "audits")
    stages = []
    try:
        with Client(running.address, timeout=120) as client:
            info = client.run_audit("demo-tiny", "tiny", dataset="demo", limit=6, label_map={"cat": [3, 5]},
                                    unit_layers=1, attribution_images=1, curve_steps=2, robustness_images=2,
                                    methods=["vanilla"], progress=lambda step, total, stage: stages.append(stage))
            assert isinstance(info, AuditInfo) and info.images == 6 and "scanning" in stages
            report = client.audit("demo-tiny")
            assert report["dataset"]["source"] == "demo" and report["classes"]["images"] == 6
            assert set(report["faithfulness"]["methods"]) == {"vanilla", "random"}
            assert [a.name for a in client.audits()] == ["demo-tiny"]
            client.delete_audit("demo-tiny")
            with pytest.raises(NotFound, match="demo-tiny"):
                client.audit("demo-tiny")
    finally:
        running.stop(0)
