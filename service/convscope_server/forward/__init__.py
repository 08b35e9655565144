"""Forward-only techniques on onnxruntime. This package never imports torch (a test enforces it).

Technique functions take numpy arrays and an :class:`OrtBackend` and return numpy arrays: no proto
types, no I/O. Long ones take a ``progress(step, total)`` callback and a ``should_stop()`` check.
"""
