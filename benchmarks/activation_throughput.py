"""Activation retrieval over gRPC vs a plain onnxruntime session that exposes the same tensor.

The plain side builds its own session with the tensor added as a graph output (the fastest way to get it
with bare onnxruntime) and runs the same float32 batch. Goal: convscope >= 80% of plain throughput.

    .venv/bin/python benchmarks/activation_throughput.py [--batch 8] [--layers ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort

from common import ROOT, ort_providers, report, start_server, timed

LAYERS = ["/_blocks.1/Clip_output_0", "/_blocks.8/_project_conv/Conv_output_0", "/Clip_1_output_0"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "auto"], default="cpu",
                        help="auto: CUDA on both sides when onnxruntime has it")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", nargs="+", default=LAYERS)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from convscope import Client

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(ROOT / "models" / "efficientnet_lite0" / "model.onnx")))
    xs = np.random.default_rng(0).normal(size=(args.batch, 3, 224, 224)).astype(np.float32)
    server = start_server(ort_batch=args.batch, device=args.device, gradient_warmup=False)
    rows = []
    try:
        with Client(server.address) as client:
            for layer in args.layers:
                exposed = onnx.ModelProto()
                exposed.CopyFrom(proto)
                exposed.graph.output.append(next(v for v in exposed.graph.value_info if v.name == layer))
                session = ort.InferenceSession(exposed.SerializeToString(), providers=ort_providers(args.device))
                plain = timed(lambda: session.run([layer], {"input": xs}), args.repeat)
                served = timed(lambda: client.activations("efficientnet_lite0", list(xs), [layer]), args.repeat)
                rows.append((f"{layer} x{args.batch}", plain, served))
    finally:
        server.stop(0)
    print("throughput ratio = plain time / convscope time (1.00x = as fast as bare onnxruntime)")
    report(rows, "convscope", "plain ORT")


if __name__ == "__main__":
    main()
