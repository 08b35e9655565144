"""Galleries, nearest neighbours and embeddings: against scikit-learn, persistence, corrupt files, bad input."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness
from sklearn.neighbors import NearestNeighbors

from convscope import AlreadyExists, Client, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from conftest import start
from convscope_server.galleries import GalleryWriter, read_gallery
from test_datasets import endless_images, random_images

MODEL = "efficientnet_lite0"
PENULTIMATE = "/Flatten_output_0"   # the input of the classifier (Gemm)


@pytest.fixture(scope="module")
def demo_files(data_root):
    return sorted((data_root / "demo").rglob("*.jpg"))


@pytest.fixture(scope="module")
def demo_gallery(server, demo_files):
    with Client(server.address, timeout=120) as c:
        steps = []
        info = c.build_gallery("demo-lite0", MODEL, dataset="demo", overwrite=True,
                               progress=lambda step, total, stage: steps.append((step, total, stage)))
    assert steps and steps[-1][0] == len(demo_files) and all(total == len(demo_files) for _, total, _ in steps)
    return info


@pytest.fixture(scope="module")
def reference_codes(server, demo_files):
    """The penultimate codes of every demo file, through Activations (not the gallery)."""
    with Client(server.address, timeout=120) as c:
        return np.concatenate([c.activations(MODEL, [f.read_bytes() for f in demo_files[i: i + 32]],
                                             [PENULTIMATE])[PENULTIMATE].values
                               for i in range(0, len(demo_files), 32)]).astype(np.float64)


def reference_thumbnail(encoded_or_pixels, side: int = 64) -> np.ndarray:
    """The model's preprocessing (stretch to 224, bilinear) then a side x side thumbnail, with Pillow."""
    image = encoded_or_pixels if isinstance(encoded_or_pixels, Image.Image) else Image.open(encoded_or_pixels)
    return np.asarray(image.convert("RGB").resize((224, 224), Image.BILINEAR).resize((side, side), Image.BILINEAR))


def test_gallery_is_built_from_the_demo_dataset(demo_gallery, demo_files, data_root):
    assert demo_gallery.ready and demo_gallery.error == ""
    assert (demo_gallery.size, demo_gallery.dim, demo_gallery.layer) == (len(demo_files), 1280, PENULTIMATE)
    assert demo_gallery.source == "demo" and demo_gallery.thumbnail_size == 64 and demo_gallery.file_bytes > 0


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_neighbours_equal_scikit_learn(client, demo_gallery, demo_files, reference_codes, chelsea, metric):
    found = client.nearest_neighbors("demo-lite0", chelsea, k=6, metric=metric, render=True)
    query_code = client.activations(MODEL, [chelsea], [PENULTIMATE])[PENULTIMATE].values.astype(np.float64)
    sk_metric = "euclidean" if metric == "l2" else "cosine"
    knn = NearestNeighbors(n_neighbors=6, algorithm="brute", metric=sk_metric).fit(reference_codes)
    distances, indices = knn.kneighbors(query_code)
    assert [n.index for n in found.feature] == indices[0].tolist()
    np.testing.assert_allclose([n.distance for n in found.feature], distances[0], rtol=1e-4, atol=1e-6)
    names = [f.relative_to(demo_files[0].parents[1]).as_posix() for f in demo_files]
    assert [n.id for n in found.feature] == [names[i] for i in indices[0]]
    assert [n.label for n in found.feature] == [names[i].split("/")[0] for i in indices[0]]
    assert found.feature[0].label == "cat"  # crops of chelsea are in the demo set
    assert found.query_predicted == 285 and "cat" in found.query_predicted_label.lower()

    pixels = np.stack([reference_thumbnail(f).reshape(-1) for f in demo_files]).astype(np.float64)
    query_pixels = reference_thumbnail(Image.fromarray(chelsea)).reshape(1, -1).astype(np.float64)
    knn = NearestNeighbors(n_neighbors=6, algorithm="brute", metric=sk_metric).fit(pixels)
    distances, indices = knn.kneighbors(query_pixels)
    assert [n.index for n in found.pixel] == indices[0].tolist()
    np.testing.assert_allclose([n.distance for n in found.pixel], distances[0], rtol=1e-4, atol=1e-6)
    grid = np.asarray(Image.open(io.BytesIO(found.grid_png)))
    assert grid.shape == (2 * 64 + 3 * 3, 7 * 64 + 8 * 3, 3)


def test_gallery_codes_and_predictions_match_the_model(client, demo_gallery, demo_files, reference_codes):
    """Querying with a gallery image finds that image at distance ~0, and its stored prediction is the
    model's top-1 for it."""
    for index in (0, 33, len(demo_files) - 1):
        found = client.nearest_neighbors("demo-lite0", demo_files[index].read_bytes(), k=1)
        assert found.feature[0].index == index and found.feature[0].distance < 1e-3
        assert found.pixel[0].index == index and found.pixel[0].distance < 1e-3
        assert found.feature[0].predicted == client.predict(MODEL, demo_files[index].read_bytes(), top=1)[0].index


def test_pca_equals_scikit_learn(client, demo_gallery, reference_codes):
    result = client.embedding("demo-lite0", "pca", render=True)
    expected = PCA(n_components=2, svd_solver="full").fit(reference_codes)
    coordinates = expected.transform(reference_codes)
    signs = np.sign((result.coordinates * coordinates).sum(axis=0))  # components are defined up to sign
    np.testing.assert_allclose(result.coordinates * signs, coordinates, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(result.explained_variance_ratio, expected.explained_variance_ratio_, rtol=1e-4)
    assert result.indices == list(range(68)) and result.scatter_png.startswith(b"\x89PNG")


def test_tsne_keeps_neighbourhoods_and_streams_progress(client, demo_gallery, reference_codes):
    steps = []
    result = client.embedding("demo-lite0", "tsne", iterations=400, seed=1, render=True, grid_size=9,
                              progress=lambda step, total, stage: steps.append((step, total, stage)))
    assert steps and steps[-1][:2] == (400, 400) and {s[2] for s in steps} == {"t-SNE"}
    assert result.coordinates.shape == (68, 2) and np.isfinite(result.kl_divergence)
    assert trustworthiness(reference_codes, result.coordinates, n_neighbors=5) > 0.9
    # crops of one photo stay together: most points' nearest 2-D neighbour has the same label
    labels = np.array(result.labels)
    knn = NearestNeighbors(n_neighbors=2).fit(result.coordinates)
    nearest = knn.kneighbors(result.coordinates, return_distance=False)[:, 1]
    assert (labels[nearest] == labels).mean() > 0.7
    grid = np.asarray(Image.open(io.BytesIO(result.grid_png)))
    assert grid.shape == (9 * 64, 9 * 64, 3)


def test_gallery_from_streamed_images_keeps_ids_labels_and_skips_bad_items(client):
    images = random_images(5, size=48)
    items = [("a", images[0], "left"), ("b", b"garbage", "left"), ("c", images[1], "right"),
             ("d", images[2], "right")]
    info = client.build_gallery("streamed-tiny", "tiny", items, overwrite=True, thumbnail_size=16)
    assert (info.size, info.dim, info.source, info.model) == (3, 16, "stream", "tiny")
    assert [(e.index, e.id) for e in info.errors] == [(1, "b")]
    found = client.nearest_neighbors("streamed-tiny", images[1], k=3)
    assert found.feature[0].id == "c" and found.feature[0].label == "right"
    assert sorted(n.id for n in found.feature) == ["a", "c", "d"]


def test_galleries_persist_and_corrupt_files_are_reported(repository, data_root, tmp_path):
    root = tmp_path / "galleries"
    first = start(repository, data_root=data_root, gallery_root=root)
    try:
        with Client(first.address, timeout=120) as c:
            c.build_gallery("good", "tiny", dataset="demo", limit=20)
            before = c.nearest_neighbors("good", random_images(1)[0], k=4)
    finally:
        first.stop(0)
    assert sorted(p.name for p in root.iterdir()) == ["good.gallery"]  # no temporary files left
    data = (root / "good.gallery").read_bytes()
    (root / "truncated.gallery").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (root / "flipped.gallery").write_bytes(bytes(flipped))
    (root / "junk.gallery").write_bytes(b"hello")
    second = start(repository, data_root=data_root, gallery_root=root)
    try:
        with Client(second.address, timeout=120) as c:
            listed = {g.name: g for g in c.galleries()}
            assert listed["good"].ready and listed["good"].size == 20
            assert "truncated" in listed["truncated"].error and not listed["truncated"].ready
            assert "checksum" in listed["flipped"].error
            assert "bad magic" in listed["junk"].error
            with pytest.raises(FailedPrecondition, match="truncated"):
                c.nearest_neighbors("truncated", random_images(1)[0])
            after = c.nearest_neighbors("good", random_images(1)[0], k=4)
            assert after == before
            c.delete_gallery("flipped")
            assert "flipped" not in {g.name for g in c.galleries()}
    finally:
        second.stop(0)
    assert not (root / "flipped.gallery").exists()


def test_a_replaced_model_makes_its_galleries_unusable(data_root, tmp_path, repository):
    models = tmp_path / "models"
    shutil.copytree(repository / "tiny", models / "tiny")
    root = tmp_path / "galleries"
    running = start(models, data_root=data_root, gallery_root=root)
    try:
        with Client(running.address, timeout=60) as c:
            c.build_gallery("g", "tiny", random_images(6))
    finally:
        running.stop(0)
    shutil.copy(repository / "tiny_fixed_batch" / "model.onnx", models / "tiny" / "model.onnx")
    running = start(models, data_root=data_root, gallery_root=root)
    try:
        with Client(running.address, timeout=60) as c:
            (gallery,) = c.galleries()
            assert not gallery.ready and "different version" in gallery.error
            with pytest.raises(FailedPrecondition, match="rebuild"):
                c.nearest_neighbors("g", random_images(1)[0])
    finally:
        running.stop(0)


def test_gallery_names_and_overwrite(client):
    client.build_gallery("twice", "tiny", random_images(4))
    with pytest.raises(AlreadyExists, match="set overwrite"):
        client.build_gallery("twice", "tiny", random_images(4))
    assert client.build_gallery("twice", "tiny", random_images(6), overwrite=True).size == 6
    for bad in ("../evil", ".hidden", "a/b", "", "x" * 200):
        with pytest.raises(InvalidArgument, match="spec.name"):
            client.build_gallery(bad, "tiny", random_images(2))


@pytest.mark.parametrize("call, error, match", [
    (lambda c: c.nearest_neighbors("nope", random_images(1)[0]), NotFound, "gallery: unknown gallery"),
    (lambda c: c.nearest_neighbors("twice", random_images(1)[0], k=101), ResourceExhausted, "k: 101"),
    (lambda c: c.nearest_neighbors("twice", b"junk"), InvalidArgument, "image.encoded: cannot decode"),
    (lambda c: c.embedding("twice", iterations=10), InvalidArgument, "iterations"),
    (lambda c: c.embedding("twice", iterations=5000), ResourceExhausted, "iterations"),
    (lambda c: c.embedding("twice", grid_size=100), InvalidArgument, "grid_size"),
    (lambda c: c.embedding("twice", max_points=3), InvalidArgument, "4 or more"),
    (lambda c: c.embedding("twice", perplexity=-1), InvalidArgument, "perplexity"),
    (lambda c: c.build_gallery("g2", "tiny", random_images(2), thumbnail_size=300), InvalidArgument,
     "spec.thumbnail_size"),
    (lambda c: c.build_gallery("g2", "", random_images(2)), InvalidArgument, "spec.model: required"),
    (lambda c: c.build_gallery("g2", "tiny", random_images(2), layer="/conv3/Conv_outptu_0"), NotFound,
     "spec.layer"),
    (lambda c: c.build_gallery("g2", "tiny", [b"junk"]), InvalidArgument, "no readable images"),
    (lambda c: c.delete_gallery("never-built"), NotFound, "name"),
])
def test_gallery_bad_input(client, call, error, match):
    if not any(g.name == "twice" for g in client.galleries()):
        client.build_gallery("twice", "tiny", random_images(6))
    with pytest.raises(error, match=match):
        call(client)
    assert "g2" not in {g.name for g in client.galleries()}  # failed builds leave nothing behind


def test_embedding_point_limit(repository, data_root, tmp_path):
    small = start(repository, data_root=data_root, gallery_root=tmp_path, max_embed_points=10)
    try:
        with Client(small.address, timeout=60) as c:
            c.build_gallery("g", "tiny", random_images(12))
            with pytest.raises(ResourceExhausted, match="max_points"):
                c.embedding("g", "pca")
            assert len(c.embedding("g", "pca", max_points=10).indices) == 10
    finally:
        small.stop(0)


def test_cancelling_a_gallery_build_leaves_nothing(client, server):
    def stop(step, total, stage):
        if step >= 48:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.build_gallery("cancelled", "tiny", endless_images(), progress=stop)
    def leftovers():
        return [p for p in server.config.gallery_root.iterdir() if p.name.startswith(".")]

    deadline = time.monotonic() + 15  # the job notices the cancellation between batches, then cleans up
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "cancelled" not in {g.name for g in client.galleries()}
    assert not leftovers()
    assert client.build_gallery("cancelled", "tiny", random_images(3)).size == 3  # the name is free again


def test_cli_dataset_commands(server, tmp_path, capsys):
    from convscope.cli import main

    photos = tmp_path / "photos"
    for label, seed in (("noise", 1), ("blocks", 2)):
        (photos / label).mkdir(parents=True)
        for i, image in enumerate(random_images(4, seed=seed, size=40)):
            Image.fromarray(image).save(photos / label / f"{i}.png")
    base = ["--server", server.address]
    assert main(base + ["datasets"]) == 0
    assert "demo" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(base + ["patches", MODEL, "/_blocks.5/Clip_1_output_0", "--dataset", "demo", "--k", "4",
                        "--rows", "6", "--out", str(out / "patches")]) == 0
    assert "68 images scanned" in capsys.readouterr().out
    assert (out / "patches" / "index.html").exists() and (out / "patches" / "patches.json").exists()
    assert main(base + ["gallery", "build", "cli-tiny", "tiny", str(photos), "--overwrite"]) == 0
    assert "gallery cli-tiny: 8 images" in capsys.readouterr().out
    assert main(base + ["gallery", "list"]) == 0
    assert "cli-tiny" in capsys.readouterr().out
    query = photos / "noise" / "0.png"
    assert main(base + ["neighbors", "cli-tiny", str(query), "--k", "3", "--out", str(out / "nn")]) == 0
    printed = capsys.readouterr().out
    assert f"{query.as_posix()}" in printed and "noise" in printed
    assert main(base + ["embed", "cli-tiny", "--method", "pca", "--grid", "3", "--out", str(out / "embed")]) == 0
    assert (out / "embed" / "pca_coordinates.csv").read_text().count("\n") == 9
    assert main(base + ["gallery", "delete", "cli-tiny"]) == 0
    assert main(base + ["patches", MODEL, "/nope", "--dataset", "demo"]) == 3  # not found (convscope --help)
    assert "NOT_FOUND" in capsys.readouterr().err


# -- housekeeping: a shared root, files changing on disk --------------------------------------------------

HOLD_LOCK = ("import fcntl, sys; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
             "print('locked', flush=True); sys.stdin.read()")


def test_start_up_removes_only_its_own_files_whose_owner_is_gone(repository, data_root, tmp_path):
    root = tmp_path / "galleries"
    root.mkdir()
    users = {".gitignore": b"*\n", ".env": b"TOKEN=1\n", ".notes": b"remember", "notes.txt": b"x",
             ".codes-k2j3h4": b"looks like an old temporary name", ".convscope-tmp-notes": b"not ours either"}
    for name, data in users.items():
        (root / name).write_bytes(data)
    (root / ".git").mkdir()
    dead = [".convscope-tmp-999999-0123456789abcdef.codes.tmp", ".convscope-tmp-999999-0123456789abcdef.gallery.tmp",
            ".convscope-build-old.lock"]
    live = ".convscope-tmp-4242-fedcba9876543210.thumbs.tmp"
    for name in dead + [live]:
        (root / name).write_bytes(b"partial")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root / live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start(repository, data_root=data_root, gallery_root=root).stop(0)
        assert {p.name for p in root.iterdir()} == set(users) | {".git", live}
    finally:
        holder.stdin.close()
        holder.wait(10)
    start(repository, data_root=data_root, gallery_root=root).stop(0)  # its owner is gone now
    assert {p.name for p in root.iterdir()} == set(users) | {".git"}
    assert all((root / name).read_bytes() == data for name, data in users.items())


def test_two_servers_share_a_gallery_root(repository, data_root, tmp_path):
    root = tmp_path / "galleries"
    images = random_images(80, seed=3)
    resume = threading.Event()
    checked = []
    first = start(repository, data_root=data_root, gallery_root=root)
    second = None

    def items():
        for i, image in enumerate(images):
            if i == 40:
                resume.wait(60)  # the first build stays in progress until the second server has had its go
            yield f"img{i}", image, "x"

    def progress(step, total, stage):
        nonlocal second
        if checked:
            return
        try:
            assert not resume.is_set()
            building = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
            assert building  # the build's lock and temporary files
            second = start(repository, data_root=data_root, gallery_root=root)
            assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == building
            with Client(second.address, timeout=60) as c:
                with pytest.raises(AlreadyExists, match="being built by another server"):
                    c.build_gallery("shared", "tiny", random_images(3), overwrite=True)
                assert c.build_gallery("other", "tiny", random_images(5)).size == 5  # meanwhile
            checked.append(step)
        finally:
            resume.set()

    try:
        with Client(first.address, timeout=120) as c1:
            info = c1.build_gallery("shared", "tiny", items(), progress=progress)
            assert checked and info.size == 80
            assert c1.nearest_neighbors("other", random_images(5)[3], k=1).feature[0].index == 3
            with Client(second.address, timeout=60) as c2:
                assert {g.name for g in c2.galleries() if g.ready} == {"shared", "other"}
                assert c2.nearest_neighbors("shared", images[50], k=1).feature[0].id == "img50"
                with pytest.raises(AlreadyExists, match="set overwrite"):
                    c2.build_gallery("shared", "tiny", random_images(3))
    finally:
        first.stop(0)
        if second is not None:
            second.stop(0)
    assert sorted(p.name for p in root.iterdir()) == ["other.gallery", "shared.gallery"]


def gallery_bytes(staging, header, codes, thumbnails) -> bytes:
    """A valid gallery file with ``header``'s metadata, ids, labels and predictions and other arrays."""
    staging.mkdir(exist_ok=True)
    writer = GalleryWriter(staging, codes.shape[1], thumbnails.shape[1])
    writer.add(codes, thumbnails, header["ids"], header["labels"], header["predicted"])
    meta = {key: header[key] for key in ("model", "model_fingerprint", "layer", "source", "created")}
    writer.finish(staging / "out.gallery", meta)
    return (staging / "out.gallery").read_bytes()


def test_a_gallery_file_changed_on_disk_is_verified_again(repository, data_root, tmp_path):
    root, staging = tmp_path / "galleries", tmp_path / "staging"
    a_images, b_images = random_images(6, seed=11), random_images(9, seed=12)
    running = start(repository, data_root=data_root, gallery_root=root)
    try:
        with Client(running.address, timeout=60) as c:
            c.build_gallery("a", "tiny", [(f"a{i}", x, "a") for i, x in enumerate(a_images)])
            c.build_gallery("b", "tiny", [(f"b{i}", x, "b") for i, x in enumerate(b_images)])
            assert c.nearest_neighbors("a", b_images[2], k=3).feature[0].id.startswith("a")  # mapped, norms cached
            path = root / "a.gallery"
            original, other = path.read_bytes(), (root / "b.gallery").read_bytes()

            # Rewritten in place (same inode) with another valid gallery: served as the new file, whose
            # header and offsets differ (the old mapping read codes at the old offsets: NaN, wrong rows).
            path.write_bytes(other)
            found = c.nearest_neighbors("a", b_images[2], k=3)
            assert found == c.nearest_neighbors("b", b_images[2], k=3)
            assert found.feature[0].id == "b2" and found.feature[0].distance < 1e-3
            assert {g.name: g.size for g in c.galleries()} == {"a": 9, "b": 9}

            # Same inode, same size, one byte flipped: noticed by its modification time.
            flipped = bytearray(other)
            flipped[-100] ^= 0xFF  # a thumbnail byte
            time.sleep(0.05)  # past the file system's timestamp granularity (see the module docstring)
            path.write_bytes(bytes(flipped))
            with pytest.raises(FailedPrecondition, match="checksum"):
                c.nearest_neighbors("a", b_images[2])

            path.write_bytes(b"garbage")
            with pytest.raises(FailedPrecondition, match="bad magic"):
                c.nearest_neighbors("a", b_images[2])
            with pytest.raises(FailedPrecondition, match="bad magic"):
                c.embedding("a", "pca")
            listed = {g.name: g for g in c.galleries()}
            assert not listed["a"].ready and "bad magic" in listed["a"].error and listed["b"].ready

            good = read_gallery(root / "b.gallery", "b")
            codes = np.asarray(good.codes).copy()
            codes[3, 5] = np.nan
            (staging / "nan.gallery").write_bytes(gallery_bytes(staging, good.header, codes,
                                                                np.asarray(good.thumbnails)))
            os.replace(staging / "nan.gallery", path)
            with pytest.raises(FailedPrecondition, match="NaN"):
                c.nearest_neighbors("a", b_images[2])

            (staging / "good.gallery").write_bytes(original)
            os.replace(staging / "good.gallery", path)  # back without a restart
            found = c.nearest_neighbors("a", a_images[4], k=1)
            assert (found.feature[0].id, found.pixel[0].id) == ("a4", "a4") and found.feature[0].distance < 1e-3

            path.unlink()
            with pytest.raises(NotFound, match="unknown gallery 'a'"):
                c.nearest_neighbors("a", a_images[4])
            assert [g.name for g in c.galleries()] == ["b"]
    finally:
        running.stop(0)


def test_a_build_refused_by_a_full_job_queue_frees_its_name(repository, data_root, tmp_path):
    """BuildGallery takes its name before its job starts; a build the job gate refuses (one job at a time,
    a short queue) must give the name back, so the same build succeeds once the server is free."""
    running = start(repository, data_root=data_root, gallery_root=tmp_path / "galleries", max_concurrent_jobs=1,
                    max_queued_jobs=1, queue_seconds=0.3)
    release = threading.Event()

    def held_images():
        yield from random_images(2)
        release.wait(30)  # the first build's job holds the only job slot until then

    try:
        with Client(running.address, timeout=60) as client:
            first = threading.Thread(target=lambda: client.build_gallery("first", "tiny", held_images()))
            first.start()
            deadline = time.monotonic() + 15
            while streaming_jobs() < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            with pytest.raises(ResourceExhausted, match="max-concurrent-jobs|max-queued-jobs|queue"):
                client.build_gallery("second", "tiny", random_images(3))
            release.set()
            first.join(30)
            assert client.build_gallery("second", "tiny", random_images(3)).size == 3
    finally:
        release.set()
        running.stop(0)


def streaming_jobs() -> int:
    from convscope_server.api.streaming import running_jobs

    return running_jobs()
