"""mixpert_train on a miniature dataset: data format, the four stages, frozen parts, resumption, bad images,
and the eval report (where "versatile everywhere" must equal transformers' own joint model)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mixpert_train.__main__ import main
from mixpert_train.checkpoint import load_checkpoint, read_checkpoint_meta
from mixpert_train.data.manifest import read_manifest
from mixpert_train.data.synthetic import generate
from mixpert_train.errors import MixpertError
from mixpert_train.evaluate import evaluate
from mixpert_train.experts import ExpertConfig, run_experts
from mixpert_train.joint import JointConfig, run_joint
from mixpert_train.router import RouterConfig, run_router

FAST_EXPERTS = ExpertConfig(epochs=1, batch=8, micro_batch=4, lr_projector=1e-3, lr_vision=1e-3, select_on_val=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    assert generate(d, n_per_domain=10, seed=3, progress=False) == {"train": 40, "val": 5, "test": 5}
    return d


@pytest.fixture(scope="module")
def joint(data, tmp_path_factory):
    return run_joint(data, tmp_path_factory.mktemp("runs") / "joint", JointConfig(epochs=1, batch=8), progress=False)


@pytest.fixture(scope="module")
def experts(data, joint, tmp_path_factory):
    return run_experts(data, joint, tmp_path_factory.mktemp("runs") / "experts", FAST_EXPERTS, progress=False)


def test_synthetic_data_is_deterministic(tmp_path, data):
    generate(tmp_path / "a", n_per_domain=2, seed=3, progress=False)
    generate(tmp_path / "b", n_per_domain=2, seed=3, progress=False)
    generate(tmp_path / "c", n_per_domain=2, seed=4, progress=False)
    a, b, c = (sorted((p.relative_to(tmp_path / x), p.read_bytes()) for p in (tmp_path / x).rglob("*.png")) for x in "abc")
    assert a == b and a != c
    samples = read_manifest(data / "train.jsonl")
    assert {s.domain for s in samples} == {"chart", "doc", "math", "ocr", "general"}
    assert all(len(s.answer.split()) == 1 for s in samples)


def test_manifest_errors_name_file_and_line(tmp_path):
    m = tmp_path / "train.jsonl"
    m.write_text('{"image": "a.png", "domain": "chart", "question": "q", "answer": "a"}\n{"image": "b.png"}\n')
    with pytest.raises(MixpertError, match=r"train\.jsonl:2: malformed sample"):
        read_manifest(m)
    m.write_text('{"image": "a.png", "domain": "poetry", "question": "q", "answer": "a"}\n')
    with pytest.raises(MixpertError, match=r"train\.jsonl:1: unknown domain 'poetry'"):
        read_manifest(m)
    with pytest.raises(MixpertError, match="manifest missing"):
        read_manifest(tmp_path / "nope.jsonl")


def test_joint_writes_a_snapshot_the_weights_loader_reads(joint):
    from mixpert_train.weights import backbone_from_snapshot

    assert (joint / "tokenizer.json").is_file() and (joint / "preprocessor_config.json").is_file()
    assert backbone_from_snapshot(joint).hidden_size == 192
    assert json.loads((joint / "mixpert_stage.json").read_text())["stage"] == "joint"


def test_expert_tuning_freezes_trunk_and_language_model(joint, experts):
    model = load_checkpoint(experts)
    ref = load_file(str(joint / "model.safetensors"))
    # trunk: bit-identical to the joint snapshot's tower layers 0..L-k-1 and embeddings
    assert torch.equal(model.trunk.embeddings.patch_embedding.weight, ref["model.vision_tower.embeddings.patch_embedding.weight"]
                       if "model.vision_tower.embeddings.patch_embedding.weight" in ref
                       else ref["vision_tower.embeddings.patch_embedding.weight"])
    from mixpert_train.experts import load_language_model

    lm_after = load_language_model(joint).state_dict()
    for k, v in lm_after.items():  # the LM on disk is the one the experts were tuned against, unchanged
        key = k if k in ref else k.replace("model.", "", 1)
        assert torch.equal(v, ref.get(k, ref.get(key, v)))
    sd = {k: v for k, v in model.state_dict().items()}
    from mixpert_train.weights import model_from_snapshot

    base = model_from_snapshot(joint).state_dict()
    for k in sd:
        if k.startswith("trunk.") or k.startswith("experts.versatile."):
            assert torch.equal(sd[k], base[k]), k  # trunk and versatile: bit-identical
    for d in model.cfg.domains:  # every domain expert moved away from the joint weights
        assert not torch.equal(sd[f"experts.{d}.projector.linear_2.weight"], base["experts.versatile.projector.linear_2.weight"])
    meta = read_checkpoint_meta(experts)
    assert meta["extra"]["experts_done"] == list(model.cfg.domains)


def test_experts_resume_after_a_stop(data, joint, tmp_path):
    out = tmp_path / "exp"
    run_experts(data, joint, out, FAST_EXPERTS, domains=["chart", "doc"], progress=False)  # stopped after two
    chart = load_checkpoint(out).experts["chart"].state_dict()
    logs = []
    run_experts(data, joint, out, FAST_EXPERTS, progress=False, log=logs.append)
    assert [line.split(":")[0] for line in logs if line.startswith("expert ")] == ["expert math", "expert ocr", "expert general"]
    after = load_checkpoint(out).experts["chart"].state_dict()
    assert all(torch.equal(chart[k], after[k]) for k in chart)


def test_router_and_eval_report(data, joint, experts, tmp_path):
    final = run_router(data, experts, tmp_path / "final", RouterConfig(epochs=20, batch=16, lr=2e-3), progress=False)
    meta = read_checkpoint_meta(final)
    assert meta["extra"]["stage"] == "router" and set(meta["extra"]["router"]["test"]) >= {"chart", "all"}
    rep = evaluate(data, final, progress=False)
    acc = rep["accuracy"]
    assert set(acc) >= {"joint", "oracle (true domain)", "direct", "versatile everywhere"}
    assert set(rep["tau_sweep"]) == {"0.1", "0.3", "0.5", "0.6", "0.7"}
    # our split, routed to versatile everywhere, answers exactly as transformers' own joint model does
    assert acc["versatile everywhere"]["all"] == acc["joint"]["all"]
    for d in ("chart", "doc", "math", "ocr", "general"):
        assert acc["versatile everywhere"][d] == acc["joint"][d]
    assert acc["versatile everywhere"]["to_versatile"] == 1.0 and rep["tau_sweep"]["0.7"]["to_versatile"] >= rep["tau_sweep"]["0.1"]["to_versatile"]


def test_bad_image_is_skipped_and_counted_or_strict(data, joint, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    chart = sorted((d / "images" / "chart").glob("*.png"))[0]
    chart.write_bytes(b"not a png")
    logs = []
    run_experts(d, joint, tmp_path / "e", FAST_EXPERTS, domains=["chart"], progress=False, log=logs.append)
    assert any("skipped 1 unreadable image" in line and chart.name in line for line in logs)
    with pytest.raises(MixpertError, match="not an image"):
        run_experts(d, joint, tmp_path / "e2", ExpertConfig(**{**FAST_EXPERTS.__dict__, "strict": True}),
                    domains=["chart"], progress=False)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["experts", "--data", str(tmp_path), "--joint", str(tmp_path / "j"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0


def test_sign_test_against_hand_values():
    from mixpert_train.evaluate import sign_test

    assert sign_test(0, 0) == 1.0 and sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)  # all 10 disagreements one way: 2 * 0.5**10
    assert sign_test(1, 4) == pytest.approx(2 * (1 + 5) / 32)


def test_torchrun_two_processes_equal_one(data, tmp_path):
    """Data-parallel joint SFT (2 CPU processes, gloo, loopback) takes the same steps as one process on the
    same global batch: 40 samples, batch 8, each rank 4 -> averaged gradients equal the full-batch gradient."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    run_joint(data, tmp_path / "one", JointConfig(epochs=1, batch=8), progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29561", "-m", "mixpert_train", "joint", "--data", str(data), "--out", str(tmp_path / "two"),
           "--epochs", "1", "--batch", "8", "--quiet"]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    assert json.loads((tmp_path / "two" / "mixpert_stage.json").read_text())["world_size"] == 2
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst  # same maths, different reduction order
