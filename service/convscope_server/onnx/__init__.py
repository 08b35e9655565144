"""ONNX graph handling: safe loading, graph description and receptive fields, onnxruntime sessions."""
