"""`build`: a Mixpert model -> a bundle directory (ONNX parts, validation figures, TensorRT engines, manifest).

Host export, device compile: `build_bundle` exports (and compiles where TensorRT is importable);
`compile_bundle` compiles an exported bundle on the appliance. Both write into a temporary directory and
rename at the end, so an interrupted build never leaves a bundle that loads.
"""

from __future__ import annotations

import resource
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from mixpert_train.errors import MixpertError
from mixpert_train.families import adapter_for
from mixpert_train.model import MixpertVision
from mixpert_train.staging import staged_dir

from . import manifest as mf
from . import tensorrt_build as trtb
from .contract import PartSpec, part_specs
from .onnx_export import OPSET, export_part, lowered, onnx_io
from .int8 import quantize_bundle
from .quantize import PRECISIONS as QDQ_PRECISIONS
from .quantize import SCOPES as QDQ_SCOPES
from .quantize import calibration_split, quantize_bundle_static
from .validate import check, sample_inputs, validate_part


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def source_paths(source: dict | None) -> dict:
    """{flag: path} of what a build reads, for the target checks (a bundle must not replace or sit inside them)."""
    return {f"--{source['kind']}": source["path"]} if source and source.get("path") else {}


def _io_eq(a: dict, b: dict) -> bool:
    """Same names, dtypes and shapes (dynamic axes, named or -1, compare equal)."""
    def norm(ts):
        return [(t["name"], [d if isinstance(d, int) and d > 0 else -1 for d in t["shape"]], t["dtype"]) for t in ts]

    return all(norm(a[k]) == norm(b[k]) for k in ("inputs", "outputs"))


def _spec_io(spec: PartSpec) -> dict:
    return {"inputs": [t.to_dict() for t in spec.inputs], "outputs": [t.to_dict() for t in spec.outputs]}


def export_parts(model: MixpertVision, bundle: Path, precision: str, max_crops: int, with_baseline: bool = True,
                 validate: bool = True, progress: bool = True) -> dict:
    """Export and validate every part into `bundle`; returns the manifest's `parts` section."""
    specs = part_specs(model.cfg, precision, with_baseline)
    low = lowered(model, precision)
    inputs = sample_inputs(model) if validate else None
    parts, shared = {}, {}  # shared: the experts' one trace (onnx_export.export_part)
    bar = tqdm(specs, desc=f"export {precision}", unit="part", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        t0 = time.perf_counter()
        files = export_part(low, spec, bundle, precision, max_crops, shared)
        seconds = time.perf_counter() - t0
        io = onnx_io(files[0])
        if not _io_eq(io, _spec_io(spec)):
            raise MixpertError(f"{files[0]}: I/O {io} does not match the part spec; the export is wrong")
        t1 = time.perf_counter()
        report = validate_part(model, spec, files[0], precision, inputs) if validate else {"status": "skipped"}
        report["seconds"] = round(time.perf_counter() - t1, 3)
        check(report, spec.name)
        parts[spec.name] = {"onnx": {"file": spec.file, "sha256": {f.name: mf.sha256(f) for f in files},
                                     "bytes": sum(f.stat().st_size for f in files), "io": io,
                                     "export_seconds": round(seconds, 3)},
                            "validation": report, "spec": _spec_io(spec)}
    return parts


def pixel_contract(cfg) -> dict:
    """What the pixel parts take, for the manifest: uint8 bytes in the rows' layout, normalised inside the graph by
    the processor's per-channel 256-entry table (model.PixelInput), whose values and hash are recorded."""
    import hashlib

    from mixpert_train.preprocess import Preprocessor

    pre = Preprocessor(cfg.backbone)
    pre.require_table()
    shape = list(adapter_for(cfg.backbone).io(cfg.backbone)["pixels"][0])
    return {"dtype": "uint8", "shape": shape, "normalised": "in the graph: a 256-entry table per channel (Gather)",
            "table_sha256": hashlib.sha256(pre.table.tobytes()).hexdigest(),
            "processor": type(pre.processor).__name__}


FP8_TARGETS = ("sm89", "sm120", "sm121")  # FP8 tensor cores: Ada and newer (TensorRT-RTX 1.7 refuses fp8 for sm80/86)


def default_gpu_targets(trt: trtb.TensorRT, precision: str = "fp32") -> tuple:
    """RTX: the build GPU where one is visible, else every RTX-class architecture (fp8: those with FP8 tensor cores);
    standard: the build GPU."""
    if trt.flavour != "tensorrt_rtx":
        return ()
    if trtb.build_gpu():
        return ("current",)
    return ("sm89", "sm120") if precision == "fp8" else ("sm80", "sm86", "sm89", "sm120")


def check_gpu_targets(gpu_targets, runtime: str = "auto", precision: str = "fp32", prefer=None):
    """Refuse --gpu-targets that cannot mean anything, before minutes of export: no engines will be built (ONNX
    Runtime, int8, no TensorRT here), standard TensorRT (it builds for the GPU it runs on), an unknown target, or
    `current` where this process sees no GPU."""
    if not gpu_targets:
        return
    given = f"--gpu-targets {','.join(gpu_targets)}"
    if runtime == "onnxruntime" or precision == "int8-dynamic":
        raise MixpertError(f"{given}: this build makes no TensorRT engines "
                           f"({'--runtime onnxruntime' if runtime == 'onnxruntime' else '--precision int8-dynamic'}); drop --gpu-targets")
    if runtime == "auto" and not trtb.available():
        raise MixpertError(f"{given}: neither tensorrt nor tensorrt_rtx is installed here, so no engines are built; "
                           "drop --gpu-targets or install TensorRT-RTX")
    if trtb.import_tensorrt(prefer).flavour != "tensorrt_rtx":
        raise MixpertError(f"{given}: standard TensorRT builds for the GPU it runs on; the targets are TensorRT-RTX's. "
                           "Drop --gpu-targets")
    bad = [g for g in gpu_targets if g != "current" and g not in trtb.GPU_TARGETS]
    if bad:
        raise MixpertError(f"--gpu-targets {','.join(bad)}: unknown; choose from {','.join(trtb.GPU_TARGETS)} or current")
    old = [g for g in gpu_targets if g not in ("current", *FP8_TARGETS)]
    if precision == "fp8" and old:
        raise MixpertError(f"--gpu-targets {','.join(old)}: fp8 needs FP8 tensor cores (sm89 Ada and newer; TensorRT-RTX "
                           f"refuses fp8 engines for older ones); drop them, or build --precision int8 for those GPUs")
    if "current" in gpu_targets and trtb.build_gpu() is None:
        raise MixpertError(f"{given}: this process sees no CUDA GPU, so there is no current one; name the appliance's "
                           f"architectures (--gpu-targets {','.join(trtb.GPU_TARGETS[1:4])}) or build on the appliance")


def compile_engines(bundle: Path, manifest: dict, gpu_targets=None, progress: bool = True, prefer=None) -> dict:
    """Build one engine per part in `bundle` (ONNX already there); fills the manifest's engine sections."""
    trt = trtb.import_tensorrt(prefer)
    check_gpu_targets(gpu_targets, "tensorrt", manifest["precision"], prefer=prefer)
    targets = tuple(gpu_targets) if gpu_targets else default_gpu_targets(trt, manifest["precision"])
    builder = trt.module.Builder(trtb._logger(trt))
    cache_path = bundle / "timing.cache"
    cache = trtb.new_timing_cache(trt, builder, cache_path)
    cfg = mf.bundle_config(manifest)
    max_crops = manifest["max_crops"]
    opt = min(cfg.backbone.max_crops, max_crops)
    least = adapter_for(cfg.backbone).io(cfg.backbone)["merge"]  # patches: a whole merge window at least
    bar = tqdm(list(manifest["parts"].items()), desc=f"engines ({trt.flavour})", unit="part", disable=not progress)
    for name, part in bar:
        bar.set_postfix_str(name)
        onnx_path = bundle / part["onnx"]["file"]
        engine_path = bundle / f"{name}.engine"
        symbolic = {t["name"]: [d if isinstance(d, str) else None for d in t["shape"]] for t in part["spec"]["inputs"]}
        info = trtb.build_engine(trt, onnx_path, engine_path, symbolic, least, opt, max_crops,
                                 gpu_targets=[g for g in targets if g != "current"], timing_cache=cache, builder=builder)
        if not _io_eq(info["io"], part["spec"]):
            raise MixpertError(f"{engine_path}: engine I/O {info['io']} differs from {onnx_path.name}'s; rebuild the bundle")
        part["engine"] = {"file": engine_path.name, "sha256": {engine_path.name: mf.sha256(engine_path)}, **info}
    if cache is not None:
        cache_path.write_bytes(memoryview(cache.serialize()))
    manifest["tensorrt"] = {"flavour": trt.flavour, "version": trt.version,
                            "targets": trtb.engine_targets(trt, targets),
                            "timing_cache": cache_path.name if cache is not None else None}
    return manifest


PRECISIONS = (*OPSET, *QDQ_PRECISIONS, "int8-dynamic")


def build_bundle(model: MixpertVision, out: str | Path, precision: str = "fp32", max_crops: int | None = None,
                 runtime: str = "auto", gpu_targets=None, source: dict | None = None, with_baseline: bool = True,
                 validate: bool = True, progress: bool = True, calibration: str | None = None,
                 quantize: str = "all") -> dict:
    """Export (+ validate) every part, build TensorRT engines where asked or available, write the manifest, and
    move the bundle into place. Returns the manifest. int8 / fp8: QDQ parts calibrated on `calibration` and gated
    on its held-out images (quantize.py), engines where TensorRT accepts them; int8-dynamic: ONNX Runtime CPU's
    dynamic quantisation of the fp32 parts (int8.py). `quantize`: int8 / fp8's scope, all or experts (quantize.py)."""
    out = Path(out)
    cfg = model.cfg
    if precision not in PRECISIONS:
        raise MixpertError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    if runtime not in ("auto", "onnxruntime", "tensorrt"):
        raise MixpertError(f"--runtime {runtime}: choose auto, onnxruntime or tensorrt")
    if precision == "int8-dynamic" and runtime == "tensorrt":
        raise MixpertError("--precision int8-dynamic is ONNX Runtime CPU dynamic quantisation; for TensorRT use "
                           "--precision int8 --calibration DIR (QDQ) or fp16")
    if precision in QDQ_PRECISIONS:
        calibration_split(calibration)  # refuse a missing or thin --calibration before minutes of export
        if quantize not in QDQ_SCOPES:
            raise MixpertError(f"--quantize {quantize}: choose {' or '.join(QDQ_SCOPES)}")
    elif calibration:
        raise MixpertError(f"--calibration {calibration}: only --precision int8 or fp8 calibrates; drop it")
    elif quantize != "all":
        raise MixpertError(f"--quantize {quantize}: only --precision int8 or fp8 builds choose what is quantised; drop it")
    if runtime == "tensorrt":
        trtb.import_tensorrt()  # fail before minutes of export
    check_gpu_targets(gpu_targets, runtime, precision)
    # crops: four of the largest images a call; patches (attention over the whole call): one largest image's worth
    max_crops = int(max_crops or (4 if adapter_for(cfg.backbone).rows == "crops" else 1) * cfg.backbone.max_crops)
    t0 = time.perf_counter()
    with staged_dir(out, mf.BUNDLE, sources=source_paths(source)) as tmp:
        quantised = precision in (*QDQ_PRECISIONS, "int8-dynamic")
        exported = "fp32" if quantised else precision  # quantisation starts from validated fp32 parts
        manifest = {
            "format": mf.FORMAT, "format_version": mf.FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": cfg.to_dict(), "source": source or {"kind": "in-memory"},
            "precision": precision, "opset": OPSET[exported], "max_crops": max_crops,
            "versions": mf.tool_versions(), "tensorrt": None,
        }
        if quantised:
            fp32 = tmp / "fp32"
            fp32.mkdir()
            manifest["parts"] = export_parts(model, fp32, "fp32", max_crops, with_baseline, validate, progress)
            if precision == "int8-dynamic":
                quantize_bundle(model, fp32, tmp, manifest)
            else:
                quantize_bundle_static(model, fp32, tmp, manifest, precision, calibration, progress, quantize)
            shutil.rmtree(fp32)
            if precision in QDQ_PRECISIONS and (runtime == "tensorrt" or (runtime == "auto" and trtb.available())):
                manifest["quantization"]["tensorrt"] = compile_quantised(tmp, manifest, gpu_targets, progress,
                                                                         required=runtime == "tensorrt")
        else:
            manifest["parts"] = export_parts(model, tmp, precision, max_crops, with_baseline, validate, progress)
            if runtime == "tensorrt" or (runtime == "auto" and trtb.available()):
                compile_engines(tmp, manifest, gpu_targets, progress)
        manifest["packing"] = mf.write_packing(tmp, model)
        manifest["pixels"] = pixel_contract(cfg)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 2)
        manifest["peak_rss_mb"] = round(peak_rss_mb())
        mf.write_manifest(tmp, manifest)
    return manifest


def compile_quantised(bundle: Path, manifest: dict, gpu_targets=None, progress: bool = True, required: bool = False) -> dict:
    """Engines for QDQ parts where this TensorRT accepts them: what it said, recorded. Where it refuses, the bundle
    keeps its QDQ ONNX for `build --from-onnx` on the appliance with standard TensorRT (or raises, with --runtime
    tensorrt)."""
    trt = trtb.import_tensorrt()
    try:
        compile_engines(bundle, manifest, gpu_targets, progress)
    except MixpertError as e:
        if required:
            raise
        for part in manifest["parts"].values():
            part.pop("engine", None)
        for p in bundle.glob("*.engine"):
            p.unlink()
        manifest["tensorrt"] = None
        return {"flavour": trt.flavour, "version": trt.version, "accepted": False,
                "error": str(e).replace(str(bundle), "<bundle>"),
                "next": "build --from-onnx DIR on the appliance with standard TensorRT"}
    return {"flavour": trt.flavour, "version": trt.version, "accepted": True,
            "engines": sorted(n for n, p in manifest["parts"].items() if p.get("engine"))}


def compile_bundle(onnx_bundle: str | Path, out: str | Path | None = None, gpu_targets=None, progress: bool = True,
                   prefer=None) -> dict:
    """Device compile: engines for an exported bundle (its ONNX verified against its manifest first)."""
    src = Path(onnx_bundle)
    out = Path(out) if out else src
    manifest = mf.read_manifest(src)
    mf.verify_files(src, manifest, "onnx")
    trtb.import_tensorrt(prefer)
    with staged_dir(out, mf.BUNDLE, sources={"--from-onnx": src}) as tmp:
        for part in manifest["parts"].values():
            part.pop("engine", None)
            for fname in part["onnx"]["sha256"]:
                shutil.copy2(src / fname, tmp / fname)
        if (src / "timing.cache").is_file():
            shutil.copy2(src / "timing.cache", tmp / "timing.cache")
        if manifest.get("packing"):
            shutil.copy2(src / manifest["packing"]["file"], tmp / manifest["packing"]["file"])
        compile_engines(tmp, manifest, gpu_targets, progress, prefer)
        manifest["peak_rss_mb"] = round(peak_rss_mb())
        mf.write_manifest(tmp, manifest)
    return manifest


def summary_rows(manifest: dict) -> list[list[str]]:
    rows = []
    for name, p in manifest["parts"].items():
        v = p.get("validation", {})
        if v.get("status") in ("pass", "fail"):
            o = next(iter(v["outputs"].values()))
            val = f"{v['status']} max|d|={o['max_abs']:.2e} cos={o['cosine']:.6f}"
        else:
            val = v.get("status", "-")
        e = p.get("engine")
        rows.append([name, p["onnx"]["file"], f"{p['onnx']['bytes'] / 2**20:.1f} MiB", f"{p['onnx']['export_seconds']:.1f}s",
                     val, f"{e['bytes'] / 2**20:.1f} MiB {e['build_seconds']:.1f}s" if e else "-"])
    return rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


