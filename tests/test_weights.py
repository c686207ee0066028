"""Snapshot loading, checked against transformers' own LLaVA-OV forward (the independent reference)."""

import json

import pytest
import torch

from conftest import reference_crop_features, rewrite_snapshot
from mixpert_train.errors import MixpertError
from mixpert_train.model import VERSATILE
from mixpert_train.weights import backbone_from_snapshot, model_from_snapshot


def _pixels(seed=1, size=(64, 128)):
    """Random crops for one image of `size`, as many as transformers' anyres counts for it."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from mixpert_train.backbones import get_backbone

    bb = get_backbone("tiny")
    n = image_size_to_num_patches(size, [list(p) for p in bb.grid_pinpoints], bb.crop_size)
    torch.manual_seed(seed)
    return torch.randn(1, n, 3, 64, 64), torch.tensor([list(size)])


@pytest.mark.parametrize("layout", ["new", "published"])
@pytest.mark.parametrize("k", [0, 2, 6])
def test_versatile_path_equals_transformers(reference_model, tiny_snapshot, tiny_snapshot_published, layout, k):
    snap = tiny_snapshot if layout == "new" else tiny_snapshot_published
    model = model_from_snapshot(snap, "tiny", expert_layers=k)
    pixel_values, sizes = _pixels()
    ref = reference_crop_features(reference_model, pixel_values, sizes)
    assert ref.shape == (pixel_values.shape[1], 16, 256) and ref.shape[0] == 3  # 2 grid crops + base
    with torch.no_grad():
        ours = model.experts[VERSATILE](model.trunk(pixel_values[0]))
    # fp32, same kernels: tolerance 1e-5 (issue #2)
    assert (ours - ref).abs().max().item() <= 1e-5
    for d in model.cfg.domains:  # experts start as copies of the joint weights
        for a, b in zip(model.experts[d].parameters(), model.experts[VERSATILE].parameters()):
            assert torch.equal(a, b)


def test_feature_layer_minus_two_drops_the_last_layer(tmp_path):
    """A snapshot that keeps SigLIP's 27th layer but selects hidden state -2 (as LLaVA-OV's reference code)
    must give the same split and the same features as transformers."""
    from conftest import make_reference

    ref = make_reference(seed=3, vision_feature_layer=-2)
    ref.save_pretrained(tmp_path, max_shard_size="1MB")
    bb = backbone_from_snapshot(tmp_path)
    assert bb.layers_in_use == 5 and bb.tower_layers == 6
    model = model_from_snapshot(tmp_path)
    pv, sizes = _pixels(2)
    with torch.no_grad():
        ours = model.experts[VERSATILE](model.trunk(pv[0]))
    assert (ours - reference_crop_features(ref, pv, sizes)).abs().max().item() <= 1e-5


def test_architecture_comes_from_the_snapshot(tiny_snapshot):
    bb = backbone_from_snapshot(tiny_snapshot)  # no --backbone: works from config.json alone
    assert (bb.hidden_size, bb.llm_hidden_size, bb.layers_in_use, bb.crop_size) == (192, 256, 6, 64)
    assert bb.expert_layers == 2 and bb.max_crops == 10


def test_language_model_shards_are_never_opened(tiny_snapshot, tmp_path):
    snap = rewrite_snapshot(tiny_snapshot, tmp_path / "s")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    # the vision side: tower, projector and the LLM input's row separator (image_newline, for packed embeddings)
    vision_shards = {
        v
        for k, v in index["weight_map"].items()
        if k.startswith(("vision_tower.", "multi_modal_projector.")) or k.endswith("image_newline")
    }
    lm_only = sorted(set(index["weight_map"].values()) - vision_shards)
    assert lm_only, "the fixture must have shards with language-model tensors only"
    for shard in lm_only:  # truncate every language-model-only shard: loading must not notice
        (snap / shard).write_bytes((snap / shard).read_bytes()[:10])
    model = model_from_snapshot(snap, "tiny")
    assert model is not None


def test_truncated_vision_shard_names_the_file(tiny_snapshot, tmp_path):
    snap = rewrite_snapshot(tiny_snapshot, tmp_path / "s")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["vision_tower.encoder.layers.0.self_attn.q_proj.weight"]
    data = (snap / shard).read_bytes()
    (snap / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(MixpertError, match=shard.replace(".", r"\.")) as e:
        model_from_snapshot(snap, "tiny")
    assert "\n" not in str(e.value)


def test_missing_tensor_is_named(tiny_snapshot, tmp_path):
    key = "vision_tower.encoder.layers.4.mlp.fc1.weight"
    snap = rewrite_snapshot(tiny_snapshot, tmp_path / "s", drop={key})
    with pytest.raises(MixpertError, match=r"experts\.versatile\.layers\.0\.mlp\.fc1\.weight"):
        model_from_snapshot(snap, "tiny")


def test_misshaped_tensor_is_named(tiny_snapshot, tmp_path):
    key = "multi_modal_projector.linear_2.bias"
    snap = rewrite_snapshot(tiny_snapshot, tmp_path / "s")
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shard = snap / index["weight_map"][key]
    from safetensors.torch import load_file, save_file

    t = load_file(str(shard))
    t[key] = torch.zeros(7)
    save_file(t, str(shard), metadata={"format": "pt"})
    with pytest.raises(MixpertError, match=r"multi_modal_projector\.linear_2\.bias has shape \(7,\)"):
        model_from_snapshot(snap, "tiny")


def test_not_a_llava_onevision_directory(tmp_path):
    with pytest.raises(MixpertError, match="no such directory"):
        backbone_from_snapshot(tmp_path / "nope")
    with pytest.raises(MixpertError, match="config.json: missing"):
        backbone_from_snapshot(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MixpertError, match=r"model_type 'llama' is not a supported MLLM \(supported: internvl, internvl_chat, llava_onevision, "
                                           r"qwen2_5_vl, qwen2_vl, qwen3_vl\)"):
        backbone_from_snapshot(tmp_path)


def test_snapshot_without_safetensors_is_refused(tiny_snapshot, tmp_path):
    (tmp_path / "config.json").write_text((tiny_snapshot / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MixpertError, match="no pickle"):
        model_from_snapshot(tmp_path)
