"""The model card's graph numbers (audit/card.py) against hand counts on the tiny model and torch's own
parameter count."""

from __future__ import annotations

from convscope_server.audit import card
from convscope_server.repository import load_folder
from tiny_models import NUM_CLASSES, SIZE, TINY_CONFIG, export, tiny_net


def test_parameters_and_multiply_accumulates_by_hand(tmp_path):
    native = tiny_net()
    export(native, tmp_path / "tiny" / "model.onnx")
    (tmp_path / "tiny" / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    model = load_folder("tiny", tmp_path / "tiny")
    # The exporter folds bn1 into conv1 (its scale into the weights, its shift into the bias): the file
    # holds every torch parameter but bn1's two vectors.
    assert card.parameters(model.proto) == sum(p.numel() for p in native.parameters()) - 2 * 8
    costs = {c.name: c.macs for c in card.layer_costs(model.proto, model.layers)}
    by_hand = {
        "/conv1/Conv_output_0": SIZE * SIZE * 8 * (3 * 3 * 3),                 # 32x32 out, 8 channels
        "/conv2/Conv_output_0": (SIZE // 2) ** 2 * 16 * (8 * 3 * 3),           # stride 2
        "/conv3/Conv_output_0": (SIZE // 4) ** 2 * 16 * (16 * 3 * 3),          # after the 2x2 pool
    }
    for name, macs in by_hand.items():
        assert costs[name] == macs, name
    fc = [name for name in costs if name not in by_hand]
    assert len(fc) == 1 and costs[fc[0]] == 16 * NUM_CLASSES
    report = card.summary(model.proto, model.layers)
    assert report["macs"] == sum(by_hand.values()) + 16 * NUM_CLASSES
    assert report["costliest"][0]["layer"] == max(by_hand, key=by_hand.get)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["/conv3/Conv_output_0"]["receptive_field"] == {"size": [15, 15], "jump": [4, 4]}  # tiny_models
    assert rows["/conv3/Conv_output_0"]["macs"] == by_hand["/conv3/Conv_output_0"]
    assert rows["/conv1/Conv_output_0"]["shape"][1:] == [8, SIZE, SIZE] and rows["/conv1/Conv_output_0"]["layout"] == "NCHW"
