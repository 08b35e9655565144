"""Dataset folders as people have them: names that are not UTF-8, hidden files, symlinked folders (inside,
outside, a loop), a FIFO with an image name, a file far larger than any image, mixed-case names. Every
entry is scanned or reported (nothing dropped in silence, nothing hangs), ids and labels are valid text,
the order is sorted paths, and ListDatasets counts what the scan goes through. Real server and client."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from convscope import Client, InvalidArgument
from conftest import png_bytes, start

LAYER = "/conv3/Conv_output_0"
MAX_PIXELS = 20_000          # the server's pixel limit here: files over 20,000 * 8 + 1 MiB bytes are refused


def picture(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("folders")
    root, outside = base / "root", base / "outside"
    outside.mkdir()
    (outside / "far.png").write_bytes(picture(99))
    mixed = root / "mixed"
    for relative, seed in [("B.png", 1), ("a.png", 2), ("b/x.png", 3), ("b/y/z.png", 4), ("b.png", 5),
                           ("c/C.JPG", 6), ("c/d.jfif", 7)]:
        (mixed / relative).parent.mkdir(parents=True, exist_ok=True)
        (mixed / relative).write_bytes(picture(seed))
    os.makedirs(os.path.join(os.fsencode(mixed), b"caf\xe9"))                        # a label that is not UTF-8
    Path(os.fsdecode(os.path.join(os.fsencode(mixed), b"caf\xe9", b"n\xefet.png"))).write_bytes(picture(8))
    (mixed / ".hidden.png").write_bytes(picture(9))                                 # hidden: not in the dataset
    (mixed / ".git").mkdir()
    (mixed / ".git" / "pic.png").write_bytes(picture(10))
    (mixed / "inner").symlink_to(mixed / "b", target_is_directory=True)             # followed
    (mixed / "loop").symlink_to(mixed, target_is_directory=True)                    # a loop: reported
    (mixed / "out").symlink_to(outside, target_is_directory=True)                   # leaves the root: reported
    os.mkfifo(mixed / "pipe.png")                                                   # would block a read
    (mixed / "zhuge.png").write_bytes(b"\x89PNG" + bytes(MAX_PIXELS * 8 + (1 << 20)))  # over the size bound
    (root / "only_bad").mkdir()
    (root / "only_bad" / "x.png").write_bytes(b"not a png")
    (root / ".secret").mkdir()
    (root / ".secret" / "s.png").write_bytes(picture(11))
    return root


@pytest.fixture(scope="module")
def client(repository, root, tmp_path_factory):
    server = start(repository, data_root=root, max_image_pixels=MAX_PIXELS,
                   gallery_root=tmp_path_factory.mktemp("folder-galleries"))
    with Client(server.address, timeout=60) as connected:
        yield connected
    server.stop(0)


EXPECTED_ORDER = ["B.png", "a.png", "b/x.png", "b/y/z.png", "b.png", "c/C.JPG", "c/d.jfif", "caf\\xe9/n\\xefet.png",
                  "inner/x.png", "inner/y/z.png", "loop/", "out/", "pipe.png", "zhuge.png"]
READABLE = [i for i, name in enumerate(EXPECTED_ORDER) if name.endswith((".png", ".JPG", ".jfif"))
            and name not in ("pipe.png", "zhuge.png")]


def test_every_entry_is_scanned_or_reported_in_sorted_path_order(client):
    errors = []
    scan = client.top_patches("tiny", LAYER, dataset="mixed", k=20, on_item_error=errors.append)
    assert scan.images == len(READABLE) == 10 and scan.skipped == 4
    hits = {(h.index, h.id) for hits in scan.channels.values() for h in hits}
    assert hits == {(i, EXPECTED_ORDER[i]) for i in READABLE}   # k = 20 > 10: every readable image is a hit
    reasons = {e.id: e.reason for e in errors}
    assert [e.index for e in errors] == [EXPECTED_ORDER.index(name) for name in ("loop/", "out/", "pipe.png",
                                                                                 "zhuge.png")]
    assert "loop" in reasons["loop/"] and "outside the data root" in reasons["out/"]
    assert "FIFO" in reasons["pipe.png"] and "not a regular file" in reasons["pipe.png"]
    assert "bytes, over the" in reasons["zhuge.png"] and "--max-image-pixels" in reasons["zhuge.png"]


def test_list_datasets_counts_what_the_scan_goes_through(client):
    found = {d.name: d for d in client.datasets()}
    assert set(found) == {"mixed", "only_bad"}   # .secret is hidden
    assert found["mixed"].images == len(EXPECTED_ORDER)
    assert found["mixed"].labels == ["b", "c", "caf\\xe9", "inner"]   # labels of the items it holds


def test_a_gallery_keeps_valid_text_ids_and_labels(client):
    gallery = client.build_gallery("mixed-codes", "tiny", dataset="mixed", overwrite=True)
    assert gallery.size == len(READABLE)
    near = client.nearest_neighbors("mixed-codes", picture(8), k=len(READABLE))
    assert "caf\\xe9/n\\xefet.png" in [n.id for n in near.feature]
    assert "caf\\xe9" in {n.label for n in near.feature}


def test_nothing_readable_is_an_error_naming_the_first_reason(client):
    with pytest.raises(InvalidArgument, match=r"spec.source: no readable images: all 1 items failed \(the first, "
                                              r"x.png: .*cannot decode"):
        client.top_patches("tiny", LAYER, dataset="only_bad")


@pytest.mark.parametrize("name", [".secret", ".", "mixed/.git"])
def test_hidden_folders_and_the_root_are_not_datasets(client, name):
    with pytest.raises(InvalidArgument, match="spec.source.dataset"):
        client.top_patches("tiny", LAYER, dataset=name)


def test_the_cli_streams_a_folder_by_the_same_rules(root, tmp_path):
    from convscope.dataset_cli import local_images

    files = local_images([str(root / "mixed" / "c"), str(root / "mixed" / "b")])
    assert [Path(path).name for _, path, _ in files] == ["C.JPG", "d.jfif", "x.png", "z.png"]
    named = local_images([os.fsdecode(os.path.join(os.fsencode(root / "mixed"), b"caf\xe9"))])
    assert named[0][0].endswith("caf\\xe9/n\\xefet.png")
    assert not [p for _, p, _ in local_images([str(root / "mixed")]) if any(s.startswith(".") for s in p.parts[-2:])]
