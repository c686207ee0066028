"""Mixpert export, three rooms with arrows pointing down: serving/ (Triton, PyTriton, the client) -> runtime/ (the
pipeline, backends, CUDA graphs) -> bundle/ (ONNX export, validation, int8, TensorRT build, manifest) ->
mixpert_train (the split). __main__.py is the thin CLI over all three."""

__version__ = "0.1.0"
