"""ONNX Runtime backend: one InferenceSession per part (CPU EP here; CUDA EP where onnxruntime-gpu is installed).

On CUDA the fast path is the default (static=True): the parts run through cuda_graphs.StaticParts, bucketed by
crop count over preallocated torch buffers bound with IOBinding at fixed addresses, the experts' gathers and
scatters on the device, and the CUDA EP's own CUDA graphs (enable_cuda_graph, one gpu_graph_id per part and
shape), which need exactly those fixed addresses. static=True on CPU runs the same binding code (CPU tests)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mixpert_train.errors import MixpertError
from mixpert_train.families import adapter_for

from mixpert_export.bundle import manifest as mf
from .base import Backend

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "uint8": np.uint8}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: int | None = None, static: bool | None = None,
                 cuda_graphs: bool | None = None, buckets=None):
        self.device = device
        self.threads = threads
        self.static_mode = (device == "cuda") if static is None else bool(static)
        self.cuda_graphs = (device == "cuda" and self.static_mode) if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and (device != "cuda" or not self.static_mode):
            raise MixpertError("ONNX Runtime CUDA graphs need --device cuda and the static path")
        self.buckets = buckets
        self.static = None
        self.no_graph: dict[str, str] = {}  # part -> why the CUDA EP could not take a graph of it
        self.sessions: dict[str, ort.InferenceSession] = {}
        self.input_dtypes: dict[str, dict[str, type]] = {}
        self.inputs: dict[str, list] = {}
        self.outputs: dict[str, list] = {}
        # CPU memory. Patch families attend over a whole call: [heads, P, P] a block (667 MB at 3228 patches, fp32),
        # so a 7B part's run peaks 3-4 GB above its weights. With ORT's defaults every part keeps its own arena,
        # grown by powers of two and never given back, and the region holding a run's output stays pinned: on
        # qwen2-vl-7b (7 parts, 6.4 GiB of weights) RSS climbed to 24 GiB within one benchmark and was killed.
        # Here all parts share one arena that grows by what is asked and is shrunk after every run: RSS back to
        # 6.7 GiB after each call, peak 10.3 at 3228 patches, and no slower (measured: the same calls 0.8-1.0x
        # the time). Without an arena at all it was 1.5x slower (a fresh mapping for every large intermediate).
        self.run_options = ort.RunOptions()
        if device == "cpu":
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def providers(self, graphs: bool = False) -> list:
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise MixpertError(f"--device cuda: onnxruntime {ort.__version__} here has no CUDAExecutionProvider; "
                                   "pip install onnxruntime-gpu on a host with a CUDA GPU (the bundle itself is fine)")
            cuda = ("CUDAExecutionProvider", {"enable_cuda_graph": "1"}) if graphs else "CUDAExecutionProvider"
            return [cuda, "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _session(self, path: Path, opts, name: str, disabled: list[str]):
        """With CUDA graphs requested, a part whose nodes do not all land on the CUDA EP cannot be captured: it
        runs without graphs, and describe() says which."""
        if self.cuda_graphs:
            try:
                return ort.InferenceSession(str(path), opts, providers=self.providers(graphs=True),
                                            disabled_optimizers=disabled)
            except Exception as e:  # noqa: BLE001 - ORT's own error types
                self.no_graph[name] = str(e).splitlines()[0][:160]
        return ort.InferenceSession(str(path), opts, providers=self.providers(), disabled_optimizers=disabled)

    def load(self, bundle: Path, manifest: dict) -> "OnnxRuntimeBackend":
        if manifest["precision"] == "bf16" and self.device == "cpu":
            raise MixpertError(f"{bundle / mf.NAME}: a bf16 bundle cannot run on ONNX Runtime CPU (no bfloat16 MatMul); "
                               "use a GPU runtime or build with --precision fp32|fp16|int8|int8-dynamic")
        mf.verify_files(bundle, manifest, "onnx")
        self.providers()  # no CUDA EP in this onnxruntime: say so here, not as a bundle that cannot load
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or min(os.cpu_count() or 1, 16)
        # one session per part: idle pools must not spin, or each part's threads starve the next part's
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.device == "cpu":
            _shared_cpu_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")
        self.precision = manifest["precision"]
        cfg = mf.bundle_config(manifest)
        self.merge = adapter_for(cfg.backbone).io(cfg.backbone)["merge"]
        for name, part in manifest["parts"].items():
            path = bundle / part["onnx"]["file"]
            try:
                sess = self._session(path, opts, name, mf.ort_disabled_optimizers(manifest))
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise MixpertError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                                   f"rebuild: {mf.rebuild_command(manifest, bundle)}") from None
            self.sessions[name] = sess
            self.input_dtypes[name] = {t["name"]: _NP.get(t["dtype"], np.float32) for t in part["onnx"]["io"]["inputs"]}
            self.inputs[name], self.outputs[name] = part["spec"]["inputs"], part["spec"]["outputs"]
        if self.static_mode:
            self._load_static(manifest)
        return self

    def _load_static(self, manifest: dict):
        from ..cuda_graphs import StaticParts

        cfg = mf.bundle_config(manifest)
        parts = manifest["parts"]
        shape = lambda t: tuple(int(d) for d in t["shape"][1:])  # noqa: E731
        trunk_out = parts["trunk"]["onnx"]["io"]["outputs"][0]
        expert_out = parts[f"expert_{cfg.experts[0]}"]["onnx"]["io"]["outputs"][0]
        if trunk_out["dtype"] != expert_out["dtype"]:
            raise MixpertError(f"static path: hidden {trunk_out['dtype']} and tokens {expert_out['dtype']} differ; "
                               "run with static=False")
        modules = {name: _BoundPart(self.sessions[name], self.inputs[name], self.outputs[name], self.input_dtypes[name],
                                    self.device, graphs=self.cuda_graphs and name not in self.no_graph, merge=self.merge)
                   for name in self.sessions}
        rows = {t["name"]: (shape(t), _torch_dtype(t["dtype"])) for t in parts["trunk"]["onnx"]["io"]["inputs"][1:]}
        pixels = parts["trunk"]["onnx"]["io"]["inputs"][0]
        self.static = StaticParts(modules, int(manifest["max_crops"]), shape(pixels),
                                  shape(trunk_out), shape(expert_out), _torch_dtype(trunk_out["dtype"]), self.device,
                                  graphs=False, buckets=self.buckets, rows=rows, merge=self.merge,  # ORT: its own graphs
                                  pixel_dtype=_torch_dtype(pixels["dtype"]))

    # --- CUDA: IOBinding on torch CUDA tensors, so the trunk's output stays on the device between parts ---
    def from_host(self, x):
        if self.device != "cuda" and self.static is None:
            return super().from_host(x)
        import torch

        if isinstance(x, torch.Tensor):
            return x.to(self.device).contiguous()
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def to_host(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        t = x.detach().float().cpu()  # a host copy that owns its memory: x may be a static buffer
        return (t.clone() if t.data_ptr() == x.data_ptr() else t).numpy()

    def run_experts(self, hidden, groups: list, n: int, rows: dict | None = None, merge: int = 1) -> np.ndarray:
        if self.static is None:
            return super().run_experts(hidden, groups, n, rows, merge)
        staged = tuple(self.from_host(rows[k]) for k in self.static.rows) if rows else ()
        return self.to_host(self.static.experts(hidden, groups, staged))

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
        torch_dt = {np.float32: torch.float32, np.float16: torch.float16, np.int64: torch.int64, np.uint8: torch.uint8}
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
        if "patches" in axes:  # an expert's output rows: one a merge window
            axes["merged"] = axes["patches"] // self.merge
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
        if self.static is not None and part in ("trunk", "router", "single_encoder"):
            args = [feeds[t["name"]] for t in self.inputs[part]]
            return {self.outputs[part][0]["name"]: getattr(self.static, part.split("_")[0])(*args)}
        if self.device == "cuda":
            return self._infer_bound(part, feeds)
        sess = self.sessions[part]
        typed = {k: np.ascontiguousarray(v, dtype=self.input_dtypes[part][k]) for k, v in feeds.items()}
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, typed, self.run_options)))

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": ort.__version__, "device": self.device,
                "providers": [p if isinstance(p, str) else p[0] for p in self.providers()],
                "precision": getattr(self, "precision", None), "static": self.static is not None,
                "cuda_graphs": self.cuda_graphs, **({"no_cuda_graph": self.no_graph} if self.no_graph else {})}


_ARENA = []  # the process's one shared CPU arena, registered with ONNX Runtime's environment on first use


def _shared_cpu_arena():
    """One CPU arena for every session that opts in (session.use_env_allocators), extended by exactly what a run
    asks for (kSameAsRequested), so that shrinking it after a run gives the memory back."""
    if _ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))
    except Exception as e:  # noqa: BLE001 - already registered by the embedding application: use that one
        if "already" not in str(e).lower():
            raise
    _ARENA.append(info)


def _torch_dtype(name: str):
    """torch holds the static path's buffers; it is imported only where that path runs."""
    import torch

    return getattr(torch, np.dtype(name).name if name != "bfloat16" else name)


class _BoundPart:
    """One session called on torch tensors through IOBinding. The output buffer and the binding are kept per
    input shape, so every call of a shape binds the same addresses: the CUDA EP's graph for that shape
    (gpu_graph_id) replays on them. The caller (StaticParts) passes buffers of fixed address per shape."""

    def __init__(self, session, inputs, outputs, input_dtypes, device: str, graphs: bool, merge: int = 1):
        self.session, self.inputs, self.outputs, self.merge = session, inputs, outputs, merge
        self.input_dtypes, self.device, self.graphs = input_dtypes, device, graphs
        self.bound: dict[tuple, tuple] = {}  # input pointers and shapes -> (binding, output tensor, run options)

    def __call__(self, *xs):
        import torch

        key = tuple((x.data_ptr(), tuple(x.shape)) for x in xs)
        entry = self.bound.get(key)
        if entry is None:
            binding = self.session.io_binding()
            axes = {}
            for t, x in zip(self.inputs, xs):
                want = self.input_dtypes[t["name"]]
                if x.dtype != _torch_dtype(np.dtype(want).name) or not x.is_contiguous():
                    raise MixpertError(f"{t['name']}: static buffer is {x.dtype}, the graph takes {np.dtype(want).name}")
                binding.bind_input(t["name"], self.device, 0, want, tuple(x.shape), x.data_ptr())
                axes |= {d: x.shape[i] for i, d in enumerate(t["shape"]) if isinstance(d, str)}
            if "patches" in axes:  # an expert's output rows: one a merge window
                axes["merged"] = axes["patches"] // self.merge
            o = self.outputs[0]
            shape = tuple(axes[d] if isinstance(d, str) else d for d in o["shape"])
            out = torch.empty(shape, dtype=_torch_dtype(o["dtype"]), device=self.device)
            binding.bind_output(o["name"], self.device, 0, _NP.get(o["dtype"], np.float32), shape, out.data_ptr())
            options = ort.RunOptions()
            if self.graphs:
                options.add_run_config_entry("gpu_graph_id", str(len(self.bound) + 1))  # 0 is reserved, -1 = off
            entry = self.bound[key] = (binding, out, options)
        binding, out, options = entry
        if self.device == "cuda":  # the buffers were filled on torch's stream; ONNX Runtime runs on its own
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding, options)
        return out
