"""The CLI as a user runs it (a subprocess against a real server): the pages and pictures it writes, its errors,
exit codes and help. Checks what the pictures show (geometry, colour-bar ranges, GIF frames), not only that
files exist. Tiny models and few steps keep it quick."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes

BIN = Path(sys.executable).parent


def run(server, *args, address=None, timeout=120):
    return subprocess.run([str(BIN / "convscope"), "--server", address or server.address, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def ok(server, *args):
    result = run(server, *args)
    assert result.returncode == 0, (args, result.stderr)
    return result


def page(out: Path) -> dict:
    data = json.loads((out / "page.json").read_text())
    html = (out / "index.html").read_text()
    for figure in data["figures"]:
        assert figure["file"] in html and (out / figure["file"]).exists()
    assert "viewport" in html and "grid-template-columns" in html and "convscope " in html
    return data


@pytest.fixture(scope="module")
def photo(tmp_path_factory, chelsea) -> Path:
    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    path.write_bytes(png_bytes(chelsea))   # 451 x 300, not the model's square
    return path


def test_maps_are_drawn_in_the_photos_geometry_with_the_maps_range(server, client, tmp_path, photo, chelsea):
    out = tmp_path / "saliency"
    ok(server, "saliency", "tiny", photo, "--out", out)
    data = page(out)
    figure = data["figures"][0]
    assert data["model"] == "tiny" and "saliency tiny" in data["command"]
    assert figure["look_for"] and "|gradient|" in figure["info"]["unit"]
    assert figure["info"]["shown_shape"] == list(chelsea.shape[:2])      # the photo's own size and aspect
    expected = client.saliency("tiny", photo).map
    assert figure["info"]["colorbar"] == pytest.approx([expected.min(), expected.max()], rel=1e-5)
    width, height = Image.open(out / figure["file"]).size
    assert width >= 1000 and height >= 250                                # readable, not a 158-px strip

    out = tmp_path / "occlusion"
    ok(server, "occlusion", "tiny", photo, "--window", "8", "--stride", "4", "--out", out)
    info = page(out)["figures"][0]["info"]
    attribution = client.occlusion("tiny", photo, window=8, stride=4).attribution
    assert info["colorbar"] == pytest.approx([attribution.min(), attribution.max()], rel=1e-5, abs=1e-9)
    assert info["unit"] == "drop in target probability"


def test_gradient_pictures_are_centred_on_grey_and_say_what_they_explain(server, tmp_path, photo):
    out = tmp_path / "deconvnet"
    result = ok(server, "deconvnet", "tiny", photo, "--layer", "/conv3/Conv_output_0", "--channel", "1", "--out", out)
    assert "channel 1 of /conv3/Conv_output_0" in result.stdout and "class" not in result.stdout.split(":")[1]
    figures = page(out)["figures"]
    gradient = next(f for f in figures if f["file"].endswith("_gradient.png"))
    assert all(scale > 0 for scale in gradient["info"]["channel_scales"])
    pixels = np.asarray(Image.open(out / gradient["file"]).convert("RGB"), np.float64)
    assert pixels.std() > 5   # not a flat picture


def test_sanity_check_grid_has_labelled_rows_and_columns(server, tmp_path, photo):
    out = tmp_path / "sanity"
    result = ok(server, "sanity", "tiny", photo, "--method", "vanilla", "--method", "gradcam", "--out", out)
    assert "Spearman" in result.stdout
    info = page(out)["figures"][0]["info"]
    assert info["methods"] == ["vanilla", "gradcam"] and info["columns"]


def test_synthesis_gifs_one_per_layer_one_canvas_and_the_steps(server, tmp_path, photo):
    out = tmp_path / "invert"
    result = ok(server, "invert", "tiny", photo, "--layer", "/conv1/Conv_output_0", "--layer", "/Add_output_0",
                "--steps", "10", "--out", out)
    assert "layer 2/2" in result.stderr
    gifs = sorted(out.glob("*.gif"))
    assert len(gifs) == 2 and gifs[0].read_bytes() != gifs[1].read_bytes()
    counts = [Image.open(g).n_frames for g in gifs]
    assert counts[0] == counts[1] and 2 <= counts[0] <= 11          # its own optimisation's frames only
    assert len(page(out)["figures"][0]["info"]["panels"]) == 3      # original | two reconstructions

    out = tmp_path / "deepdream"
    ok(server, "deepdream", "tiny", photo, "--layer", "/conv3/Conv_output_0", "--steps", "4", "--octaves", "3",
       "--out", out)
    dream = Image.open(out / "deepdream.gif")
    assert dream.n_frames >= 3 and dream.size == (32, 32)            # the last octave's size, every frame on it
    dream.seek(dream.n_frames - 1)
    assert np.asarray(dream.convert("RGB")).std() > 1

    out = tmp_path / "adversarial"
    result = ok(server, "adversarial", "tiny", photo, "--target", "2", "--steps", "20", "--epsilon", "0.1",
                "--out", out)
    figure = page(out)["figures"][0]
    assert any("perturbation x" in p for p in figure["info"]["panels"]) and figure["info"]["factor"] >= 1
    steps = [f for f in out.glob("*.gif")]
    if steps:
        assert Image.open(steps[0]).n_frames >= 2

    out = tmp_path / "classvis"
    ok(server, "classvis", "tiny", "--target", "3", "--steps", "10", "--out", out)
    assert "class 3 thing 3" in page(out)["figures"][0]["caption"]


def test_failed_commands_leave_no_folder_and_exit_by_error_class(server, tmp_path, photo):
    (tmp_path / "folder").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    cases = [  # arguments, exit code, words the message must have
        (["saliency", "tiny", tmp_path / "missing.png"], 3, ["missing.png", "no such"]),
        (["saliency", "tiny", tmp_path / "folder"], 4, ["folder", "directory"]),
        (["predict", "tiny", tmp_path / "broken.png"], 4, ["broken.png", "decode"]),
        (["saliency", "no_such_model", photo], 3, ["no_such_model"]),
        (["occlusion", "tiny", photo, "--window", "-3"], 4, ["--window"]),
        (["classvis", "tiny", "--target", "1", "--steps", "10000000"], 1, ["--steps"]),
    ]
    for args, code, words in cases:
        out = tmp_path / f"out_{args[0]}_{code}"
        result = run(server, *args, *(["--out", out] if args[0] != "predict" else []))
        assert result.returncode == code, (args, result.stderr)
        assert all(w in result.stderr for w in words), (args, result.stderr)
        assert "Traceback" not in result.stderr and "BytesIO" not in result.stderr
        assert not out.exists(), args
    usage = run(server, "saliency")
    assert usage.returncode == 2


def test_unreachable_server_gives_a_hint_and_exit_5(server, tmp_path, photo):
    result = run(server, "predict", "tiny", photo, address="127.0.0.1:9", timeout=60)
    assert result.returncode == 5, result.stderr
    assert all(w in result.stderr for w in ("127.0.0.1:9", "convscope-server", "CONVSCOPE_SERVER", "--server"))


def test_every_flag_has_help_and_the_exit_codes_are_documented():
    from convscope.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, sub in subcommands.choices.items() for action in sub._actions
               if not action.help]
    missing += [a.dest for a in parser._actions if not a.help and a is not subcommands]
    assert not missing
    help_text = parser.format_help()
    for code in ("2  usage", "3  not found", "4  invalid input", "5  the server cannot be reached"):
        assert code in help_text
    assert "(default: 32)" in subcommands.choices["occlusion"].format_help()


def test_missing_matplotlib_says_how_to_install_it(server, tmp_path, photo):
    code = ("import sys; sys.modules['matplotlib'] = None; from convscope.cli import main; "
            f"sys.exit(main(['--server', '{server.address}', 'saliency', 'tiny', '{photo}', '--out', "
            f"'{tmp_path / 'x'}']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "pip install convscope[cli]" in result.stderr
    assert not (tmp_path / "x").exists()


def test_dataset_pages_patches_neighbours_and_embeddings(server, tmp_path, photo):
    out = tmp_path / "patches"
    ok(server, "patches", "tiny", "/Add_output_0", "--dataset", "demo", "--k", "4", "--rows", "4", "--out", out)
    figure = page(out)["figures"][0]
    assert len(figure["info"]["channels"]) == 4 and all(len(v) == 4 for v in figure["info"]["values"])
    hits = json.loads((out / "patches.json").read_text())["channels"]
    for channel, values in zip(figure["info"]["channels"], figure["info"]["values"]):
        assert values == pytest.approx([h["value"] for h in hits[str(channel)]])

    ok(server, "gallery", "build", "cli-pages", "tiny", "--dataset", "demo", "--overwrite")
    out = tmp_path / "neighbors"
    ok(server, "neighbors", "cli-pages", photo, "--k", "3", "--out", out)
    info = page(out)["figures"][0]["info"]
    assert len(info["feature_distances"]) == 3 and info["feature_distances"] == sorted(info["feature_distances"])

    out = tmp_path / "pca"
    ok(server, "embed", "cli-pages", "--method", "pca", "--out", out)
    info = page(out)["figures"][0]["info"]
    assert "% of the variance" in info["axis_labels"][0] and info["groups"]   # coloured by the true labels


def test_saturated_patches_warn_and_name_the_pre_activation_tensor(client):
    from convscope.dataset_cli import pre_activation, tied_channels
    from convscope.dataset_client import PatchHit, TopPatches

    hit = PatchHit(0, "a", 6.0, 0, 0, (0, 0, 1, 1), None)
    result = TopPatches("L", 2, 0, {0: [hit, hit], 1: [hit]}, b"", [0, 1], [], "")
    assert tied_channels(result) == [0]
    before = pre_activation(client, "efficientnet_lite0", "/_blocks.5/Clip_1_output_0")
    assert before and client.describe("efficientnet_lite0").layer(before).op_type != "Clip"
