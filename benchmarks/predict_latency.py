"""Predict over gRPC (client -> server -> onnxruntime -> client) vs a plain onnxruntime session.

Both get the same float32 model inputs (the server's preprocessing is skipped that way, so the ratio is
the service's own overhead: serialisation, transport, dispatch). A second line includes preprocessing:
uint8 pixels sent to the server vs the same resize + normalisation done by hand before plain onnxruntime.

    .venv/bin/python benchmarks/predict_latency.py [--batch 1 8 32]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from PIL import Image

from common import ROOT, ort_providers, report, start_server, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu",
                        help="auto: CUDA on both sides when onnxruntime has it")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from skimage import data

    from convscope import Client

    model = ROOT / "models" / "efficientnet_lite0" / "model.onnx"
    session = ort.InferenceSession(str(model), providers=ort_providers(args.device))
    pixels = data.chelsea()

    def preprocess(p):
        x = np.asarray(Image.fromarray(p).resize((224, 224), Image.BILINEAR), np.float32) / 255.0
        return ((x - 0.5) / 0.5).transpose(2, 0, 1)

    x = preprocess(pixels)
    server = start_server(ort_batch=max(args.batch), device=args.device, gradient_warmup=False)
    rows = []
    try:
        with Client(server.address) as client:
            for batch in args.batch:
                xs = np.repeat(x[None], batch, axis=0)
                plain = timed(lambda: session.run(None, {"input": xs}), args.repeat)
                served = timed(lambda: client.predict("efficientnet_lite0", list(xs), top=5), args.repeat)
                rows.append((f"float32 input, batch {batch}", plain, served))
                plain_pre = timed(lambda: session.run(None, {"input": np.stack([preprocess(pixels)] * batch)}),
                                  args.repeat)
                served_pre = timed(lambda: client.predict("efficientnet_lite0", [pixels] * batch, top=5),
                                   args.repeat)
                rows.append((f"uint8 pixels, batch {batch}", plain_pre, served_pre))
    finally:
        server.stop(0)
    print(f"efficientnet_lite0 on {session.get_providers()[0]}; ratio = plain / served (1.00x = no overhead)")
    report(rows, "convscope", "plain ORT")


if __name__ == "__main__":
    main()
