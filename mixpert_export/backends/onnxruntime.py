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
        return self

    def infer(self, part: str, feeds: dict) -> dict:
        sess = self.sessions[part]
        typed = {k: np.ascontiguousarray(v, dtype=self.input_dtypes[part][k]) for k, v in feeds.items()}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, typed)))

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": ort.__version__, "device": self.device,
                "providers": self.providers(), "precision": getattr(self, "precision", None)}
