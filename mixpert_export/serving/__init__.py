"""Serving a bundle: the PyTriton server (serve), the Triton model repository writer (triton_repo) and the two
Python-backend models it copies in (triton_model, triton_part_model), and the gRPC client (client).

Runs the same runtime.MixpertPipeline as every other path and reads bundles through bundle.manifest. Never
imports the build steps (bundle.build, onnx_export, validate, int8); nothing in bundle/ or runtime/ imports this
room (the top of the arrows: serving -> runtime -> bundle -> mixpert_train).
"""
