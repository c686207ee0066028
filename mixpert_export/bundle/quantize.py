"""`--precision int8|fp8 --calibration SRC`: explicitly quantised (QDQ) parts for TensorRT, calibrated on the
user's images, gated on held-out images of the same source.

The quantiser is ONNX Runtime's own `quantize_static` in QDQ format (README, "Quantised bundles", says why not
NVIDIA ModelOpt). What is quantised: the inputs of the linear layers' MatMuls (those whose second input is a
weight; a Gemm is first rewritten as MatMul + Add), weights symmetric per output channel, activations symmetric per
tensor (int8: MinMax calibration; fp8 e4m3: the Distribution calibrator, the one quantize_static takes for float
types); their outputs stay float (no Q/DQ after a linear layer: one rounding less, and the placement TensorRT's
guide recommends). ONNX Runtime CPU then runs each quantised layer as one integer kernel, given the optimizers
manifest.ort_disabled_optimizers leaves off. Left in fp32: the router (it
decides the expert, copied as exported), LayerNorm, Softmax, GELU, the patch-embedding Conv, attention's
activation-by-activation MatMuls, and biases (TensorRT-RTX's parser refuses int32 bias DequantizeLinear).

The images: every 5th file of the sorted source is held out for the gate, the rest calibrates. The gate, on the
held-out images, against fp32 torch: each part's output cosine (experts and the router on fp32 trunk features, so
a part's own error), the tokens cosine per image through the quantised bundle's own routing, and routing agreement
under the bundle's rule. ONNX Runtime CPU runs the QDQ graphs (the reference that runs here).

`--quantize experts` leaves the trunk in fp32 (copied as validated) and quantises only the expert layers: in
each expert, and in the single encoder its last nodes that are the versatile expert's (so the baseline stays the
same computation as the Mixpert path it is compared with). The router then sees exactly the fp32 features, so the
routing decision cannot move; what is saved is the experts' memory (the ~237M parameters Mixpert adds).
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from tqdm.auto import tqdm

from mixpert_train.errors import MixpertError
from mixpert_train.families import adapter_for
from mixpert_train.model import VERSATILE, MixpertVision, PixelInput, margins, pool_matrix, route
from mixpert_train.preprocess import IMAGE_SUFFIXES, ImageError, Preprocessor, load_image

from . import manifest as mf
from .onnx_export import onnx_io
from .validate import cosine

PRECISIONS = ("int8", "fp8")
# what is quantised: "all" (trunk, experts, single encoder: the speed) or "experts" (the experts and the single
# encoder's expert layers; the trunk, so the router's input and decision, stays fp32: the memory, routing exact)
SCOPES = ("all", "experts")
GATE = {"part_cosine": 0.99, "tokens_cosine": 0.99, "routing_agreement": 0.99}  # the defaults a user would accept
HELD_OUT_EVERY = 5  # every 5th image of the sorted source is held out for the gate
MIN_HELD_OUT = 10  # fewer held-out images cannot tell 99% agreement from chance
PART_ORDER = ("trunk", "single_encoder")  # then the experts


def _quant_types(precision: str):
    from onnxruntime.quantization import CalibrationMethod, QuantType

    if precision == "int8":
        return QuantType.QInt8, CalibrationMethod.MinMax, "int8"
    return QuantType.QFLOAT8E4M3FN, CalibrationMethod.Distribution, "float8e4m3fn"


def calibration_split(source: str) -> tuple[list[str], list[str]]:
    """(calibration files, held-out files) of `source` (a directory or a quoted glob), every HELD_OUT_EVERY-th of
    the sorted files held out; refused in one line when there are too few to calibrate and gate."""
    if not source:
        raise MixpertError("--precision int8/fp8 needs --calibration DIR-or-glob: a few hundred images like the ones "
                           "you will serve (never calibrated on noise)")
    if Path(source).is_dir():  # a dataset tree: its image files at any depth
        files = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    elif any(c in source for c in "*?["):
        files = sorted(f for f in glob.glob(source, recursive=True)
                       if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise MixpertError(f"--calibration {source}: no such directory; pass a directory of images or a quoted glob")
    if not files:
        raise MixpertError(f"--calibration {source}: no image files there ({', '.join(sorted(IMAGE_SUFFIXES))})")
    held = files[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    if len(held) < MIN_HELD_OUT:
        raise MixpertError(f"--calibration {source}: {len(files)} images; the gate holds out every {HELD_OUT_EVERY}th "
                           f"and needs {MIN_HELD_OUT} of them: pass at least {HELD_OUT_EVERY * MIN_HELD_OUT} "
                           "(a few hundred is better)")
    calib = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return calib, held


class _Images:
    """An image's uint8 rows and per-row inputs, as the pipeline makes them; unreadable files counted."""

    def __init__(self, model: MixpertVision):
        self.model, self.cfg = model, model.cfg
        self.pre, self.ad = Preprocessor(model.cfg.backbone), adapter_for(model.cfg.backbone)
        self.pixel_input = PixelInput(model.cfg)
        self.skipped: list[str] = []

    def rows(self, path: str):
        try:
            rows, grid = self.pre.rows(load_image(path))
        except ImageError as e:
            self.skipped.append(f"{e}")
            return None
        rows = np.ascontiguousarray(rows)
        extra = self.ad.row_inputs(self.cfg.backbone, [grid]) if self.ad.rows != "crops" else {}
        return {"pixel_values": rows, **extra}

    @torch.no_grad()
    def hidden(self, feed: dict) -> np.ndarray:
        extra = [torch.from_numpy(v) for k, v in feed.items() if k != "pixel_values"]
        return self.model.trunk(self.pixel_input(torch.from_numpy(feed["pixel_values"])), *extra).numpy()


def _linear_layers(path: Path) -> list[tuple[str, tuple]]:
    """(name, weight shape) of each MatMul / Gemm whose second input is an initializer, in graph order: the linear
    layers (not attention's activation products)."""
    m = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: tuple(i.dims) for i in m.graph.initializer}
    return [(n.name, shapes[n.input[1]]) for n in m.graph.node
            if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in shapes]


def _gemms_as_matmuls(src: Path, work: Path) -> Path:
    """`src` with each Gemm of a weight (alpha = beta = 1, no transA) rewritten as MatMul (same name, weight
    transposed where transB) + Add of its bias; `src` itself when it has none. Why: with the bias left in float
    (QuantizeBias False, as TensorRT-RTX needs) a QDQ Gemm has a non-quantised third input, which ONNX Runtime's
    QDQ fusion refuses, so it ran in fp32 on weights dequantised every call (Qwen2-VL's fused qkv projection is a
    Gemm); as MatMul + Add it fuses like every other linear layer. TensorRT takes either form."""
    layers = {name for name, _ in _linear_layers(src)}
    m = onnx.load(str(src), load_external_data=False)
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in m.graph.node if n.op_type == "Gemm" and n.name in layers}
    rewrite = {n for n, a in attrs.items()
               if a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0 and not a.get("transA", 0)}
    if not rewrite:
        return src
    m = onnx.load(str(src))  # with its weights
    weights = {i.name: i for i in m.graph.initializer}
    transposed: dict[str, str] = {}
    nodes = []
    for n in m.graph.node:
        if n.name not in rewrite:
            nodes.append(n)
            continue
        b, y = n.input[1], n.output[0]
        if attrs[n.name].get("transB", 0):
            if b not in transposed:  # a new name: no shape recorded for the old one can contradict it
                transposed[b] = b + "_t"
                m.graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weights[b]).T.copy(), b + "_t"))
            b = transposed[b]
        bias = len(n.input) > 2 and n.input[2]
        nodes.append(onnx.helper.make_node("MatMul", [n.input[0], b], [y + "_matmul" if bias else y], name=n.name))
        if bias:
            nodes.append(onnx.helper.make_node("Add", [y + "_matmul", n.input[2]], [y], name=n.name + "_bias"))
    used = {i for n in nodes for i in n.input}
    for b in transposed:
        if b not in used:
            m.graph.initializer.remove(weights[b])
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    work.mkdir(exist_ok=True)
    dst = work / src.name
    big = sum(f.stat().st_size for f in src.parent.glob(src.name + "*")) > 1.8 * 2**30
    onnx.save(m, str(dst), save_as_external_data=big, location=src.name + ".data" if big else None)
    return dst


def _expert_nodes_of_single(single: Path, expert: Path) -> list[str]:
    """The single encoder's linear layers that are the versatile expert's: its last n weight MatMuls in graph
    (topological) order, n the expert's own count, each checked to carry a weight of the same shape."""
    s, e = _linear_layers(single), _linear_layers(expert)
    tail = s[len(s) - len(e):]
    if len(e) > len(s) or [w for _, w in tail] != [w for _, w in e]:
        raise MixpertError(f"{single.name}: its last {len(e)} linear layers do not match {expert.name}'s weights; "
                           "--quantize experts cannot find the expert layers in the single encoder (build --quantize all)")
    return [n for n, _ in tail]


def _feed_for(names: list[str], feed: dict, hidden: np.ndarray | None) -> dict:
    out = {}
    for n in names:
        out[n] = hidden if n == "hidden" else feed[n]
    return out


def _stride(n: int, most: int = 16) -> int:
    """The largest divisor of n up to `most`: images per calibration pass (quantize_static needs n % stride == 0)."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def _quantize_part(src: Path, dst: Path, precision: str, names: list[str], files: list[Path],
                   nodes: list[str] | None = None) -> dict:
    """quantize_static of one part, calibrated on the cached images `files` in passes of a few images
    (CalibStridedMinMax: each pass merges its ranges or histograms, so memory stays bounded at real scale; ORT's
    CalibMaxIntermediateOutputs would instead drop every full batch of outputs unmeasured, onnxruntime 1.32)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items, self.it = files, iter(files)

        def __len__(self):
            return len(self.items)

        def set_range(self, start_index: int, end_index: int):
            self.it = iter(self.items[start_index:end_index])

        def get_next(self):
            f = next(self.it, None)
            if f is None:
                return None
            with np.load(f) as z:
                d = {k: z[k] for k in z.files}
            return _feed_for(names, d, d.get("hidden"))

    qtype, method, _ = _quant_types(precision)
    nodes = [n for n, _ in _linear_layers(src)] if nodes is None else nodes
    src = _gemms_as_matmuls(src, dst.parent / ".gemm")  # node names kept: `nodes` still names them
    big = sum(f.stat().st_size for f in src.parent.glob(src.name + "*")) > 1.8 * 2**30  # protobuf's 2 GB limit
    options = {"QuantizeBias": False, "ActivationSymmetric": True, "WeightSymmetric": True, "DedicatedQDQPair": True,
               "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
               # images a calibration pass: int8's MinMax keeps two numbers a tensor and image, fp8's histogram
               # calibrator keeps every calibrated tensor of the pass whole (internvl2-8b: ~0.7 GB an image; 16 a
               # pass was killed at 24 GiB here), so fp8 passes take at most 2 images (the histograms merge)
               "CalibStridedMinMax": _stride(len(files), 16 if precision == "int8" else 2)}
    t0 = time.perf_counter()
    logging.disable(logging.WARNING)  # the quantiser's root-logger advice on every call
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and the histogram calibrator's prints
            quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes, per_channel=True,
                            reduce_range=False, activation_type=qtype, weight_type=qtype, calibrate_method=method,
                            use_external_data_format=big, extra_options=options)
    finally:
        logging.disable(logging.NOTSET)
        if src.parent.name == ".gemm":
            shutil.rmtree(src.parent)
    return {"quantized_nodes": len(nodes), "seconds": round(time.perf_counter() - t0, 2)}



def quantize_bundle_static(model: MixpertVision, fp32: Path, out: Path, manifest: dict, precision: str, source: str,
                           progress: bool = True, scope: str = "all") -> dict:
    """One step of an int8 / fp8 build: the validated fp32 parts in `fp32` -> QDQ parts in `out` (the router
    copied), calibrated on `source`, then gated on its held-out images. Fills `manifest` in place; refuses a bundle
    that misses the gate in one line naming the part and the figure."""
    if precision not in PRECISIONS:
        raise MixpertError(f"--precision {precision}: static QDQ quantisation is int8 or fp8")
    if scope not in SCOPES:
        raise MixpertError(f"--quantize {scope}: choose {' or '.join(SCOPES)}")
    calib, held = calibration_split(source)
    imgs = _Images(model)
    cache = out / ".calibration"  # inside the staging directory: a killed build leaves nothing beside the bundle
    cache.mkdir()
    try:
        # the calibration images once: rows and fp32 trunk features to disk (bounded memory at real scale)
        kept = []
        for i, path in enumerate(tqdm(calib, desc="calibration features", unit="img", disable=not progress)):
            feed = imgs.rows(path)
            if feed is None:
                continue
            np.savez(cache / f"{i}.npz", hidden=imgs.hidden(feed), **feed)
            kept.append(cache / f"{i}.npz")
        if len(kept) < len(calib) // 2:
            raise MixpertError(f"--calibration {source}: {len(calib) - len(kept)} of {len(calib)} calibration images "
                               f"are unreadable (first: {imgs.skipped[0]})")

        parts = sorted((n for n in manifest["parts"] if n != "router"),
                       key=lambda n: (PART_ORDER.index(n) if n in PART_ORDER else len(PART_ORDER), n))
        shutil.copy2(fp32 / manifest["parts"]["router"]["onnx"]["file"], out / manifest["parts"]["router"]["onnx"]["file"])
        done = {}
        bar = tqdm(parts, desc=f"quantise {precision}", unit="part", disable=not progress)
        for name in bar:
            bar.set_postfix_str(name)
            part = manifest["parts"][name]
            src, dst = fp32 / part["onnx"]["file"], out / part["onnx"]["file"]
            names = [t["name"] for t in part["onnx"]["io"]["inputs"]]
            if scope == "experts" and name == "trunk":  # the router's input stays exactly as validated
                for f in fp32.glob(src.name + "*"):
                    shutil.copy2(f, out / f.name)
                done[name] = {"quantized_nodes": 0, "kept": "fp32"}
                continue
            nodes = None
            if scope == "experts" and name == "single_encoder":
                versatile = fp32 / manifest["parts"][f"expert_{VERSATILE}"]["onnx"]["file"]
                nodes = _expert_nodes_of_single(src, versatile)
            done[name] = _quantize_part(src, dst, precision, names, kept, nodes)
        for name, part in manifest["parts"].items():
            files = [p for p in out.iterdir() if p.name == part["onnx"]["file"] or p.name.startswith(part["onnx"]["file"] + ".")]
            part["onnx"] |= {"sha256": {p.name: mf.sha256(p) for p in files}, "bytes": sum(p.stat().st_size for p in files),
                             "io": onnx_io(out / part["onnx"]["file"])}
        gate = gate_figures(model, out, manifest, held, imgs, progress)
        gate["scope"] = scope
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    qtype, method, onnx_type = _quant_types(precision)
    manifest["quantization"] = {
        "method": mf.QDQ_METHOD, "type": onnx_type,
        "calibrator": method.name, "weights": "symmetric, per output channel", "activations": "symmetric, per tensor",
        "quantized": "inputs of the linear layers' MatMuls (Gemm rewritten as MatMul + Add); outputs float",
        "scope": scope,
        "kept_fp32": ("trunk (all of it), the single encoder's trunk layers, " if scope == "experts" else "")
        + "router, LayerNorm, Softmax, GELU, patch-embedding Conv, attention MatMuls, biases",
        "parts": done,
        "calibration": {"source": str(source), "images": len(kept), "held_out": len(held), "skipped": imgs.skipped,
                        "split": f"every {HELD_OUT_EVERY}th file of the sorted source held out for the gate"},
        "gate": gate}
    for name, part in manifest["parts"].items():
        if name in gate["part_cosine"]:
            c, d = gate["part_cosine"][name], gate["part_max_abs"][name]
            part["validation"] = {"status": "pass" if c >= GATE["part_cosine"] else "fail",
                                  "tolerance": {"cosine": GATE["part_cosine"]}, "reference": "torch fp32 (CPU)",
                                  "runtime": "onnxruntime CPU, " + ("fp32 (not quantised)" if done[name].get("kept")
                                                                    else f"QDQ {onnx_type}"), "images": len(held),
                                  "outputs": {part["onnx"]["io"]["outputs"][0]["name"]: {"cosine": c, "max_abs": d,
                                                                                       "finite": True}}}
    check_gate(gate, precision, source)
    return manifest


def check_gate(gate: dict, precision: str, source: str):
    """Refuse, in one line naming the part and the figure, a bundle that misses the gate."""
    def fix(trunk_side: bool = True) -> str:  # --quantize experts helps where the quantised trunk is the cause
        experts = " --quantize experts (the trunk, so the routing, stays fp32) or" if trunk_side and gate.get("scope") == "all" else ""
        return f"calibrate on more images like the ones you serve (--calibration), or build{experts} --precision fp16"
    for name, c in sorted(gate["part_cosine"].items(), key=lambda kv: kv[1]):
        if c < GATE["part_cosine"]:
            raise MixpertError(f"{precision} gate: {name} cosine {c:.4f} < {GATE['part_cosine']} against fp32 torch on "
                               f"{gate['images']} held-out images of {source}; {fix(not name.startswith('expert_'))}")
    if gate["routing_agreement"] < GATE["routing_agreement"]:
        rule = gate["rule"]
        edge = (f"tau {rule['tau']}" if rule["strategy"] == "score-difference" else f"lam {rule['lam']}"
                if rule["strategy"] == "score-threshold" else "argmax")
        m = gate["flipped_fp32_margins"]
        raise MixpertError(f"{precision} gate: routing agrees with fp32 on {gate['routing_agreement']:.1%} of "
                           f"{gate['images']} held-out images (< {GATE['routing_agreement']:.0%}; {len(m)} flipped, "
                           f"their fp32 margins {min(m):.3f}..{max(m):.3f} against {edge}); {fix()}")
    if gate["tokens_cosine"]["min"] < GATE["tokens_cosine"]:
        raise MixpertError(f"{precision} gate: tokens cosine {gate['tokens_cosine']['min']:.4f} < {GATE['tokens_cosine']} "
                           f"(worst of {gate['images']} held-out images of {source}); {fix()}")


def gate_figures(model: MixpertVision, bundle: Path, manifest: dict, held: list[str], imgs: _Images,
                 progress: bool = True) -> dict:
    """The gate's figures on the held-out images: per part cosine (worst image), tokens cosine per image through
    each side's own routing, routing agreement under the bundle's rule. Quantised parts on ONNX Runtime CPU."""
    cfg = model.cfg
    off = mf.ort_disabled_optimizers({"quantization": {"method": mf.QDQ_METHOD}})  # the sessions the runtime makes
    sess = {n: ort.InferenceSession(str(bundle / p["onnx"]["file"]), providers=["CPUExecutionProvider"],
                                    disabled_optimizers=off) for n, p in manifest["parts"].items()}
    inputs = {n: [i.name for i in s.get_inputs()] for n, s in sess.items()}
    part_cos = {n: [] for n in manifest["parts"] if n != "router"}
    part_abs = {n: [] for n in part_cos}

    def compare(name, got, want):
        part_cos[name].append(cosine(got, want))
        part_abs[name].append(float(np.abs(np.asarray(got, np.float64) - want).max()))
    tokens_cos, agree, score_d, flips = [], [], [], []
    for path in tqdm(held, desc="gate (held-out)", unit="img", disable=not progress):
        feed = imgs.rows(path)
        if feed is None:
            continue
        n_rows = len(feed["pixel_values"])
        pool = pool_matrix([n_rows])
        extra = {k: v for k, v in feed.items() if k != "pixel_values"}
        with torch.no_grad():
            h32 = imgs.hidden(feed)
            ht = torch.from_numpy(h32)
            et = [torch.from_numpy(v) for v in extra.values()]
            s32 = model.router(ht, torch.from_numpy(pool)).numpy()
            want = {e: model.experts[e](ht, *et).numpy() for e in cfg.experts}
        hq = sess["trunk"].run(None, _feed_for(inputs["trunk"], feed, None))[0]
        compare("trunk", hq, h32)
        for e in cfg.experts:  # each expert on the fp32 features: its own error
            got = sess[f"expert_{e}"].run(None, _feed_for(inputs[f"expert_{e}"], feed, h32))[0]
            compare(f"expert_{e}", got, want[e])
        if "single_encoder" in sess:
            got = sess["single_encoder"].run(None, _feed_for(inputs["single_encoder"], feed, None))[0]
            compare("single_encoder", got, want[VERSATILE])
        # end to end, as the pipeline runs it: quantised trunk -> fp32 router -> the rule -> quantised expert
        sq = sess["router"].run(None, {"hidden": hq, "pool": pool})[0]
        e32 = route(s32, cfg.domains, cfg.strategy, cfg.tau, cfg.lam)[0]
        eq = route(sq, cfg.domains, cfg.strategy, cfg.tau, cfg.lam)[0]
        tq = sess[f"expert_{eq}"].run(None, _feed_for(inputs[f"expert_{eq}"], feed, hq))[0]
        tokens_cos.append(cosine(tq, want[e32]))
        agree.append(e32 == eq)
        if e32 != eq:  # how close to the rule's threshold the fp32 decision was
            flips.append(round(float(margins(s32)[0] if cfg.strategy == "score-difference" else s32.max()), 4))
        score_d.append(float(np.abs(s32 - sq).max()))
    if not agree:
        raise MixpertError(f"--calibration: none of the {len(held)} held-out images could be read "
                           f"(first: {imgs.skipped[-1] if imgs.skipped else '?'})")
    return {"images": len(agree), "rule": {"strategy": cfg.strategy, "tau": cfg.tau, "lam": cfg.lam},
            "part_cosine": {n: float(min(v)) for n, v in part_cos.items() if v},
            "part_max_abs": {n: float(max(v)) for n, v in part_abs.items() if v},
            "tokens_cosine": {"min": float(min(tokens_cos)), "mean": float(np.mean(tokens_cos))},
            "routing_agreement": float(np.mean(agree)), "score_max_abs": float(max(score_d)),
            "flipped_fp32_margins": flips,  # score-difference: top1 - top2 of the flipped images (else top1)
            "thresholds": dict(GATE)}
