"""Gradient methods on a PyTorch module converted from the same ONNX file (onnx2pytorch).

torch is imported only here, lazily: a server without torch serves every forward-only technique, and
gradient requests answer FAILED_PRECONDITION saying why.
"""
