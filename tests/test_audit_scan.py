"""The audit's one pass (audit/scan.py) and the sections built from it (audit/sections.py), on the tiny
model over a small labelled folder, against onnxruntime run by the test itself and hand counts."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from convscope_server.audit import sections
from convscope_server.audit.scan import class_mapping, scan
from convscope_server.datasets import folder_items
from convscope_server.onnx.graph import classifier_input
from convscope_server.repository import load_folder
from tiny_models import DEAD_CHANNEL, NUM_CLASSES, SIZE, TINY_CONFIG, export, tiny_net

FOLDERS = {"thing 0": 4, "Thing_1": 3, "7": 3, "mystery": 2}


@pytest.fixture(scope="module")
def audit_setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("audit")
    folder = base / "models" / "tiny"
    export(tiny_net(), folder / "model.onnx")
    (folder / "config.toml").write_text(TINY_CONFIG)
    (folder / "labels.txt").write_text("".join(f"thing {i}\n" for i in range(NUM_CLASSES)))
    model = load_folder("tiny", folder)
    data = base / "data" / "set"
    rng = np.random.default_rng(3)
    pixels = {}
    for label, count in FOLDERS.items():
        (data / label).mkdir(parents=True)
        for n in range(count):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(image).save(data / label / f"{n}.png")
            pixels[f"{label}/{n}.png"] = image
    Image.fromarray(pixels["thing 0/0.png"]).save(data / "thing 0" / "copy.png")  # a duplicate
    pixels["thing 0/copy.png"] = pixels["thing 0/0.png"]
    (data / "mystery" / "broken.png").write_bytes(b"not a png")
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return model, data, pixels, session


def reference_logits(session, pixels: np.ndarray) -> np.ndarray:
    x = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None]  # TINY_CONFIG
    return session.run(None, {"input": x.astype(np.float32)})[0][0]


def test_one_pass_feeds_predictions_codes_and_units(audit_setup):
    model, data, pixels, session = audit_setup
    code_layer = classifier_input(model.proto, model.config.logits_output)  # the penultimate layer
    assert code_layer == "/Flatten_output_0"
    units = [model.layer("/relu2/Relu_output_0"), model.layer("/relu6/Clip_output_0")]
    result = scan(model, folder_items(data, data.parent, model.config, 10**7), code_layer, units, batch_size=4,
                  should_stop=lambda: False, ceiling={"/relu6/Clip_output_0": 6.0})
    assert len(result.ids) == sum(FOLDERS.values()) + 1 and [f.id for f in result.failures] == ["mystery/broken.png"]
    for row, item_id in enumerate(result.ids):
        np.testing.assert_allclose(result.logits[row], reference_logits(session, pixels[item_id]), rtol=1e-4,
                                   atol=1e-5)
    assert DEAD_CHANNEL in result.units["/relu2/Relu_output_0"].dead().tolist()
    assert result.units["/relu6/Clip_output_0"].images == len(result.ids)

    mapping, unmapped = class_mapping(result.labels, model.labels)
    assert mapping == {"thing 0": (0,), "Thing_1": (1,), "7": (7,)} and unmapped == ["mystery"]
    report = sections.classes(result, mapping, unmapped, model.label)
    rows = [i for i, label in enumerate(result.labels) if label in mapping]
    right = [int(np.argmax(reference_logits(session, pixels[result.ids[i]]))) == mapping[result.labels[i]][0]
             for i in rows]
    assert report["labelled"] == len(rows) and report["accuracy"] == pytest.approx(np.mean(right))
    assert report["unmapped_labels"] == ["mystery"]
    assert sum(b["images"] for b in report["calibration"]["bins"]) == len(rows)
    assert len(report["worst"]) == min(12, len(rows))

    duplicates = sections.dataset(result)["near_duplicates"]
    assert {duplicates[0]["first"], duplicates[0]["second"]} == {"thing 0/0.png", "thing 0/copy.png"}
    assert duplicates[0]["distance"] == pytest.approx(0, abs=1e-5)


def test_explicit_mappings_and_numbers():
    names = ["tench", "goldfish", "great white shark", "Egyptian cat"]
    mapping, unmapped = class_mapping(["cat", "egyptian_cat", "3", "99", "shark", ""], names,
                                      explicit={"cat": [3, 1], "shark": 2}, num_classes=4)
    assert mapping == {"cat": (3, 1), "egyptian_cat": (3,), "3": (3,), "shark": (2,)}
    assert unmapped == ["99"]
