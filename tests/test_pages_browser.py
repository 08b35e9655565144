"""The pages the CLI writes, opened in a real browser (headless Chromium): every <img> loads (complete, with a
natural size) and is laid out with a non-empty box, and the screenshot is not blank, the images' own regions
included.

Skipped, with the reason, where no Chromium is installed (scripts/setup installs Debian's `chromium` on the
test path when it runs as root with apt-get; CONVSCOPE_BROWSER names another binary). The test knows only
that a page is an .html file whose <img> tags point at files beside it: it globs the output folders."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import png_bytes

BIN = Path(sys.executable).parent
WIDTH, HEIGHT = 1280, 2000
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    named = os.environ.get("CONVSCOPE_BROWSER")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((found for found in map(shutil.which, CANDIDATES) if found), None)


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason=f"no headless browser found (looked for {', '.join(CANDIDATES)} on PATH and "
                            "CONVSCOPE_BROWSER); install Debian's chromium, as scripts/setup does when run as root")

# Appended to a copy of the page, beside it so relative sources resolve: lazy images are made eager, and once
# the page has loaded every image is described in a hidden <pre> that --dump-dom prints (written synchronously
# in the load handler: --dump-dom does not wait for promises such as img.decode()).
CHECK_ID = "convscope-browser-check"
CHECK_SCRIPT = """
<script>
(function () {
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (img) { img.loading = "eager"; });
  window.addEventListener("load", function () {
    var out = document.createElement("pre");
    out.id = "%s";
    out.hidden = true;
    out.textContent = JSON.stringify(images.map(function (img) {
      var box = img.getBoundingClientRect();
      return {src: img.getAttribute("src"), complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
              box: [box.left + window.scrollX, box.top + window.scrollY, box.width, box.height]};
    }));
    document.body.appendChild(out);
  });
})();
</script>
""" % CHECK_ID


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [BROWSER, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
               "--disable-dev-shm-usage", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", *args]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def errors(result: subprocess.CompletedProcess) -> str:
    """Chromium's stderr without the D-Bus complaints every headless run makes in a container."""
    return "\n".join(line for line in result.stderr.splitlines() if "dbus" not in line)[-2000:]


def browser_check(page: Path, work: Path) -> tuple[list[dict], np.ndarray]:
    """Open ``page`` in headless Chromium: what each <img> became once the page loaded, and a screenshot
    (HEIGHTxWIDTHx3 uint8) of the first WIDTHxHEIGHT CSS pixels."""
    work.mkdir(parents=True, exist_ok=True)
    copy = page.with_name(f".browser-check-{page.stem}.html")
    copy.write_text(page.read_text(encoding="utf-8") + CHECK_SCRIPT, encoding="utf-8")
    try:
        shot = work / f"{page.stem}.png"
        dumped = chromium("--dump-dom", copy.as_uri(), profile=work / "profile-dom")
        taken = chromium(f"--screenshot={shot}", copy.as_uri(), profile=work / "profile-shot")
        found = re.search(rf'id="{CHECK_ID}"[^>]*>(.*?)</pre>', dumped.stdout, re.S)
        assert found, (f"{page}: the check script never reported (exit {dumped.returncode}); "
                       f"stderr: {errors(dumped)}")
        images = json.loads(html.unescape(found.group(1)))
        assert shot.exists(), f"{page}: no screenshot (exit {taken.returncode}): {errors(taken)}"
        return images, np.asarray(Image.open(shot).convert("RGB"))
    finally:
        copy.unlink(missing_ok=True)


def broken_images(images: list[dict]) -> list[str]:
    return [f"{image['src']} (complete={image['complete']}, natural={image['natural']}, box={image['box']})"
            for image in images if not (image["complete"] and min(image["natural"]) > 0
                    and min(image["box"][2:]) > 0)]


def painted_regions(images: list[dict], shot: np.ndarray) -> list[np.ndarray]:
    """The screenshot's pixels under each image that lies (at least 8x8 of it) in the captured viewport."""
    regions = []
    for image in images:
        left, top, width, height = image["box"]
        x0, y0 = max(int(round(left)), 0), max(int(round(top)), 0)
        x1, y1 = min(int(round(left + width)), shot.shape[1]), min(int(round(top + height)), shot.shape[0])
        if x1 - x0 >= 8 and y1 - y0 >= 8:
            regions.append(shot[y0:y1, x0:x1])
    return regions


def assert_page_renders(page: Path, work: Path) -> None:
    images, shot = browser_check(page, work)
    text_only = "<table>" in page.read_text()  # a page of tables (an audit's layer table) may have no picture
    assert images or text_only, f"{page}: no <img> on the page"
    broken = broken_images(images)
    assert not broken, f"{page}: images that did not load: {broken}"
    assert shot.shape[:2] == (HEIGHT, WIDTH), shot.shape
    colours = len(np.unique(shot.reshape(-1, 3), axis=0))
    assert shot.std() > 5 and colours > 16, f"{page}: the screenshot is blank (std {shot.std():.1f}, {colours} colours)"
    if not images:
        return
    regions = painted_regions(images, shot)
    assert regions, f"{page}: no image lies in the first {WIDTH}x{HEIGHT} pixels: {[i['box'] for i in images]}"
    spread = [float(region.std()) for region in regions]
    assert max(spread) > 2, f"{page}: every image on screen is painted as one flat colour (std {spread})"


@pytest.fixture(scope="session")  # session: probed before the session-scoped server starts
def browser(tmp_path_factory) -> str:
    """The browser, once it is known to start headless here (a snap stub or missing libraries skip)."""
    profile = tmp_path_factory.mktemp("browser-probe")
    try:
        probe = chromium("--dump-dom", "about:blank", profile=profile)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"{BROWSER} does not start headless: {error}")
    if probe.returncode != 0 or "<html" not in probe.stdout:
        pytest.skip(f"{BROWSER} does not start headless (exit {probe.returncode}): {errors(probe)}")
    return BROWSER


@pytest.fixture(scope="module")
def pages(browser, server, tmp_path_factory, chelsea) -> dict[str, list[Path]]:
    """Pages written by the real CLI against the test server, by command: pictures of a conv layer's weights,
    an occlusion map (coarse window), a saliency map, a feature inversion (a GIF), the top patches of the
    demo dataset and an audit's report site."""
    base = tmp_path_factory.mktemp("pages")
    image = base / "chelsea.png"
    image.write_bytes(png_bytes(chelsea))
    runs = {
        "filters": ["filters", "efficientnet_lite0", "/_conv_stem/Conv_output_0"],
        "occlusion": ["occlusion", "efficientnet_lite0", str(image), "--window", "64", "--stride", "32"],
        "saliency": ["saliency", "efficientnet_lite0", str(image)],
        "invert": ["invert", "tiny", str(image), "--layer", "/conv1/Conv_output_0", "--steps", "10"],
        "patches": ["patches", "efficientnet_lite0", "/_blocks.5/Clip_1_output_0", "--dataset", "demo", "--k", "4"],
        "audit": ["audit", "tiny", "--dataset", "demo", "--limit", "8", "--name", "browser", "--overwrite",
                  "--unit-layers", "1", "--attribution-images", "1", "--curve-steps", "2", "--robustness-images", "2"],
    }

    def run(name):
        args = [str(BIN / "convscope"), "--server", server.address, *runs[name], "--out", str(base / name)]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(runs, pool.map(run, runs)))
    written = {}
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-2000:])
        written[name] = sorted((base / name).rglob("*.html"))
        assert written[name], f"{name}: no .html page under {base / name}"
    return written


@pytest.mark.parametrize("command", ["filters", "occlusion", "saliency", "invert", "patches", "audit"])
def test_page_images_load_in_a_real_browser(pages, command, tmp_path):
    for n, page in enumerate(pages[command]):
        assert_page_renders(page, tmp_path / f"page{n}")


def test_a_page_pointing_at_a_missing_image_fails_the_check(pages, tmp_path):
    """The check itself: a copy of a real page with one <img> pointed at a file that is not there."""
    page = pages["filters"][0]
    text = page.read_text(encoding="utf-8")
    broken, count = re.subn(r'(<img\b[^>]*?\bsrc=)("[^"]*"|\'[^\']*\'|[^\s>]+)', r'\1"no-such-picture.png"',
                            text, count=1, flags=re.I)
    assert count == 1, f"{page}: no <img src=...> to break"
    copy = page.with_name("missing-image-copy.html")
    copy.write_text(broken, encoding="utf-8")
    try:
        images, _ = browser_check(copy, tmp_path / "check")
        with pytest.raises(AssertionError, match="did not load.*no-such-picture.png"):
            assert_page_renders(copy, tmp_path / "again")
    finally:
        copy.unlink()
    assert [image["src"] for image in images if broken_images([image])] == ["no-such-picture.png"], images
