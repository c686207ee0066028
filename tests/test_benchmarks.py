"""Benchmarks: Table 6 counts (meta device), a latency smoke on tiny, and the regression gate's logic."""

import json
import sys
from pathlib import Path

import numpy as np
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
    """Builds a tiny bundle, times a-e side by side, writes md/json/png; one run is no baseline (no run-to-run
    spread to judge by), refused in one line before any timing."""
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
    assert latency.main(args + ["--baseline", str(js), "--max-regression", "1000%"]) == 2


def _point(b_ratios, c_ratios, batch=1, crops=1):
    """A results point whose rounds have the given b/a and c/a ratios (a = 10 ms every round)."""
    cases = {"a_single": {"all_ms": [10.0] * len(b_ratios)},
             "b_one_domain": {"all_ms": [10.0 * r for r in b_ratios]}, "c_mixed": {"all_ms": [10.0 * r for r in c_ratios]}}
    ratios = {k: {"median": float(np.median(v))} for k, v in (("b_one_domain", b_ratios), ("c_mixed", c_ratios))}
    return {"batch": batch, "crops": crops, "cases": cases, "ratios": ratios}


def _runs(rng, n_runs, b_growth=1.0, run_sd=0.02, round_sd=0.05, rounds=9):
    """A report of n_runs runs: each run's ratios drift by a run effect (sd run_sd), rounds scatter around it."""
    runs = []
    for _ in range(n_runs):
        shift = rng.normal(0.0, run_sd)
        b = list(b_growth * 1.02 * np.exp(shift + rng.normal(0.0, round_sd, rounds)))
        c = list(1.04 * np.exp(shift + rng.normal(0.0, round_sd, rounds)))
        runs.append([_point(b, c)])
    return {"runs": runs, "results": [runs[0][0]]}


def test_t_quantile_matches_the_tables():
    assert latency.t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert latency.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert latency.t_quantile(0.95, 10) == pytest.approx(1.812, abs=1e-3)
    assert latency.t_quantile(0.975, 1000) == pytest.approx(1.962, abs=2e-3)


def test_gate_judges_runs_and_flags_only_growth_whose_interval_clears_the_allowance():
    rng = np.random.default_rng(1)
    base = _runs(rng, 5)
    # the same setup, 200 one-run gates: the rule's false alarms stay rare (the allowance and the t interval)
    alarms = sum(any(g["regressed"] for g in latency.gate(_runs(rng, 1), base, 0.05)) for _ in range(200))
    assert alarms <= 4
    # b 20% slower: flagged, c untouched: not; the figures the line prints come from the runs
    (b, c) = latency.gate(_runs(rng, 1, b_growth=1.2), base, 0.05)
    assert b["regressed"] and not c["regressed"] and b["low"] > 0.05 and 0.1 < b["growth"] < 0.3
    assert b["runs"] == [1, 5] and 0.005 < b["run_sd"] < 0.06 and b["detectable"] > 0.05
    assert "growth +" in latency.gate_line(b) and "1 vs 5 runs" in latency.gate_line(b)
    # a 6% growth on a machine whose runs drift 5% apart: the interval reaches below 5%, no alarm
    noisy = _runs(rng, 5, run_sd=0.05)
    (b, _) = latency.gate(_runs(rng, 1, b_growth=1.06, run_sd=0.05), noisy, 0.05)
    assert b["low"] < 0.05 and not b["regressed"]
    # three runs of a gate narrow the interval: the same 20% growth, a tighter interval
    one, three = (latency.gate(_runs(np.random.default_rng(2), n, b_growth=1.2), base, 0.05)[0] for n in (1, 3))
    assert three["high"] - three["low"] < one["high"] - one["low"]
    assert latency.gate({"results": [_point([1.0], [1.0], batch=9)]}, base, 0.05) == []  # no common point


def test_gate_refuses_baselines_it_cannot_compare():
    rng = np.random.default_rng(0)
    run = _runs(rng, 3) | {"device": "NVIDIA H100 80GB HBM3", "runtime": "torch", "precision": "bf16"}
    assert latency._percent("5%") == pytest.approx(0.05) and latency._percent("0.1") == 0.1
    assert latency.gate_mismatch(run, run) is None
    assert "device 'NVIDIA H200'" in latency.gate_mismatch(run, run | {"device": "NVIDIA H200"})
    assert "precision 'fp16'" in latency.gate_mismatch(run, run | {"precision": "fp16"})
    assert "injected slowdown of 10%" in latency.gate_mismatch(run, run | {"injected_slowdown": 0.1})
    assert "--runs 5" in latency.gate_mismatch(run, {k: v for k, v in run.items() if k != "runs"})  # one run: no spread
    other = run | {"results": [_point([1.0], [1.0], 16, 10)], "runs": [[_point([1.0], [1.0], 16, 10)]] * 2}
    assert "nothing would be compared" in latency.gate_mismatch(run, other)


def test_gate_catches_an_injected_slowdown_and_never_overwrites_its_baseline(tmp_path, capsys):
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    model, src = resolve("tiny", random_init=True)
    build_bundle(model, tmp_path / "b", runtime="onnxruntime", max_crops=4, source=src, progress=False)
    out = tmp_path / "r"
    args = ["--bundle", str(tmp_path / "b"), "--batch", "4", "--rounds", "5", "--warmup", "1", "--cases", "a", "b", "c",
            "--out", str(out)]
    assert latency.main(args + ["--runs", "3"]) == 0  # three processes
    (base,) = out.glob("latency_*.json")
    first = base.read_text()
    rep = json.loads(first)
    assert len(rep["runs"]) == 3 and rep["results"][0]["rounds"] == 15 and rep["results"][0]["runs"] == 3
    assert set(rep["results"][0]["cases"]) == {"a_single", "b_one_domain", "c_mixed"}
    capsys.readouterr()
    # b and c take twice as long: caught with the defaults (3 runs, auto rounds, 3% allowance), both ratios, exit 1
    auto = [x for i, x in enumerate(args) if x != "--rounds" and args[i - 1] != "--rounds"]
    assert latency.main(auto + ["--baseline", str(base), "--inject-slowdown", "100%"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("REGRESSION ") for line in err)
    injected = json.loads((out / base.name.replace(".json", "_gate_injected.json")).read_text())
    assert injected["injected_slowdown"] == 1.0 and all(g["regressed"] for g in injected["gate"]["rows"])
    # auto rounds: at least 15, enough for 3 s of timing a point, at most 300 (a tiny point is milliseconds)
    assert len(injected["runs"]) == 3 and all(15 < run[0]["rounds"] <= 300 for run in injected["runs"])
    # no injection, a generous allowance (this checks the plumbing, the statistics have their own test): passes
    assert latency.main(args + ["--baseline", str(base), "--max-regression", "50%", "--runs", "1"]) == 0  # one run
    assert base.read_text() == first  # the gate wrote latency_..._gate.json beside it
    assert (out / base.name.replace(".json", "_gate.json")).is_file()
    # an injected run or a single run is no baseline; a gate without b or c has nothing to judge
    for bad, why in (("_gate_injected.json", "injected slowdown"), ("_gate.json", "--runs 5")):
        assert latency.main(args + ["--baseline", str(out / base.name.replace(".json", bad))]) == 2
        assert why in capsys.readouterr().err
    assert latency.main(args[:-6] + ["--cases", "a", "b", "--out", str(out), "--baseline", str(base)]) == 2


def test_gate_check_keeps_every_trial_and_counts_alarms(tmp_path):
    """benchmarks/gate_check.py: a baseline, then alternating clean and injected gates, every trial in the report;
    a 200% slowdown is a detection whatever the machine is doing."""
    import gate_check
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    model, src = resolve("tiny", random_init=True)
    build_bundle(model, tmp_path / "b", runtime="onnxruntime", max_crops=4, source=src, progress=False)
    out = tmp_path / "r"
    assert gate_check.main(["--bundle", str(tmp_path / "b"), "--trials", "1", "--inject", "200%", "--baseline-runs", "2",
                            "--out", str(out), "--", "--batch", "1", "--rounds", "5", "--warmup", "1", "--runs", "1",
                            "--cases", "a", "b", "c"]) == 0
    (js,) = out.glob("gate_check_*_onnxruntime_tiny_fp32.json")
    rep = json.loads(js.read_text())
    assert [t["kind"] for t in rep["trials"]] == ["clean", "injected"] and rep["detections"] == 1
    assert all(len(t["rows"]) == 2 for t in rep["trials"]) and rep["inject"] == 2.0
    assert len(rep["baseline"]["spread"]) == 2 and all(len(x["runs"]) == 2 for x in rep["baseline"]["spread"])
    md = js.with_suffix(".md").read_text()
    assert "**Detections: 1/1**" in md and f"**False alarms: {rep['false_alarms']}/1**" in md
    with pytest.raises(SystemExit):
        gate_check.main(["--bundle", "b", "--", "--baseline", "x.json"])  # the check sets the baseline itself


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
