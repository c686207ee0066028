"""Checkpoint directory round trip and its refusals."""

import json

import pytest
import torch

import mixpert_train.checkpoint as ckpt
from mixpert_train.backbones import get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertConfig, build_model


@pytest.fixture
def model():
    m = build_model(MixpertConfig.for_backbone(get_backbone("tiny"), expert_layers=3, tau=0.4), seed=7)
    with torch.no_grad():  # make experts differ so a mix-up shows
        for i, e in enumerate(m.experts.values()):
            for p in e.parameters():
                p.add_(i * 0.01)
    return m


def test_round_trip(model, tmp_path):
    out = ckpt.save_checkpoint(model, tmp_path / "ck")
    back = ckpt.load_checkpoint(out)
    assert back.cfg == model.cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "mixpert.json").read_text())
    assert meta["format_version"] == 1 and meta["routing"]["tau"] == 0.4 and meta["versions"]["torch"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["mixpert.json", *ckpt.part_files(model.cfg).values()])


def test_overwrite_replaces_atomically(model, tmp_path):
    ckpt.save_checkpoint(model, tmp_path / "ck")
    ckpt.save_checkpoint(model, tmp_path / "ck")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_interrupted_save_leaves_nothing(model, tmp_path, monkeypatch):
    calls = []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    real = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_version(model, tmp_path):
    out = ckpt.save_checkpoint(model, tmp_path / "ck")
    meta = json.loads((out / "mixpert.json").read_text())
    meta["format_version"] = 99
    (out / "mixpert.json").write_text(json.dumps(meta))
    with pytest.raises(MixpertError, match="version 99"):
        ckpt.load_checkpoint(out)


def test_missing_part(model, tmp_path):
    out = ckpt.save_checkpoint(model, tmp_path / "ck")
    (out / "expert_ocr.safetensors").unlink()
    with pytest.raises(MixpertError, match="expert_ocr.safetensors: missing part"):
        ckpt.load_checkpoint(out)


def test_part_from_another_split(model, tmp_path):
    out = ckpt.save_checkpoint(model, tmp_path / "ck")
    other = build_model(MixpertConfig.for_backbone(get_backbone("tiny"), expert_layers=2))
    ckpt.save_checkpoint(other, tmp_path / "other")
    (out / "expert_doc.safetensors").write_bytes((tmp_path / "other" / "expert_doc.safetensors").read_bytes())
    with pytest.raises(MixpertError, match="does not fit expert_doc"):
        ckpt.load_checkpoint(out)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(MixpertError, match="mixpert.json: missing"):
        ckpt.load_checkpoint(tmp_path)


def test_a_checkpoint_from_before_packing_takes_image_newline_from_its_joint_snapshot(tmp_path, tiny_snapshot, reference_model):
    from mixpert_train.weights import model_from_snapshot

    m = model_from_snapshot(tiny_snapshot, "tiny")
    assert torch.equal(m.packing.image_newline, reference_model.model.image_newline.detach())
    out = ckpt.save_checkpoint(m, tmp_path / "ck", extra={"joint": str(tiny_snapshot)})
    (out / "packing.safetensors").unlink()  # what the stages wrote before packing was a part
    meta = json.loads((out / "mixpert.json").read_text())
    del meta["parts"]["packing"]
    (out / "mixpert.json").write_text(json.dumps(meta))
    back = ckpt.load_checkpoint(out)
    assert torch.equal(back.packing.image_newline, reference_model.model.image_newline.detach())
    meta["extra"] = {}
    (out / "mixpert.json").write_text(json.dumps(meta))
    with pytest.raises(MixpertError, match="no packing part") as e:
        ckpt.load_checkpoint(out)
    assert "\n" not in str(e.value)
