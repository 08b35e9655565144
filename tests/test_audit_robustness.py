"""Accuracy under corruptions (audit/robustness.py) on the tiny model, against corrupted inputs the test
builds itself with Pillow and runs through its own onnxruntime session."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageFilter

from convscope_server.audit.robustness import corruption_accuracy
from convscope_server.forward.backend import OrtBackend
from convscope_server.repository import load_folder
from tiny_models import NUM_CLASSES, SIZE, TINY_CONFIG, export, tiny_net


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust") / "tiny"
    export(tiny_net(), folder / "model.onnx")
    (folder / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    model = load_folder("tiny", folder)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(5).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    samples = np.stack([((p / 255.0 - 0.5) / 0.25).transpose(2, 0, 1) for p in pixels]).astype(np.float32)
    return model, session, pixels, samples


def predictions(session, pixels: np.ndarray) -> np.ndarray:
    x = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2)
    return session.run(None, {"input": np.ascontiguousarray(x, np.float32)})[0].argmax(axis=1)


def test_blur_and_jpeg_accuracy_equal_pillow_by_hand(tiny):
    model, session, pixels, samples = tiny
    accepted = [(int(c),) for c in np.random.default_rng(1).integers(0, NUM_CLASSES, len(pixels))]
    accepted[:6] = [(int(c),) for c in predictions(session, pixels[:6])]  # half right when clean
    report = corruption_accuracy(OrtBackend(model).logits, samples, accepted, model.config,
                                 {"gaussian_blur": (1.0, 3.0), "jpeg": (30,)})
    truth = np.array([a[0] for a in accepted])
    assert report["clean"] == pytest.approx(np.mean(predictions(session, pixels) == truth))

    def jpeg(p, quality):
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))

    for radius, row in zip((1.0, 3.0), report["gaussian_blur"]):
        blurred = np.stack([np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(radius))) for p in pixels])
        assert row == {"strength": radius, "accuracy": pytest.approx(np.mean(predictions(session, blurred) == truth))}
    compressed = np.stack([jpeg(p, 30) for p in pixels])
    assert report["jpeg"][0]["accuracy"] == pytest.approx(np.mean(predictions(session, compressed) == truth))


def test_noise_and_occlusion_are_seeded_and_bounded(tiny):
    model, session, pixels, samples = tiny
    accepted = [(int(c),) for c in predictions(session, pixels)]
    corruptions = {"gaussian_noise": (0.0, 0.5), "occlusion": (0.0, 1.0)}
    first = corruption_accuracy(OrtBackend(model).logits, samples, accepted, model.config, corruptions, seed=3)
    again = corruption_accuracy(OrtBackend(model).logits, samples, accepted, model.config, corruptions, seed=3)
    assert first == again and first["clean"] == 1.0
    assert first["gaussian_noise"][0]["accuracy"] == 1.0      # no noise: the clean predictions
    blank = OrtBackend(model).logits(np.zeros_like(samples[:1]))[0].argmax()
    assert first["occlusion"][1]["accuracy"] == pytest.approx(np.mean([a[0] == blank for a in accepted]))
