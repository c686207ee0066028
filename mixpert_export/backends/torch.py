"""torch backend: the reference. The same part modules that were exported, rebuilt from the bundle's source
(checkpoint, snapshot, or random-init seed). fp32 on CPU; the bundle's precision on CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import manifest as mf
from ..onnx_export import PRECISIONS, lowered, part_module, part_specs
from ..sources import model_from_source
from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", model=None):
        self.device = torch.device(device)
        self.model = model  # an in-memory MixpertVision skips reloading the source

    def load(self, bundle: Path, manifest: dict) -> "TorchBackend":
        cfg = mf.bundle_config(manifest)
        model = self.model or model_from_source(manifest["source"], cfg, Path(bundle) / mf.NAME)
        self.precision = "fp32" if self.device.type == "cpu" or manifest["precision"] == "int8" else manifest["precision"]
        model = lowered(model, self.precision).to(self.device)
        self.parts = {s.name: part_module(model, s, self.precision) for s in part_specs(cfg, self.precision)}
        self.specs = {s.name: s for s in part_specs(cfg, self.precision)}
        return self

    def from_host(self, x: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_host(self, x) -> np.ndarray:
        return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    def take(self, x, index: np.ndarray):
        return x.index_select(0, torch.as_tensor(index, device=x.device))

    @torch.inference_mode()
    def infer(self, part: str, feeds: dict) -> dict:
        spec = self.specs[part]
        args = []
        for t in spec.inputs:
            x = feeds[t.name]
            x = x if isinstance(x, torch.Tensor) else self.from_host(x)
            args.append(x.to(torch.float32 if t.dtype == "float32" else PRECISIONS[self.precision]))
        out = self.parts[part](*args)
        return {spec.outputs[0].name: out}

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {"runtime": "torch", "version": torch.__version__, "device": str(self.device), "precision": self.precision}
