"""DatasetService: maximally-activating patches against brute-force numpy, datasets, bad input, cancel."""

from __future__ import annotations

import gc
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from convscope import Client, InvalidArgument, NotFound, ResourceExhausted
from conftest import png_bytes, start
from tiny_models import HAND_RECEPTIVE_FIELDS, SIZE

MODEL = "efficientnet_lite0"
LITE0_BLOCK3 = "/_blocks.3/Clip_1_output_0"   # (N, 144, 28, 28), receptive field 35, jump 8, start 7


@pytest.fixture(scope="module")
def pooled(repository, data_root, tmp_path_factory):
    """A server decoding scans in 3 threads (the session server uses one per core)."""
    running = start(repository, data_root=data_root, gallery_root=tmp_path_factory.mktemp("pooled-galleries"),
                    decode_workers=3)
    with Client(running.address, timeout=60) as c:
        yield c
    running.stop(0)


@pytest.fixture(params=["default", "3 decode workers"])
def scan_client(request):
    return request.getfixturevalue("client" if request.param == "default" else "pooled")


def random_images(count: int, seed: int = 0, size: int = SIZE) -> list[np.ndarray]:
    """Smooth random pictures (blocky noise): varied activations, a few exact ties after ReLU6."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        images.append(coarse.repeat(4, axis=0).repeat(4, axis=1))
    return images


def endless_images():
    """A stream that never ends (for cancelling)."""
    seed = 0
    while True:
        seed += 1
        yield random_images(1, seed=seed)[0]


def brute_force_top(activations: np.ndarray, k: int):
    """(N, C, H, W) or (N, C) -> per channel the k (image, flat position, value) with the largest per-image
    maximum, ties to the earlier image: every activation held at once."""
    n, c = activations.shape[:2]
    flat = activations.reshape(n, c, -1)
    best = flat.max(axis=2)
    where = flat.argmax(axis=2)
    hits = {}
    for channel in range(c):
        order = np.lexsort((np.arange(n), -best[:, channel]))[:k]
        hits[channel] = [(int(i), int(where[i, channel]), float(best[i, channel])) for i in order]
    return hits


def hand_box(layer: str, position: int, grid_width: int, size: int = SIZE):
    rf, jump, start = HAND_RECEPTIVE_FIELDS[layer]
    row, col = divmod(position, grid_width)

    def axis(unit):
        centre = start + unit * jump
        low, high = np.floor(centre - (rf - 1) / 2 + 0.5), np.floor(centre + (rf - 1) / 2 + 0.5)
        return max(0, int(low)), min(size, int(high) + 1)

    (top, bottom), (left, right) = axis(row), axis(col)
    return top, left, bottom, right


@pytest.mark.parametrize("layer", ["/conv2/Conv_output_0", "/Add_output_0"])
def test_top_patches_equal_brute_force_on_streamed_images(client, layer):
    images = random_images(48)
    k = 5
    scan = client.top_patches("tiny", layer, images, k=k, patches=True, render=True)
    values = np.concatenate([client.activations("tiny", images[i: i + 16], [layer])[layer].values
                             for i in range(0, len(images), 16)])
    expected = brute_force_top(values, k)
    grid_width = values.shape[3]
    assert scan.images == 48 and scan.skipped == 0 and set(scan.channels) == set(range(values.shape[1]))
    for channel, hits in scan.channels.items():
        assert [(h.index, h.row * grid_width + h.col, h.value) for h in hits] == expected[channel]
        for hit in hits:
            assert hit.id == str(hit.index)
            assert hit.box == hand_box(layer, hit.row * grid_width + hit.col, grid_width)
            top, left, bottom, right = hit.box
            assert hit.patch.shape == (bottom - top, right - left, 3)
            source = images[hit.index][top:bottom, left:right].astype(int)
            assert np.abs(hit.patch.astype(int) - source).max() <= 1  # display image = pixels back from the input
    assert scan.grid_png.startswith(b"\x89PNG") and len(scan.grid_channels) == min(16, values.shape[1])


@pytest.mark.parametrize("layer", ["logits", "/GlobalAveragePool_output_0"])
def test_top_patches_of_a_non_spatial_layer_are_whole_images(client, layer):
    images = random_images(20, seed=3)
    scan = client.top_patches("tiny", layer, images, k=3)
    values = client.activations("tiny", images, [layer])[layer].values
    expected = brute_force_top(values.reshape(20, -1), 3)
    for channel, hits in scan.channels.items():
        assert [(h.index, 0, h.value) for h in hits] == expected[channel]
        assert all(h.box == (0, 0, SIZE, SIZE) for h in hits)


def test_top_patches_on_the_demo_dataset_folder(scan_client, client, data_root):
    channels = [0, 7, 21, 100]
    scan = scan_client.top_patches(MODEL, LITE0_BLOCK3, dataset="demo", k=4, channels=channels, patches=True,
                              render=True)
    files = sorted(p for p in (data_root / "demo").rglob("*.jpg"))
    assert scan.images == len(files) == 68 and scan.skipped == 0
    values = np.concatenate([client.activations(MODEL, [f.read_bytes() for f in files[i: i + 32]],
                                                [LITE0_BLOCK3])[LITE0_BLOCK3].values for i in range(0, 68, 32)])
    expected = brute_force_top(values[:, channels], 4)
    for column, channel in enumerate(channels):
        hits = scan.channels[channel]
        assert [h.index for h in hits] == [e[0] for e in expected[column]]
        assert [h.row * 28 + h.col for h in hits] == [e[1] for e in expected[column]]
        np.testing.assert_allclose([h.value for h in hits], [e[2] for e in expected[column]], rtol=1e-5)
        for hit in hits:
            assert hit.id == files[hit.index].relative_to(data_root / "demo").as_posix()
            top, left, bottom, right = hit.box
            centre = 7 + 8 * np.array([hit.row, hit.col])  # receptive field 35, jump 8, start 7
            assert (top, left) == tuple(np.maximum(centre - 17, 0))
            assert (bottom, right) == tuple(np.minimum(centre + 18, 224))
            assert hit.patch.shape == (bottom - top, right - left, 3)
    assert scan.grid_channels == channels


def test_streamed_items_keep_ids_and_unreadable_ones_are_reported_and_skipped(scan_client, client):
    good = random_images(6, seed=5)
    items = [("first", good[0]), ("junk", b"not an image"), ("second", good[1]),
             ("wrong-shape", np.zeros((3, 5, 5), np.float32)), ("third", good[2])] + [
        (f"more-{i}", image) for i, image in enumerate(good[3:])]
    reported = []
    scan = scan_client.top_patches("tiny", "/conv3/Conv_output_0", items, k=2, on_item_error=reported.append)
    assert scan.images == 6 and scan.skipped == 2   # readable images; the unreadable are skipped
    assert [(e.index, e.id) for e in scan.errors] == [(1, "junk"), (3, "wrong-shape")] == \
        [(e.index, e.id) for e in reported]
    assert "cannot decode" in scan.errors[0].reason and "shape" in scan.errors[1].reason
    clean = client.top_patches("tiny", "/conv3/Conv_output_0", good, k=2)
    names = ["first", "second", "third", "more-0", "more-1", "more-2"]
    for channel, hits in scan.channels.items():
        assert [h.id for h in hits] == [names[h.index] for h in clean.channels[channel]]
        assert [h.value for h in hits] == [h.value for h in clean.channels[channel]]


def test_dataset_folder_with_unreadable_files_and_a_symlink_out(client):
    scan = client.top_patches("tiny", "/conv3/Conv_output_0", dataset="broken", k=3)
    assert scan.images == 2 and scan.skipped == 3
    reasons = {e.id: e.reason for e in scan.errors}
    assert set(reasons) == {"b_corrupt.jpg", "c_truncated.png", "d_escape.png"}
    assert "outside the data root" in reasons["d_escape.png"]
    assert {h.id for hits in scan.channels.values() for h in hits} <= {"a_good.png", "e_good.png"}


def test_datasets_are_listed(client):
    found = {d.name: d for d in client.datasets()}
    assert found["demo"].images == 68 and len(found["demo"].labels) == 17 and "cat" in found["demo"].labels
    assert "linked" not in found  # resolves outside the data root


@pytest.mark.parametrize("dataset, error, match", [
    ("../outside", InvalidArgument, "'..' is not allowed"),
    ("/etc", InvalidArgument, "relative to the data root"),
    ("linked", InvalidArgument, "outside the data root"),
    ("dem", NotFound, "did you mean 'demo'"),
])
def test_dataset_paths_outside_the_root_are_refused(client, dataset, error, match):
    with pytest.raises(error, match=match) as caught:
        client.top_patches("tiny", "/conv3/Conv_output_0", dataset=dataset)
    assert "source.dataset" in str(caught.value)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"k": 101}, ResourceExhausted, "spec.k: 101 is over"),
    ({"k": -1}, InvalidArgument, "spec.k"),
    ({"channels": [16]}, InvalidArgument, r"spec.channels\[0\]: 16 is outside"),
    ({"layer": "/pool/MaxPool_outptu_0"}, NotFound, "did you mean"),
    ({"layer": ""}, InvalidArgument, "spec.layer: required"),
    ({"model": "nope"}, NotFound, "spec.model"),
    ({"limit": 10**9}, ResourceExhausted, "max-scan-images"),
    ({"limit": -1}, InvalidArgument, "spec.source.limit: must be >= 0"),
    ({"tile_size": 600}, InvalidArgument, "spec.tile_size"),
    ({"render_channels": -2}, InvalidArgument, "spec.render_channels"),
    ({"model": ""}, InvalidArgument, "spec.model: required"),
])
def test_top_patches_bad_spec(client, kwargs, error, match):
    args = {"model": "tiny", "layer": "/conv3/Conv_output_0", **kwargs}
    with pytest.raises(error, match=match):
        client.top_patches(args.pop("model"), args.pop("layer"), random_images(2), **args)


def test_scan_size_limits(repository, data_root):
    small = start(repository, data_root=data_root, max_scan_images=10)
    try:
        with Client(small.address, timeout=60) as c:
            with pytest.raises(ResourceExhausted, match="holds 68 images, over the server's limit of 10"):
                c.top_patches("tiny", "/conv3/Conv_output_0", dataset="demo")
            assert c.top_patches("tiny", "/conv3/Conv_output_0", dataset="demo", limit=10).images == 10
            with pytest.raises(ResourceExhausted, match="over the server's limit of 10 images"):
                c.top_patches("tiny", "/conv3/Conv_output_0", random_images(12))
            assert c.predict("tiny", random_images(1)[0], top=1)  # still serving
    finally:
        small.stop(0)


def scan_threads() -> list[str]:
    """Threads a scan starts: its job, the reader and the decode pool (``convscope-decode_<n>``)."""
    return [t.name for t in threading.enumerate()
            if t.name in ("convscope-job", "convscope-reader") or t.name.startswith("convscope-decode")]


def test_cancelling_a_scan_stops_it_and_frees_its_table(client):
    from convscope_server.forward.patches import TopActivations

    def stop(step, total, stage):
        if step >= 64:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.top_patches("tiny", "/conv3/Conv_output_0", endless_images(), k=4, progress=stop)
    deadline = time.monotonic() + 15
    while scan_threads() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not scan_threads()
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is TopActivations]
    assert client.predict("tiny", png_bytes(random_images(1)[0]), top=1)


def test_pooled_scan_reports_failures_in_index_order_and_equals_brute_force(pooled, client):
    images = random_images(45, seed=11)
    bad = {0, 7, 16, 17, 30, 44}   # around and across batch boundaries (16 per run on CPU)
    items = [(f"item-{i}", b"junk" if i in bad else image) for i, image in enumerate(images)]
    reported = []
    layer = "/conv2/Conv_output_0"
    scan = pooled.top_patches("tiny", layer, items, k=4, on_item_error=reported.append)
    assert [e.index for e in reported] == sorted(bad) == [e.index for e in scan.errors]
    assert scan.images == 45 - len(bad) and scan.skipped == len(bad)
    good = [i for i in range(45) if i not in bad]
    values = np.concatenate([client.activations("tiny", [images[i] for i in good[b: b + 16]], [layer])[layer].values
                             for b in range(0, len(good), 16)])
    expected = brute_force_top(values, 4)
    width = values.shape[3]
    for channel, hits in scan.channels.items():
        assert [(h.index, h.row * width + h.col, h.value) for h in hits] == [
            (good[i], position, value) for i, position, value in expected[channel]]
        assert all(h.id == f"item-{h.index}" for h in hits)


def test_batches_keep_index_order_stay_bounded_and_end_their_threads():
    from convscope_server.datasets import Item, batches
    from convscope_server.errors import InvalidArgument as Unreadable

    delays = np.random.default_rng(0).uniform(0, 0.003, 200)
    started: list[int] = []

    def load(i):
        def run():
            started.append(i)
            time.sleep(delays[i])  # loads finish out of order
            if i % 9 == 4:
                raise Unreadable("image", f"bad {i}")
            return np.full(2, i, np.float32)
        return run

    def items(count, then=None):
        yield from (Item(i, str(i), "", load(i)) for i in range(count))
        if then:
            raise then

    failures, seen = [], []
    for batch in batches(items(200), 8, failures.append, lambda: False, workers=4):
        assert batch.inputs[:, 0].tolist() == batch.indices
        assert max(started) - batch.indices[-1] <= 8 * 8  # a few batches ahead, not the whole set
        seen.append(batch.indices)
        time.sleep(0.01)  # a slow consumer: the reader runs as far ahead as it may
    assert [i for b in seen for i in b] == [i for i in range(200) if i % 9 != 4]
    assert all(len(b) == 8 for b in seen[:-1])
    assert [f.index for f in failures] == [i for i in range(200) if i % 9 == 4]

    stop = threading.Event()
    scan = batches(items(200), 8, failures.append, stop.is_set, workers=4)
    assert next(scan).indices == [0, 1, 2, 3, 5, 6, 7, 8]
    stop.set()
    assert list(scan) == []

    got = []
    with pytest.raises(RuntimeError, match="listing failed"):
        for batch in batches(items(20, RuntimeError("listing failed")), 8, failures.append, lambda: False, workers=3):
            got.append(batch.indices)
    delivered = [i for b in got for i in b]  # the batches before the error (loads in flight are dropped)
    assert delivered == [i for i in range(20) if i % 9 != 4][:len(delivered)]

    abandoned = batches(items(200), 8, failures.append, lambda: False, workers=3)
    next(abandoned)
    abandoned.close()
    assert not [name for name in scan_threads() if name.startswith("convscope-decode")]  # joined on close
    deadline = time.monotonic() + 5
    while scan_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scan_threads()


def _config(resize: str, mean, std, layout="NCHW", order="RGB", scale=1.0, channels=3):
    from convscope_server.repository import ModelConfig

    return ModelConfig("input", 224, 224, channels, layout, order, scale, mean, std, resize, 0.875, "logits", True,
                       None)


LITE0 = _config("stretch", (0.5,) * 3, (0.5,) * 3)                  # the default model's preprocessing
IMAGENET_CROP = _config("center_crop", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.mark.parametrize("config", [
    LITE0, IMAGENET_CROP, _config("stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "NHWC", "BGR"),
    _config("center_crop", (103.939, 116.779, 123.68), (1.0,) * 3, order="BGR", scale=255.0),
    _config("stretch", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), scale=255.0),
    _config("stretch", (0.1307,), (0.3081,), channels=1),
], ids=["lite0", "imagenet-crop", "nhwc-bgr", "caffe", "torch-255", "gray"])
def test_one_multiply_add_equals_the_preprocessing_steps(config, chelsea):
    from convscope_server.images import pixels_to_input

    pixels = chelsea.copy()
    pixels[0, :256] = np.arange(256, dtype=np.uint8)[:, None]  # every value in every channel
    image = Image.fromarray(pixels)
    # The steps as the configuration reads them (the code before they were folded into one multiply-add).
    resized = image.convert("L" if config.channels == 1 else "RGB")
    if config.resize == "center_crop":
        scale = min(config.height, config.width) / config.crop_fraction / min(resized.size)
        resized = resized.resize((round(resized.width * scale), round(resized.height * scale)), Image.BILINEAR)
        left, top = (resized.width - 224) // 2, (resized.height - 224) // 2
        resized = resized.crop((left, top, left + 224, top + 224))
    else:
        resized = resized.resize((224, 224), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32).reshape(224, 224, -1) * (config.scale / 255.0)
    if config.channel_order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
    if config.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    got = pixels_to_input(image, config)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == x.shape
    assert np.abs(got - x).max() <= 1e-6


@pytest.fixture(scope="module")
def big_jpegs() -> list[tuple[str, bytes]]:
    """Photos upscaled to 2000-4000 px, JPEG quality 90: the files draft mode is for."""
    from skimage import data

    found = []
    for name, side in (("chelsea", 3000), ("coffee", 2000), ("astronaut", 4000)):
        photo = Image.fromarray(getattr(data, name)())
        scale = side / max(photo.size)
        big = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, "JPEG", quality=90)
        found.append((name, buffer.getvalue()))
    return found


@pytest.mark.parametrize("config, max_abs, mean_abs", [(LITE0, 0.055, 0.0030), (IMAGENET_CROP, 0.103, 0.0066)],
                         ids=["lite0", "imagenet-crop"])
def test_draft_decode_stays_within_the_measured_tolerance(big_jpegs, config, max_abs, mean_abs):
    """The bounds are the worst measured over 48 photo JPEGs (docs/BENCHMARKS.md, images.py)."""
    from convscope_server.images import decode, encoded_to_input

    for name, data in big_jpegs:
        full = encoded_to_input(data, config, "image", 10**8)
        drafted = encoded_to_input(data, config, "image", 10**8, draft=True)
        difference = np.abs(drafted - full)
        assert 0 < difference.max() <= max_abs and difference.mean() <= mean_abs, name
        assert decode(data, "image", 10**8).size == Image.open(io.BytesIO(data)).size  # never drafted
    small = io.BytesIO()
    Image.fromarray(random_images(1, size=256)[0]).save(small, "JPEG")  # under 2x the input at 1/2 scale
    assert np.array_equal(encoded_to_input(small.getvalue(), config, "image", 10**8, draft=True),
                          encoded_to_input(small.getvalue(), config, "image", 10**8))


def test_scans_decode_large_jpegs_in_draft_mode_and_requests_do_not(client, big_jpegs):
    from convscope_server.images import encoded_to_input

    scan = client.top_patches(MODEL, "logits", big_jpegs, k=3)
    scanned = np.zeros((3, 1000), np.float32)
    for channel, hits in scan.channels.items():
        for hit in hits:
            scanned[hit.index, channel] = hit.value
    drafted = [encoded_to_input(data, LITE0, "image", 10**8, draft=True) for _, data in big_jpegs]
    full = [encoded_to_input(data, LITE0, "image", 10**8) for _, data in big_jpegs]
    np.testing.assert_allclose(scanned, client.activations(MODEL, drafted, ["logits"])["logits"].values,
                               rtol=1e-5, atol=1e-5)
    requested = client.activations(MODEL, [data for _, data in big_jpegs], ["logits"])["logits"].values
    np.testing.assert_allclose(requested, client.activations(MODEL, full, ["logits"])["logits"].values,
                               rtol=1e-5, atol=1e-5)  # a request decodes in full: the reference
    assert (scanned.argmax(axis=1) == requested.argmax(axis=1)).all()
