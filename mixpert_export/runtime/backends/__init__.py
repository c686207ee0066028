"""Runtimes behind one interface (base.Backend): torch (reference), onnxruntime, tensorrt."""

from __future__ import annotations

from pathlib import Path

from mixpert_train.errors import MixpertError

RUNTIMES = ("auto", "torch", "onnxruntime", "tensorrt")


def pick_runtime(manifest: dict) -> str:
    """auto: TensorRT where the bundle has engines and a CUDA GPU is visible, else ONNX Runtime."""
    from mixpert_export.bundle import tensorrt_build as trtb

    if manifest.get("tensorrt") and trtb.build_gpu() is not None:
        return "tensorrt"
    return "onnxruntime"


def create_backend(runtime: str, bundle: Path, manifest: dict, device: str | None = None, model=None, **options):
    """options go to the backend: torch takes static, graphs, compile, streams, buckets."""
    if runtime == "auto":
        runtime = pick_runtime(manifest)
    if device is not None and runtime in ("torch", "onnxruntime"):
        from mixpert_train.errors import require_device

        require_device("--device", device, "run on a host with a CUDA GPU, or drop --device (the CPU)")
    if runtime == "torch":
        from .torch import TorchBackend

        return TorchBackend(device or "cpu", model=model, **options).load(bundle, manifest)
    if runtime == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(device or "cpu", **options).load(bundle, manifest)
    if runtime == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend().load(bundle, manifest)
    raise MixpertError(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")
