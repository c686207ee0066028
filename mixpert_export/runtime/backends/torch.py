"""torch backend: the reference. The same part modules that were exported, rebuilt from the bundle's source
(checkpoint, snapshot, or random-init seed). fp32 on CPU; the bundle's precision on CUDA.

On CUDA it runs the fast path by default (cuda_graphs.StaticParts): parts bucketed by crop count over
preallocated buffers, one CUDA graph per part and bucket captured on first use, the experts' gathers and
scatters inside their graphs, optionally expert groups on `streams` concurrent streams, and optionally the
parts compiled with torch.compile first (`compile=True`). static=True without graphs runs the same bucketed
code eagerly (CPU tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mixpert_train.errors import MixpertError
from mixpert_train.families import adapter_for

from mixpert_export.bundle import manifest as mf
from mixpert_export.bundle.contract import part_specs
from mixpert_export.bundle.onnx_export import PRECISIONS, lowered, part_module
from mixpert_export.bundle.sources import model_from_source
from .base import Backend


_DTYPES = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}  # inputs whatever the precision


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", model=None, static: bool | None = None, graphs: bool | None = None,
                 compile: bool = False, streams: int = 1, buckets=None):
        self.device = torch.device(device)
        self.model = model  # an in-memory MixpertVision skips reloading the source
        cuda = self.device.type == "cuda"
        self.graphs = cuda if graphs is None else bool(graphs)
        if self.graphs and not cuda:
            raise MixpertError("CUDA graphs need --device cuda")
        self.static_mode = cuda if static is None else bool(static) or self.graphs
        self.compile, self.streams, self.buckets = compile, streams, buckets
        self.static = None

    def load(self, bundle: Path, manifest: dict) -> "TorchBackend":
        cfg = mf.bundle_config(manifest)
        model = self.model or model_from_source(manifest["source"], cfg, Path(bundle) / mf.NAME)
        self.precision = "fp32" if self.device.type == "cpu" or manifest["precision"] in ("int8", "fp8", "int8-dynamic") else manifest["precision"]
        model = lowered(model, self.precision).to(self.device)
        self.parts = {s.name: part_module(model, s, self.precision) for s in part_specs(cfg, self.precision)}
        self.specs = {s.name: s for s in part_specs(cfg, self.precision)}
        if self.compile:  # static shapes per bucket: compile once per part and bucket, graphs captured after
            from torch import _dynamo

            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
            self.parts = {k: torch.compile(m, mode="max-autotune-no-cudagraphs", dynamic=False)
                          for k, m in self.parts.items()}
        if self.static_mode:
            from ..cuda_graphs import StaticParts

            spec = {s.name: s for s in part_specs(cfg, self.precision)}
            shape = lambda t: tuple(int(d) for d in t.shape[1:])  # noqa: E731
            rows = {t.name: (shape(t), torch.int64 if t.dtype == "int64" else torch.float32)
                    for t in spec["trunk"].inputs[1:]}  # patch families' per-row inputs
            self.static = StaticParts(
                self.parts, int(manifest["max_crops"]),
                shape(spec["trunk"].inputs[0]), shape(spec["trunk"].outputs[0]),
                shape(spec[f"expert_{cfg.experts[0]}"].outputs[0]), PRECISIONS[self.precision], self.device,
                graphs=self.graphs, buckets=self.buckets, streams=self.streams, rows=rows,
                merge=adapter_for(cfg.backbone).io(cfg.backbone)["merge"], pixel_dtype=_DTYPES[spec["trunk"].inputs[0].dtype])
        return self

    def from_host(self, x):
        if isinstance(x, torch.Tensor):  # device preprocessing's crops
            return x.to(self.device)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_host(self, x) -> np.ndarray:
        """A host copy that owns its memory (a CPU tensor may be a view of a static buffer reused next call)."""
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        t = x.detach().float().cpu()
        return (t.clone() if t.data_ptr() == x.data_ptr() else t).numpy()

    def _as_tensor(self, x):
        return x if isinstance(x, torch.Tensor) else self.from_host(x)

    def take(self, x, index: np.ndarray):
        return x.index_select(0, torch.as_tensor(index, device=x.device))

    @torch.inference_mode()
    def infer(self, part: str, feeds: dict) -> dict:
        if self.static is not None and part in ("trunk", "router", "single_encoder"):
            out = getattr(self.static, part.split("_")[0])(*self._args(part, feeds))
            return {self.specs[part].outputs[0].name: out}
        out = self.parts[part](*self._args(part, feeds))
        outs = out if isinstance(out, tuple) else (out,)  # parts with DeepStack taps give two
        return {t.name: o for t, o in zip(self.specs[part].outputs, outs)}

    @torch.inference_mode()
    def run_experts(self, hidden, groups: list, n: int, rows: dict | None = None, merge: int = 1) -> np.ndarray:
        if self.static is None:
            return super().run_experts(hidden, groups, n, rows, merge)
        staged = tuple(self._as_tensor(rows[k]) for k in self.static.rows) if rows else ()
        return self.to_host(self.static.experts(hidden, groups, staged))  # one copy to the host for all groups

    def _args(self, part: str, feeds: dict) -> list:
        spec = self.specs[part]
        args = []
        for t in spec.inputs:
            x = feeds[t.name]
            x = x if isinstance(x, torch.Tensor) else self.from_host(x)
            args.append(x.to(_DTYPES.get(t.dtype, PRECISIONS[self.precision])))
        return args

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        return {"runtime": "torch", "version": torch.__version__, "device": str(self.device), "precision": self.precision,
                "static": self.static is not None, "cuda_graphs": self.graphs, "compile": self.compile,
                "streams": self.streams, "buckets": list(self.static.buckets) if self.static else None}
