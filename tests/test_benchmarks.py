"""Benchmarks: Table 6 counts (meta device), a latency smoke on tiny, and the regression gate's logic."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flops  # noqa: E402
import latency  # noqa: E402


def test_table6_llava_ov_7b_counts():
    r = flops.count("llava-ov-7b", (1, 10), prompt_tokens=64)
    f1, f10 = r["flops"][1], r["flops"][10]
    # one so400m layer at 729 tokens: 24.65 GFLOP (QKV+O 7.74, MLP 14.46, attention 2.45), counted by hand
    t, d, m = 729, 1152, 4304
    layer = 2 * t * d * d * 4 + 2 * t * d * m * 2 + 2 * 2 * t * t * d
    assert abs(f1["trunk"] - 24 * layer) / (24 * layer) < 0.01  # 24 layers (+ the patch embedding, < 0.2%)
    projector = 2 * t * (d * 3584 + 3584 * 3584)
    assert f1["expert"] == 2 * layer + projector
    assert f1["router"] == flops.router_flops_by_hand(1152, 5, 1) and f1["router"] < 0.003e9  # ~0.001 GMACs (paper)
    assert f10["trunk"] == 10 * f1["trunk"]
    p = r["params"]
    assert abs(p["added_experts"] - 237.1e6) / 237.1e6 < 0.01 and p["added_activated"] == p["router"]
    assert 7.6e9 < r["llm_params"] < 7.7e9  # Qwen2-7B
    md = flops.markdown(r)
    assert "237.3M" in md and "1.334M" in md


def test_flops_cli_writes_markdown_and_json(tmp_path):
    assert flops.main(["--backbone", "tiny", "--crops", "1", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "flops_tiny.md").read_text().startswith("### Table 6")
    assert json.loads((tmp_path / "flops_tiny.json").read_text())["backbone"] == "tiny"


def test_latency_smoke_on_tiny(tmp_path):
    """Builds a tiny bundle, times a-e side by side, writes md/json/png, and gates against itself."""
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    model, src = resolve("tiny", random_init=True)
    bundle = tmp_path / "b"
    build_bundle(model, bundle, runtime="onnxruntime", max_crops=8, source=src, progress=False)
    out = tmp_path / "res"
    args = ["--bundle", str(bundle), "--batch", "1", "4", "--crops", "1", "--rounds", "2", "--warmup", "1", "--out", str(out)]
    assert latency.main(args) == 0
    (js,) = out.glob("latency_*.json")
    rep = json.loads(js.read_text())
    assert [(r["batch"], r["crops"]) for r in rep["results"]] == [(1, 1), (4, 1)]
    for r in rep["results"]:
        assert set(r["cases"]) == set(latency.CASES) and all(c["median_ms"] > 0 for c in r["cases"].values())
        assert r["ratios"]["d_two_encoders"]["median"] > 1.2  # two encoders cost clearly more than one
    assert js.with_suffix(".png").stat().st_size > 10_000 and js.with_suffix(".md").is_file()
    assert latency.main(args + ["--baseline", str(js), "--max-regression", "1000%"]) == 0


def _report(b, c):
    return {"results": [{"batch": 1, "crops": 1, "ratios": {"b_one_domain": {"median": b}, "c_mixed": {"median": c}}}]}


def test_regression_gate_logic():
    base = _report(1.01, 1.04)
    assert latency.regressions(_report(1.05, 1.09), base, 0.05) == []
    bad = latency.regressions(_report(1.07, 1.04), base, 0.05)
    assert len(bad) == 1 and bad[0].startswith("b_one_domain at 1x1: 1.070 > 1.010")
    assert latency.regressions({"results": [{"batch": 9, "crops": 9, "ratios": {}}]}, base, 0.05) == []
    assert latency._percent("5%") == pytest.approx(0.05) and latency._percent("0.1") == 0.1
    run = _report(1.0, 1.0) | {"device": "NVIDIA H100 80GB HBM3", "runtime": "torch", "precision": "bf16"}
    assert latency.gate_mismatch(run, run) is None
    assert "device 'NVIDIA H200'" in latency.gate_mismatch(run, run | {"device": "NVIDIA H200"})
    assert "precision 'fp16'" in latency.gate_mismatch(run, run | {"precision": "fp16"})
    assert "nothing would be compared" in latency.gate_mismatch(
        run, run | {"results": [{"batch": 16, "crops": 10, "ratios": {}}]})


def test_gate_exits_non_zero_on_regression(tmp_path, monkeypatch):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_report(0.5, 0.5)))  # an impossible baseline: any real run regresses past it
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    model, src = resolve("tiny", random_init=True)
    build_bundle(model, tmp_path / "b", runtime="onnxruntime", max_crops=4, source=src, progress=False)
    rc = latency.main(["--bundle", str(tmp_path / "b"), "--batch", "1", "--rounds", "1", "--warmup", "0",
                       "--out", str(tmp_path / "r"), "--baseline", str(base), "--max-regression", "5%"])
    assert rc == 1


def test_e2e_smoke_on_tiny(tmp_path):
    """bytes -> tokens: per-core preprocessing of three paths, the overlap figures and the files, on a tiny bundle.
    The checks are what must hold on any machine, however loaded: both fast paths beat transformers' processor,
    and end to end is never faster than either stage alone (it includes both)."""
    import e2e
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    model, src = resolve("tiny", random_init=True)
    bundle = tmp_path / "b"
    build_bundle(model, bundle, runtime="onnxruntime", max_crops=20, source=src, progress=False, validate=False)
    out = tmp_path / "res"
    assert e2e.main(["--bundle", str(bundle), "--rounds", "2", "--sizes", "small", "768x1024", "--repeat", "2",
                     "--intra-threads", "1", "--out", str(out)]) == 0
    (js,) = out.glob("e2e_*_onnxruntime_tiny.json")
    rep = json.loads(js.read_text())
    pc = rep["per_core"]
    assert pc["crops"] == {"small.jpeg": 10, "small.png": 10, "768x1024.jpeg": 10, "768x1024.png": 10}  # tiny 3x3 grid
    assert pc["speedup"]["fast_pil"]["median"] > 1.1 and pc["speedup"]["torch_uint8"]["median"] > 1.1  # tiny: decoding dominates
    for ov in rep["overlap"].values():
        m = ov["median_s"]
        assert ov["images"] == 8 and ov["crops"] == 80 and ov["calls"] == 4
        assert m["end_to_end"] >= 0.9 * max(m["preprocessing"], m["inference"])
        assert set(ov["latency_ms"]) == {"small.jpeg", "small.png", "768x1024.jpeg", "768x1024.png"}
    assert js.with_suffix(".png").stat().st_size > 10_000 and "crops/s per core" in js.with_suffix(".md").read_text()


def test_e2e_preprocessing_only_for_a_patch_family(tmp_path):
    """--preprocessing-only: any backbone's per-core figures without a bundle; Qwen2-VL's rows are patches, and its
    patch counts are the processor's (a 320x240 image: smart_resize to 308x252 = 22 x 18 patches)."""
    import e2e

    out = tmp_path / "res"
    assert e2e.main(["--backbone", "qwen2-vl-7b", "--preprocessing-only", "--rounds", "1", "--sizes", "small",
                     "--out", str(out)]) == 0
    (js,) = out.glob("preprocess_*_qwen2-vl-7b.json")
    rep = json.loads(js.read_text())
    assert rep["unit"] == "patches" and rep["overlap"] == {}
    assert rep["per_core"]["crops"] == {"small.jpeg": 396, "small.png": 396}
    assert "patches/s per core" in js.with_suffix(".md").read_text() and js.with_suffix(".png").stat().st_size > 5_000
