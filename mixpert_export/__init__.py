"""Mixpert export: ONNX parts, TensorRT engines, manifests, and the runtime pipeline over several backends."""

__version__ = "0.1.0"
