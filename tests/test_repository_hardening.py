"""A repository where each model folder fails alone: one good model beside hostile folders (deep or
mistyped config.toml, non-regular files, escaping symlinks, graphs whose first run fails or gives NaN),
served by the real server. The good model answers, every hostile one is listed failed with a reason
naming the problem, and start-up neither exits nor blocks."""

from __future__ import annotations

import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import convscope
from conftest import start
from convscope import Client
from convscope_server.repository import ModelRepository
from convscope_server.onnx.session import SessionSettings
from tiny_models import NUM_CLASSES, SIZE, TINY_CONFIG, export, tiny_net

GOOD = "good"
READY = (GOOD, "external_weights")  # the models that must load
START_TIMEOUT = 120  # seconds; start-up blocked on a FIFO would never end

# TINY_CONFIG with one line replaced: folder -> (old, new, key words the reason must hold)
CONFIG_CASES = {
    "mean_text": ("mean = [0.5, 0.5, 0.5]", 'mean = "abc"', ("mean", "array of 3 numbers")),
    "mean_short": ("mean = [0.5, 0.5, 0.5]", "mean = [0.5, 0.5]", ("mean", "array of 3 numbers")),
    "mean_item_text": ("mean = [0.5, 0.5, 0.5]", 'mean = [0.5, "x", 0.5]', ("mean[1]", "number")),
    "scale_text": ("scale = 1.0", 'scale = "big"', ("scale", "must be a number")),
    "scale_inf": ("scale = 1.0", "scale = inf", ("scale", "finite")),
    "scale_zero": ("scale = 1.0", "scale = 0", ("scale", "> 0")),
    "std_nan": ("std = [0.25, 0.25, 0.25]", "std = [nan, 0.25, 0.25]", ("std[0]", "finite")),
    "std_zero": ("std = [0.25, 0.25, 0.25]", "std = [0.25, 0.0, 0.25]", ("std[1]", "> 0")),
    "std_negative": ("std = [0.25, 0.25, 0.25]", "std = [0.25, 0.25, -1]", ("std[2]", "> 0")),
    "height_bool": ("height = 32", "height = true", ("height", "positive integer")),
    "height_float": ("height = 32", "height = 32.0", ("height", "positive integer")),
    "width_huge": ("width = 32", "width = 1000000", ("width", "positive integer")),
    "layout_number": ('layout = "NCHW"', "layout = 1", ("layout", "string")),
    "softmax_text": ('[output]', '[output]\nsoftmax = "no"', ("softmax", "true or false")),
    "softmax_number": ('[output]', '[output]\nsoftmax = 0', ("softmax", "true or false")),
    "crop_big": ("scale = 1.0", "scale = 1.0\ncrop_fraction = 2.0", ("crop_fraction", "(0, 1]")),
    "crop_text": ("scale = 1.0", 'scale = 1.0\ncrop_fraction = "most"', ("crop_fraction", "number")),
    "labels_number": ('labels = "labels.txt"', "labels = 5", ("labels", "string")),
    "labels_absolute": ('labels = "labels.txt"', 'labels = "/etc/passwd"', ("labels", "inside the model folder")),
    "labels_directory": ('labels = "labels.txt"', 'labels = "names"', ("labels", "directory")),
    "input_not_table": ("[input]", "input = 3\n[runtime]", ("input", "must be a table")),
}


def _logits_branch(proto: onnx.ModelProto, nodes: list, initializers: list) -> onnx.ModelProto:
    """``proto`` with its logits output renamed "raw" and ``nodes`` computing a new "logits" from it."""
    changed = onnx.ModelProto()
    changed.CopyFrom(proto)
    for node in changed.graph.node:
        node.output[:] = ["raw" if name == "logits" else name for name in node.output]
    changed.graph.node.extend(nodes)
    changed.graph.initializer.extend(initializers)
    return changed


def huge_allocation(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Adds sum(ConstantOfShape([batch * 10^6, 10^6])) to the logits: 4 TB, sized at run time from the
    input's shape, so neither shape inference nor constant folding sees it; only a run does."""
    million = onnx.numpy_helper.from_array(np.array([1_000_000], np.int64), "million")
    first = onnx.numpy_helper.from_array(np.array([0], np.int64), "first")
    nodes = [helper.make_node("Shape", ["input"], ["shape"]),
             helper.make_node("Gather", ["shape", "first"], ["batch"], axis=0),
             helper.make_node("Mul", ["batch", "million"], ["rows"]),
             helper.make_node("Concat", ["rows", "million"], ["dims"], axis=0),
             helper.make_node("ConstantOfShape", ["dims"], ["huge"],
                              value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("ReduceSum", ["huge"], ["total"], keepdims=0),
             helper.make_node("Add", ["raw", "total"], ["logits"])]
    return _logits_branch(proto, nodes, [million, first])


def nan_on_zero(proto: onnx.ModelProto) -> onnx.ModelProto:
    """logits = log(raw * 0): -inf for every input."""
    zero = onnx.numpy_helper.from_array(np.array(0, np.float32), "zero")
    nodes = [helper.make_node("Mul", ["raw", "zero"], ["zeroed"]), helper.make_node("Log", ["zeroed"], ["logits"])]
    return _logits_branch(proto, nodes, [zero])


def build_hostile_repository(root: Path, outside: Path) -> tuple[dict[str, tuple[str, ...]], list[Path]]:
    """``root`` with the good model and the hostile folders. Returns folder -> key words its reason must
    hold, and the FIFOs made (to unblock a start-up that opened one)."""
    good = root / GOOD
    export(tiny_net(), good / "model.onnx")
    (good / "config.toml").write_text(TINY_CONFIG)
    (good / "labels.txt").write_text("".join(f"thing {i}\n" for i in range(NUM_CLASSES)))
    model = (good / "model.onnx").read_bytes()
    proto = onnx.load(str(good / "model.onnx"))
    expected: dict[str, tuple[str, ...]] = {}
    fifos: list[Path] = []

    def folder(name: str, config: str | None = TINY_CONFIG, onnx_bytes: bytes | None = model) -> Path:
        path = root / name
        path.mkdir()
        if onnx_bytes is not None:
            (path / "model.onnx").write_bytes(onnx_bytes)
        if config is not None:
            (path / "config.toml").write_text(config)
        (path / "labels.txt").write_text((good / "labels.txt").read_text())
        return path

    def fifo(path: Path) -> None:
        os.mkfifo(path)
        fifos.append(path)

    for name, (old, new, words) in CONFIG_CASES.items():
        assert old in TINY_CONFIG, name
        folder(name, TINY_CONFIG.replace(old, new, 1))
        expected[name] = words
    (root / "labels_directory" / "names").mkdir()

    folder("deep_config", "x = " + "[" * 5000)
    expected["deep_config"] = ("config.toml", "nested too deeply")
    folder("binary_config", None)
    (root / "binary_config" / "config.toml").write_bytes(b"\xff\xfe[input]\x00")
    expected["binary_config"] = ("config.toml", "utf-8")

    (folder("model_directory", onnx_bytes=None) / "model.onnx").mkdir()
    expected["model_directory"] = ("model.onnx", "directory")
    fifo(folder("fifo_model", onnx_bytes=None) / "model.onnx")
    expected["fifo_model"] = ("model.onnx", "fifo")
    fifo(folder("fifo_config", None) / "config.toml")
    expected["fifo_config"] = ("config.toml", "fifo")
    labels_fifo = folder("fifo_labels") / "labels.txt"
    labels_fifo.unlink()
    fifo(labels_fifo)
    expected["fifo_labels"] = ("labels", "fifo")
    try:  # a character device (/dev/null's numbers) named model.onnx: needs CAP_MKNOD
        os.mknod(folder("device_model", onnx_bytes=None) / "model.onnx", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["device_model"] = ("model.onnx", "character device")
    except OSError:
        shutil.rmtree(root / "device_model")
    (folder("symlink_loop", onnx_bytes=None) / "model.onnx").symlink_to("model.onnx")
    expected["symlink_loop"] = ("model.onnx", "cannot be read")
    if os.geteuid() != 0:  # root reads files whatever their mode
        (folder("unreadable") / "model.onnx").chmod(0)
        expected["unreadable"] = ("model.onnx", "cannot be read", "permission")

    outside.mkdir(parents=True, exist_ok=True)
    (outside / "config.toml").write_text(TINY_CONFIG)
    (outside / "model.onnx").write_bytes(model)
    (folder("config_outside", None) / "config.toml").symlink_to(outside / "config.toml")
    expected["config_outside"] = ("config.toml", "outside the model folder")
    (folder("model_outside", onnx_bytes=None) / "model.onnx").symlink_to(outside / "model.onnx")
    expected["model_outside"] = ("model.onnx", "outside the model folder")

    # Weights as external data: inside the folder they load; a FIFO in their place is refused.
    for name in ("external_weights", "external_fifo"):
        folder(name, onnx_bytes=None)
        onnx.save_model(onnx.load(str(good / "model.onnx")), str(root / name / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (root / "external_fifo" / "weights.bin").unlink()
    fifo(root / "external_fifo" / "weights.bin")
    expected["external_fifo"] = ("weights.bin", "fifo")

    folder("huge_allocation", onnx_bytes=huge_allocation(proto).SerializeToString())
    expected["huge_allocation"] = ("first run", "zero image")
    folder("nan_logits", onnx_bytes=nan_on_zero(proto).SerializeToString())
    expected["nan_logits"] = ("logits", "not finite")
    return expected, fifos


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(running server, folder -> expected key words). Start-up runs on a thread with a time limit: if a
    FIFO blocked it, the FIFOs are opened for writing and closed (so the blocked reader sees EOF) and the
    test fails instead of hanging."""
    base = tmp_path_factory.mktemp("hostile")
    expected, fifos = build_hostile_repository(base / "models", base / "outside")
    result: dict = {}

    def run():
        try:
            result["server"] = start(base / "models")
        except BaseException as error:  # reported below: start-up must not raise
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(START_TIMEOUT)
    if thread.is_alive():
        for path in fifos:
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"server start-up did not finish in {START_TIMEOUT} s (blocked on a FIFO?)")
    if "error" in result:
        pytest.fail(f"server start-up raised {type(result['error']).__name__}: {result['error']}")
    yield result["server"], expected
    result["server"].stop(0)


@pytest.fixture()
def hostile_client(hostile):
    with Client(hostile[0].address, timeout=60) as c:
        yield c


def test_good_model_predicts_beside_hostile_folders(hostile_client):
    listed = {m.name: m for m in hostile_client.models()}
    x = np.random.default_rng(0).normal(size=(3, SIZE, SIZE)).astype(np.float32)
    answers = []
    for name in READY:
        assert listed[name].ready and not listed[name].error and listed[name].num_classes == NUM_CLASSES
        answers.append(hostile_client.predict(name, x, top=3))
    assert all(np.isfinite(s.probability) for s in answers[0]) and answers[0][0].label.startswith("thing ")
    for other in answers[1:]:  # the same weights, read from external data
        assert [(s.index, s.logit) for s in other] == [(s.index, s.logit) for s in answers[0]]


def test_every_hostile_folder_is_listed_failed_with_its_reason(hostile, hostile_client):
    expected = hostile[1]
    listed = {m.name: m for m in hostile_client.models()}
    assert set(expected) <= set(listed), "a hostile folder is not listed"
    wrong = {}
    for name, words in expected.items():
        model = listed[name]
        reason = model.error.lower()
        if model.ready or "\n" in model.error or not all(word.lower() in reason for word in words):
            wrong[name] = (model.ready, model.error, words)
    assert not wrong, wrong


def test_failed_models_answer_failed_precondition_with_the_reason(hostile_client):
    with pytest.raises(convscope.FailedPrecondition, match="softmax"):
        hostile_client.predict("softmax_text", np.zeros((3, SIZE, SIZE), np.float32))
    with pytest.raises(convscope.FailedPrecondition, match="first run"):
        hostile_client.describe("huge_allocation")


def test_server_keeps_serving_after_failed_requests(hostile_client):
    for _ in range(2):
        with pytest.raises(convscope.FailedPrecondition):
            hostile_client.predict("nan_logits", np.zeros((3, SIZE, SIZE), np.float32))
    assert hostile_client.predict(GOOD, np.ones((3, SIZE, SIZE), np.float32), top=1)


def test_reload_adds_changes_and_drops_folders(tmp_path):
    """reload() loads a new folder, reloads one whose config changed, drops a removed one and keeps the
    unchanged model object itself; a folder broken by the change becomes failed with the reason."""
    root = tmp_path / "models"
    export(tiny_net(), root / "a" / "model.onnx")
    (root / "a" / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    for name in ("b", "c"):
        shutil.copytree(root / "a", root / name)
    repository = ModelRepository(root, SessionSettings("cpu", 1))
    repository.load_all()
    assert all(repository.status(name)[0] for name in "abc")
    kept = repository.status("a")[0]

    shutil.copytree(root / "a", root / "d")
    (root / "b" / "config.toml").write_text(TINY_CONFIG.replace("scale = 1.0", 'scale = "big"'))
    shutil.rmtree(root / "c")
    report = repository.reload()
    assert (report.added, report.changed, report.removed, report.unchanged) == (["d"], ["b"], ["c"], ["a"])
    assert repository.status("a")[0] is kept and repository.status("d")[0] is not None
    model, error = repository.status("b")
    assert model is None and "scale" in error
    assert repository.names() == ["a", "b", "d"]

    (root / "b" / "config.toml").write_text(TINY_CONFIG.replace('labels = "labels.txt"', ""))
    report = repository.reload()
    assert report.changed == ["b"] and repository.status("b")[0] is not None
