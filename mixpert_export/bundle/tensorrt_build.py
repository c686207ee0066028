"""ONNX -> TensorRT engine, for standard `tensorrt` (data-centre GPUs, Jetson) or `tensorrt_rtx` (RTX GPUs; its
ahead-of-time build runs on a CPU-only host). The only module that imports TensorRT, lazily.

Small steps, each testable alone (polygraphy's loader idea): import -> network from ONNX -> config with one
optimisation profile over crops -> serialized engine -> file. Networks are strongly typed: precision comes
from the ONNX tensor types.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from mixpert_train.errors import MixpertError

GPU_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


@dataclass(frozen=True)
class TensorRT:
    module: object  # the imported tensorrt or tensorrt_rtx module
    flavour: str  # "tensorrt" | "tensorrt_rtx"

    @property
    def version(self) -> str:
        return self.module.__version__


def import_tensorrt(prefer: str | None = None) -> TensorRT:
    """Standard TensorRT where installed, else TensorRT-RTX (same builder / parser / runtime API)."""
    order = [prefer] if prefer else ["tensorrt", "tensorrt_rtx"]
    errors = []
    for name in order:
        try:
            mod = __import__(name)
            if not hasattr(mod, "Builder"):  # the registry's `tensorrt` placeholder wheel has no API
                raise ImportError(f"{name} has no Builder (placeholder package?)")
            return TensorRT(mod, name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise MixpertError("TensorRT is not installed (" + "; ".join(errors) + "); "
                       "pip install tensorrt-rtx-cu13 (builds on any host) or tensorrt (data-centre GPUs), "
                       "or pass --runtime onnxruntime")


def available() -> bool:
    try:
        import_tensorrt()
        return True
    except MixpertError:
        return False


def _logger(trt: TensorRT):
    if not hasattr(_logger, "cache"):
        _logger.cache = {}
    if trt.flavour not in _logger.cache:
        _logger.cache[trt.flavour] = trt.module.Logger(trt.module.Logger.ERROR)
    return _logger.cache[trt.flavour]


def network_from_onnx(trt: TensorRT, builder, onnx_path: Path):
    """A strongly typed network parsed from the ONNX file; a parser error is one line naming the file."""
    t = trt.module
    flags = 1 << int(t.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = t.OnnxParser(network, _logger(trt))
    if not Path(onnx_path).is_file():
        raise MixpertError(f"{onnx_path}: missing; re-export the bundle (python -m mixpert_export build ...)")
    if not parser.parse_from_file(str(onnx_path)):
        first = parser.get_error(0) if parser.num_errors else "unknown parser error"
        desc = getattr(first, "desc", lambda: str(first))()
        raise MixpertError(f"{onnx_path}: TensorRT ({trt.flavour} {trt.version}) cannot parse it: "
                           f"{' '.join(str(desc).split())[:300]}; re-export it with python -m mixpert_export build")
    return network, parser


def network_io(trt: TensorRT, network) -> dict:
    """Names, shapes (-1 = dynamic) and dtypes of the parsed network's inputs and outputs."""
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "INT8": "int8", "BOOL": "bool", "FP8": "float8"}

    def desc(t):
        return {"name": t.name, "shape": list(t.shape), "dtype": names.get(t.dtype.name, t.dtype.name.lower())}

    return {"inputs": [desc(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [desc(network.get_output(i)) for i in range(network.num_outputs)]}


def profile_shapes(io: dict, symbolic: dict, min_crops: int, opt_crops: int, max_crops: int) -> dict:
    """min / opt / max per dynamic input: 'crops' axes run min..max crops, 'images' axes 1..max crops.
    `symbolic` maps an input name to its axis names (None for fixed axes); unnamed dynamic axes count as crops."""
    shapes = {}
    for t in io["inputs"]:
        if -1 not in t["shape"]:
            continue
        dyn = symbolic.get(t["name"]) or ["crops"] * len(t["shape"])
        tri = []
        for n_crops, n_images in ((min_crops, 1), (opt_crops, 1), (max_crops, max_crops)):
            tri.append(tuple((n_images if name == "images" else n_crops) if d == -1 else d
                             for d, name in zip(t["shape"], dyn)))
        shapes[t["name"]] = tri
    return shapes


def create_config(trt: TensorRT, builder, network, shapes: dict, timing_cache=None, gpu_targets=()):
    t = trt.module
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)
    if timing_cache is not None:
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    if gpu_targets and trt.flavour == "tensorrt_rtx":
        targets = [getattr(t.ComputeCapability, g.upper()) for g in gpu_targets]
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            config.set_compute_capability(cc, i)
    return config


def new_timing_cache(trt: TensorRT, builder, path: Path | None = None):
    """One timing cache shared by every part of a bundle (loaded from `path` when it exists)."""
    config = builder.create_builder_config()
    if not hasattr(config, "create_timing_cache"):
        return None
    data = path.read_bytes() if path and path.is_file() else b""
    return config.create_timing_cache(data)


def build_engine(trt: TensorRT, onnx_path: Path, engine_path: Path, symbolic: dict, min_crops: int,
                 opt_crops: int, max_crops: int, gpu_targets=(), timing_cache=None, builder=None) -> dict:
    """Parse, configure, build, write (atomically). `symbolic` maps input name -> axis names (from the spec).
    Returns what the manifest records: network I/O, profile, build seconds, engine bytes."""
    t = trt.module
    builder = builder or t.Builder(_logger(trt))
    start = time.perf_counter()
    network, _parser = network_from_onnx(trt, builder, onnx_path)
    io = network_io(trt, network)
    shapes = profile_shapes(io, symbolic, min_crops, opt_crops, max_crops)
    config = create_config(trt, builder, network, shapes, timing_cache, gpu_targets)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MixpertError(f"{onnx_path}: TensorRT ({trt.flavour} {trt.version}) failed to build an engine; "
                           "run with --runtime onnxruntime, or see the TensorRT log above")
    tmp = engine_path.with_name(f".{engine_path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, engine_path)
    return {"io": io, "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
            "build_seconds": round(time.perf_counter() - start, 3), "bytes": engine_path.stat().st_size}


def engine_targets(trt: TensorRT, gpu_targets) -> dict:
    """What an engine is built for, as the manifest records it."""
    if trt.flavour == "tensorrt_rtx":
        return {"compute_capabilities": list(gpu_targets) or ["current"]}
    return {"gpu": build_gpu()}


def build_gpu() -> dict | None:
    """Name and compute capability of the GPU this process sees (standard TensorRT builds for it)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"sm{major}{minor}"}
    except Exception:
        pass
    return None
