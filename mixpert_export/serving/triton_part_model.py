"""One part (trunk, router or an expert) of a Triton model repository written with --platform python:
ONNX Runtime inside Triton's Python backend, for a Triton build that has the Python backend but no
onnxruntime backend (the server PyTriton ships). Copied there as 1/model.py beside 1/model.onnx."""

import json
import os
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / config["parameters"]["onnx_file"]["string_value"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = min(os.cpu_count() or 1, 16)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        off = config["parameters"].get("disabled_optimizers", {}).get("string_value", "")  # e.g. QDQ parts: CSE
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=[o for o in off.split(",") if o])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            try:
                result = self.session.run(self.outputs, feeds)
            except Exception as e:  # ORT's own error types: answer this request, keep serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e).splitlines()[0])))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, v) for n, v in zip(self.outputs, result)]))
        return responses
