"""`convscope audit` / `convscope audits` through the real CLI and server: the report site (tables,
figures, audit.json equal to the stored report), the --fail-if verdict and its exit codes."""

from __future__ import annotations

import json
import re

import pytest

from convscope import Client
from conftest import start


@pytest.fixture(scope="module")
def audit_server(repository, data_root, tmp_path_factory):
    running = start(repository, data_root=data_root, audit_root=tmp_path_factory.mktemp("audits"))
    yield running
    running.stop(0)


def test_audit_writes_a_site_and_gives_a_verdict(audit_server, tmp_path, capsys):
    from convscope.cli import main

    (tmp_path / "map.json").write_text(json.dumps({"astronaut": [834, 817], "brick": 0}))  # the first 8 images
    base = ["--server", audit_server.address]
    out = tmp_path / "site"
    code = main(base + ["audit", "efficientnet_lite0", "--dataset", "demo", "--limit", "8", "--name", "lite0",
                        "--label-map", str(tmp_path / "map.json"), "--unit-layers", "1", "--attribution-images", "1",
                        "--curve-steps", "2", "--robustness-images", "2", "--method", "occlusion",
                        "--feature-steps", "2", "--worst-images", "3",
                        "--out", str(out), "--fail-if", "accuracy > 2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "audit lite0: 8 images" in printed and "dead_units" in printed
    page = (out / "index.html").read_text()
    for heading in ("model card", "costliest layers", "which attribution methods to trust", "near-duplicate pairs"):
        assert heading in page
    with Client(audit_server.address) as client:
        assert json.loads((out / "audit.json").read_text()) == client.audit("lite0")
    figures = json.loads((out / "page.json").read_text())["figures"]
    pictures = [f["file"] for f in figures if f["file"]]
    assert {"units.png", "faithfulness.png", "robustness.png"} <= set(pictures)
    assert all((out / name).stat().st_size > 1000 for name in pictures)
    for href in re.findall(r'href="([^"]+)"', page):  # every link of the report leads to a file
        assert (out / href).is_file(), href
    assert "layers/index.html" in page and "/_conv_stem/Conv_output_0" in (out / "layers" / "index.html").read_text()
    unit_pages = sorted((out / "units").glob("*/index.html"))
    assert len(unit_pages) == 1 and str(unit_pages[0].relative_to(out)) in page  # linked from the report
    layer_page = unit_pages[0].read_text()
    channel_pages = sorted(unit_pages[0].parent.glob("channel_*/index.html"))
    assert len(channel_pages) == 8 and all(f"{c.parent.name}/index.html" in layer_page for c in channel_pages)
    for site_page in [out / "index.html", *unit_pages, *channel_pages]:  # every link of every page leads to a file
        for href in re.findall(r'(?:href|src)="([^"]+)"', site_page.read_text()):
            assert (site_page.parent / href).resolve().is_file(), (site_page, href)
    stem = json.loads((channel_pages[0].parent / "page.json").read_text())["figures"]  # the stem's ReLU6: a filter
    assert {"feature.png", "filter.png", "card.png"} <= {f["file"] for f in stem}
    assert any(f.get("table") == "neighbours" and len(f["rows"]) == 5 for f in stem)
    assert "worst.png" in pictures and "per label" in page
    assert {"duplicates.png", "outliers.png"} <= set(pictures)  # a dataset folder: its images are shown

    assert main(base + ["audits", "show", "lite0", "--out", str(tmp_path / "again"), "--fail-if", "images < 100"]) == 6
    assert "failed images < 100 (it is 8)" in capsys.readouterr().err
    assert main(base + ["audits", "list"]) == 0 and "lite0" in capsys.readouterr().out
    refused = tmp_path / "refused"
    assert main(base + ["audits", "show", "lite0", "--out", str(refused), "--fail-if", "accuracy >> 1"]) == 2
    assert main(base + ["audits", "show", "lite0", "--out", str(refused), "--fail-if", "happiness < 1"]) == 2
    assert "no metric 'happiness'" in capsys.readouterr().err
    assert not refused.exists()  # a malformed condition writes nothing
    assert main(base + ["audits", "delete", "lite0"]) == 0
    assert main(base + ["audits", "show", "lite0", "--out", str(refused)]) == 3


def test_audits_diff_compares_two_versions(audit_server, tmp_path, capsys):
    from convscope.audit_cli import diff
    from convscope.cli import main

    base = ["--server", audit_server.address]
    small = ["--unit-layers", "1", "--attribution-images", "1", "--curve-steps", "2", "--robustness-images", "2",
             "--method", "vanilla", "--out", str(tmp_path / "site")]
    assert main(base + ["audit", "tiny", "--dataset", "demo", "--limit", "4", "--name", "v1", *small]) == 0
    assert main(base + ["audit", "tiny", "--dataset", "demo", "--limit", "8", "--name", "v2", *small]) == 0
    capsys.readouterr()
    assert main(base + ["audits", "diff", "v1", "v2", "--out", str(tmp_path / "diff")]) == 0
    printed = capsys.readouterr().out
    assert "images" in printed and "vanilla" in printed
    changes = json.loads((tmp_path / "diff" / "diff.json").read_text())
    assert changes["metrics"]["images"] == {"first": 4, "second": 8, "change": 4}
    # the same model on the same sampled image: its vanilla map has not drifted at all
    drift = changes["attribution_drift"]["vanilla"]
    assert sum(g["images"] for g in drift.values()) == 1
    assert all(g["mean_spearman"] == pytest.approx(1.0) for g in drift.values())
    assert main(base + ["audits", "diff", "v1"]) == 2

    # units that died and came alive, on two reports that differ only there
    first = {"units": {"L": {"dead": [1, 2], "saturating": [], "mean": [], "max": []}}}
    second = {"units": {"L": {"dead": [2, 5], "saturating": [], "mean": [], "max": []}}}
    assert diff(first, second)["units"] == {"L": {"died": [5], "revived": [1]}}
    assert diff(first, second)["metrics"]["dead_units"]["change"] == 0


def test_spearman_equals_scipy_with_ties():
    from scipy.stats import spearmanr

    from convscope.audit_cli import spearman

    rng = __import__("numpy").random.default_rng(4)
    a = rng.integers(0, 5, 40).astype(float).tolist()
    b = (rng.integers(0, 5, 40) + rng.normal(size=40)).tolist()
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1.0] * 5, b[:5]) is None
