"""Whether an exported part is right: polygraphy's Comparator runs the torch module and ONNX Runtime (CPU)
on the same inputs, and the outputs are held to the tolerances below (fp32 reference in every case)."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertVision, PixelInput, pool_matrix

from .contract import PartSpec
from .onnx_export import part_module

# (issue #10) fp32: max |diff| <= 1e-4 and cosine >= 0.9999; fp16/bf16: cosine >= 0.999 against fp32 torch.
TOLERANCES = {"fp32": {"max_abs": 1e-4, "cosine": 0.9999}, "fp16": {"cosine": 0.999}, "bf16": {"cosine": 0.999}}


def cosine(a, b) -> float:
    """Cosine of two arrays taken whole, in float64: the accuracy figure of every validation and gate."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


CPU_UNSUPPORTED = {"bf16": "ONNX Runtime CPU has no bfloat16 MatMul; validate on a GPU (tests marked gpu)"}

G_LOGGER.module_severity = G_LOGGER.ERROR


class TorchCpuRunner(BaseRunner):
    """polygraphy runner for a torch module on CPU (polygraphy's own PytRunner moves inputs to CUDA)."""

    def __init__(self, module: torch.nn.Module, spec: PartSpec, name=None):
        super().__init__(name=name, prefix="torch-cpu-runner")
        self.module, self.spec = module, spec
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]

    def activate_impl(self):
        self.module.eval()

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for t in self.spec.inputs:  # the reference takes fp32 (integer inputs as they are); dynamic axes are -1
            meta.add(t.name, dtype=_reference_dtype(t), shape=[d if isinstance(d, int) else -1 for d in t.shape])
        return meta

    def infer_impl(self, feed_dict):
        args = [torch.from_numpy(np.asarray(feed_dict[t.name], dtype=_reference_dtype(t))) for t in self.spec.inputs]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.module(*args)
        self.inference_time = time.perf_counter() - start
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return OrderedDict((n, o.float().numpy()) for n, o in zip(self.output_names, outs))

    def deactivate_impl(self):
        pass


def _reference_dtype(t):
    return {"int64": np.int64, "uint8": np.uint8}.get(t.dtype, np.float32)


def sample_pictures(s: int, seed: int = 0) -> list:
    """Drawn s x s RGB images: a text page, chart-like bars, a gradient scene."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    doc = Image.new("RGB", (s, s), "white")
    d = ImageDraw.Draw(doc)
    for i in range(0, s, max(8, s // 8)):
        d.text((2, i), "Mixpert 0.6 tau", fill="black")
    images.append(doc)
    chart = Image.new("RGB", (s, s), (240, 240, 250))
    d = ImageDraw.Draw(chart)
    for i, h in enumerate(rng.uniform(0.2, 0.9, 5)):
        x0 = int(i * s / 5) + 1
        d.rectangle([x0, int(s * (1 - h)), x0 + s // 7, s - 1], fill=(30 * i, 90, 200 - 30 * i))
    images.append(chart)
    yy, xx = np.mgrid[0:s, 0:s] / max(1, s - 1)
    scene = np.stack([xx, yy, 1 - xx * yy], -1) * 255
    images.append(Image.fromarray(scene.astype(np.uint8)))
    return images


def sample_crops(cfg, n_random: int = 2, seed: int = 0) -> np.ndarray:
    """Validation crops as the engines take them: the drawn images' bytes and uniform noise bytes (every value
    of the table). [N, S, S, 3] uint8, channels last."""
    s = cfg.backbone.crop_size
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(im, np.uint8) for im in sample_pictures(s, seed)]
    arrs += list(rng.integers(0, 256, (n_random, s, s, 3), dtype=np.uint8))
    return np.ascontiguousarray(np.stack(arrs))


class ValidationInputs:
    """Real-looking uint8 rows (crops, or the patches of images of several sizes with their per-row inputs) and,
    computed once for all parts that take it, the fp32 trunk's output on them. `counts`: rows an image."""

    def __init__(self, model: MixpertVision, crops: np.ndarray, rows: dict | None = None, counts=None):
        self.model, self.crops, self._hidden = model, crops, None
        self.rows = rows or {}
        self.counts = list(counts) if counts is not None else [2, 1, len(crops) - 3]

    @property
    def hidden(self) -> np.ndarray:
        if self._hidden is None:
            with torch.no_grad():
                rows = [torch.from_numpy(v) for v in self.rows.values()]
                pixels = PixelInput(self.model.cfg)(torch.from_numpy(self.crops))
                self._hidden = self.model.trunk(pixels, *rows).numpy()
        return self._hidden


def sample_inputs(model: MixpertVision) -> ValidationInputs:
    """Validation rows for this model's family: sample_crops for crop families; for patch families the same
    drawn images at several sizes and aspect ratios through the family's own image processor (each its own grid)."""
    from PIL import Image

    from mixpert_train.families import adapter_for
    from mixpert_train.preprocess import Preprocessor

    cfg = model.cfg
    ad = adapter_for(cfg.backbone)
    if ad.rows == "crops":
        return ValidationInputs(model, sample_crops(cfg))
    pre = Preprocessor(cfg.backbone)
    s = int(cfg.backbone.vision["patch_size"]) * 8
    noise = np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)
    pictures = sample_pictures(s) + [Image.fromarray(noise)]
    sizes = [(s, s), (s // 2, 3 * s // 2), (3 * s // 2, s // 3), (s // 3, s // 4)]  # (w, h); the last resized up
    patches, grids = [], []
    for img, (w, h) in zip(pictures, sizes):
        px, grid = pre.rows(img.resize((w, h)))
        patches.append(px)
        grids.append(grid)
    rows = ad.row_inputs(cfg.backbone, grids)
    return ValidationInputs(model, np.concatenate(patches), rows, [len(p) for p in patches])


def validation_feeds(spec: PartSpec, inputs: ValidationInputs) -> list[dict]:
    """One feed dict for this part: rows for pixel parts, the fp32 trunk's output for the others."""
    crops = inputs.crops
    names = {t.name for t in spec.inputs}
    rows = {k: v for k, v in inputs.rows.items() if k in names}
    if spec.inputs[0].name == "pixel_values":
        return [{"pixel_values": crops} | rows]
    feed = {"hidden": inputs.hidden} | rows
    if spec.name == "router":
        feed["pool"] = pool_matrix(inputs.counts)
    return [feed]


def _cast_for_graph(feed: dict, spec: PartSpec) -> dict:
    out = {}
    for t in spec.inputs:
        x = feed[t.name]
        if t.dtype == "float16":
            x = x.astype(np.float16)
        elif t.dtype == "bfloat16":
            import ml_dtypes

            x = x.astype(ml_dtypes.bfloat16)
        out[t.name] = x
    return out


def validate_part(model_fp32: MixpertVision, spec: PartSpec, onnx_path, precision: str, inputs) -> dict:
    """Run torch (fp32, the reference) and ONNX Runtime CPU through polygraphy; return the figures and
    whether they meet TOLERANCES. Never raises for a miss: the caller decides (build fails on a miss)."""
    if precision in CPU_UNSUPPORTED:
        return {"status": "not-run", "reason": CPU_UNSUPPORTED[precision]}
    if not isinstance(inputs, ValidationInputs):
        inputs = ValidationInputs(model_fp32, inputs)
    feeds = validation_feeds(spec, inputs)
    crops = inputs.crops
    torch_runner = TorchCpuRunner(part_module(model_fp32, spec, "fp32"), spec, name="torch-fp32")
    ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name="onnxruntime-cpu")
    # the ORT runner gets the inputs in the graph's own dtypes; torch always gets fp32
    results = Comparator.run([torch_runner], data_loader=feeds)
    results.extend(Comparator.run([ort_runner], data_loader=[_cast_for_graph(f, spec) for f in feeds]))
    ref, got = results[0][1][0], results[1][1][0]
    figures = {}
    for t in spec.outputs:
        a, b = ref[t.name].astype(np.float64).ravel(), np.asarray(got[t.name], dtype=np.float64).ravel()
        figures[t.name] = {"max_abs": float(np.abs(a - b).max()), "cosine": cosine(a, b), "finite": bool(np.isfinite(b).all())}
    tol = TOLERANCES[precision]
    ok = all(f["finite"] and f["cosine"] >= tol["cosine"] and f["max_abs"] <= tol.get("max_abs", np.inf)
             for f in figures.values())
    return {"status": "pass" if ok else "fail", "tolerance": tol, "reference": "torch fp32 (CPU)",
            "runtime": "onnxruntime CPUExecutionProvider", "inputs": int(len(crops)), "outputs": figures}


def check(report: dict, part: str):
    if report["status"] == "fail":
        out = next(iter(report["outputs"].values()))
        raise MixpertError(f"{part}: ONNX output differs from torch beyond {report['tolerance']} "
                           f"(max_abs {out['max_abs']:.3g}, cosine {out['cosine']:.6f}); the export is wrong")
