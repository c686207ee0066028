"""TensorRT backend: the bundle's engines, torch CUDA tensors as device buffers, one stream, execute_async_v3.
Runs only on a GPU the engines were built for (manifest.check_engine_compat says why not, in one line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixpert_train.errors import MixpertError

from mixpert_export.bundle import manifest as mf
from mixpert_export.bundle import tensorrt_build as trtb
from .base import Backend


def current_gpu() -> dict | None:
    return trtb.build_gpu()


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, device: str = "cuda"):
        self.device = device

    def load(self, bundle: Path, manifest: dict) -> "TensorRTBackend":
        import torch

        trt = trtb.import_tensorrt((manifest.get("tensorrt") or {}).get("flavour"))
        mf.check_engine_compat(manifest, bundle, trt.flavour, trt.version, current_gpu())
        mf.verify_files(bundle, manifest, "engine")
        self.trt, self.torch = trt, torch
        self.runtime = trt.module.Runtime(trtb._logger(trt))
        self.stream = torch.cuda.Stream()
        self.engines, self.contexts = {}, {}
        for name, part in manifest["parts"].items():
            path = bundle / part["engine"]["file"]
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise MixpertError(f"{path}: {trt.flavour} {trt.version} could not deserialize it on this GPU; "
                                   f"rebuild: {mf.rebuild_command(manifest, bundle, engines=True)}")
            self.engines[name], self.contexts[name] = engine, engine.create_execution_context()
        self.precision = manifest["precision"]
        return self

    def _dtype(self, trt_dtype):
        t, torch = self.trt.module, self.torch
        return {t.float32: torch.float32, t.float16: torch.float16, t.bfloat16: torch.bfloat16,
                t.int64: torch.int64, t.uint8: torch.uint8}[trt_dtype]

    def from_host(self, x):
        if isinstance(x, self.torch.Tensor):  # device preprocessing's crops, made on torch's current stream
            x = x.to("cuda", non_blocking=True).contiguous()
            self.stream.wait_stream(self.torch.cuda.current_stream())
            return x
        return self.torch.from_numpy(np.ascontiguousarray(x)).to("cuda", non_blocking=True)

    def to_host(self, x) -> np.ndarray:
        self.stream.synchronize()
        return x.float().cpu().numpy()

    def take(self, x, index: np.ndarray):
        with self.torch.cuda.stream(self.stream):
            return x.index_select(0, self.torch.as_tensor(index, device=x.device))

    def infer(self, part: str, feeds: dict) -> dict:
        t, torch = self.trt.module, self.torch
        engine, ctx = self.engines[part], self.contexts[part]
        outputs = {}
        with torch.cuda.stream(self.stream):
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == t.TensorIOMode.INPUT:
                    x = feeds[name]
                    x = (x if isinstance(x, torch.Tensor) else self.from_host(x)).to(self._dtype(engine.get_tensor_dtype(name))).contiguous()
                    feeds[name] = x  # keep alive until the stream is done with it
                    ctx.set_input_shape(name, tuple(x.shape))
                    ctx.set_tensor_address(name, x.data_ptr())
            for i in range(engine.num_io_tensors):
                name = engine.get_tensor_name(i)
                if engine.get_tensor_mode(name) == t.TensorIOMode.OUTPUT:
                    out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype(engine.get_tensor_dtype(name)), device="cuda")
                    ctx.set_tensor_address(name, out.data_ptr())
                    outputs[name] = out
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise MixpertError(f"{part}: TensorRT execution failed")
        return outputs

    def synchronize(self):
        self.stream.synchronize()

    def describe(self) -> dict:
        return {"runtime": self.trt.flavour, "version": self.trt.version, "device": (current_gpu() or {}).get("name"),
                "precision": self.precision}
