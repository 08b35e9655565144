"""The demo: start convscope-server on the repository, then use the CLI and the library against it.

Writes scikit-image's bundled sample photos to demo-output/, lists and describes the default model,
classifies the photos through the running server, finds the demo dataset's top patches for a block-5
layer, builds a gallery and asks for chelsea's nearest neighbours, and stops the server with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL = "efficientnet_lite0"


def start_server() -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([str(BIN / "convscope-server"), "--port", "0", "--host", "127.0.0.1",
                               "--repository", str(ROOT / "models"), "--data-root", str(ROOT / "datasets"),
                               "--gallery-root", str(ROOT / "demo-output" / "galleries"), "--log-level", "WARNING"],
                              stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if "listening on" not in line:
        server.kill()
        raise SystemExit(f"demo: the server did not start: {line!r}")
    print(f"$ convscope-server --port 0 --repository models\n{line.strip()}\n")
    return server, f"127.0.0.1:{line.split('listening on ')[1].split()[0].rsplit(':', 1)[1]}"


def cli(address: str, *args: str) -> None:
    print(f"$ convscope {' '.join(args)}")
    subprocess.run([str(BIN / "convscope"), "--server", address, *args], check=True)
    print()


def main() -> int:
    from PIL import Image
    from skimage import data

    out = ROOT / "demo-output"
    out.mkdir(exist_ok=True)
    photos = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut()}
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(out / f"{name}.png")

    started = time.perf_counter()
    server, address = start_server()
    try:
        cli(address, "models")
        cli(address, "describe", MODEL, "--op", "Conv")
        cli(address, "predict", MODEL, *(str((out / f"{n}.png").relative_to(ROOT)) for n in photos), "--top", "3")
        cli(address, "patches", MODEL, "/_blocks.5/Clip_1_output_0", "--dataset", "demo", "--k", "8", "--rows", "8",
            "--out", "demo-output/patches")
        cli(address, "gallery", "build", "demo", MODEL, "--dataset", "demo", "--overwrite")
        cli(address, "neighbors", "demo", "demo-output/chelsea.png", "--k", "5", "--out", "demo-output/neighbors")

        from convscope import Client

        with Client(address) as client:
            top = client.predict(MODEL, data.chelsea(), top=1)[0]
            print(f"library: chelsea -> {top.index} {top.label} (p={top.probability:.2f})")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    print(f"server stopped with exit code {code}; demo took {time.perf_counter() - started:.1f} s")
    return code


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
