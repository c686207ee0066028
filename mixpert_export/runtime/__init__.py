"""Running a bundle: MixpertPipeline (pipeline: crops -> trunk -> router -> one expert per image), the runtimes
behind one Backend interface (backends/: torch, onnxruntime, tensorrt) and the GPU fast path (cuda_graphs).

Reads bundles through bundle.manifest (and bundle.sources / bundle.tensorrt_build for the torch and TensorRT
backends). Never imports mixpert_export.serving or the build steps (bundle.build, int8, validate); the pipeline
never imports a runtime library, and backends never import the pipeline.
"""
