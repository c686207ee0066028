"""ONNX Runtime backend: one InferenceSession per part (CPU EP here; CUDA EP where onnxruntime-gpu is installed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mixpert_train.errors import MixpertError

from .. import manifest as mf
from .base import Backend

_NP = {"float32": np.float32, "float16": np.float16}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.device = device
        self.threads = threads
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.input_dtypes: dict[str, dict[str, type]] = {}
        self.inputs: dict[str, list] = {}
        self.outputs: dict[str, list] = {}

    def providers(self) -> list[str]:
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MixpertError("--device cuda: this onnxruntime has no CUDAExecutionProvider; pip install onnxruntime-gpu")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def load(self, bundle: Path, manifest: dict) -> "OnnxRuntimeBackend":
        if manifest["precision"] == "bf16" and self.device == "cpu":
            raise MixpertError(f"{bundle / mf.NAME}: a bf16 bundle cannot run on ONNX Runtime CPU (no bfloat16 MatMul); "
                               "use a GPU runtime or build with --precision fp32|fp16|int8")
        mf.verify_files(bundle, manifest, "onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or min(os.cpu_count() or 1, 16)
        # one session per part: idle pools must not spin, or each part's threads starve the next part's
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.precision = manifest["precision"]
        for name, part in manifest["parts"].items():
            path = bundle / part["onnx"]["file"]
            try:
                sess = ort.InferenceSession(str(path), opts, providers=self.providers())
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise MixpertError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                   f"rebuild: {mf.rebuild_command(manifest, bundle)}") from None
            self.sessions[name] = sess
            self.input_dtypes[name] = {t["name"]: _NP.get(t["dtype"], np.float32) for t in part["onnx"]["io"]["inputs"]}
            self.inputs[name], self.outputs[name] = part["spec"]["inputs"], part["spec"]["outputs"]
        return self

    # --- CUDA: IOBinding on torch CUDA tensors, so the trunk's output stays on the device between parts ---
    def from_host(self, x: np.ndarray):
        if self.device != "cuda":
            return x
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to("cuda")

    def to_host(self, x) -> np.ndarray:
        if self.device == "cuda" and not isinstance(x, np.ndarray):
            return x.float().cpu().numpy()
        return np.asarray(x)

    def take(self, x, index: np.ndarray):
        if self.device == "cuda":
            import torch

            return x.index_select(0, torch.as_tensor(index, device=x.device))
        return x[index]

    def synchronize(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def _infer_bound(self, part: str, feeds: dict) -> dict:
        import torch

        sess = self.sessions[part]
        torch_dt = {np.float32: torch.float32, np.float16: torch.float16}
        binding = sess.io_binding()
        keep = []
        for t in self.inputs[part]:
            name, x = t["name"], feeds[t["name"]]
            want = self.input_dtypes[part][name]
            x = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).to("cuda", torch_dt[want]).contiguous()
            keep.append(x)
            binding.bind_input(name, "cuda", 0, want, tuple(x.shape), x.data_ptr())
        axes = {}  # named dynamic axis -> size in this call ('crops', 'images'), read off the inputs
        for t, x in zip(self.inputs[part], keep):
            axes |= {d: x.shape[i] for i, d in enumerate(t["shape"]) if isinstance(d, str)}
        outputs = {}
        for o in self.outputs[part]:
            shape = tuple(axes[d] if isinstance(d, str) else d for d in o["shape"])
            out = torch.empty(shape, dtype=torch_dt[_NP.get(o["dtype"], np.float32)], device="cuda")
            binding.bind_output(o["name"], "cuda", 0, _NP.get(o["dtype"], np.float32), shape, out.data_ptr())
            outputs[o["name"]] = out
        binding.synchronize_inputs()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs

    def infer(self, part: str, feeds: dict) -> dict:
        if self.device == "cuda":
            return self._infer_bound(part, feeds)
        sess = self.sessions[part]
        typed = {k: np.ascontiguousarray(v, dtype=self.input_dtypes[part][k]) for k, v in feeds.items()}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, typed)))

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": ort.__version__, "device": self.device,
                "providers": self.providers(), "precision": getattr(self, "precision", None)}
