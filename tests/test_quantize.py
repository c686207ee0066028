"""int8 / fp8 QDQ bundles (issue 27), every family, tiny: calibrated on demo-style images with a trained router,
gated on the held-out fifth against fp32 torch; the QDQ graphs hold what TensorRT expects; bad or missing
calibration is refused in one line with its figure; TensorRT-RTX builds the parts where it accepts them."""

import collections
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from mixpert_export.__main__ import PRECISIONS as CLI_PRECISIONS
from mixpert_export.__main__ import main
from mixpert_export.bundle import manifest as mf
from mixpert_export.bundle import tensorrt_build as trtb
from mixpert_export.bundle.build import PRECISIONS, build_bundle
from mixpert_export.bundle.quantize import GATE, HELD_OUT_EVERY, calibration_split, check_gate
from mixpert_export.runtime.pipeline import MixpertPipeline
from mixpert_train.backbones import get_backbone
from mixpert_train.data import synthetic
from mixpert_train.data.manifest import read_manifest
from mixpert_train.errors import MixpertError
from mixpert_train.model import VERSATILE, MixpertConfig, build_model, route
from mixpert_train.preprocess import Preprocessor, load_image
from mixpert_train.router import pooled_features, router_scores

FAMILIES = ["tiny", "tiny-internvl", "tiny-qwen2-vl"]
ONNX_TYPE = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}


def trained(backbone: str, data):
    """A tiny random-init model whose router is trained on the demo-style images (decisive scores, as a trained
    Mixpert's are; a random router sends everything to versatile and says nothing about routing)."""
    torch.manual_seed(0)
    model = build_model(MixpertConfig.for_backbone(get_backbone(backbone)), seed=0).eval()
    samples = [s for s in read_manifest(data / "train.jsonl") if s.domain in model.cfg.domains]
    with torch.no_grad():
        feats, labels = pooled_features(model, samples, log=lambda *_: None)
    y = torch.from_numpy(labels)
    opt = torch.optim.Adam(model.router.parameters(), lr=3e-3)
    for _ in range(600):
        loss = torch.nn.functional.cross_entropy(model.router.logits(feats[:, None, :], torch.eye(len(feats))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    synthetic.generate(d, n_per_domain=12, seed=3, progress=False, fractions=(0.5, 0.25, 0.25))
    return d


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, data):
    model = trained(request.param, data)
    with torch.no_grad():
        test = [s for s in read_manifest(data / "test.jsonl") if s.domain in model.cfg.domains]
        feats, _ = pooled_features(model, test, log=lambda *_: None)
        names = route(router_scores(model, feats).numpy(), model.cfg.domains, model.cfg.strategy, model.cfg.tau)
    assert sum(n != VERSATILE for n in names) >= len(names) // 2, names  # the router decides: routing is tested
    return request.param, model


def qdq_nodes(path):
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    return g, [n for n in g.node if n.op_type == "QuantizeLinear"], [n for n in g.node if n.op_type == "DequantizeLinear"], inits


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_bundle_passes_the_gate_on_held_out_images(family, data, precision, tmp_path):
    name, model = family
    out = tmp_path / "b"
    m = build_bundle(model, out, precision=precision, runtime="onnxruntime", max_crops=32 if name != "tiny-qwen2-vl" else None,
                     calibration=str(data / "images"), progress=False)
    q = m["quantization"]
    gate = q["gate"]
    n_files = len(list((data / "images").rglob("*.png")))
    assert q["calibration"]["held_out"] == n_files // HELD_OUT_EVERY and gate["images"] == n_files // HELD_OUT_EVERY
    assert q["calibration"]["images"] == n_files - n_files // HELD_OUT_EVERY
    assert set(gate["part_cosine"]) == {p for p in m["parts"] if p != "router"}
    assert min(gate["part_cosine"].values()) >= GATE["part_cosine"] and gate["tokens_cosine"]["min"] >= GATE["tokens_cosine"]
    assert gate["routing_agreement"] >= GATE["routing_agreement"]
    assert min(gate["part_cosine"].values()) < 1.0 - 1e-6  # really quantised (InternViT's tiny layer scales keep its
    # random-init trunk within 1e-8 of fp32; the experts' projectors are not)
    mf.verify_files(out, mf.read_manifest(out), "onnx")
    # the graphs: weights DQ'd per output channel in the precision's type, activations through Q/DQ, no int32 bias,
    # the router untouched
    for part in ("trunk", "single_encoder", f"expert_{model.cfg.experts[0]}"):
        g, qs, dqs, inits = qdq_nodes(out / f"{part}.onnx")
        assert qs and dqs, part
        weight_dq = [n for n in dqs if n.input[0] in inits]
        assert weight_dq, part
        for n in weight_dq:  # symmetric per output channel: one scale per channel, zero points 0, the precision's type
            w, scale = inits[n.input[0]], onnx.numpy_helper.to_array(inits[n.input[1]])
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            assert w.data_type == ONNX_TYPE[precision] and scale.size == w.dims[axis] > 1, (part, n.name)
            if len(n.input) > 2:
                zp = inits[n.input[2]]
                assert zp.data_type == ONNX_TYPE[precision] and not onnx.numpy_helper.to_array(zp).astype(np.float32).any()
        assert not any(inits[n.input[0]].data_type == onnx.TensorProto.INT32 for n in weight_dq)  # biases stay float
        matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in {d.output[0] for d in weight_dq}]
        assert matmuls, part  # the linear layers take dequantised weights
        assert any(n.op_type == "LayerNormalization" for n in g.node) or part != "trunk"  # LayerNorm stays a float op
    g, qs, dqs, _ = qdq_nodes(out / "router.onnx")
    assert not qs and not dqs
    if precision == "int8":  # ONNX Runtime CPU, as the backend makes its sessions: every quantised layer an int8 kernel
        off = mf.ort_disabled_optimizers(m)
        assert off == ["CommonSubexpressionElimination", "MatMulAddFusion"]
        for part in ("trunk", "single_encoder", f"expert_{model.cfg.experts[0]}"):
            so = ort.SessionOptions()
            so.optimized_model_filepath, so.log_severity_level = str(tmp_path / f"{part}.opt.onnx"), 3
            ort.InferenceSession(str(out / f"{part}.onnx"), so, providers=["CPUExecutionProvider"], disabled_optimizers=off)
            ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
            assert ops["MatMulIntegerToFloat"] == q["parts"][part]["quantized_nodes"], (part, ops)
    # the deployed path: the pipeline on the quantised bundle routes the held-out images as fp32 torch does
    _, held = calibration_split(str(data / "images"))
    pipe = MixpertPipeline.from_engines(out, runtime="onnxruntime")
    results = pipe(held)
    assert all(r.ok for r in results)
    pre = Preprocessor(model.cfg.backbone)
    agree = np.mean([r.expert == want for r, want in zip(results, fp32_routes(model, pre, held))])
    assert agree >= GATE["routing_agreement"]


@pytest.mark.parametrize("backbone", FAMILIES)
def test_experts_scope_keeps_the_trunk_fp32_and_the_routing_exact(backbone, data, tmp_path):
    """--quantize experts: the trunk is the validated fp32 graph (no Q/DQ), so the router sees the fp32 features and
    no held-out image changes expert; the experts and, in the single encoder, exactly the versatile expert's linear
    layers are quantised (the baseline stays the computation Mixpert's path is compared with)."""
    model = trained(backbone, data)
    out = tmp_path / "b"
    m = build_bundle(model, out, precision="int8", runtime="onnxruntime", max_crops=32 if backbone != "tiny-qwen2-vl" else None,
                     calibration=str(data / "images"), progress=False, quantize="experts")
    q, gate = m["quantization"], m["quantization"]["gate"]
    assert q["scope"] == gate["scope"] == "experts" and q["parts"]["trunk"] == {"quantized_nodes": 0, "kept": "fp32"}
    assert gate["routing_agreement"] == 1.0 and gate["score_max_abs"] < 1e-4 and not gate["flipped_fp32_margins"]
    assert gate["part_cosine"]["trunk"] > 1 - 1e-6 and gate["tokens_cosine"]["min"] >= GATE["tokens_cosine"]
    assert min(v for k, v in gate["part_cosine"].items() if k.startswith("expert_")) < 1 - 1e-6  # really quantised
    _, qs, dqs, _ = qdq_nodes(out / "trunk.onnx")
    assert not qs and not dqs
    assert m["parts"]["trunk"]["validation"]["runtime"] == "onnxruntime CPU, fp32 (not quantised)"

    def quantised_weights(part):  # the linear layers whose weight comes through a DequantizeLinear, in graph order
        g, _, dqs, inits = qdq_nodes(out / f"{part}.onnx")
        deq = {d.output[0]: tuple(inits[d.input[0]].dims) for d in dqs if d.input[0] in inits}
        return [deq[n.input[1]] for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in deq]
    single, versatile = quantised_weights("single_encoder"), quantised_weights(f"expert_{VERSATILE}")
    assert single and single == versatile  # the same layers, nothing of the trunk's
    assert q["parts"]["single_encoder"]["quantized_nodes"] == q["parts"][f"expert_{VERSATILE}"]["quantized_nodes"]
    mf.verify_files(out, mf.read_manifest(out), "onnx")
    _, held = calibration_split(str(data / "images"))
    pipe = MixpertPipeline.from_engines(out, runtime="onnxruntime")
    results = pipe(held)
    assert [r.expert for r in results] == fp32_routes(model, Preprocessor(model.cfg.backbone), held)


def fp32_routes(model, pre, paths):
    from mixpert_train.families import adapter_for
    from mixpert_train.model import PixelInput, pool_matrix

    ad, out = adapter_for(model.cfg.backbone), []
    for p in paths:
        rows, grid = pre.rows(load_image(p))
        extra = [torch.from_numpy(v) for v in ad.row_inputs(model.cfg.backbone, [grid]).values()] if ad.rows != "crops" else []
        with torch.no_grad():
            h = model.trunk(PixelInput(model.cfg)(torch.from_numpy(np.ascontiguousarray(rows))), *extra)
            s = model.router(h, torch.from_numpy(pool_matrix([len(rows)]))).numpy()
        out += route(s, model.cfg.domains, model.cfg.strategy, model.cfg.tau, model.cfg.lam)
    return out


# ------------------------------------------------------------------------------------------------ refusals

def _blank_and_real(tmp_path, data):
    """A calibration source whose calibration files are blank mid-grey pages and whose held-out files are real
    pages: a bad calibration the gate must catch (the held-out images are what the bundle will see). Measured on
    tiny int8 (QDQ on the linear layers' inputs): grey pages worst part cosine 0.944 (an expert), tokens 0.956;
    uniform noise 0.993, low-contrast noise 0.978, black pages 0.998 (these pass or nearly: a calibration that
    spans the values the real pages take is not bad enough)."""
    real = sorted((data / "images").rglob("*.png"))
    src = tmp_path / "bad"
    src.mkdir()
    for i, p in enumerate(real):
        dst = src / f"{i:03d}.png"
        if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
            dst.write_bytes(p.read_bytes())
        else:
            w, h = Image.open(p).size
            Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(dst)
    return src


def test_a_calibration_on_blank_pages_is_refused_with_its_figure(data, tmp_path):
    model = trained("tiny", data)
    with pytest.raises(MixpertError) as e:
        build_bundle(model, tmp_path / "b", precision="int8", runtime="onnxruntime", max_crops=32,
                     calibration=str(_blank_and_real(tmp_path, data)), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("int8 gate: ") and "held-out images" in msg, msg
    assert re.search(r"(cosine 0\.\d{4} < 0\.99|agrees with fp32 on \d+\.\d% of 12 held-out images \(< 99%; \d+ flipped, their fp32 margins)", msg), msg
    assert not (tmp_path / "b").exists()  # nothing half-written


def test_the_refusal_names_the_way_on_that_fits_the_figure():
    """--quantize experts is offered where the quantised trunk is the cause (trunk or single encoder cosine,
    routing, tokens) and the trunk was quantised; never for an expert's own error or an experts-only bundle."""
    rule = {"strategy": "score-difference", "tau": 0.6, "lam": 0.5}
    ok = {"images": 12, "rule": rule, "part_cosine": {"trunk": 0.999, "expert_doc": 0.999}, "tokens_cosine": {"min": 0.999},
          "routing_agreement": 1.0, "flipped_fp32_margins": [], "scope": "all"}
    check_gate(ok, "int8", "SRC")  # passes: no error
    cases = [({"part_cosine": {"trunk": 0.95, "expert_doc": 0.999}}, "trunk cosine 0.9500 < 0.99", True),
             ({"part_cosine": {"trunk": 0.999, "expert_doc": 0.95}}, "expert_doc cosine 0.9500 < 0.99", False),
             ({"routing_agreement": 10 / 12, "flipped_fp32_margins": [0.58, 0.61]},
              "routing agrees with fp32 on 83.3% of 12 held-out images (< 99%; 2 flipped, their fp32 margins 0.580..0.610 against tau 0.6)", True),
             ({"tokens_cosine": {"min": 0.98}}, "tokens cosine 0.9800 < 0.99", True),
             ({"routing_agreement": 0.5, "flipped_fp32_margins": [0.5], "scope": "experts"}, "agrees with fp32 on 50.0%", False)]
    for change, want, offered in cases:
        with pytest.raises(MixpertError) as e:
            check_gate({**ok, **change}, "int8", "SRC")
        msg = str(e.value)
        assert want in msg and ("--quantize experts" in msg) == offered and "--precision fp16" in msg, (change, msg)


def test_calibration_refusals_are_one_line_before_any_work(data, tmp_path, capsys):
    base = ["build", "--backbone", "tiny", "--random-init", "--runtime", "onnxruntime", "--quiet", "--out", str(tmp_path / "b")]
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted((data / "images").rglob("*.png"))[:20]:
        (few / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    for extra, want in ((["--precision", "int8"], "needs --calibration DIR-or-glob"),
                        (["--precision", "fp8", "--calibration", str(tmp_path / "nowhere")], "no such directory"),
                        (["--precision", "int8", "--calibration", str(few)], "20 images; the gate holds out every 5th"),
                        (["--precision", "int8", "--calibration", str(tmp_path / "none*.jpg")], "no image files there"),
                        (["--calibration", str(data / "images")], "only --precision int8 or fp8 calibrates"),
                        (["--quantize", "experts"], "--quantize experts: only --precision int8 or fp8 builds"),
                        (["--precision", "int8-dynamic", "--quantize", "all"], "--quantize all: only --precision int8")):
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and want in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "b").exists()


def test_cli_builds_a_calibrated_bundle_and_prints_its_table(data, tmp_path, capsys):
    """Through the CLI: the QDQ bundle is written and its table printed (the gate's worst-image figures per part)."""
    out = tmp_path / "b"
    assert main(["build", "--backbone", "tiny", "--random-init", "--runtime", "onnxruntime", "--quiet", "--out", str(out),
                 "--precision", "int8", "--calibration", str(data / "images"), "--max-crops", "8"]) == 0
    text = capsys.readouterr().out
    assert "trunk.onnx" in text and "pass max|d|=" in text and "(int8," in text
    assert mf.read_manifest(out)["quantization"]["gate"]["part_max_abs"]["trunk"] > 0


def test_cli_precisions_are_the_builds():
    assert tuple(CLI_PRECISIONS) == tuple(PRECISIONS)


@pytest.mark.skipif(not trtb.available(), reason="needs tensorrt_rtx (or tensorrt) to build engines")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_tensorrt_builds_the_qdq_parts_or_says_why(data, precision, tmp_path):
    """What TensorRT makes of the QDQ parts, recorded in the manifest. Measured with TensorRT-RTX 1.7.1 (no GPU):
    int8 builds for sm80, sm86, sm89 and sm120; fp8 for sm89 and sm120 (its default targets) and is refused for
    sm80 / sm86, which have no FP8 tensor cores: asked for, that is one line before any work."""
    model = trained("tiny", data)
    m = build_bundle(model, tmp_path / "b", precision=precision, runtime="auto", max_crops=8,
                     calibration=str(data / "images"), progress=False)
    t = m["quantization"]["tensorrt"]
    assert t["flavour"] in ("tensorrt_rtx", "tensorrt") and isinstance(t["accepted"], bool)
    if t["flavour"] == "tensorrt_rtx":
        assert t["accepted"], t
        want = ["sm89", "sm120"] if precision == "fp8" else ["sm80", "sm86", "sm89", "sm120"]
        assert m["tensorrt"]["targets"]["compute_capabilities"] == want
    if t["accepted"]:
        assert set(t["engines"]) == set(m["parts"]) and m["tensorrt"] is not None
        assert all((tmp_path / "b" / p["engine"]["file"]).stat().st_size > 0 for p in m["parts"].values())
        mf.verify_files(tmp_path / "b", mf.read_manifest(tmp_path / "b"), "engine")
    else:
        assert m["tensorrt"] is None and "\n" not in t["error"] and "--from-onnx" in t["next"]
        assert not list((tmp_path / "b").glob("*.engine"))
    if precision == "fp8" and t["flavour"] == "tensorrt_rtx":
        with pytest.raises(MixpertError, match=r"--gpu-targets sm80: fp8 needs FP8 tensor cores \(sm89"):
            build_bundle(model, tmp_path / "c", precision="fp8", calibration=str(data / "images"), progress=False,
                         gpu_targets=["sm80", "sm89"])
        assert not (tmp_path / "c").exists()


def test_quant_speed_benchmark_side_by_side_on_tiny(data, tmp_path):
    """benchmarks/quant_speed.py: fp32, int8-dynamic and int8 (QDQ) bundles timed in one process, sizes on disk."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quant_speed

    model = trained("tiny", data)
    paths = []
    for precision in ("fp32", "int8-dynamic", "int8"):
        paths.append(tmp_path / precision)
        build_bundle(model, paths[-1], precision=precision, runtime="onnxruntime", max_crops=8, progress=False,
                     calibration=str(data / "images") if precision == "int8" else None)
    out = tmp_path / "r"
    assert quant_speed.main(["--bundles", *map(str, paths), "--rounds", "3", "--out", str(out)]) == 0
    (js,) = out.glob("quant_speed_*_onnxruntime_tiny.json")
    rep = __import__("json").loads(js.read_text())
    rows = {r["precision"]: r for r in rep["rows"]}
    assert set(rows) == {"fp32", "int8-dynamic", "int8"} and rows["fp32"]["a_single_speedup"]["median"] == 1.0
    assert all(r[f"{k}_ms"] > 0 for r in rows.values() for k in ("a_single", "b_one_domain"))
    assert rows["int8"]["onnx_bytes"] < rows["fp32"]["onnx_bytes"] and "gate" in rows["int8"]
    with pytest.raises(SystemExit, match="must be fp32"):
        quant_speed.main(["--bundles", str(paths[2]), str(paths[0]), "--out", str(out)])


@pytest.mark.parametrize("backbone", ["tiny-internvl", "tiny-qwen2-vl"])
def test_int8_dynamic_builds_for_every_family(backbone, tmp_path):
    """The ONNX Runtime CPU dynamic path takes the family's own validation rows (it took crops only, and a
    Qwen2-VL build ended in a KeyError traceback)."""
    model = build_model(MixpertConfig.for_backbone(get_backbone(backbone)), seed=0).eval()
    m = build_bundle(model, tmp_path / "b", precision="int8-dynamic", runtime="onnxruntime", progress=False)
    assert all(p["validation"]["status"] == "pass" for n, p in m["parts"].items() if n != "router")
    assert m["int8"]["images"] >= 3 and m["int8"]["speedup"]["int8_ms"] > 0
    assert MixpertPipeline.from_engines(tmp_path / "b", runtime="onnxruntime").cfg.backbone.name == backbone


def test_gemm_is_rewritten_as_matmul_plus_add_with_the_same_outputs(tmp_path):
    """The rewrite before quantisation (so ONNX Runtime fuses the layer with a float bias): a Gemm with transB and a
    bias, one without transB, and one whose weight another node also reads, against onnx's reference evaluator."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from mixpert_export.bundle.quantize import _gemms_as_matmuls

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)  # [out, in]
    w2 = rng.standard_normal((6, 5)).astype(np.float32)  # [in, out], no transB, no bias
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=1),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="g2"),
             helper.make_node("Gemm", ["x", "w1"], ["z"], name="g3", transB=1)]  # w1 read twice
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 6])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
                               numpy_helper.from_array(w2, "w2")])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    dst = _gemms_as_matmuls(src, tmp_path / "work")
    m = onnx.load(str(dst))
    onnx.checker.check_model(m, full_check=True)
    assert [n.op_type for n in m.graph.node] == ["MatMul", "Add", "MatMul", "MatMul"]
    assert [n.name for n in m.graph.node if n.op_type == "MatMul"] == ["g1", "g2", "g3"]  # names kept for nodes_to_quantize
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = ReferenceEvaluator(str(src)).run(None, {"x": x})
    got = ReferenceEvaluator(m).run(None, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert _gemms_as_matmuls(dst, tmp_path / "again") == dst  # nothing left to rewrite: the file itself
