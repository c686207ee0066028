"""`--precision int8-dynamic` for ONNX Runtime CPU: dynamic int8 quantisation of the MatMuls of trunk, experts and the
single encoder (the router stays fp32: it is tiny and decides the routing), gated on accuracy against fp32
torch and on routing agreement, with the speed-up measured side by side."""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertVision, pool_matrix, route

from . import manifest as mf
from .onnx_export import onnx_io
from .validate import cosine, sample_inputs

INT8_COSINE = 0.99  # gate: every int8 part's output cosine against fp32 torch
INT8_AGREEMENT = 0.9  # gate: fraction of images routed to the same expert as fp32 (score-difference)


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])



def measure_speedup(fp32: Path, int8: Path, feed: dict, reps: int = 5) -> dict:
    """fp32 / int8 latency of one ONNX part on the same inputs, interleaved rounds (this machine is noisy)."""
    s32, s8 = _session(fp32), _session(int8)
    s32.run(None, feed), s8.run(None, feed)  # warm-up
    t32, t8 = [], []
    for _ in range(reps):
        for sess, acc in ((s32, t32), (s8, t8)):
            t = time.perf_counter()
            sess.run(None, feed)
            acc.append((time.perf_counter() - t) * 1e3)
    ratios = [a / b for a, b in zip(t32, t8)]
    return {"part": fp32.stem, "rows": int(len(feed["pixel_values"])), "fp32_ms": statistics.median(t32),
            "int8_ms": statistics.median(t8), "speedup": statistics.median(ratios), "speedup_min": min(ratios),
            "speedup_max": max(ratios), "device": "CPU (ONNX Runtime CPUExecutionProvider)"}


def quantize_bundle(model: MixpertVision, fp32: Path, out: Path, manifest: dict) -> dict:
    """One step of an int8-dynamic build: the validated fp32 parts in `fp32` -> int8 parts in `out` (the router
    copied), each gated on cosine against fp32 torch on the validation rows (sample_inputs: crops, or patches of
    images of several sizes with their per-row inputs), then routing agreement and the speed-up. Fills `manifest`
    in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    inputs = sample_inputs(model)
    rows = {k: torch.from_numpy(v) for k, v in inputs.rows.items()}
    with torch.no_grad():
        hidden = torch.from_numpy(inputs.hidden)
        want = {"trunk": inputs.hidden, "single_encoder": model.experts["versatile"](hidden, *rows.values()).numpy()}
        want |= {f"expert_{e}": model.experts[e](hidden, *rows.values()).numpy() for e in model.cfg.experts}
    available = {"pixel_values": inputs.crops, "hidden": inputs.hidden, **inputs.rows}

    def feed(part):
        return {t["name"]: available[t["name"]] for t in part["onnx"]["io"]["inputs"]}

    for name, part in manifest["parts"].items():
        src = fp32 / part["onnx"]["file"]
        dst = out / part["onnx"]["file"]
        if name == "router":
            shutil.copy2(src, dst)
        else:
            logging.disable(logging.WARNING)  # the quantizer's root-logger advice on every call
            try:
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
            finally:
                logging.disable(logging.NOTSET)
            got = _session(dst).run(None, feed(part))[0]
            cos = cosine(got, want[name])
            part["validation"] = {"status": "pass" if cos >= INT8_COSINE else "fail", "tolerance": {"cosine": INT8_COSINE},
                                  "reference": "torch fp32 (CPU)", "runtime": "onnxruntime CPU, dynamic int8",
                                  "outputs": {part["onnx"]["io"]["outputs"][0]["name"]:
                                              {"cosine": cos, "max_abs": float(np.abs(got - want[name]).max()), "finite": bool(np.isfinite(got).all())}}}
            if cos < INT8_COSINE:
                raise MixpertError(f"{dst.name}: int8 output cosine {cos:.4f} < {INT8_COSINE} against fp32; use --precision fp32")
        part["onnx"] |= {"sha256": {dst.name: mf.sha256(dst)}, "bytes": dst.stat().st_size, "io": onnx_io(dst)}
    # routing agreement on the validation images: fp32 torch vs int8 trunk + fp32 router
    pool = pool_matrix(inputs.counts)
    with torch.no_grad():
        s32 = model.router(hidden, torch.from_numpy(pool)).numpy()
    h8 = _session(out / "trunk.onnx").run(None, feed(manifest["parts"]["trunk"]))[0]
    s8 = _session(out / "router.onnx").run(None, {"hidden": h8, "pool": pool})[0]
    cfg = model.cfg
    agree = {st: float(np.mean([a == b for a, b in zip(route(s32, cfg.domains, st, cfg.tau, cfg.lam),
                                                         route(s8, cfg.domains, st, cfg.tau, cfg.lam))]))
             for st in ("direct", "score-threshold", "score-difference")}
    manifest["int8"] = {"routing_agreement": agree, "images": len(inputs.counts), "score_max_abs": float(np.abs(s32 - s8).max()),
                        "speedup": measure_speedup(fp32 / "single_encoder.onnx", out / "single_encoder.onnx",
                                                   feed(manifest["parts"]["single_encoder"]))}
    if agree[cfg.strategy] < INT8_AGREEMENT:
        raise MixpertError(f"int8 routing agrees with fp32 on {agree[cfg.strategy]:.0%} of images (< {INT8_AGREEMENT:.0%}); use --precision fp32")
    return manifest
