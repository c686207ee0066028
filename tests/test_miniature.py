"""The miniature's experiment: the designed conflict in the data, the probes (one domain alone from the pre-joint
start; the Table 7 control), expert selection on the validation split, the paired comparisons named before the run,
the demo's reading of them, and reproducible CPU training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mixpert_train.checkpoint import load_checkpoint, read_checkpoint_meta
from mixpert_train.data import synthetic
from mixpert_train.data.manifest import read_manifest
from mixpert_train.evaluate import COMPARISONS, CONTROL, DOMAIN_ONLY, FURTHER, JOINT, evaluate, paired, sign_test
from mixpert_train.experts import ExpertConfig, one_expert_steps, run_control, run_experts
from mixpert_train.joint import JointConfig, run_joint
from mixpert_train.model import DOMAINS, VERSATILE
from mixpert_train.router import RouterConfig, run_router

ROOT = Path(__file__).resolve().parents[1]
FAST = ExpertConfig(epochs=1, batch=8, micro_batch=4, lr_projector=1e-3, lr_vision=1e-3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    synthetic.generate(d, n_per_domain=12, seed=5, progress=False, fractions=(0.5, 0.25, 0.25))
    return d


@pytest.fixture(scope="module")
def joint(data, tmp_path_factory):
    return run_joint(data, tmp_path_factory.mktemp("j") / "joint", JointConfig(epochs=1, batch=8), progress=False)


def test_one_scene_five_readings():
    """The same draw in every domain: the same shape in the same colour and place, the same question, a different
    page; the answers differ exactly where the domain's legend swaps that colour."""
    seen = set()
    for i in range(60):
        out = {d: synthetic.sample(d, np.random.default_rng([7, i])) for d in DOMAINS}
        imgs = {d: np.asarray(im, np.int16) for d, (im, _, _) in out.items()}
        assert len({q for _, q, _ in out.values()}) == 1
        colour = out["chart"][2] if out["chart"][2] not in synthetic.SWAPS["chart"] else \
            [c for c in synthetic.SWAPS["chart"] if c != out["chart"][2]][0]
        for d, (_, _, answer) in out.items():
            assert answer == synthetic.legend(d, colour)
            shape = np.all(imgs[d] == synthetic.COLOURS[colour], axis=-1)  # the shape's pixels, in its exact colour
            assert 0.04 < shape.mean() < 0.6
            assert np.array_equal(shape, np.all(imgs["chart"] == synthetic.COLOURS[colour], axis=-1))
        pages = {d: tuple(imgs[d][~np.all(imgs[d] == synthetic.COLOURS[colour], axis=-1)].mean(0).round()) for d in DOMAINS}
        assert len(set(pages.values())) == len(DOMAINS)  # every page differs
        seen |= {(colour, tuple(sorted({a for _, _, a in out.values()})))}
    # every colour is swapped somewhere, and four of six colours are plain names in every domain
    for d, (a, b) in synthetic.SWAPS.items():
        assert synthetic.legend(d, a) == b and synthetic.legend(d, b) == a
        assert sum(synthetic.legend(d, c) == c for c in synthetic.COLOURS) == 4
    assert set().union(*synthetic.SWAPS.values()) == set(synthetic.COLOURS)


def test_domain_alone_trains_on_that_domain_with_the_same_vocabulary(data, joint, tmp_path):
    alone = run_joint(data, tmp_path / "chart", JointConfig(epochs=1, batch=8, domains=("chart",)), progress=False)
    rec = json.loads((alone / "mixpert_stage.json").read_text())
    assert rec["train_samples"] == sum(s.domain == "chart" for s in read_manifest(data / "train.jsonl"))
    assert rec["config"]["domains"] == ["chart"]
    assert (alone / "tokenizer.json").read_text() == (joint / "tokenizer.json").read_text()
    from mixpert_train.errors import MixpertError

    with pytest.raises(MixpertError, match="--domains poetry: not among"):
        run_joint(data, tmp_path / "x", JointConfig(epochs=1, domains=("poetry",)), progress=False)


def test_experts_keep_their_best_validation_state(data, joint, tmp_path):
    """A rate that wrecks the expert: the validation check keeps the start (the joint weights, step 0); without the
    check the wrecked weights are written."""
    from mixpert_train.weights import model_from_snapshot

    base = model_from_snapshot(joint).experts[VERSATILE].state_dict()
    wreck = dict(FAST.__dict__, lr_projector=50.0, lr_vision=50.0, epochs=2)
    kept = run_experts(data, joint, tmp_path / "kept", ExpertConfig(**wreck), domains=["doc"], progress=False)
    h = read_checkpoint_meta(kept)["extra"]["history"]["doc"]
    assert [v["step"] for v in h["val"]][0] == 0 and len(h["val"]) == 3  # start + after each of 2 passes
    best = max(v["val_acc"] for v in h["val"])
    assert h["kept_val_acc"] == best and h["kept_step"] == min(v["step"] for v in h["val"] if v["val_acc"] == best)
    doc = load_checkpoint(kept).experts["doc"].state_dict()
    if h["kept_step"] == 0:
        assert all(torch.equal(doc[k], base[k]) for k in base)
    raw = run_experts(data, joint, tmp_path / "raw", ExpertConfig(**{**wreck, "select_on_val": False}), domains=["doc"], progress=False)
    raw_doc = load_checkpoint(raw).experts["doc"].state_dict()
    assert not all(torch.equal(raw_doc[k], base[k]) for k in base)
    assert read_checkpoint_meta(raw)["extra"]["history"]["doc"]["val"] == []


def test_control_tunes_versatile_on_the_mix_for_one_experts_steps(data, joint, tmp_path):
    from mixpert_train.weights import model_from_snapshot

    cfg = ExpertConfig(**{**FAST.__dict__, "select_on_val": False})
    out = run_control(data, joint, tmp_path / "control", cfg, progress=False)
    meta = read_checkpoint_meta(out)["extra"]
    train = read_manifest(data / "train.jsonl")
    per_domain = [sum(s.domain == d for s in train) for d in DOMAINS]
    assert meta["stage"] == "control" and meta["history"]["mixed"]["steps"] == one_expert_steps(per_domain, cfg)
    assert meta["history"]["mixed"]["samples"] == len(train)  # every domain's images in the mix
    # one expert's steps: 6 chart images, micro-batch 4 x accumulation 2 = 8 a step -> 1 step a pass
    assert one_expert_steps([6] * 5, cfg) == 1 and one_expert_steps([17] * 5, cfg) == 3
    got, base = load_checkpoint(out), model_from_snapshot(joint)
    assert not torch.equal(got.experts[VERSATILE].projector.linear_2.weight, base.experts[VERSATILE].projector.linear_2.weight)
    for d in DOMAINS:  # the domain experts are the joint weights, untouched
        assert torch.equal(got.experts[d].projector.linear_2.weight, base.experts[VERSATILE].projector.linear_2.weight)
    logs = []
    run_control(data, joint, out, cfg, progress=False, log=logs.append)
    assert logs and "reusing" in logs[0]


def test_paired_counts_and_p_values():
    a = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1], bool)
    b = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    v = paired(a, b)
    assert (v["better"], v["worse"], v["n"]) == (9, 1, 12)
    assert v["a"] == pytest.approx(10 / 12) and v["b"] == pytest.approx(2 / 12)
    assert v["p_value"] == pytest.approx(2 * (1 + 10) / 2 ** 10)  # two-sided exact binomial, k <= 1 of 10
    assert sign_test(3, 3) == 1.0


def test_eval_gives_every_row_and_the_named_comparisons(data, joint, tmp_path):
    experts = run_experts(data, joint, tmp_path / "e", FAST, progress=False)
    control = run_control(data, joint, tmp_path / "c", FAST, progress=False)
    final = run_router(data, experts, tmp_path / "f", RouterConfig(epochs=5, batch=16, lr=2e-3), progress=False)
    alone = {d: run_joint(data, tmp_path / "alone" / d, JointConfig(epochs=1, batch=8, domains=(d,)), progress=False)
             for d in DOMAINS}
    rep = evaluate(data, final, control=control, domain_only=alone, progress=False)
    acc, cmp = rep["accuracy"], rep["comparisons"]
    assert {JOINT, DOMAIN_ONLY, FURTHER, CONTROL, "oracle (true domain)", "direct"} <= set(acc)
    assert set(cmp) == {name for name, *_ in COMPARISONS}
    assert acc[FURTHER] == acc["oracle (true domain)"]  # the probe of finding 1 is the oracle read per domain
    assert rep["mixpert_row"].startswith("score-difference")
    for d in DOMAINS:  # each per-domain test is over that domain's images, its accuracies the rows' own figures
        v = cmp["1a further-tuned vs joint"][d]
        assert v["n"] == sum(s.domain == d for s in read_manifest(data / "test.jsonl"))
        assert v["a"] == pytest.approx(acc[FURTHER][d]) and v["b"] == pytest.approx(acc[JOINT][d])
        w = cmp["1b joint vs domain alone"][d]
        assert w["a"] == pytest.approx(acc[JOINT][d]) and w["b"] == pytest.approx(acc[DOMAIN_ONLY][d])
    m = cmp["2a Mixpert vs joint"]
    assert m["a"] == pytest.approx(acc[rep["mixpert_row"]]["all"]) and m["b"] == pytest.approx(acc[JOINT]["all"])
    assert (m["better"], m["worse"]) == (acc[rep["mixpert_row"]]["vs_joint"]["better"], acc[rep["mixpert_row"]]["vs_joint"]["worse"])
    c = cmp["2b Mixpert vs Table 7 control"]
    assert c["b"] == pytest.approx(acc[CONTROL]["all"])


def _report(one_a, one_b, two_a, two_b):
    own = lambda a, b: {d: {"a": a, "b": b, "p_value": 0.5, "n": 10} for d in DOMAINS}  # noqa: E731
    return {"comparisons": {"1a further-tuned vs joint": own(*one_a), "1b joint vs domain alone": own(*one_b),
                            "2a Mixpert vs joint": {"a": two_a[0], "b": two_a[1], "p_value": two_a[2]},
                            "2b Mixpert vs Table 7 control": {"a": two_b[0], "b": two_b[1], "p_value": two_b[2]}}}


def test_demo_reads_the_findings_with_the_thresholds_named_before():
    sys.path.insert(0, str(ROOT))
    import demo

    good = _report((0.9, 0.6), (0.6, 0.4), (0.8, 0.6, 0.001), (0.8, 0.7, 0.01))
    f = demo.findings([good, good, good])
    assert all(all(v) for v in f.values())
    weak = _report((0.6, 0.6), (0.4, 0.6), (0.8, 0.6, 0.02), (0.8, 0.7, 0.06))  # ties, reversed, p just above
    f = demo.findings([good, weak])
    assert f == {"1a": [True, False], "1b": [True, False], "2a": [True, False], "2b": [True, False]}
    assert "does NOT hold in seed(s) [1]" in demo.findings_text([dict(good, seed=0), dict(weak, seed=1)], DOMAINS)


def test_kernel_pins_take_effect_only_before_torch():
    from mixpert_train.determinism import pin_kernels

    if os.uname().machine in ("x86_64", "AMD64"):
        with pytest.raises(RuntimeError, match="before torch is imported"):
            pin_kernels()  # torch is imported in this process already
    code = ("from mixpert_train.determinism import pin_kernels, deterministic; p = pin_kernels(); "
            "import json; print(json.dumps(deterministic()))")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    got = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert got["threads"] == 2
    if os.uname().machine == "x86_64":
        assert got["cpu_capability"] == "AVX2" and got["MKL_CBWR"] == "AVX2"


def test_two_fresh_joint_runs_are_bit_identical(data, tmp_path):
    """Seeded order, fixed threads, deterministic algorithms: the same weights, byte for byte, run after run."""
    code = ("import sys; from mixpert_train.determinism import pin_kernels, deterministic; pin_kernels(); deterministic(); "
            "from mixpert_train.joint import JointConfig, run_joint; "
            "run_joint(sys.argv[1], sys.argv[2], JointConfig(epochs=1, batch=8), progress=False)")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(data), str(tmp_path / name)], check=True, capture_output=True)
    a, b = (load_file(str(tmp_path / n / "model.safetensors")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_control_and_eval_flags(data, joint, tmp_path, capsys):
    from mixpert_train.__main__ import main

    assert main(["control", "--data", str(data), "--joint", str(joint), "--out", str(tmp_path / "c"), "--batch", "8",
                 "--micro-batch", "4", "--steps", "2", "--quiet"]) == 0
    meta = read_checkpoint_meta(tmp_path / "c")["extra"]
    assert meta["stage"] == "control" and meta["history"]["mixed"]["steps"] == 2
    capsys.readouterr()  # transformers' loading bars
    assert main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "ev"),
                 "--domain-alone", "chart", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --domain-alone 'chart': write DOMAIN=SNAPSHOT, e.g. chart=runs/demo/domain-alone/chart"
    assert main(["eval", "--data", str(data), "--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "ev"),
                 "--domain-alone", f"chart={joint}", "--quiet"]) == 2
    assert "--domain-alone: no model for doc, math, ocr, general; pass DOMAIN=SNAPSHOT for every domain" in capsys.readouterr().err


def test_demo_rebuilds_a_bundle_from_an_older_format_rather_than_stop(tmp_path):
    """`make demo` after an upgrade: a bundle this version refuses (format 1, float32 pixels) is rebuilt, not read."""
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import demo
    from mixpert_export.bundle import manifest as mf

    ck, engines = tmp_path / "ck", tmp_path / "engines"
    ck.mkdir()
    engines.mkdir()
    (ck / "mixpert.json").write_text("{}")
    time.sleep(0.01)
    (engines / mf.NAME).write_text(json.dumps({"format": mf.FORMAT, "format_version": 1, "packing": {}}))
    assert not demo.reusable_bundle(engines, ck)
    (engines / mf.NAME).write_text(json.dumps({"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "packing": {"file": "p"}}))
    assert demo.reusable_bundle(engines, ck)
    assert not demo.reusable_bundle(tmp_path / "missing", ck)
