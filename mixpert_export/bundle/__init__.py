"""Making a bundle: export each part to ONNX (onnx_export), validate it against torch (validate), quantise it
(quantize: int8 / fp8 QDQ calibrated on the user's images and gated; int8: ONNX Runtime CPU dynamic), compile TensorRT engines (tensorrt_build, the only module that imports TensorRT), and the manifest that
records and checks all of it (manifest); build.py runs those steps, sources.py says where the model came from.

Never imports mixpert_export.runtime or mixpert_export.serving: a bundle is made without knowing how it is run.
"""
