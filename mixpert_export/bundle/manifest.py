"""manifest.json of a bundle: what was built, from what, with which tools, for which GPU; and the checks that
refuse a bundle that does not fit this machine, each a one-line error naming the file and the rebuild command."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mixpert_train.checkpoint import read_versioned_json
from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertConfig
from mixpert_train.staging import Output, member

FORMAT = "mixpert-bundle"
FORMAT_VERSION = 2  # 2: the pixel parts take uint8 bytes and normalise them in the graph (1: float32 normalised pixels)
NAME = "manifest.json"
BUNDLE = Output("bundle", NAME, FORMAT)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tool_versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from mixpert_export import __version__

    return {"mixpert": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_manifest(bundle: Path, manifest: dict) -> Path:
    path = bundle / NAME
    tmp = bundle / f".{NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def rebuild_command(manifest: dict, bundle: Path, engines: bool = False) -> str:
    if engines:
        return f"python -m mixpert_export build --from-onnx {bundle} --runtime tensorrt"
    m = manifest.get("model", {})
    name = m.get("backbone", {}).get("name", "NAME") if isinstance(m.get("backbone"), dict) else "NAME"
    return f"python -m mixpert_export build --backbone {name} --out {bundle} (with the same --weights/--checkpoint)"


def read_manifest(bundle: str | Path) -> dict:
    """The bundle's manifest; every file name in it checked to be a plain name inside the bundle."""
    bundle = Path(bundle)
    manifest = read_versioned_json(bundle / NAME, FORMAT, FORMAT_VERSION,
                                   f"{bundle} is not a Mixpert bundle (build one with python -m mixpert_export build)",
                                   lambda m: f"rebuild: {rebuild_command(m, bundle)}")
    for part in manifest.get("parts", {}).values():
        for entry in (part.get("onnx"), part.get("engine")):
            if entry:
                for name in (entry.get("file"), *entry.get("sha256", {})):
                    member(bundle, name, bundle / NAME)
    if (manifest.get("tensorrt") or {}).get("timing_cache"):
        member(bundle, manifest["tensorrt"]["timing_cache"], bundle / NAME)
    if manifest.get("packing"):
        member(bundle, manifest["packing"]["file"], bundle / NAME)
    return manifest


QDQ_METHOD = "static QDQ (onnxruntime.quantization.quantize_static)"  # quantization.method of int8 / fp8 bundles


def ort_disabled_optimizers(manifest: dict) -> list[str]:
    """ONNX Runtime optimizers to leave off for this bundle, so that its CPU EP runs every quantised linear layer of
    a QDQ bundle (int8) as one integer kernel (MatMulIntegerToFloat) instead of an fp32 MatMul on weights
    dequantised every call. Common-subexpression elimination merges the dedicated Q/DQ pairs in front of q, k and v
    back into one DequantizeLinear with three consumers, which the QDQ fusion refuses; MatMul + Add fusion turns a
    2-D linear layer into a Gemm whose float bias the QDQ fusion refuses. Measured on the tiny trunks: 12 of 24
    (tiny, tiny-internvl) and 8 of 16 (tiny-qwen2-vl) layers fused with ORT's defaults, all with these two off."""
    qdq = (manifest.get("quantization") or {}).get("method") == QDQ_METHOD
    return ["CommonSubexpressionElimination", "MatMulAddFusion"] if qdq else []


PACKING = "packing.safetensors"


def write_packing(bundle: Path, model) -> dict:
    """The LLM-side tensors packing needs (model.Packing: image_newline), beside the parts; its manifest entry."""
    from safetensors.numpy import save_file

    f = Path(bundle) / PACKING
    save_file({k: v.detach().float().cpu().numpy() for k, v in model.packing.state_dict().items()}, str(f))
    return {"file": PACKING, "sha256": sha256(f), "tensors": sorted(model.packing.state_dict())}


def read_packing(bundle: str | Path, manifest: dict) -> dict:
    """{'image_newline': float32 [D_llm]} from the bundle, checked against its manifest."""
    from safetensors.numpy import load_file

    bundle = Path(bundle)
    entry = manifest.get("packing")
    if not entry:
        raise MixpertError(f"{bundle / NAME}: this bundle carries no packing tensors (built before they were "
                           f"exported); rebuild: {rebuild_command(manifest, bundle)}")
    f = bundle / entry["file"]
    if not f.is_file() or sha256(f) != entry["sha256"]:
        raise MixpertError(f"{f}: {'missing' if not f.is_file() else 'sha256 differs from ' + NAME}; "
                           f"rebuild: {rebuild_command(manifest, bundle)}")
    return load_file(str(f))


def bundle_config(manifest: dict) -> MixpertConfig:
    return MixpertConfig.from_dict(manifest["model"])


def verify_files(bundle: Path, manifest: dict, kind: str = "onnx", parts=None) -> None:
    """Every file of `kind` ('onnx' or 'engine') present and with the recorded sha256."""
    bundle = Path(bundle)
    for name, part in manifest["parts"].items():
        if parts is not None and name not in parts:
            continue
        entry = part.get(kind)
        if entry is None:
            if kind == "engine":
                raise MixpertError(f"{bundle / NAME}: part {name} has no TensorRT engine; "
                                   f"build them: {rebuild_command(manifest, bundle, engines=True)}")
            raise MixpertError(f"{bundle / NAME}: part {name} has no ONNX file; rebuild: {rebuild_command(manifest, bundle)}")
        for fname, digest in entry["sha256"].items():
            f = bundle / fname
            if not f.is_file():
                raise MixpertError(f"{f}: missing from the bundle; rebuild: {rebuild_command(manifest, bundle, kind == 'engine')}")
            if sha256(f) != digest:
                raise MixpertError(f"{f}: sha256 differs from {NAME} (modified or corrupt); "
                                   f"rebuild: {rebuild_command(manifest, bundle, kind == 'engine')}")


def check_engine_compat(manifest: dict, bundle: Path, flavour: str, version: str, gpu: dict | None) -> None:
    """Refuse engines built by another TensorRT flavour or version, or for another GPU.
    `gpu`: {'name', 'compute_capability': 'sm89'} of the GPU that would run them (None: no GPU)."""
    trt = manifest.get("tensorrt")
    engine = bundle / next(iter(manifest["parts"].values()))["engine"]["file"] if trt else bundle
    fix = rebuild_command(manifest, bundle, engines=True)
    if not trt:
        raise MixpertError(f"{bundle / NAME}: no TensorRT engines in this bundle; build them: {fix}")
    if gpu is None:
        raise MixpertError(f"{engine}: TensorRT engines need a CUDA GPU and none is visible; use --runtime onnxruntime here")
    if trt["flavour"] != flavour:
        raise MixpertError(f"{engine}: built by {trt['flavour']} {trt['version']}, this machine has {flavour} {version}; "
                           f"rebuild here: {fix}")
    if trt["version"] != version:
        raise MixpertError(f"{engine}: built by {trt['flavour']} {trt['version']}, installed is {version}; rebuild: {fix}")
    cc = gpu.get("compute_capability")
    if flavour == "tensorrt_rtx":
        targets = trt["targets"].get("compute_capabilities", [])
        rtx_ok = cc in {"sm80", "sm86", "sm89"} or (cc or "").startswith("sm12")
        if not rtx_ok:
            raise MixpertError(f"{engine}: TensorRT-RTX engines run on Ampere/Ada/Blackwell RTX-class GPUs, not "
                               f"{gpu.get('name')} ({cc}); build with standard TensorRT on this machine: pip install "
                               f"tensorrt, then {fix}")
        if targets and "current" not in targets and cc not in targets:
            raise MixpertError(f"{engine}: built for {','.join(targets)}, this GPU is {gpu.get('name')} ({cc}); "
                               f"rebuild with --gpu-targets {cc} (or current): {fix}")
    else:
        built = trt["targets"].get("gpu") or {}
        if built.get("compute_capability") != cc or built.get("name") != gpu.get("name"):
            raise MixpertError(f"{engine}: built on {built.get('name')} ({built.get('compute_capability')}), this GPU is "
                               f"{gpu.get('name')} ({cc}); rebuild on this machine: {fix}")
