"""convscope server: a gRPC service that inspects convolutional networks exported to ONNX."""

__version__ = "0.1.0"
