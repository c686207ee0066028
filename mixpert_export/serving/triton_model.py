"""The `mixpert` model of a Triton model repository (copied there as 1/model.py by triton_repo.py).

Python backend, business logic scripting: per merged batch of requests, MixpertPipeline runs over a backend
whose infer() is a BLS request to the part models (mixpert_trunk, mixpert_router, mixpert_expert_<d>), so
the trunk runs once on all crops, the router once, and each chosen expert once on its group. An image that
cannot be decoded gets an error response of its own; the other requests are answered.

Needs mixpert-deploy importable by the Python backend (installed in the server's Python, or an
EXECUTION_ENV_PATH environment).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mixpert_export.bundle.manifest import read_packing
from mixpert_export.runtime.backends.base import Backend
from mixpert_export.runtime.pipeline import MixpertPipeline
from mixpert_export.serving.serve import INPUT, PipelineCallable
from mixpert_train.errors import MixpertError


class TritonBLSBackend(Backend):
    """Each part is another model of the same server, called with pb_utils.InferenceRequest(...).exec()."""

    name = "triton-bls"

    def __init__(self, models: dict):
        self.models = models  # part -> Triton model name
        self.outputs = {}

    def load(self, bundle, manifest):
        self.precision = manifest["precision"]
        self.outputs = {p: [t["name"] for t in manifest["parts"][p]["spec"]["outputs"]] for p in self.models}
        return self

    def infer(self, part, feeds):
        request = pb_utils.InferenceRequest(
            model_name=self.models[part], requested_output_names=self.outputs[part],
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()])
        response = request.exec()
        if response.has_error():
            raise MixpertError(f"model {self.models[part]}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.outputs[part]}

    def describe(self):
        return {"runtime": "triton-bls", "version": "", "device": "server", "precision": self.precision,
                "models": self.models}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        manifest = json.loads((version_dir / "manifest.json").read_text())
        models = json.loads(config["parameters"]["part_models"]["string_value"])
        backend = TritonBLSBackend(models).load(version_dir, manifest)
        packed = config["parameters"].get("packed", {}).get("string_value") == "true"
        packing = read_packing(version_dir, manifest) if packed else None  # `triton --packed`: what serve --packed answers
        self.call = PipelineCallable(MixpertPipeline(backend, manifest, packing=packing))
        self.outputs = self.call.outputs  # PACKED_OUTPUTS or OUTPUTS, + deepstack for Qwen3-VL

    def execute(self, requests):
        feeds = [{INPUT: pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy()} for r in requests]
        try:
            answers = self.call(feeds)
        except MixpertError as e:  # a part model failed: every request of this batch gets the message
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))) for _ in requests]
        responses = []
        for answer in answers:
            error = answer["error"].reshape(-1)[0]
            if error:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error.decode())))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, answer[n]) for n in self.outputs]))
        return responses
